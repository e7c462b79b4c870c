"""
Tiny Shakespeare with GPT-2 BPE (about 338K tokens; nanoGPT's data/shakespeare), or byte level.
The first 90% of the characters train, the rest validate (nanoGPT's split).

    python data/shakespeare/prepare.py                       # input.txt here, else downloaded
    python data/shakespeare/prepare.py --input my.txt        # any local UTF-8 text, offline
    python data/shakespeare/prepare.py --tokenizer=bytes     # vocabulary 256 -> data/shakespeare_bytes
    WFC_GPT2_TIKTOKEN=/path/gpt2.tiktoken python data/shakespeare/prepare.py   # no network for tiktoken

Writes train.bin, val.bin, manifest.json and meta.pkl (data/prepare_lib.py describes them).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import prepare_lib  # noqa: E402  (first: it puts the repo root on the path)

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    args = prepare_lib.common_args(__doc__).parse_args()
    path = prepare_lib.one_text_file(args, HERE)
    text = prepare_lib.read_or_download(path, URL, binary=args.tokenizer == 'bytes')
    codec, meta = prepare_lib.make_codec(args.tokenizer, args.tiktoken)
    out_dir = args.out_dir or prepare_lib.default_out_dir(HERE, 'shakespeare', args.tokenizer, 'gpt2')
    prepare_lib.prepare_text(text, codec, meta, out_dir, args.val_fraction, args.shard_tokens,
                             source=os.path.basename(path) if not args.input else path)


if __name__ == '__main__':
    main()
