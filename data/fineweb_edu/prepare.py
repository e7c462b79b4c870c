"""
FineWeb-Edu, the 10B-token sample (HuggingFaceFW/fineweb-edu, 'sample-10BT'): educational web
pages filtered from Common Crawl, the modern choice for a GPT-2-sized run (it reaches a given
HellaSwag score with far fewer tokens than OpenWebText). GPT-2 BPE, 0.5% of the documents held out
(about 50M tokens). Needs about 30 GB of Hugging Face cache and 20 GB for the shards.

    python data/fineweb_edu/prepare.py                          # download + tokenize
    python data/fineweb_edu/prepare.py --hf_config=sample-100BT # the larger sample
    python data/fineweb_edu/prepare.py --tokenizer=bytes        # byte level -> data/fineweb_edu_bytes
    python data/fineweb_edu/prepare.py --input pages.jsonl      # your own documents, offline

Writes train_000.bin, ... (100M tokens each), val_000.bin, ..., manifest.json and meta.pkl here
(data/prepare_lib.py describes them).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_lib import corpus_main  # noqa: E402

if __name__ == '__main__':
    corpus_main(__doc__, 'fineweb_edu', hf_dataset='HuggingFaceFW/fineweb-edu', hf_config='sample-10BT',
                val_fraction=0.005)
