"""
Tiny Shakespeare, character level: writes train.bin / val.bin (uint16 token ids, the first 90% /
last 10% of the characters), meta.pkl (vocab_size, stoi, itos) and manifest.json next to this file.

    python data/shakespeare_char/prepare.py                    # uses input.txt here, else downloads it
    python data/shakespeare_char/prepare.py --input my.txt     # any local text file, offline
    python data/shakespeare_char/prepare.py --tokenizer=bytes  # UTF-8 bytes, vocabulary 256 -> data/shakespeare_bytes
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import prepare_lib  # noqa: E402  (first: it puts the repo root on the path)
from configurator import fail  # noqa: E402
from plumbing.tokenizer import CharCodec  # noqa: E402

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def main():
    parser = prepare_lib.common_args(__doc__, tokenizers=('char', 'bytes'))
    args = parser.parse_args()
    path = prepare_lib.one_text_file(args, HERE)
    text = prepare_lib.read_or_download(path, URL, binary=args.tokenizer == 'bytes')
    if args.tokenizer == 'char':
        chars = sorted(set(text))
        if len(chars) > 65535:
            fail(f"{len(chars)} distinct characters do not fit uint16 token ids; use --tokenizer=bytes")
        stoi = {ch: i for i, ch in enumerate(chars)}
        codec = CharCodec(stoi, dict(enumerate(chars)))
        meta = {'tokenizer': 'char', 'vocab_size': len(chars), 'itos': codec.itos, 'stoi': stoi}
    else:
        codec, meta = prepare_lib.make_codec(args.tokenizer)
    out_dir = args.out_dir or prepare_lib.default_out_dir(HERE, 'shakespeare', args.tokenizer, 'char')
    prepare_lib.prepare_text(text, codec, meta, out_dir, args.val_fraction, args.shard_tokens, source=path)


if __name__ == '__main__':
    main()
