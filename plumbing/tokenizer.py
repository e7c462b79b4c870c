"""
Text <-> token ids. A dataset's meta (meta.pkl, also stored in every checkpoint) says which:
a character vocabulary ({'stoi', 'itos'}), raw bytes ({'tokenizer': 'bytes'}, vocabulary 256),
or GPT-2 BPE via tiktoken ({'tokenizer': 'gpt2'}, nanoGPT's default when there is no meta).

GPT-2 BPE offline: point WFC_GPT2_TIKTOKEN (or the `path` argument) at a local `gpt2.tiktoken`
ranks file (GPT-2's ranks in tiktoken's format: the file tiktoken publishes as r50k_base.tiktoken,
sha256 306cd27f...); without it tiktoken downloads (and caches) the vocabulary.

`encode` reads a prompt (the text '<|endoftext|>' is the end-of-text token); `encode_ordinary`
reads training text, where that string is just text (data/prepare_lib.py uses it).
"""

import base64
import os

GPT2_EOT = 50256


class CharCodec:
    def __init__(self, stoi, itos):
        self.stoi, self.itos = stoi, itos
        self.vocab_size, self.eos = len(stoi), None

    def encode(self, text):
        unknown = sorted({ch for ch in text if ch not in self.stoi})
        if unknown:
            raise ValueError(f"the prompt has characters outside the model's {len(self.stoi)}-character vocabulary: "
                             f"{', '.join(repr(ch) for ch in unknown)}; remove or replace them")
        return [self.stoi[ch] for ch in text]

    encode_ordinary = encode

    def decode(self, ids):
        return ''.join(self.itos[i] for i in ids)


class ByteCodec:
    """UTF-8 bytes, no tokenizer: any text in any language. 0xFF never occurs in UTF-8, so it is
    free to end a document (prepared corpora put it between documents; sampling stops on it)."""
    vocab_size, eos = 256, 0xFF

    def encode(self, text):
        return list(text.encode('utf-8'))

    encode_ordinary = encode

    def decode(self, ids):
        return bytes(ids).decode('utf-8', errors='replace')


class TiktokenCodec:
    def __init__(self, encoding):
        self.encoding, self.vocab_size, self.eos = encoding, encoding.n_vocab, encoding.eot_token

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={'<|endoftext|>'})

    def encode_ordinary(self, text):
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        return self.encoding.decode(ids)


def gpt2_encoding(path=None):
    """tiktoken's GPT-2 encoding, from a local ranks file when one is given (argument or the
    WFC_GPT2_TIKTOKEN environment variable), else tiktoken's own (downloaded once, cached).
    The end-of-text token follows the ranks (50256 for GPT-2's 50256 ranks), so a small ranks
    file in the same format (tests) gives a small, consistent vocabulary."""
    import tiktoken
    path = path or os.environ.get('WFC_GPT2_TIKTOKEN')
    if not path:
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:
            raise RuntimeError(f"could not load tiktoken's GPT-2 vocabulary ({type(e).__name__}: {e}). Offline? "
                               f"Set WFC_GPT2_TIKTOKEN=/path/to/gpt2.tiktoken (a local copy of the ranks file)") from None
    from tiktoken_ext.openai_public import r50k_pat_str
    if not os.path.exists(path):
        raise RuntimeError(f"no GPT-2 ranks file at {path} (from --tiktoken or WFC_GPT2_TIKTOKEN)")
    try:
        with open(path, 'rb') as f:  # tiktoken's format, read here: its loader would cache a copy keyed by the path
            ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in (line.split() for line in f if line.strip())}
    except (OSError, ValueError) as e:  # a folder, an unreadable file, a line that is not 'base64-token rank'
        raise RuntimeError(f"{path} is not a GPT-2 ranks file in tiktoken's format (lines 'base64-token rank'): "
                           f"{type(e).__name__}: {e}") from None
    if not ranks:
        raise RuntimeError(f"{path} is not a GPT-2 ranks file in tiktoken's format: it holds no ranks")
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': max(ranks.values()) + 1})


def codec_for(meta, tiktoken_path=None):
    """The codec a dataset meta describes (None: GPT-2 BPE, as nanoGPT assumes). tiktoken_path:
    a local GPT-2 ranks file (else WFC_GPT2_TIKTOKEN, else tiktoken's download)."""
    kind = (meta or {}).get('tokenizer', 'char' if meta and 'stoi' in meta else 'gpt2')
    if kind == 'char':
        return CharCodec(meta['stoi'], meta['itos'])
    if kind == 'bytes':
        return ByteCodec()
    if kind == 'gpt2':
        return TiktokenCodec(gpt2_encoding(tiktoken_path))
    raise ValueError(f"unknown tokenizer {kind!r} in the dataset meta (expected 'char', 'bytes' or 'gpt2')")
