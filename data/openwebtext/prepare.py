"""
OpenWebText (GPT-2's WebText, recreated: about 8M documents, 9B GPT-2 tokens), as nanoGPT trains
on it: GPT-2 BPE, 0.05% of the documents held out for validation. Needs about 55 GB for the
Hugging Face cache (nanoGPT's figure) and 18 GB for the shards.

    python data/openwebtext/prepare.py                        # download + tokenize (--num_proc=8)
    python data/openwebtext/prepare.py --tokenizer=bytes      # byte level -> data/openwebtext_bytes
    python data/openwebtext/prepare.py --input my.jsonl       # your own documents, offline ('text' field)
    WFC_GPT2_TIKTOKEN=/path/gpt2.tiktoken python data/openwebtext/prepare.py --input a.txt b.txt

Writes train_000.bin, ... (100M tokens each), val.bin, manifest.json and meta.pkl here
(data/prepare_lib.py describes them).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_lib import corpus_main  # noqa: E402

if __name__ == '__main__':
    corpus_main(__doc__, 'openwebtext', hf_dataset='Skylion007/openwebtext', val_fraction=0.0005)
