"""
Token shards on disk -> batches. A split is every `{split}.bin` / `{split}_*.bin` file in the
dataset folder: flat uint16 token ids (nanoGPT's format), memory-mapped, validated when opened.

A prepared folder may also hold manifest.json (data/prepare_lib.py writes it): the tokenizer, the
vocabulary, and per split the shard files with their token counts and sha256. When it is there,
opening a split checks that the files on disk are exactly the listed ones, of the listed sizes and
checksums, and fails with an error naming the shard otherwise (hashing reads about 1 GB/s).

Batches are a pure function of a seed: `batch(seed)` draws the same rows every time, so the
trainer derives each micro-step's seed from (run seed, iteration, micro-step) and the data order
survives a resume or a change of DDP world size without any loader state to save.
"""

import glob
import hashlib
import json
import os
import pickle

import numpy as np
import torch

from configurator import UserError


MANIFEST = 'manifest.json'


class DataError(UserError, ValueError):
    pass


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, above plumbing/


def data_dir(dataset):
    """The folder of a dataset setting: a name under the repo's data/ (e.g. 'shakespeare_char'), or a
    path to a folder (anything with a path separator)."""
    return dataset if os.sep in dataset else os.path.join(REPO, 'data', dataset)


def split_files(data_dir, split):
    files = sorted(glob.glob(os.path.join(data_dir, f'{split}.bin')) + glob.glob(os.path.join(data_dir, f'{split}_*.bin')))
    if not files:
        raise DataError(f"no '{split}' shards in {data_dir} (expected {split}.bin or {split}_000.bin, ...). "
                        f"Prepare the dataset first, e.g. python data/shakespeare_char/prepare.py")
    return files


def read_manifest(data_dir):
    """manifest.json as a dict, or None when the folder has none (nanoGPT-style folders)."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); re-run the dataset's prepare.py") from None


def sha256_of(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_split(data_dir, split, files, manifest, checksums=True):
    """Check a split's shard files against the manifest: the same set of files, the recorded
    token counts and (checksums=True) the recorded sha256. Raises DataError naming the shard."""
    redo = f"re-run the preparation ({manifest.get('command') or 'the dataset prepare.py'})"
    listed = manifest.get('splits', {}).get(split)
    if listed is None:
        raise DataError(f"{os.path.join(data_dir, MANIFEST)} has no '{split}' split; {redo}")
    recorded = {shard['file']: shard for shard in listed['shards']}
    for path in files:
        if os.path.basename(path) not in recorded:
            raise DataError(f"{path} is not listed in {MANIFEST} (a leftover from another preparation?): "
                            f"remove it or {redo}")
    for name, shard in recorded.items():
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise DataError(f"{path} is missing: {MANIFEST} lists it with {shard['tokens']:,} tokens; {redo}")
        tokens = os.path.getsize(path) / 2
        if tokens != shard['tokens']:
            raise DataError(f"{path} holds {tokens:,g} tokens but {MANIFEST} records {shard['tokens']:,} "
                            f"(truncated or overwritten?); {redo}")
        if checksums and sha256_of(path) != shard['sha256']:
            raise DataError(f"{path} fails its checksum: its sha256 differs from the one in {MANIFEST} "
                            f"({shard['sha256'][:16]}...), so the shard is corrupt or was changed after "
                            f"preparation; {redo}")


def read_meta(data_dir):
    """meta.pkl (char vocabularies: vocab_size, stoi, itos) or None when the folder has none."""
    path = os.path.join(data_dir, 'meta.pkl')
    if not os.path.exists(path):
        return None
    try:
        with open(path, 'rb') as f:
            meta = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise DataError(f"{path} is not a readable meta.pkl ({type(e).__name__}: {e}); re-run the dataset's prepare.py") from None
    stoi = meta.get('stoi') if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or (stoi and max(stoi.values()) >= meta.get('vocab_size', len(stoi))):
        raise DataError(f"{path} does not describe a vocabulary: expected a dict whose vocab_size exceeds every "
                        f"character id in stoi; re-run the dataset's prepare.py")
    manifest = read_manifest(data_dir)
    if manifest is not None and not all(m is None or m == v for v, m in zip(meta_fingerprint(meta), manifest_fingerprint(manifest))):
        raise DataError(f"{path} does not belong to the shards in {data_dir}: its vocabulary "
                        f"{meta_fingerprint(meta)} differs from the one manifest.json records "
                        f"{manifest_fingerprint(manifest)} (a meta.pkl copied from another dataset?); re-run the preparation "
                        f"({manifest.get('command') or 'the dataset prepare.py'})")
    return meta


def vocabulary_sha256(meta):
    """A character vocabulary's identity: the sha256 of its characters in id order (None for other tokenizers)."""
    itos = meta.get('itos')
    return hashlib.sha256(''.join(itos[i] for i in range(len(itos))).encode('utf-8')).hexdigest()[:16] if itos else None


def meta_fingerprint(meta):
    return (meta.get('tokenizer', 'char' if 'stoi' in meta else 'gpt2'), meta.get('vocab_size'), vocabulary_sha256(meta))


def manifest_fingerprint(manifest):
    """What a manifest records of the vocabulary (fields it lacks, from older preparations, match anything)."""
    return (manifest.get('tokenizer'), manifest.get('model_vocab_size'), manifest.get('vocabulary_sha256'))


class TokenShards:
    """The shards of one split, checked: even byte length, the manifest when there is one (see
    above; verify=False skips the checksums), at least one shard with block_size + 1 tokens
    (shorter ones, e.g. a split's short last shard, hold no window and are skipped), and (when
    vocab_size is given) every token id < vocab_size."""

    def __init__(self, data_dir, split, block_size, vocab_size=None, verify=True):
        self.files, self.block_size = split_files(data_dir, split), block_size
        self.manifest = read_manifest(data_dir)
        if self.manifest is not None:
            verify_split(data_dir, split, self.files, self.manifest, checksums=verify)
        used, self.shards = [], []
        for path in self.files:
            size = os.path.getsize(path)
            if size % 2:
                raise DataError(f"{path} has {size} bytes, an odd number: not a uint16 token shard "
                                f"(truncated copy?). Re-run the dataset's prepare.py")
            if size // 2 >= block_size + 1:
                used.append(path)
                self.shards.append(np.memmap(path, dtype=np.uint16, mode='r'))
        if not self.shards:
            longest = max(os.path.getsize(path) // 2 for path in self.files)
            raise DataError(f"the '{split}' shards in {data_dir} hold at most {longest} tokens each, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a smaller --block_size or more text")
        self.files = used
        if vocab_size is not None:
            self.check_vocab(vocab_size)
        starts = torch.tensor([len(s) - block_size for s in self.shards])  # valid window starts per shard
        self.offsets = torch.cumsum(starts, 0)
        self.n_tokens = sum(len(s) for s in self.shards)

    def check_vocab(self, vocab_size):
        recorded = (self.manifest or {}).get('max_token')
        for path, shard in zip(self.files, self.shards):
            top = recorded if recorded is not None else max(int(shard[i:i + (1 << 24)].max()) for i in range(0, len(shard), 1 << 24))
            if top >= vocab_size:
                raise DataError(f"{path} holds token id {top} but the vocabulary has {vocab_size} tokens: "
                                f"the shards and meta.pkl / vocab_size come from different preparations")

    def batch(self, batch_size, seed, device='cpu'):
        """(x, y) int64 (batch_size, block_size): random windows, y = x shifted by one."""
        g = torch.Generator().manual_seed(seed)
        picks = torch.randint(int(self.offsets[-1]), (batch_size,), generator=g)
        shard_ids = torch.searchsorted(self.offsets, picks, right=True)
        rows = []
        for shard_id, pick in zip(shard_ids.tolist(), picks.tolist()):
            start = pick - (int(self.offsets[shard_id - 1]) if shard_id else 0)
            rows.append(torch.from_numpy(self.shards[shard_id][start:start + self.block_size + 1].astype(np.int64)))
        xy = torch.stack(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if str(device).startswith('cuda'):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def step_seed(seed, iteration, micro):
    """The seed of one micro-step: distinct for every (run seed, iteration, global micro-step)."""
    return hash((seed, iteration, micro)) & 0x7FFF_FFFF_FFFF_FFFF  # int tuples hash the same in every process
