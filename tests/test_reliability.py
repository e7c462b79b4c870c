"""Reliability on CPU, with a tiny model and synthetic data: an interrupted run loses
nothing, and bad input stops early with a one-line message that says what to do.

Proves: a checkpoint holds everything a resume needs and loads with weights_only=True; a save
interrupted by an exception or by SIGKILL leaves the previous checkpoint loadable; stopping and
resuming (once, twice, or by SIGTERM / SIGINT) gives the same per-step losses and bit-equal final
weights as the straight run, dropout on; a NaN loss or gradient stops the run (exit 3) naming the
step and leaves the last good checkpoint as it was; the loss-spike detector warns or stops (exit 4);
keep_last keeps rolling copies and best.pt is never replaced by a worse evaluation; bad data and
a changed architecture on resume are an 'error: ...' line (exit 2), never a traceback (the
sampler's and every other script's bad inputs are in test_bad_inputs.py). The DDP properties are in test_ddp.py. The signal tests carry the slow marker (the
default run includes them; -m "not slow" skips them).
"""

import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_inprocess, run_script, write_dataset

from model import GPTConfig  # noqa: E402 (conftest put the repo on the path)
from plumbing import checkpoint  # noqa: E402

ENV = {'OMP_NUM_THREADS': '1'}  # one thread: identical float sums run to run, and no spinning on a shared CPU
DEBUG = os.path.join(REPO, 'config', 'train_debug.py')
COMMON = [DEBUG, '--log_interval=1', '--dropout=0.1', '--eval_iters=2', '--eval_interval=2', '--keep_last=2',
          '--spike_factor=3.0']
N = 8  # iterations of the straight run; it saves at 2, 4, 6, 8 and keeps ckpt-00000006.pt and ckpt-00000008.pt


def pattern_corpus(n, rng):
    """A repeating 0..6 pattern with 5% random tokens from a vocabulary of 9 (as conftest.pattern_data)."""
    base = np.tile(np.arange(7), n // 7 + 1)[:n]
    return np.where(rng.random(n) < 0.05, rng.integers(0, 9, n), base)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_dataset(tmp_path_factory.mktemp('data') / 'pattern', pattern_corpus(20000, rng),
                         pattern_corpus(4000, rng), vocab_size=9)


def train(data, out, *args, check=True, env=None):
    return run_script('train.py', *COMMON, f'--dataset={data}', f'--out_dir={out}', *args, check=check,
                      env={**ENV, **(env or {})})


@pytest.fixture(scope='module')
def straight(data, tmp_path_factory):
    """The reference: N iterations in one process. Returns (out_dir, stdout)."""
    out = tmp_path_factory.mktemp('straight')
    return out, train(data, out, f'--max_iters={N}').stdout


def losses(out):
    """{iteration: train loss} from train_log.jsonl (exact floats, unlike the 4-digit log lines)."""
    with open(os.path.join(out, 'train_log.jsonl')) as f:
        return {r['iter']: r['loss'] for r in map(json.loads, f)}


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optimizer(a, b):
    return a['state'].keys() == b['state'].keys() and all(same_tensors(a['state'][k], b['state'][k]) for k in a['state'])


def train_here(data, out, *args):
    return run_inprocess('train.py', *COMMON, f'--dataset={data}', f'--out_dir={out}', *args)


def assert_clean_error(code, err, phrase):
    assert code == 2, err
    assert err.startswith('error: ') and phrase in err and 'Traceback' not in err, err


# -----------------------------------------------------------------------------
# checkpoints: contents, policy, atomic writes


def test_a_checkpoint_holds_everything_a_resume_needs_and_loads_weights_only(straight):
    ckpt = load(straight[0] / 'ckpt.pt')
    assert {'model', 'optimizer', 'scaler', 'iter_num', 'best_val_loss', 'rng', 'data', 'config', 'model_args',
            'meta', 'format_version', 'loss_ema', 'capabilities', 'recipe', 'solver'} <= set(ckpt)
    assert set(ckpt['model_args']) == {f.name for f in dataclasses.fields(GPTConfig)}  # the architecture alone
    assert ckpt['iter_num'] == N and ckpt['data'] == {'iter': N, 'seed': 1337}  # the data loader's position
    assert ckpt['config']['dropout'] == 0.1 and ckpt['config']['max_iters'] == N  # the resolved config
    assert {'python', 'numpy', 'torch'} <= set(ckpt['rng']) and ckpt['optimizer']['state']
    assert ckpt['format_version'] == checkpoint.FORMAT_VERSION
    assert not [k for k in ckpt['model'] if k.startswith(('_orig_mod.', 'module.'))]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    def draws():
        return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()
    random.seed(1), np.random.seed(2), torch.manual_seed(3), np.random.randn()  # numpy now holds a cached gaussian
    checkpoint.save({'rng': checkpoint.rng_state()}, tmp_path / 'rng.pt')
    first = draws()
    checkpoint.set_rng_state(load(tmp_path / 'rng.pt')['rng'])
    assert draws() == first


def test_keep_last_keeps_the_newest_copies_and_best_pt_the_best_weights(straight):
    out = straight[0]
    assert sorted(n for n in os.listdir(out) if n.startswith('ckpt-')) == ['ckpt-00000006.pt', 'ckpt-00000008.pt']
    assert same_tensors(load(out / 'ckpt-00000008.pt')['model'], load(out / 'ckpt.pt')['model'])
    with open(out / 'eval_log.jsonl') as f:
        evals = [json.loads(line) for line in f]
    best = load(out / 'best.pt')
    assert best['val_loss'] == min(r['val'] for r in evals) and 'optimizer' not in best


def test_a_worse_evaluation_never_replaces_best_pt_and_says_so(straight, tmp_path):
    """Resume the run on random tokens: its val loss gets worse than the best, so ckpt.pt (the resume
    point) moves on while best.pt stays byte for byte, and the log says which file holds what."""
    run = shutil.copytree(straight[0], tmp_path / 'run')
    rng = np.random.default_rng(1)
    noise = write_dataset(tmp_path / 'noise', rng.integers(0, 9, 4000), rng.integers(0, 9, 4000), vocab_size=9)
    best_before = (run / 'best.pt').read_bytes()
    code, out, err = run_inprocess('train.py', *COMMON, f'--dataset={noise}', f'--out_dir={run}', '--init_from=resume',
                              f'--max_iters={N}')
    assert code == 0, err
    with open(run / 'eval_log.jsonl') as f:
        last = json.loads(f.readlines()[-1])
    assert last['val'] > load(run / 'best.pt')['val_loss']  # the premise: this evaluation is worse
    assert 'is worse than the best' in out and "changed settings: ['dataset']" in out
    assert (run / 'best.pt').read_bytes() == best_before


def test_an_exception_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    checkpoint.save({'version': 1, 'w': torch.ones(1000)}, path)
    real_save = torch.save

    def write_half_then_fail(payload, f):
        buffer = io.BytesIO()
        real_save(payload, buffer)
        f.write(buffer.getvalue()[:buffer.tell() // 2])
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', write_half_then_fail)
    with pytest.raises(checkpoint.CheckpointError, match='No space left on device'):  # one line for the user
        checkpoint.save({'version': 2, 'w': torch.zeros(1000)}, path)
    assert load(path)['version'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']  # and the half file is gone


SAVE_THEN_HANG = '''
import io, sys, time
import torch
sys.path.insert(0, {repo!r})
from plumbing import checkpoint
checkpoint.save({{'model': {{'w': torch.ones(1 << 18)}}, 'model_args': {{}}, 'version': 1}}, {path!r})
real_save = torch.save
def write_half_then_hang(payload, f):
    buffer = io.BytesIO()
    real_save(payload, buffer)
    f.write(buffer.getvalue()[:buffer.tell() // 2])
    f.flush()
    print('mid-save', flush=True)
    time.sleep(120)
torch.save = write_half_then_hang
checkpoint.save({{'model': {{'w': torch.zeros(1 << 18)}}, 'model_args': {{}}, 'version': 2}}, {path!r})
'''


def test_a_sigkill_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    child = subprocess.Popen([sys.executable, '-c', SAVE_THEN_HANG.format(repo=REPO, path=str(path))],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        assert child.stdout.readline().strip() == 'mid-save'
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup
        child.communicate(timeout=60)
    half = [n for n in os.listdir(tmp_path) if n.startswith(checkpoint.TEMP_PREFIX)]
    assert len(half) == 1 and (tmp_path / half[0]).stat().st_size > 0  # the kill did land mid-write
    ckpt = checkpoint.load(tmp_path)  # the run folder resolves to ckpt.pt, never to the half file
    assert ckpt['version'] == 1 and torch.equal(ckpt['model']['w'], torch.ones(1 << 18))
    checkpoint.remove_stale_temps(tmp_path)  # what train.py does at startup
    assert os.listdir(tmp_path) == ['ckpt.pt']


# -----------------------------------------------------------------------------
# exact resume, preemption


@pytest.mark.slow  # three train.py runs
def test_stop_and_resume_once_and_twice_matches_the_straight_run_exactly(data, straight, tmp_path):
    """N/2 steps, stop; resume in a new process to 3N/4 (resumed once), stop; resume again to N
    (resumed twice): the per-step train losses equal the straight run's, and so do the weights and
    optimizer state after one resume (the ckpt-00000006.pt copies) and after two (ckpt.pt), bit for
    bit, dropout on. A resume that replayed the data from the seed, or lost the optimizer or the
    schedule, would differ."""
    out, reference = tmp_path / 'run', straight[0]
    for k, stop in enumerate((N // 2, 3 * N // 4, N)):
        train(data, out, f'--max_iters={stop}', *(['--init_from=resume'] if k else []))
    assert losses(out) == losses(reference) and len(losses(out)) == N
    for name in ('ckpt-00000006.pt', 'ckpt.pt'):
        ours, theirs = load(out / name), load(reference / name)
        assert same_tensors(ours['model'], theirs['model']), name
        assert same_optimizer(ours['optimizer'], theirs['optimizer']), name


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_saves_a_checkpoint_and_the_resume_matches(signum, data, tmp_path):
    """A signal during training: checkpoint at the next step boundary, exit 75; resuming from it for
    two more steps equals an uninterrupted run of the same length (both run in this process)."""
    args = ['--eval_interval=1000', '--max_iters=100000']
    stopped = tmp_path / 'stopped'
    child = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), *COMMON, f'--dataset={data}',
                              f'--out_dir={stopped}', *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    for line in child.stdout:
        if line.startswith('iter 2:'):  # training is under way: the handlers are installed
            child.send_signal(signum)
            break
    rest, err = child.communicate(timeout=120)
    assert child.returncode == 75, err
    k = int(re.search(r'stopped by a signal at iteration (\d+)', rest).group(1))
    assert load(stopped / 'ckpt.pt')['iter_num'] == k >= 2
    assert train_here(data, stopped, args[0], f'--max_iters={k + 2}', '--init_from=resume')[0] == 0
    straight = tmp_path / 'straight'
    assert train_here(data, straight, args[0], f'--max_iters={k + 2}')[0] == 0
    assert losses(stopped) == losses(straight) and len(losses(straight)) == k + 2
    assert same_tensors(load(stopped / 'ckpt.pt')['model'], load(straight / 'ckpt.pt')['model'])


# -----------------------------------------------------------------------------
# non-finite values and loss spikes (WFC_FAULT: see train.py)


@pytest.mark.parametrize('kind', ['nan_loss', 'nan_grad'])
def test_a_non_finite_loss_or_gradient_stops_and_keeps_the_last_good_checkpoint(kind, data, straight, tmp_path,
                                                                                monkeypatch):
    out = tmp_path / 'run'
    monkeypatch.setenv('WFC_FAULT', f'{kind}@7')
    code, _, err = train_here(data, out, f'--max_iters={N}')
    assert code == 3 and 'error: non-finite loss or gradient at iter 7 ' in err, err
    ckpt = load(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 6  # saved at step 6, untouched by the bad step
    assert same_tensors(ckpt['model'], load(straight[0] / 'ckpt-00000006.pt')['model'])
    assert not [n for n in os.listdir(out) if n.startswith(checkpoint.TEMP_PREFIX)]


@pytest.mark.parametrize('action', ['warn', 'stop'])
def test_a_loss_spike_warns_or_stops(action, data, straight, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    monkeypatch.setenv('WFC_FAULT', 'spike@5')
    code, stdout, err = train_here(data, out, f'--max_iters={N}', f'--spike_action={action}')
    if action == 'stop':
        assert code == 4 and 'error: loss spike at iter 5:' in err, err
        assert load(out / 'ckpt.pt')['iter_num'] == 4
    else:
        assert code == 0, err
        assert re.findall(r'warning: loss spike at iter (\d+):', stdout)[0] == '5'
        assert load(out / 'ckpt.pt')['iter_num'] == N
        assert 'loss spike' not in straight[1]  # the same detector raised no false alarm without the fault


# -----------------------------------------------------------------------------
# bad data and config: checked at startup, before any training


def corrupt_meta(folder):
    (folder / 'meta.pkl').write_bytes(b'not a pickle')


def drop_meta(folder):
    os.remove(folder / 'meta.pkl')


def small_meta(folder):  # a meta.pkl for 5 characters beside shards that use 9
    write_dataset(folder / 'other', [0] * 40, [0] * 40, vocab_size=5)
    shutil.copy(folder / 'other' / 'meta.pkl', folder / 'meta.pkl')


def odd_bytes(folder):
    with open(folder / 'train.bin', 'ab') as f:
        f.write(b'\0')


def short_val(folder):
    np.zeros(10, dtype=np.uint16).tofile(folder / 'val.bin')


def no_val(folder):
    os.remove(folder / 'val.bin')


DATA_ERRORS = {  # how to break a good dataset, extra arguments, what the message must say
    'token_id_over_vocab_size': (drop_meta, ['--vocab_size=5'], 'holds token id 8 but the vocabulary has 5 tokens'),
    'meta_does_not_match_shards': (small_meta, [], 'holds token id 8 but the vocabulary has 5 tokens'),
    'meta_unreadable': (corrupt_meta, [], 'is not a readable meta.pkl'),
    'odd_byte_length': (odd_bytes, [], 'an odd number'),
    'shard_shorter_than_a_window': (short_val, [], 'fewer than block_size + 1 = 17'),
    'missing_split': (no_val, [], "no 'val' shards"),
}


@pytest.mark.parametrize('case', DATA_ERRORS)
def test_bad_data_is_a_clear_error_at_startup(case, data, tmp_path):
    folder = shutil.copytree(data, tmp_path / 'data')
    damage, args, phrase = DATA_ERRORS[case]
    damage(folder)
    code, _, err = run_inprocess('train.py', *COMMON, f'--dataset={folder}', f'--out_dir={tmp_path / "out"}', *args)
    assert_clean_error(code, err, phrase)


def test_resuming_another_architecture_is_an_error_naming_the_fields(data, straight, tmp_path):
    run = shutil.copytree(straight[0], tmp_path / 'run')
    code, _, err = run_inprocess('train.py', *COMMON, f'--dataset={data}', f'--out_dir={run}', '--init_from=resume',
                            '--n_layer=3', '--n_embd=48')
    assert_clean_error(code, err, "its architecture differs in ['n_embd', 'n_layer']")


def test_resuming_with_changed_batch_and_schedule_settings_warns(data, straight, tmp_path):
    run = shutil.copytree(straight[0], tmp_path / 'run')
    code, out, err = run_inprocess('train.py', *COMMON, f'--dataset={data}', f'--out_dir={run}', '--init_from=resume',
                              f'--max_iters={N}', '--batch_size=8', '--learning_rate=2e-3')
    assert code == 0, err
    assert "warning: resuming with changed settings: ['batch_size', 'learning_rate']" in out


# -----------------------------------------------------------------------------
# sampler inputs
