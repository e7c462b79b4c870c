"""The speed work changes no result: the WFC sampler with the pinned past's cache draws the same
tokens as one that recomputes the past every step; a GPT samples the same tokens with its KV
cache as with nanoGPT's crop-and-recompute loop; outputs of the last positions only (cache_past's
`queries`) are the full run's; refinement decodes only where a test needs it; per-slot early exit
computes fewer slots and leaves converged outputs within tol; batched rows are the single runs;
bench.py prints its table and tools/vs_nanogpt.py reads both programs' logs. Never timing."""

import math
import os
import sys

import pytest
import torch

from conftest import REPO, run_script, tiny, train_pattern_model
from sampling import Settings, choose_slots, generate, sample_tokens

sys.path.insert(0, os.path.join(REPO, 'tools'))
import vs_nanogpt  # noqa: E402


def record_refines(model):
    """The future's logits after every refine of this model, in a list."""
    seen, original = [], model.refine

    def refine(w, *args, **kwargs):
        w, used = original(w, *args, **kwargs)
        seen.append(w.stats['logits'].clone())
        return w, used
    model.refine = refine
    return seen


def record_decodes(model):
    """Every output of the model's lm_head, flattened to (rows, V), in a list."""
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.reshape(-1, out.size(-1)).clone()))
    return seen


def uncached_wfc(model, idx, n, s, generator):
    """The sampler's loop with no cache to speak of: the past's keys/values are recomputed from
    scratch (all final states too) at every step. Policy and draws as in sampling.generate."""
    w, out = model.start(idx), []
    while sum(t.size(1) for t in out) < n:
        w.cache, w.pending = model.cache_past(w.past)[0], 0
        w, _ = model.refine(w if s.warm == 'on' else model.forget(w))
        logits = model.future_logits(w)
        bits = model.entropy_of_logits(logits) / math.log(2)
        slots = choose_slots(s.policy, bits, w.decided < 0, s.tau)
        w = model.collapse(w, slots, sample_tokens(logits, s, generator))
        w, moved = model.shift(w, slide=s.slide)
        out.append(moved)
    return torch.cat(out, 1)[:, :n]


@pytest.fixture(scope='module')
def pattern_wfc():
    """Trained a little on the repeating pattern: sure of some slots and not of others, so the
    threshold policy commits one token in some steps and several in others."""
    return {'rope': train_pattern_model(steps=100, n_future=4, pos_emb='rope'),
            'learned-looped': train_pattern_model(steps=250, n_future=4, pos_emb='learned', n_loop=2, inject=True,
                                                  spec_window=1, max_loop=3)}


@pytest.mark.parametrize('kind', ['rope', 'learned-looped'])
@pytest.mark.parametrize('slide', [0, 3])
def test_cached_past_sampler_draws_the_same_tokens_as_recomputing_the_past(pattern_wfc, kind, slide):
    model = pattern_wfc[kind]
    idx = torch.tensor([[0], [3]])  # a short prompt: the past grows through 15 cached extensions first
    s = Settings(temperature=1.0, top_k=0, policy='threshold', tau=1.0, slide=slide, warm='on')
    seen = record_refines(model)
    try:
        cached, stats = generate(model, idx, 40, s, torch.Generator().manual_seed(1))  # slides past block_size 16
        steps, _ = list(seen), seen.clear()
        assert torch.equal(cached, uncached_wfc(model, idx, 40, s, torch.Generator().manual_seed(1)))
    finally:
        del model.refine
    # fp32 rounding of the two ways (up to ~1e-4 after warm starts carry it a few steps); a stale cache is O(1)
    assert len(steps) == len(seen) and all(torch.allclose(a, b, atol=1e-3) for a, b in zip(steps, seen))
    emitted = {step['emitted'] for step in stats.steps}
    assert 1 in emitted and max(emitted) > 1, "steps that commit one token and steps that commit several"


@pytest.mark.parametrize('overrides', [dict(), dict(n_loop=2), dict(pos_emb='rope', n_loop=2, inject=True, step_size=0.5)])
@pytest.mark.parametrize('slide', [0, 5])
def test_gpt_kv_cache_draws_the_same_tokens_as_recomputing(overrides, slide):
    model = tiny(**overrides).eval()
    idx = torch.randint(0, 13, (3, 4), generator=torch.Generator().manual_seed(0))
    s = Settings(temperature=1.0, top_k=0, slide=slide)
    seen = record_decodes(model)
    cached, _ = generate(model, idx, 40, s, torch.Generator().manual_seed(2))
    steps, _ = list(seen), seen.clear()
    g, seq, window = torch.Generator().manual_seed(2), idx, idx
    bs = model.config.block_size
    with torch.no_grad():
        for _ in range(40):  # nanoGPT's loop: a full forward of the window, the last position's logits
            logits, _ = model(window)
            token = sample_tokens(logits[:, -1], s, g)[:, None]
            seq, window = torch.cat((seq, token), 1), torch.cat((window, token), 1)
            if window.size(1) > bs:
                window = window[:, -max(1, bs - slide):]
    assert torch.equal(cached, seq[:, 4:])
    assert len(steps) == len(seen) == 40 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(steps, seen))


@pytest.mark.parametrize('overrides', [dict(), dict(pos_emb='rope', n_loop=2, inject=True, step_size=0.5)])
def test_cache_past_last_positions_match_the_full_run(overrides):
    model = tiny(**overrides).eval()
    idx = torch.randint(0, 13, (2, 12))
    full_cache, full = model.cache_past(idx)
    for queries in (0, 1, 3):
        cache, last = model.cache_past(idx, queries=queries)
        assert last.shape == (2, queries, 32)
        assert torch.allclose(last, full[:, 12 - queries:], atol=1e-5)
        assert all(torch.equal(a, b) for p, q in zip(cache, full_cache) for x, y in zip(p, q) for a, b in zip(x, y))
    grown, _ = model.cache_past(idx[:, :7])  # extending a cache: the new tokens' states and keys
    _, tail = model.cache_past(idx[:, 7:], grown, start=7, queries=2)
    assert torch.allclose(tail, full[:, -2:], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for x, y in zip(grown[-1], full_cache[-1]) for a, b in zip(x, y))


def count_decodes(model):
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_refinement_decodes_only_where_the_convergence_test_needs_it():
    model = tiny(n_future=4, pos_emb='rope', max_loop=1).eval()
    calls = count_decodes(model)
    w = model.start(torch.randint(0, 13, (1, 6)))
    model.refine(w)
    assert len(calls) == 1, "one pass decides nothing: the only decode is refine's report (entropy, logits)"
    calls.clear()
    model.refine(w, max_loop=4, min_loop=4, tol=-1.0)
    assert len(calls) == 1 + 1, "min_loop = max_loop: one decode before the last test is all there is"
    calls.clear()
    _, used = model.refine(w, max_loop=5, tol=-1.0)
    assert used == 5 and len(calls) == 5 + 1, "before pass 1, after passes 1..4, and the report"


@pytest.fixture(scope='module')
def slow_converger():
    """Trained with a small step size: its future slots converge over several passes, not all at once."""
    return train_pattern_model(steps=60, n_future=6, pos_emb='rope', n_loop=3, step_size=0.25, max_loop=60)


def test_slot_exit_computes_fewer_slots_and_keeps_converged_outputs_within_tol(slow_converger):
    model, tol = slow_converger, 1e-5
    idx = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [3, 4, 5, 6, 0, 1, 2, 3, 4, 8], [8, 8, 1, 2, 3, 4, 5, 6, 0, 1]])
    computed = []
    stack = model._stack
    model._stack = lambda x, *a, **k: (computed.append(x.size(1)), stack(x, *a, **k))[1]
    try:
        plain, plain_passes = model.refine(model.start(idx), tol=tol, slot_exit=False)
        full_slots = sum(computed)
        computed.clear()
        early, early_passes = model.refine(model.start(idx), tol=tol, slot_exit=True)
    finally:
        del model._stack
    assert sum(computed) < full_slots, "converged slots must stop being computed"
    assert early_passes <= plain_passes
    logp, logq = (torch.log_softmax(w.stats['logits'].float(), -1) for w in (plain, early))
    kl = (logq.exp() * (logq - logp)).sum(-1)
    assert kl.max() <= tol, kl
    same, _ = model.refine(model.start(idx), tol=-1.0, max_loop=8, slot_exit=True)  # nothing converges
    ref, _ = model.refine(model.start(idx), tol=-1.0, max_loop=8, slot_exit=False)
    assert torch.equal(same.future, ref.future)


@pytest.mark.parametrize('kind', ['gpt', 'wfc'])
def test_batched_rows_are_the_single_runs(kind):
    model = tiny(**({} if kind == 'gpt' else dict(n_future=4, pos_emb='rope'))).eval()
    idx = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(0))
    s = Settings(temperature=0, policy='first')
    batched, _ = generate(model, idx, 30, s)
    for row in range(3):
        single, _ = generate(model, idx[row:row + 1], 30, s)
        assert torch.equal(batched[row:row + 1], single)


def test_bench_prints_one_table(tmp_path):
    out = tmp_path / 'bench.json'
    result = run_script('bench.py', '--n_layer=1', '--n_embd=32', '--n_head=2', '--block_size=16', '--batch_size=2',
                        '--steps=2', '--warmup=1', '--sample_tokens=20', '--repeats=1', '--num_samples=2',
                        '--dataset=none', '--dtypes=float32', f'--out={out}', timeout=120)
    assert 'matmul peak' in result.stdout and 'train tok/s' in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(('gpt ', 'wfc '))]
    assert len(rows) == 2, result.stdout
    import json
    data = json.loads(out.read_text())
    assert all(r['train_tokens_per_s'] > 0 and r['sample_tokens_per_s'] > 0 and 0 < r['mfu'] for r in data['rows'])
    assert data['rows'][1]['passes_per_token'] > 0


def test_vs_nanogpt_reads_both_programs_logs():
    nano = "step 0: train loss 4.2, val loss 4.3\n" + ''.join(
        f"iter {i}: loss 2.5000, time {30 + i % 3}.50ms, mfu 1.00%\n" for i in range(14)) + \
        "step 13: train loss 2.1000, val loss 2.2000\n"
    ours = ''.join(f"iter {i}: loss 2.5000, lr 1.00e-03, time {20 + i % 2}.0ms, mfu 30.0%\n" for i in range(1, 14)) + \
        "step 13: train loss 2.0, val loss 2.1500, by distance 2.1 2.5, passes 1.00\n"
    assert vs_nanogpt.iteration_ms(nano) == [31.5, 32.5, 30.5, 31.5]
    assert vs_nanogpt.iteration_ms(ours, skip=10) == [21.0, 20.0, 21.0]
    assert vs_nanogpt.final_val_loss(nano) == 2.2 and vs_nanogpt.final_val_loss(ours) == 2.15
    stderr = 'noise\n@@generate {"seconds": 0.5, "ids": [[1, 2, 3]]}\n@@generate {"seconds": 1.5, "ids": [[4, 5]]}\n'
    assert vs_nanogpt.generations(stderr) == [(0.5, [[1, 2, 3]]), (1.5, [[4, 5]])]
