"""
Checkpoints: written atomically, read safely, turned back into models. Reads nanoGPT's
checkpoints too (`ckpt.pt` with 'model' and 'model_args'): GPT mode has nanoGPT's parameter names.

A run folder (train.py's out_dir) holds:
  ckpt.pt          the resume point: model, optimizer, grad scaler, iteration, best val loss, every
                   RNG state, the data position, the resolved config and the format version
  best.pt          the weights with the best val loss so far (no optimizer): a worse evaluation
                   later never replaces it
  ckpt-<iter>.pt   the newest keep_last copies of ckpt.pt (keep_last = 0: none)
  train.lock       held (flock) by the training process that writes the folder: one run per folder
Every file holds only tensors and plain Python data, so torch.load(weights_only=True) reads it.
"""

import fcntl
import glob
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import asdict, fields

import numpy as np
import torch

from configurator import UserError
from model import GPT, GPTConfig
from modeling.recipe import Recipe
from modeling.solver import Solver
from plumbing.dataloader import vocabulary_sha256

FORMAT_VERSION = 2  # 2: model_args is the architecture only, with 'recipe' and 'solver' beside it
TEMP_PREFIX = '.tmp-'  # save() writes here first; a leftover one is a save that was killed
# fields that change parameter shapes: a checkpoint cannot be resumed into a model that differs in these
SHAPE_FIELDS = ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size', 'bias', 'pos_emb', 'n_future')


class CheckpointError(UserError, RuntimeError):
    pass


def _write_atomically(path, write):
    """write(file) into a temporary file in path's folder, fsync, rename over path, fsync the
    folder: a crash at any moment leaves either the old file or the new one, never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix='.pt')
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() gives, not mkstemp's private 0600
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself survive a power loss (POSIX)
        folder_fd = os.open(folder, os.O_DIRECTORY)
        os.fsync(folder_fd)
        os.close(folder_fd)


LOCK_NAME = 'train.lock'


def lock_run(out_dir):
    """Hold an exclusive lock on out_dir/train.lock for as long as the returned file stays open (the
    whole training process): a second run into the same folder is refused however close the two
    starts are. flock, not a pid file: the kernel drops the lock when its holder exits, so a crashed
    or killed run leaves no stale lock. The file is never deleted (deleting it would let a third run
    lock a new file while the second still holds the old one)."""
    path = os.path.join(out_dir, LOCK_NAME)
    os.makedirs(out_dir, exist_ok=True)
    lock = open(path, 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or 'unknown'
        lock.close()
        raise CheckpointError(f"{out_dir} is in use by another training run (pid {holder}, lock {path}): wait "
                              f"for it to finish, or train into another --out_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # for the refusal message only; the lock itself is the flock
    lock.flush()
    return lock


def save(payload, path):
    """torch.save(payload) to path, atomically (see _write_atomically). A disk that refuses the write
    (full, read-only) is a CheckpointError: the old file stays and no partial file is left."""
    try:
        _write_atomically(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; {path} is left as it was") from None


def save_text(text, path):
    """Write text to path atomically: a full disk leaves the old file, never half a new one."""
    _write_atomically(path, lambda f: f.write(text.encode('utf-8')))


def remove_stale_temps(folder):
    """Delete the half-written files of saves that were killed (SIGKILL, power loss) in folder.
    Nothing ever reads them; this only frees the disk. Call it where no other save is running."""
    for path in glob.glob(os.path.join(folder, TEMP_PREFIX + '*.pt')):
        os.remove(path)


def copies(folder):
    """The names of the rolling ckpt-<iter>.pt copies in a run folder, oldest first."""
    return [os.path.basename(p) for p in sorted(glob.glob(os.path.join(folder, 'ckpt-*.pt')))]


def keep_copy(path, iter_num, keep_last):
    """Copy path to ckpt-<iter>.pt beside it (atomically) and delete all but the newest keep_last
    copies; keep_last = 0 keeps none."""
    folder = os.path.dirname(os.path.abspath(path))
    if keep_last > 0:
        with open(path, 'rb') as source:
            _write_atomically(os.path.join(folder, f'ckpt-{iter_num:08d}.pt'), lambda f: shutil.copyfileobj(source, f))
    for old in sorted(glob.glob(os.path.join(folder, 'ckpt-*.pt')))[:-keep_last or None]:
        os.remove(old)


def rng_state():
    """Every RNG state (python, numpy, torch, CUDA) as tensors and plain lists: weights_only-loadable."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # MT19937: 624 uint32 keys
    state = dict(python=list(random.getstate()[1]), numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)),
                 pos=int(pos), has_gauss=int(has_gauss), gauss=float(gauss)), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned (a CUDA state only where this machine has as many GPUs)."""
    random.setstate((3, tuple(state['python']), None))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def resolve_path(path):
    """A checkpoint file, or a run folder holding ckpt.pt."""
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path


def load(path):
    """The checkpoint dict, on the CPU, read with weights_only=True (no code runs on load)."""
    path = resolve_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py <config>) "
                              f"or point out_dir / the path at an existing run")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): the file is empty")
    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 writes a zip archive
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): it is not the zip "
                              f"archive torch.save writes")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a damaged archive can fail anywhere inside the unpickler (IndexError, KeyError, ...)
        if 'Weights only load failed' in str(e) and 'Unsupported' in str(e):  # intact, but holds Python objects
            raise CheckpointError(f"{path} holds Python objects, not just tensors and plain data, so it was not "
                                  f"written by this repo or nanoGPT; it is not loaded because unpickling them "
                                  f"could run arbitrary code") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__} while unpickling") from None
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'model_args' not in ckpt:
        found = f"keys {list(ckpt)[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path} is not a WFC-GPT or nanoGPT checkpoint (a different model type?): "
                              f"expected a dict with 'model' and 'model_args', found {found}")
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


def split_settings(settings):
    """Flat settings (train.py's names: architecture, recipe and solver mixed) -> (GPTConfig,
    Recipe, Solver); a name none of the three knows is a TypeError, a bad value a ValueError."""
    parts = [{f.name: settings[f.name] for f in fields(cls) if f.name in settings} for cls in (GPTConfig, Recipe, Solver)]
    unknown = sorted(set(settings) - {k for part in parts for k in part})
    if unknown:
        raise TypeError(f"unknown model settings {unknown}: not a GPTConfig, Recipe or Solver field")
    return GPTConfig(**parts[0]), Recipe(**parts[1]), Solver(**parts[2])


def default_settings():
    """Every flat setting of a model (architecture, recipe, solver) with its default."""
    return {f.name: f.default for cls in (GPTConfig, Recipe, Solver) for f in fields(cls)}


def build(**settings):
    """A GPT from flat settings (see split_settings)."""
    config, recipe, solver = split_settings(settings)
    return GPT(config, recipe, solver)


def stored_settings(model):
    """What a checkpoint stores of a model besides its weights (train.py writes these keys)."""
    return dict(model_args=asdict(model.config), recipe=asdict(model.recipe), solver=asdict(model.solver),
                capabilities=dict(model.capabilities))


def settings_of(ckpt):
    """The flat settings of a checkpoint: format 2 stores the architecture (model_args), recipe and
    solver apart; format 1 kept all three in model_args (with step_size, which is now always 1);
    nanoGPT's model_args are a subset (the rest default to nanoGPT's architecture)."""
    args = {**ckpt['model_args'], **ckpt.get('recipe', {}), **ckpt.get('solver', {})}
    if isinstance(args.get('inject'), bool):  # before inject had kinds it was a switch for adding the input
        args['inject'] = 'add' if args['inject'] else 'none'
    if args.pop('step_size', 1.0) != 1.0:
        raise CheckpointError(f"the checkpoint was trained with step_size={ckpt['model_args']['step_size']}, an option "
                              f"this code no longer has (every pass adds its whole delta); use an older commit to read it")
    return args


def build_model(ckpt, **overrides):
    """A GPT with the checkpoint's weights; overrides change solver settings (max_loop, tol, ...)."""
    not_solver = sorted(set(overrides) - {f.name for f in fields(Solver)})
    if not_solver:
        raise CheckpointError(f"only solver settings can be changed when loading a checkpoint, not {not_solver}")
    try:
        model = build(**settings_of(ckpt))
        model.solver = model.solver.but(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint settings do not describe a model this code builds: {e}") from None
    state = clean_state_dict(ckpt['model'])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: the weights come from another architecture
        raise CheckpointError(f"checkpoint weights do not fit the model its model_args describe: "
                              f"{' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # what it was trained to do, as stored when trained (older checkpoints: computed from the config)
    model.capabilities.update({k: v for k, v in ckpt.get('capabilities', {}).items() if k in model.capabilities})
    return model


def load_model(path, device='cpu', **overrides):
    """(model in eval mode on device, checkpoint dict without the weights and optimizer)."""
    ckpt = load(path)
    model = build_model(ckpt, **overrides).to(device).eval()
    ckpt.pop('model'), ckpt.pop('optimizer', None)  # free what is loaded
    return model, ckpt


def compare_args(saved, wanted):
    """Differences between two flat settings (a checkpoint's, see settings_of, and a run's):
    (shape fields, other fields). A setting one side lacks counts at its default."""
    defaults = default_settings()
    keys = sorted(set(saved) | set(wanted))
    diff = [k for k in keys if saved.get(k, defaults.get(k)) != wanted.get(k, defaults.get(k))]
    return [k for k in diff if k in SHAPE_FIELDS], [k for k in diff if k not in SHAPE_FIELDS]


def check_vocabulary(model, codec, meta):
    """The model must cover the tokenizer its checkpoint (or dataset) names: a larger tokenizer means
    the meta and the weights come from different preparations, and sampling would print garbage."""
    V = model.config.vocab_size
    if codec.vocab_size > V or (meta and meta.get('vocab_size', V) != V and meta.get('tokenizer', 'char') == 'char'):
        raise CheckpointError(f"the tokenizer ({codec.vocab_size} tokens, meta vocab_size {(meta or {}).get('vocab_size')}) "
                              f"does not fit the model's vocabulary of {V}: the checkpoint and its meta.pkl come from "
                              f"different datasets; sample the run with the meta it was trained on")


def vocabulary(meta, vocab_size):
    """A vocabulary in words, for messages: 'char, 65 tokens' (meta None: not recorded)."""
    kind = meta.get('tokenizer', 'char' if 'stoi' in meta else 'gpt2') if meta else 'tokenizer not recorded'
    return f"{kind}, {vocab_size} tokens"


def check_same_vocabulary(name, meta, vocab_size, other_name, other_meta, other_vocab_size):
    """Two models (or a model and a dataset) must mean the same text by the same token ids, else one
    scores the other's ids as other characters and prints a number that means nothing. A meta that
    was not recorded (nanoGPT's checkpoints) is compared by size only."""
    same = vocab_size == other_vocab_size
    if meta and other_meta:
        same = same and (vocabulary(meta, 0), vocabulary_sha256(meta)) == (vocabulary(other_meta, 0), vocabulary_sha256(other_meta))
    if not same:
        raise CheckpointError(f"{name} ({vocabulary(meta, vocab_size)}) and {other_name} "
                              f"({vocabulary(other_meta, other_vocab_size)}) have different vocabularies: the same "
                              f"token ids mean different text; use ones prepared with the same tokenizer")


def load_judge(path, device, meta, vocab_size, role='judge'):
    """A GPT that scores another model's text (eval.py, compare.py, sample.py's steering): a GPT,
    because its loss is the next-token likelihood, over the vocabulary the other model writes in."""
    judge, info = load_model(path, device)
    if judge.config.n_future:
        raise CheckpointError(f"the {role} {path} is a WFC model (n_future = {judge.config.n_future}); "
                              f"the {role} must be a GPT checkpoint (n_future = 0)")
    check_same_vocabulary(f"the {role} {path}", info.get('meta'), judge.config.vocab_size, "the model", meta, vocab_size)
    return judge
