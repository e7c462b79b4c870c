"""
FineWeb-Edu, the 10B-token sample (HuggingFaceFW/fineweb-edu, 'sample-10BT'): educational web
pages picked out of Common Crawl by a classifier, the modern choice for a GPT-2-sized run
(Karpathy's build-nanogpt trains GPT-2 124M on this sample). GPT-2 BPE, 0.5% of the documents
held out (about 50M tokens). The shards take about 20 GB (2 bytes per token), plus the Hugging Face cache.

    python data/fineweb_edu/prepare.py                          # download + tokenize
    python data/fineweb_edu/prepare.py --hf_config=sample-100BT # the larger sample
    python data/fineweb_edu/prepare.py --tokenizer=bytes        # byte level -> data/fineweb_edu_bytes
    python data/fineweb_edu/prepare.py --input pages.jsonl      # your own documents, offline

Writes train_000.bin, ... (100M tokens each), val.bin, manifest.json and meta.pkl here
(data/prepare_lib.py describes them).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_lib import corpus_main  # noqa: E402

if __name__ == '__main__':
    corpus_main(__doc__, 'fineweb_edu', hf_dataset='HuggingFaceFW/fineweb-edu', hf_config='sample-10BT',
                val_fraction=0.005)
