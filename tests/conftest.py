"""Shared helpers for the tests: tiny models, synthetic token shards, running the scripts."""

import fcntl
import glob
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from plumbing import checkpoint  # noqa: E402

# One thread per process: the models here are tiny, and on a busy 2-core machine two OpenMP
# threads per process spin against each other (first iterations 100x slower).
torch.set_num_threads(1)
ONE_THREAD = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


def tiny(**overrides):
    """A 2-layer, 32-wide model over a vocabulary of 13: builds and runs in milliseconds."""
    args = dict(block_size=16, vocab_size=13, n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.0)
    args.update(overrides)
    torch.manual_seed(0)
    return checkpoint.build(**args)


def write_dataset(folder, tokens_train, tokens_val, vocab_size):
    """train.bin / val.bin (uint16) and a char meta.pkl whose characters are letters."""
    os.makedirs(folder, exist_ok=True)
    np.asarray(tokens_train, dtype=np.uint16).tofile(os.path.join(folder, 'train.bin'))
    np.asarray(tokens_val, dtype=np.uint16).tofile(os.path.join(folder, 'val.bin'))
    chars = [chr(ord('a') + i) for i in range(vocab_size)]
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': vocab_size, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}, f)
    return str(folder)


@pytest.fixture
def pattern_data(tmp_path):
    """A learnable synthetic corpus: a repeating 'abcdefg' pattern with rare random letters."""
    rng = np.random.default_rng(0)
    def corpus(n):
        base = np.tile(np.arange(7), n // 7 + 1)[:n]
        noise = rng.random(n) < 0.05
        return np.where(noise, rng.integers(0, 9, n), base)
    return write_dataset(tmp_path / 'pattern', corpus(20000), corpus(4000), vocab_size=9)


def run_script(script, *args, timeout=300, check=True, env=None):
    """Run a repo script in a fresh process (as a user would); returns the CompletedProcess."""
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, **ONE_THREAD, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def train_pattern_model(steps=300, **overrides):
    """A tiny model trained for a few seconds on the repeating pattern 0 1 2 3 4 5 6 (vocabulary 9):
    certain about what comes next, so policies, pins and warm starts have something to show.
    Trained once per code version: the weights (and torch's RNG state after training, so what
    follows draws the same numbers) are kept in a cache folder keyed by the arguments and the
    source of the repo's modules, and a lock makes parallel test workers wait for one training
    instead of each repeating it."""
    key = hashlib.sha256(repr((steps, sorted(overrides.items()), SOURCE_DIGEST)).encode()).hexdigest()[:24]
    path = os.path.join(MODEL_CACHE, f'{key}.pt')
    os.makedirs(MODEL_CACHE, exist_ok=True)
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            saved = torch.load(path)
            model = tiny(vocab_size=9, **overrides)
            model.load_state_dict(saved['model'])
            torch.set_rng_state(saved['rng'])
            return model.eval()
        model = _fit_pattern(steps, overrides)
        torch.save({'model': model.state_dict(), 'rng': torch.get_rng_state()}, path + '.tmp')
        os.replace(path + '.tmp', path)
    return model.eval()


def _fit_pattern(steps, overrides):
    model = tiny(vocab_size=9, **overrides)
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(7), 400)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = model.config.block_size
    for _ in range(steps):
        starts = rng.integers(0, len(base) - T - 1, 16)
        x = torch.tensor(np.stack([base[s:s + T] for s in starts]))
        y = torch.tensor(np.stack([base[s + 1:s + T + 1] for s in starts]))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _source_digest():
    """What a trained test model depends on: the repo's modules (top level and one folder down), this
    file, torch's version and CPU kernels."""
    # the kernel set too: the same code trains different weights with AVX2 and AVX-512 kernels
    digest = hashlib.sha256((torch.__version__ + torch.backends.cpu.get_cpu_capability()).encode())
    for path in sorted(glob.glob(os.path.join(REPO, '*.py')) + glob.glob(os.path.join(REPO, '*', '*.py'))) + [os.path.abspath(__file__)]:
        with open(path, 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()


SOURCE_DIGEST = _source_digest()
MODEL_CACHE = os.environ.get('WFC_TEST_CACHE') or os.path.join(tempfile.gettempdir(), f'wfc-gpt-test-models-{os.getuid()}')


def run_inprocess(script, *args):
    """Run a repo script in this process as `python script args` would, and faster: torch is
    imported already, and the MFU denominator is not measured (0.8 s of matmuls per run). One
    thread, as in the subprocesses, so the numbers agree bit for bit. Returns (exit code, stdout,
    stderr). Any exception but SystemExit propagates and fails the test: a traceback is what bad
    input must not produce. sys.argv, signal handlers, RNG states and threads are put back."""
    import io
    import runpy
    import signal
    from contextlib import redirect_stderr, redirect_stdout
    from plumbing import runtime
    saved = sys.argv, checkpoint.rng_state(), torch.get_num_threads(), runtime.peak_flops
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv, runtime.peak_flops = [os.path.join(REPO, script), *map(str, args)], lambda device, dtype: float('nan')
    torch.set_num_threads(1)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, rng, threads, runtime.peak_flops = saved
        checkpoint.set_rng_state(rng)
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code, out.getvalue(), err.getvalue()
