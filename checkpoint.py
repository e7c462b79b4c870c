"""
Checkpoints: written atomically, read safely, turned back into models. Reads nanoGPT's
checkpoints too (`ckpt.pt` with 'model' and 'model_args'): GPT mode has nanoGPT's parameter names.
"""

import os
import pickle
import tempfile

import torch

from model import GPT, GPTConfig

FORMAT_VERSION = 1
# fields that change parameter shapes: a checkpoint cannot be resumed into a model that differs in these
SHAPE_FIELDS = ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size', 'bias', 'pos_emb', 'n_future')


class CheckpointError(RuntimeError):
    pass


def save(payload, path):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at
    any moment leaves either the old checkpoint or the new one, never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.pt')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def resolve_path(path):
    """A checkpoint file, or a run folder holding ckpt.pt."""
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path


def load(path):
    """The checkpoint dict, on the CPU, read with weights_only=True (no code runs on load)."""
    path = resolve_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py <config>) "
                              f"or point out_dir / the path at an existing run")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        raise CheckpointError(f"{path} is not a WFC-GPT or nanoGPT checkpoint: expected a dict with 'model' and "
                              f"'model_args', found {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}")
    if ckpt.get('format_version', FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}; this code reads up to "
                              f"{FORMAT_VERSION}: update the repo")
    return ckpt


def clean_state_dict(state_dict):
    """Strip torch.compile's '_orig_mod.' and DDP's 'module.' prefixes; drop nanoGPT's causal-mask
    buffers ('.attn.bias', present when it ran without flash attention)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ('_orig_mod.', 'module.'):
            while key.startswith(prefix):
                key = key[len(prefix):]
        if not key.endswith('.attn.bias'):
            out[key] = value
    return out


def model_args(ckpt):
    """GPTConfig keyword arguments of a checkpoint (nanoGPT's are a subset: the rest default to
    nanoGPT's architecture)."""
    known = GPTConfig.__dataclass_fields__
    unknown = sorted(set(ckpt['model_args']) - set(known))
    if unknown:
        raise CheckpointError(f"checkpoint model_args has fields this code does not know: {unknown}")
    return dict(ckpt['model_args'])


def build_model(ckpt, **overrides):
    """A GPT with the checkpoint's weights; overrides change inference knobs (max_loop, tol, ...)."""
    model = GPT(GPTConfig(**{**model_args(ckpt), **overrides}))
    state = clean_state_dict(ckpt['model'])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_model(path, device='cpu', **overrides):
    """(model in eval mode on device, checkpoint dict without the weights and optimizer)."""
    ckpt = load(path)
    model = build_model(ckpt, **overrides).to(device).eval()
    ckpt.pop('model'), ckpt.pop('optimizer', None)  # free what is loaded
    return model, ckpt


def compare_args(saved, wanted):
    """Differences between a checkpoint's model_args and a run's: (shape fields, other fields)."""
    keys = sorted(set(saved) | set(wanted))
    diff = [k for k in keys if saved.get(k, GPTConfig.__dataclass_fields__[k].default) != wanted.get(k)]
    return [k for k in diff if k in SHAPE_FIELDS], [k for k in diff if k not in SHAPE_FIELDS]
