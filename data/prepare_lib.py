"""
What every data/<corpus>/prepare.py shares: text -> token ids -> uint16 shards + manifest.json +
meta.pkl. The scripts only name their corpus and defaults.

A prepared folder holds
    train.bin, val.bin                  when a split fits in one shard (nanoGPT's names), else
    train_000.bin, train_001.bin, ...   shards of exactly --shard_tokens tokens (the last one shorter)
    manifest.json   tokenizer, vocab_size, eot, max_token, the command that made it, and per split
                    its token and document counts and per shard its file, tokens and sha256;
                    dataloader.TokenShards checks it every time a split is opened
    meta.pkl        {'tokenizer', 'vocab_size'} for train.py and sample.py (tokenizer.codec_for);
                    vocab_size is the model's: GPT-2's 50257 padded to 50304, a multiple of 64

Tokenizers: 'gpt2' (tiktoken's GPT-2 BPE; documents end with <|endoftext|>; offline with
--tiktoken or WFC_GPT2_TIKTOKEN), 'bytes' (UTF-8 bytes, vocabulary 256, no tokenizer at all: any
file in any language; documents end with 0xFF, a byte UTF-8 never uses), 'char' (shakespeare_char).

Shards are written as *.tmp files and renamed into place only when every split is complete, so an
interrupted run leaves the previous preparation intact.
"""

import argparse
import glob
import hashlib
import json
import os
import pickle
import shlex
import sys
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from configurator import ArgumentParser, fail  # noqa: E402
from plumbing.dataloader import MANIFEST, vocabulary_sha256  # noqa: E402
from plumbing.tokenizer import ByteCodec, codec_for  # noqa: E402


BUILDERS = {'.txt': 'text', '.jsonl': 'json', '.json': 'json', '.parquet': 'parquet'}  # --input kinds -> datasets builders


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def common_args(description, tokenizers=('gpt2', 'bytes')):
    """The options every prepare script takes."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', nargs='+', help='local files instead of the download (works offline)')
    parser.add_argument('--tokenizer', choices=tokenizers, default=tokenizers[0],
                        help="'gpt2' (GPT-2 BPE via tiktoken) or 'bytes' (UTF-8 bytes, vocabulary 256)")
    parser.add_argument('--tiktoken', help='a local gpt2.tiktoken ranks file (default: $WFC_GPT2_TIKTOKEN, '
                                           "else tiktoken's download)")
    parser.add_argument('--out_dir', help='where to write (default: this folder, or data/<corpus>_<tokenizer> '
                                          'for a non-default tokenizer)')
    parser.add_argument('--val_fraction', type=fraction, default=0.1, help='share of the data held out for validation')
    parser.add_argument('--shard_tokens', type=positive, default=100_000_000, help='tokens per shard file (2 bytes each)')
    return parser


def corpus_args(parser, hf_dataset, hf_config=None):
    """The extra options of a document corpus prepared with Hugging Face `datasets`."""
    parser.add_argument('--hf_dataset', default=hf_dataset, help='a Hugging Face dataset name')
    parser.add_argument('--hf_config', default=hf_config, help='its configuration (subset), if any')
    parser.add_argument('--text_field', default='text', help='the column (JSONL key) holding the text')
    parser.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help='processes for download and tokenization')
    parser.add_argument('--cache_dir', help="Hugging Face datasets cache (default: theirs, ~/.cache/huggingface)")
    return parser


def default_out_dir(here, corpus, tokenizer, native):
    """The script's own folder for its native tokenizer, else a sibling data/<corpus>_<tokenizer>."""
    return here if tokenizer == native else os.path.join(os.path.dirname(here), f'{corpus}_{tokenizer}')


def make_codec(tokenizer, tiktoken_path=None):
    """(codec, meta) for 'gpt2' or 'bytes'. meta['vocab_size'] is the model's vocabulary: the
    tokenizer's rounded up to a multiple of 64 (GPT-2: 50257 -> 50304, nanoGPT's padding)."""
    try:
        codec = codec_for({'tokenizer': tokenizer}, tiktoken_path)
    except (ValueError, RuntimeError) as e:  # a missing or corrupt local ranks file, or no network for tiktoken
        fail(e)
    if codec.vocab_size > 1 << 16:
        fail(f"a vocabulary of {codec.vocab_size} does not fit uint16 shards")
    return codec, {'tokenizer': tokenizer, 'vocab_size': -(-codec.vocab_size // 64) * 64}


def encode_array(codec, text, end=True, encoding='utf-8'):
    """Text (or bytes, read as they are) -> uint16 token ids (+ the end-of-text token when end and
    the codec has one). encoding: how the byte codec turns a str back into the file's bytes."""
    if isinstance(codec, ByteCodec):  # no tokenizer: the bytes themselves, without a Python list
        data = text if isinstance(text, bytes) else text.encode(encoding)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    else:
        ids = np.asarray(codec.encode_ordinary(text), dtype=np.uint16)
    return np.append(ids, np.uint16(codec.eos)) if end and codec.eos is not None else ids


def one_text_file(args, here):
    """The one text file a single-text corpus reads: --input, or input.txt beside its prepare.py
    (downloaded there when missing, see read_or_download)."""
    if args.input and len(args.input) > 1:
        fail("--input takes one text file here (data/openwebtext/prepare.py takes many)")
    path = args.input[0] if args.input else os.path.join(here, 'input.txt')
    if args.input and not os.path.exists(path):
        fail(f"--input {path}: no such file")
    return path


def read_or_download(path, url, binary=False):
    """The text at path (binary: its bytes, for the byte tokenizer), downloaded from url first when missing."""
    if os.path.isdir(path):
        fail(f"{path} is a folder; give a text file")
    if not os.path.exists(path):
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
        except OSError as e:
            fail(f"could not download the text ({e}). Offline? Put it at {path}, or run with --input /path/to/text.txt")
        with open(path, 'wb') as f:
            f.write(data)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    return data if binary else utf8_text(data, path)


def utf8_text(data, path):
    """data decoded as UTF-8, or a one-line refusal saying where it is not text."""
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}; a binary file?); "
             f"--tokenizer=bytes reads any file as bytes")


class ShardWriter:
    """One split's token ids -> {split}_000.bin, {split}_001.bin, ... of exactly shard_tokens
    tokens (the last one shorter), written as .tmp files and hashed on the way."""

    def __init__(self, out_dir, split, shard_tokens, total):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.width = max(3, len(str(max(total - 1, 0) // shard_tokens)))  # names sort in order
        self.shards, self.file, self.max_token = [], None, -1

    def write(self, ids):
        if len(ids):
            self.max_token = max(self.max_token, int(ids.max()))
        while len(ids):
            if self.file is None:
                name = f'{self.split}_{len(self.shards):0{self.width}d}.bin'
                self.file, self.digest, self.count = open(os.path.join(self.out_dir, name + '.tmp'), 'wb'), hashlib.sha256(), 0
                self.shards.append(dict(file=name, tokens=0, sha256=''))
            part, ids = ids[:self.shard_tokens - self.count], ids[self.shard_tokens - self.count:]
            data = part.astype('<u2').tobytes()
            self.file.write(data)
            self.digest.update(data)
            self.count += len(part)
            if self.count == self.shard_tokens:
                self._close()

    def _close(self):
        self.file.close()
        self.shards[-1].update(tokens=self.count, sha256=self.digest.hexdigest())
        self.file = None

    def finish(self):
        """Close the last shard; returns [(tmp path, final name)] (one shard is named {split}.bin)."""
        if self.file is not None:
            self._close()
        if not self.shards:
            fail(f"the '{self.split}' split is empty; use more text or another --val_fraction")
        moves = [(os.path.join(self.out_dir, s['file'] + '.tmp'), s['file']) for s in self.shards]
        if len(self.shards) == 1:
            self.shards[0]['file'] = f'{self.split}.bin'
            moves = [(moves[0][0], self.shards[0]['file'])]
        return moves


def commit(out_dir, writers, codec, meta, documents, source):
    """Put the finished shards in place of any earlier preparation, then write meta.pkl and
    manifest.json (last, atomically)."""
    moves = [move for writer in writers.values() for move in writer.finish()]
    for split in writers:  # leftovers of an earlier preparation would be read as data
        for old in glob.glob(os.path.join(out_dir, f'{split}.bin')) + glob.glob(os.path.join(out_dir, f'{split}_*.bin')):
            os.remove(old)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))
    for tmp, name in moves:
        os.replace(tmp, os.path.join(out_dir, name))
    with open(os.path.join(out_dir, 'meta.pkl'), 'wb') as f:
        pickle.dump(meta, f)
    manifest = dict(
        format='flat little-endian uint16 token ids', tokenizer=meta['tokenizer'], vocab_size=codec.vocab_size,
        model_vocab_size=meta['vocab_size'], vocabulary_sha256=vocabulary_sha256(meta), eot=codec.eos,
        max_token=max(writer.max_token for writer in writers.values()), source=source,
        command=shlex.join(['python', os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else 'prepare.py', *sys.argv[1:]]),
        splits={split: dict(tokens=sum(s['tokens'] for s in writer.shards), documents=documents.get(split),
                            shards=writer.shards) for split, writer in writers.items()})
    tmp = os.path.join(out_dir, MANIFEST + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    counts = ', '.join(f"{split} {info['tokens']:,} tokens in {len(info['shards'])} shard(s)"
                       for split, info in manifest['splits'].items())
    print(f"{meta['tokenizer']}, vocabulary {codec.vocab_size}: {counts} -> {out_dir}")
    return manifest


def prepare_text(text, codec, meta, out_dir, val_fraction, shard_tokens, source):
    """One text (a book, a single file): its first 1 - val_fraction of characters train, the
    rest validate (nanoGPT's Shakespeare split), each tokenized whole, no end-of-text token."""
    n_train = int(len(text) * (1 - val_fraction))
    os.makedirs(out_dir, exist_ok=True)
    writers = {}
    for split, part in (('train', text[:n_train]), ('val', text[n_train:])):
        ids = encode_array(codec, part, end=False)
        writers[split] = ShardWriter(out_dir, split, shard_tokens, len(ids))
        writers[split].write(ids)
    print(f"{len(text):,} {'bytes' if isinstance(text, bytes) else 'characters'}")
    return commit(out_dir, writers, codec, meta, {'train': None, 'val': None}, source)


class Tokenize:
    """datasets.map function (batched, picklable for num_proc): a batch of documents -> token ids."""

    def __init__(self, codec, text_field, encoding='utf-8'):
        self.codec, self.text_field, self.encoding = codec, text_field, encoding

    def __call__(self, batch):
        ids = [encode_array(self.codec, text, encoding=self.encoding) for text in batch[self.text_field]]
        return {'ids': ids, 'tokens': [len(x) for x in ids]}


def load_documents(args):
    """A datasets.Dataset of documents: the --input files (.txt: one document per file; .jsonl /
    .json: one per line, the text under --text_field; .parquet), else the Hugging Face dataset."""
    import datasets
    if args.input:
        kinds = {BUILDERS.get(os.path.splitext(path)[1].lower()) for path in args.input}
        missing = [path for path in args.input if not os.path.isfile(path)]
        if missing or None in kinds or len(kinds) > 1:
            fail(f"--input takes existing files of one kind ({', '.join(BUILDERS)}); got {args.input}")
        builder = kinds.pop()
        options = dict(sample_by='document') if builder == 'text' else {}
        if builder == 'text' and args.tokenizer == 'bytes':  # any file: latin-1 maps byte k to character k, and back
            options['encoding'] = 'latin-1'
        elif builder == 'text':
            for path in args.input:
                with open(path, 'rb') as f:
                    utf8_text(f.read(), path)
        return datasets.load_dataset(builder, data_files=[os.path.abspath(p) for p in args.input], split='train',
                                     cache_dir=args.cache_dir, **options)
    where = dict(name=args.hf_config, split='train', num_proc=args.num_proc, cache_dir=args.cache_dir)
    try:
        return datasets.load_dataset(args.hf_dataset, **where)
    except RuntimeError as e:
        if 'scripts are no longer supported' not in str(e):
            raise
        # the hub copy still has a loading script (OpenWebText did in 2025), which datasets >= 4
        # refuses; the Hub's own Parquet conversion of it loads without one
        print(f"{args.hf_dataset} has a loading script; using its Parquet conversion (refs/convert/parquet)")
        return datasets.load_dataset(args.hf_dataset, revision='refs/convert/parquet', **where)


def prepare_documents(args, codec, meta, out_dir, source):
    """A corpus of documents: a random val_fraction of the documents to val (as nanoGPT splits
    OpenWebText), every document tokenized in num_proc processes and followed by the end-of-text
    token, the splits streamed into shards. A single document falls back to prepare_text."""
    import datasets
    import pyarrow.compute as pc
    from tqdm import tqdm
    docs = load_documents(args)
    if args.text_field not in docs.column_names:
        fail(f"the documents have no '{args.text_field}' field (they have {docs.column_names}); "
                 f"use --text_field")
    encoding = 'latin-1' if args.input and args.tokenizer == 'bytes' and docs.info.builder_name == 'text' else 'utf-8'
    if len(docs) < 2:
        text = docs[0][args.text_field] if len(docs) else ''
        return prepare_text(text.encode('latin-1') if encoding == 'latin-1' else text, codec, meta, out_dir,
                            args.val_fraction, args.shard_tokens, source)
    splits = docs.train_test_split(test_size=args.val_fraction, seed=2357, shuffle=True)
    splits = {'train': splits['train'], 'val': splits['test']}
    features = datasets.Features({'ids': datasets.Sequence(datasets.Value('uint16')), 'tokens': datasets.Value('int64')})
    os.makedirs(out_dir, exist_ok=True)
    writers = {}
    for split, part in splits.items():
        tokenized = part.map(Tokenize(codec, args.text_field, encoding), batched=True, remove_columns=part.column_names,
                             features=features, num_proc=min(args.num_proc, len(part)), desc=f'tokenizing {split}')
        total = int(pc.sum(tokenized.with_format('arrow')['tokens']).as_py())
        writers[split] = writer = ShardWriter(out_dir, split, args.shard_tokens, total)
        with tqdm(total=total, unit='tok', unit_scale=True, desc=f'writing {split}') as bar:
            for table in tokenized.with_format('arrow').iter(batch_size=4096):
                ids = pc.list_flatten(table['ids']).to_numpy()
                writer.write(ids)
                bar.update(len(ids))
    return commit(out_dir, writers, codec, meta, {split: len(part) for split, part in splits.items()}, source)


def corpus_main(doc, corpus, hf_dataset, hf_config=None, val_fraction=0.0005):
    """The whole command line of a document corpus script (openwebtext, fineweb_edu)."""
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    parser = corpus_args(common_args(doc), hf_dataset, hf_config)
    parser.set_defaults(val_fraction=val_fraction)
    args = parser.parse_args()
    codec, meta = make_codec(args.tokenizer, args.tiktoken)
    out_dir = args.out_dir or default_out_dir(here, corpus, args.tokenizer, 'gpt2')
    source = args.input or f"{args.hf_dataset}" + (f" ({args.hf_config})" if args.hf_config else '')
    return prepare_documents(args, codec, meta, out_dir, source)
