"""
Tiny Shakespeare, character level: writes train.bin / val.bin (uint16 token ids, 90% / 10%)
and meta.pkl (vocab_size, stoi, itos) next to this file.

    python data/shakespeare_char/prepare.py                 # uses input.txt here, else downloads it
    python data/shakespeare_char/prepare.py --input my.txt  # any local text file, offline
"""

import argparse
import os
import pickle
import sys
import urllib.request

import numpy as np

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
HERE = os.path.dirname(os.path.abspath(__file__))


def get_text(path):
    if path is None:
        path = os.path.join(HERE, 'input.txt')
        if not os.path.exists(path):
            print(f"downloading {URL}")
            try:
                with urllib.request.urlopen(URL, timeout=30) as response:
                    data = response.read()
            except OSError as e:
                sys.exit(f"error: could not download the text ({e}).\n"
                         f"Offline? Put the tiny-shakespeare text at {path}, or run with --input /path/to/text.txt")
            with open(path, 'wb') as f:
                f.write(data)
    if not os.path.exists(path):
        sys.exit(f"error: --input {path}: no such file")
    with open(path, encoding='utf-8') as f:
        return f.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', help='a local UTF-8 text file (default: input.txt here, downloaded if missing)')
    parser.add_argument('--out_dir', default=HERE, help='where to write the shards and meta.pkl')
    parser.add_argument('--val_fraction', type=float, default=0.1)
    args = parser.parse_args()
    text = get_text(args.input)
    chars = sorted(set(text))
    if len(chars) > 65535:
        sys.exit(f"error: {len(chars)} distinct characters do not fit uint16 token ids")
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    n_train = int(len(ids) * (1 - args.val_fraction))
    os.makedirs(args.out_dir, exist_ok=True)
    ids[:n_train].tofile(os.path.join(args.out_dir, 'train.bin'))
    ids[n_train:].tofile(os.path.join(args.out_dir, 'val.bin'))
    with open(os.path.join(args.out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'itos': dict(enumerate(chars)), 'stoi': stoi}, f)
    print(f"{len(text):,} characters, vocabulary of {len(chars)}: train {n_train:,} tokens, "
          f"val {len(ids) - n_train:,} tokens -> {args.out_dir}")


if __name__ == '__main__':
    main()
