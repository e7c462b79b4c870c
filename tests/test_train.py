"""train.py end to end on synthetic shards: GPT, looped GPT, WFC pinned and WFC bidirectional
train (loss falls), write a checkpoint and resume from its step; the pinned vectorised layout
makes every token a future target exactly once, with the visibility of the model's one rule."""

import dataclasses
import json
import os

import pytest
import torch

from conftest import run_script, tiny
from modeling.layout import block_starts, keep_blocks, training_layout

VARIANTS = {
    'gpt': [],
    'looped': ['--n_loop=2'],
    'wfc_pinned': ['--n_future=4', '--pos_emb=rope', '--past_loss=0.5', '--dist_power=1.0'],
    'wfc_bidirectional': ['--n_future=3', '--pos_emb=rope', '--attn=bidirectional', '--n_loop=2', '--max_loop=2'],
}


def read_log(out_dir):
    with open(os.path.join(out_dir, 'eval_log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # train.py runs in subprocesses
@pytest.mark.parametrize('variant', VARIANTS)
def test_few_steps_learn_checkpoint_and_resume(variant, pattern_data, tmp_path):
    out = tmp_path / variant
    common = ['config/train_debug.py', f'--dataset={pattern_data}', f'--out_dir={out}', '--eval_iters=4',
              '--learning_rate=3e-3', *VARIANTS[variant]]
    run_script('train.py', *common, '--max_iters=60', '--lr_decay_iters=80', '--eval_interval=30')
    log = read_log(out)
    assert [r['iter'] for r in log] == [0, 30, 60]
    assert log[-1]['val'] < 0.85 * log[0]['val'], log
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 60
    run_script('train.py', *common, '--max_iters=80', '--lr_decay_iters=80', '--eval_interval=10', '--init_from=resume')
    assert [r['iter'] for r in read_log(out)] == [0, 30, 60, 70, 80], "each evaluation once, the resumed one included"
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 80


@pytest.mark.parametrize('F_,phase', [(4, 0), (4, 2), (3, 1), (1, 0)])
def test_pinned_layout_targets_every_token_once_with_the_defined_visibility(F_, phase):
    T = 13
    model = tiny(n_future=F_, pos_emb='rope')
    idx, tgt = torch.randint(0, 13, (2, T)), torch.randint(0, 13, (2, T))
    out = model.wfc_forward(idx, tgt, phase=torch.tensor([phase, (phase + 1) % F_]))
    assert out.scored.all() and torch.equal(out.targets, tgt)  # each target once
    layout = training_layout(model, idx[:1], tgt[:1], F_, phase=torch.tensor([phase]))
    mask, dist = layout.ctx.mask[0, 0], layout.dist[0]
    starts = sorted({0} | set(range(phase, T, F_)))
    for j in range(T):
        s = max(b for b in starts if b <= j)
        assert dist[j] == j - s + 1 and 1 <= dist[j] <= F_
        visible_past = [i for i in range(T) if mask[j, i]]
        visible_future = [k for k in range(T) if mask[j, T + k]]
        assert visible_past == list(range(s + 1)), f"slot {j} sees past {visible_past}"
        assert visible_future == [k for k in range(T) if max(b for b in starts if b <= k) == s]


@pytest.mark.parametrize('frac', [0.25, 0.5])
def test_future_frac_runs_whole_blocks_that_match_the_full_layout(frac):
    """Skipping future blocks saves compute without changing what the kept slots compute: a kept
    block keeps all its slots, so their logits equal those of the full layout."""
    T, F_ = 16, 4
    model = tiny(n_future=F_, pos_emb='rope', future_frac=frac).train()  # dropout is 0: deterministic
    idx, tgt = torch.randint(0, 13, (3, T)), torch.randint(0, 13, (3, T))
    phase = torch.tensor([0, 1, 3])
    torch.manual_seed(0)
    part, _ = model(idx, tgt, phase=phase)
    model.recipe = dataclasses.replace(model.recipe, future_frac=1.0)
    full, _ = model(idx, tgt, phase=phase)
    torch.manual_seed(0)  # the same draw of blocks as inside the first forward
    order, real = keep_blocks(phase, T, F_, frac)
    starts = block_starts(phase, T, F_)
    for b in range(3):
        kept = order[b][real[b]]
        assert 1 <= len(kept) < T
        assert torch.allclose(part[b][real[b]], full[b][kept], atol=1e-5)
        for s in set(starts[b][kept].tolist()):  # whole blocks only
            assert set(kept.tolist()) >= set(torch.nonzero(starts[b] == s)[:, 0].tolist())
