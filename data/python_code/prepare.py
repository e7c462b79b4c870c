"""
Source code at byte level: the Python files under a folder (by default this Python's own standard
library: offline, on every machine, under the PSF license), split into train and val by file, not
by offset, so no val file shares text with a train file. Writes shards, meta.pkl and manifest.json
next to this file (data/prepare_lib.py describes them); bits per byte is the loss in nats / ln 2.

    python data/python_code/prepare.py                           # the standard library, bytes (vocabulary 256)
    python data/python_code/prepare.py --root=path/to/project    # any folder of .py files
    python data/python_code/prepare.py --tokenizer=gpt2          # GPT-2 BPE instead -> data/python_code_gpt2
"""

import os
import random
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import prepare_lib  # noqa: E402  (first: it puts the repo root on the path)
from configurator import fail  # noqa: E402

SKIP = {'site-packages', 'test', 'tests', 'idlelib', 'lib2to3', '__pycache__'}  # installed packages and test suites


def python_files(root):
    """Every .py file under root (relative paths, sorted), skipping the folders in SKIP."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files) if f.endswith('.py')]
    return found


def main():
    parser = prepare_lib.common_args(__doc__, tokenizers=('bytes', 'gpt2'))
    parser.add_argument('--root', default=sysconfig.get_paths()['stdlib'], help='the folder of .py files (default: the stdlib)')
    parser.set_defaults(val_fraction=0.05)
    args = parser.parse_args()
    if args.input:
        fail("--input does not apply here: give a folder of .py files with --root")
    if not os.path.isdir(args.root):
        fail(f"--root {args.root}: no such folder")
    files = python_files(args.root)
    if len(files) < 2:
        fail(f"{args.root} holds {len(files)} .py files; a train/val split needs at least 2")
    random.Random(2357).shuffle(files)  # the split by file, the same on every machine for the same folder
    n_val = max(1, round(len(files) * args.val_fraction))
    codec, meta = prepare_lib.make_codec(args.tokenizer, args.tiktoken)
    out_dir = args.out_dir or prepare_lib.default_out_dir(HERE, 'python_code', args.tokenizer, 'bytes')
    os.makedirs(out_dir, exist_ok=True)
    writers = {}
    for split, names in (('val', files[:n_val]), ('train', files[n_val:])):
        texts = []
        for name in sorted(names):
            with open(os.path.join(args.root, name), encoding='utf-8', errors='replace') as f:
                texts.append(f.read())
        ids = [prepare_lib.encode_array(codec, text) for text in texts]  # each file ends with the end-of-text token
        writers[split] = prepare_lib.ShardWriter(out_dir, split, args.shard_tokens, sum(len(x) for x in ids))
        for x in ids:
            writers[split].write(x)
    return prepare_lib.commit(out_dir, writers, codec, meta, {'train': len(files) - n_val, 'val': n_val},
                              source=f"{args.root} ({len(files)} .py files)")


if __name__ == '__main__':
    main()
