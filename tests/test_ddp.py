"""DDP on CPU (torchrun, gloo): 2 ranks with gradient accumulation k give the per-step losses and
final weights of 1 process with accumulation 2k (to 1e-6), with every rank's weights identical at
every evaluation; a NaN on one rank stops every rank with the last good checkpoint intact; a rank
killed with SIGKILL fails the whole job, non-zero, within a bounded time instead of hanging.
Slow (torchrun starts 3 Python processes per run), so marked; the default run still includes them."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_script, write_dataset

pytestmark = pytest.mark.slow
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
ARGS = [os.path.join(REPO, 'config', 'train_debug.py'), '--log_interval=1', '--dropout=0.1', '--eval_iters=2',
        '--eval_interval=3', '--gradient_accumulation_steps=4']  # global: 2 ranks x 2 micro-steps, or 1 x 4


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    def corpus(n):
        return np.where(rng.random(n) < 0.05, rng.integers(0, 9, n), np.tile(np.arange(7), n // 7 + 1)[:n])
    return write_dataset(tmp_path_factory.mktemp('data') / 'pattern', corpus(20000), corpus(4000), vocab_size=9)


def torchrun(*args, env=None):
    """Start train.py on 2 CPU ranks in its own process group (so a failed test can end all of it)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(REPO, 'train.py'), *ARGS, *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **(env or {})}, start_new_session=True)


def finish(job, timeout=120):
    """(stdout, stderr) once the job exits; a job still running after timeout seconds is a hang."""
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise AssertionError(f"the DDP job did not exit within {timeout} s")


def losses(out):
    with open(os.path.join(out, 'train_log.jsonl')) as f:
        return [r['loss'] for r in map(json.loads, f)]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_two_ranks_match_one_process_with_twice_the_accumulation(data, tmp_path):
    job = torchrun(f'--dataset={data}', f'--out_dir={tmp_path / "ddp"}', '--max_iters=6')
    stdout, stderr = finish(job)
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.count('weights identical on 2 ranks') == 3  # checked at steps 0, 3 and 6
    run_script('train.py', *ARGS, f'--dataset={data}', f'--out_dir={tmp_path / "single"}', '--max_iters=6',
               env={'OMP_NUM_THREADS': '1'})
    ddp, single = losses(tmp_path / 'ddp'), losses(tmp_path / 'single')
    assert len(ddp) == len(single) == 6 and np.allclose(ddp, single, rtol=0, atol=1e-6), (ddp, single)
    ours, theirs = load(tmp_path / 'ddp' / 'ckpt.pt')['model'], load(tmp_path / 'single' / 'ckpt.pt')['model']
    assert ours.keys() == theirs.keys()  # no 'module.' prefixes from the DDP wrapper
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6


def test_a_nan_on_one_rank_stops_every_rank(data, tmp_path):
    job = torchrun(f'--dataset={data}', f'--out_dir={tmp_path}', '--max_iters=6', env={'WFC_FAULT': 'nan_grad@5:1'})
    _, stderr = finish(job)
    assert job.returncode != 0
    # rank 0 computed a finite gradient; it stops because the ranks agree on the bad value
    assert stderr.count('error: non-finite loss or gradient at iter 5 ') == 2, stderr[-3000:]
    assert load(tmp_path / 'ckpt.pt')['iter_num'] == 3  # the last good checkpoint, untouched


def test_a_killed_rank_fails_the_job_in_bounded_time(data, tmp_path):
    job = torchrun(f'--dataset={data}', f'--out_dir={tmp_path}', '--max_iters=100000', '--lr_decay_iters=100000',
                   '--eval_interval=100000')
    try:
        for line in job.stdout:
            if line.startswith('iter 3:'):
                break
        workers = subprocess.run(['pgrep', '-P', str(job.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [int(pid) for pid in workers if b'RANK=1' in open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGKILL)
        killed = time.monotonic()
        finish(job, timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    print(f"the job exited {time.monotonic() - killed:.1f} s after rank 1 was killed")
