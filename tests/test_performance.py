"""The speed work changes no result. The collapse sampler with the pinned past's cache draws the
same tokens as one that recomputes the past from scratch every step; a GPT samples the same tokens
with its KV cache as with nanoGPT's crop-and-recompute loop (learned positions) or as attention
over a rolling window recomputed from scratch (rotary: the cache rolls past the block edge and is
never rebuilt), also in the ring of fixed shape the samplers use; the last positions only (`queries`) equal the full run's; refinement decodes only
where a test needs it; rows that have converged stop being computed without changing the others;
batched rows are the single runs; bench.py prints its table; tools/vs_nanogpt.py reads both
programs' logs; tools/step_profile.py splits a step; tools/sample_profile.py lists a sampler's ops.
Never timing."""

import math
import os
import sys

import pytest
import torch

from conftest import ONE_THREAD, REPO, run_inprocess, run_script, tiny, train_pattern_model
from generation import engine
from generation.decoding import Settings, sample_tokens
from generation.sampling import choose_slots, generate
from modeling.layout import Context, visibility
from modeling.solver import entropy_of_logits

sys.path.insert(0, os.path.join(REPO, 'tools'))
import vs_nanogpt  # noqa: E402


def record_refines(monkeypatch):
    """The future's logits after every engine.refine, in a list."""
    seen, original = [], engine.refine

    def refine(model, w, *args, **kwargs):
        w, used = original(model, w, *args, **kwargs)
        seen.append(w.stats['logits'].clone())
        return w, used
    monkeypatch.setattr(engine, 'refine', refine)
    return seen


def recomputed_causal(model, history):
    """The causal stream over the token history from scratch: what the cache must equal. Learned
    positions: the window as nanoGPT crops it. Rotary: every token attends to the block_size tokens
    up to itself (the rolling window), positions counting from 0. Returns states and per-pass (k, v)."""
    bs = model.config.block_size
    history = history if engine.block_edge(model).rolls else history[:, -bs:]
    pos = torch.arange(history.size(1))
    engine.ensure_positions(model, history.size(1) + model.config.n_future + 1)
    x = model.token_states(history, pos)
    ctx, kvs = Context(x, pos, visibility(pos, None, None, pos, window=bs)), []
    if model.sandwiched():  # prelude, core, coda: one entry of every layer
        _, x, layers = model.once_through(x, ctx, model.config.n_loop)
        return x, [layers]
    for _ in range(model.config.n_loop):
        x, layers = model.update(x, ctx)
        kvs.append(layers)
    return x, kvs


def uncached_collapse(model, idx, n, s, generator):
    """The collapse sampler's loop with the past's keys/values recomputed from scratch every step
    (recomputed_causal over the whole history). Policy and draws as in sampling.generate."""
    w, out, history = engine.start(model, idx), [], idx
    while sum(t.size(1) for t in out) < n:
        _, kvs = recomputed_causal(model, history if engine.block_edge(model).rolls else w.past)  # learned: the window itself
        keep = w.past.size(1)
        w.cache = engine.KVCache(start=history.size(1) - keep if engine.block_edge(model).rolls else 0)
        w.cache.append([[(k[:, :, -keep:], v[:, :, -keep:]) for k, v in layers] for layers in kvs])
        w.pending = 0
        w, _ = engine.refine(model, w if s.warm == 'on' else engine.forget(model, w))
        logits = w.stats['logits']
        slots = choose_slots(s.policy, entropy_of_logits(logits) / math.log(2), w.decided < 0, s.tau)
        w = engine.collapse(model, w, slots, sample_tokens(logits, s, generator))
        w, moved = engine.shift(model, w, slide=s.slide)
        out.append(moved)
        history = torch.cat((history, moved), 1)
    return torch.cat(out, 1)[:, :n]


@pytest.fixture(scope='module')
def pattern_wfc():
    """Trained a little on the repeating pattern: sure of some slots and not of others."""
    return {'rope': train_pattern_model(steps=100, n_future=4, pos_emb='rope'),
            'learned-looped': train_pattern_model(steps=250, n_future=4, pos_emb='learned', n_loop=2, inject='add',
                                                  spec_window=1, max_loop=3)}


@pytest.mark.parametrize('kind,slide', [('rope', 0), ('learned-looped', 0), ('learned-looped', 3)])
def test_cached_collapse_sampler_draws_the_same_tokens_as_recomputing_the_past(pattern_wfc, kind, slide, monkeypatch):
    model = pattern_wfc[kind]
    idx = torch.tensor([[0], [3]])  # a short prompt: the past grows through cached extensions first
    s = Settings(temperature=1.0, top_k=0, policy='threshold', tau=1.0, slide=slide, warm='on', sampler='collapse')
    seen = record_refines(monkeypatch)
    cached, stats = generate(model, idx, 40, s, torch.Generator().manual_seed(1))  # slides past block_size 16
    steps, _ = list(seen), seen.clear()
    assert torch.equal(cached, uncached_collapse(model, idx, 40, s, torch.Generator().manual_seed(1)))
    # fp32 rounding of the two ways (warm starts carry it a few steps); a stale cache is O(1)
    assert len(steps) == len(seen) and all(torch.allclose(a, b, atol=1e-3) for a, b in zip(steps, seen))


@pytest.mark.parametrize('overrides', [dict(), dict(n_loop=2), dict(pos_emb='rope'),
                                       dict(pos_emb='rope', n_loop=2, inject='add', decay=0.5)])
@pytest.mark.parametrize('slide', [0, 5])
def test_gpt_kv_cache_draws_the_same_tokens_as_recomputing(overrides, slide):
    model = tiny(**overrides).eval()
    if slide and model.rotary is not None:
        pytest.skip("a rotary cache rolls: slide applies to learned positions only")
    idx = torch.randint(0, 13, (3, 4), generator=torch.Generator().manual_seed(0))
    s = Settings(temperature=1.0, top_k=0, slide=slide)
    cached, _ = generate(model, idx, 40, s, torch.Generator().manual_seed(2))
    g, seq, window, bs = torch.Generator().manual_seed(2), idx, idx, model.config.block_size
    with torch.no_grad():
        for _ in range(40):
            if model.rotary is None:  # nanoGPT's loop: a full forward of the cropped window
                logits, _ = model(window)
            else:  # the rolling window, recomputed from scratch over everything so far
                logits = model.logits(recomputed_causal(model, seq)[0])
            token = sample_tokens(logits[:, -1], s, g)[:, None]
            seq, window = torch.cat((seq, token), 1), torch.cat((window, token), 1)
            if window.size(1) > bs:
                window = window[:, -max(1, bs - slide):]
    assert torch.equal(cached, seq[:, 4:])


@pytest.mark.parametrize('overrides', [dict(), dict(pos_emb='rope', n_loop=2, inject='add', decay=0.5)])
def test_run_causal_last_positions_match_the_full_run(overrides):
    model = tiny(**overrides).eval()
    idx = torch.randint(0, 13, (2, 12))
    full_cache = engine.KVCache()
    full = engine.run_causal(model, idx, full_cache)
    for queries in (0, 1, 3):
        cache = engine.KVCache()
        last = engine.run_causal(model, idx, cache, queries=queries)
        assert last.shape == (2, queries, 32)
        assert torch.allclose(last, full[:, 12 - queries:], atol=1e-5)
        assert torch.equal(cache.buf[..., :12, :], full_cache.buf[..., :12, :])
    grown = engine.KVCache()
    engine.run_causal(model, idx[:, :7], grown)  # extending a cache: the new tokens' states and keys
    tail = engine.run_causal(model, idx[:, 7:], grown, queries=2)
    assert torch.allclose(tail, full[:, -2:], atol=1e-5)
    assert torch.allclose(grown.buf[..., :12, :], full_cache.buf[..., :12, :], atol=1e-5)


@pytest.mark.parametrize('chunk', [1, 3, 7])
def test_a_rolling_cache_extended_in_chunks_is_the_rolling_window_recomputed(chunk):
    """Past the block edge, extending a rotary cache by several tokens at a time (as a pending join or
    a verification call does) gives every token the keys of the block_size tokens up to itself."""
    model = tiny(pos_emb='rope', n_loop=2).eval()
    seq = torch.randint(0, 13, (2, 45), generator=torch.Generator().manual_seed(3))
    cache = engine.KVCache()
    engine.run_causal(model, seq[:, :5], cache)
    outs = [engine.run_causal(model, seq[:, k:k + chunk], cache) for k in range(5, 45, chunk)]
    full, _ = recomputed_causal(model, seq)
    assert torch.allclose(torch.cat(outs, 1), full[:, 5:], atol=1e-5)


@pytest.mark.parametrize('overrides', [dict(n_loop=2), dict(n_future=2, n_prelude=1, n_coda=1, n_layer=3, inject='contract',
                                                       bound='rms')])
@pytest.mark.parametrize('chunk', [1, 3])
def test_a_ring_cache_is_the_rolling_window_recomputed_and_never_moves(overrides, chunk):
    """The causal sampler's ring cache (fixed shape, written in place): past the block edge
    every token sees the keys of the block_size tokens up to itself, for a looped GPT and a sandwich
    WFC's past stream, fed a token or a few at a time; its buffers are never reallocated."""
    model = tiny(pos_emb='rope', **overrides).eval()
    seq = torch.randint(0, 13, (2, 45), generator=torch.Generator().manual_seed(3))
    cache = engine.causal_ring(model, 2, most_per_call=chunk)
    engine.decode_ring(model, seq[:, :5], cache)
    buffers = [(t.data_ptr(), t.shape) for kv in (cache.k, cache.v) for layers in kv for t in layers]
    outs = [engine.decode_ring(model, seq[:, k:k + chunk], cache) for k in range(5, 45, chunk)]
    full, _ = recomputed_causal(model, seq)
    assert torch.allclose(torch.cat(outs, 1), full[:, 5:], atol=1e-5)
    assert [(t.data_ptr(), t.shape) for kv in (cache.k, cache.v) for layers in kv for t in layers] == buffers
    assert cache.end == 45 and int(cache.pointer) == 45


def test_a_ring_cache_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match='rotary'):
        engine.causal_ring(tiny().eval(), 1)  # learned positions re-encode the window at the edge
    model = tiny(pos_emb='rope').eval()
    cache = engine.causal_ring(model, 1, most_per_call=2)
    engine.decode_ring(model, torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match='overwrite'):
        engine.decode_ring(model, torch.zeros(1, 3, dtype=torch.long), cache)  # 3 > most_per_call tokens at once


def test_the_cache_truncates_selects_and_compacts():
    cache = engine.KVCache()
    k = torch.arange(2 * 3 * 70 * 4, dtype=torch.float).view(2, 3, 70, 4)  # (B, heads, n, head size)
    cache.append([[(k, -k)]])
    assert cache.length == 70 and torch.equal(cache.views(0)[0][0], k) and torch.equal(cache.views(0, 5)[0][1], -k[:, :, -5:])
    cache.truncate(60)
    assert cache.end == 60 and torch.equal(cache.views(0)[0][0], k[:, :, :60])
    assert torch.equal(cache.select(torch.tensor([1, 1])).views(0)[0][0], k[[1, 1], :, :60])
    cache.compact(10)
    assert (cache.start, cache.length) == (50, 10) and torch.equal(cache.views(0)[0][0], k[:, :, 50:60])


def count_decodes(model):
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_refinement_decodes_only_where_the_convergence_test_needs_it():
    model = tiny(n_future=4, pos_emb='rope', max_loop=1).eval()
    calls = count_decodes(model)
    w = engine.start(model, torch.randint(0, 13, (1, 6)))
    engine.refine(model, w)
    assert len(calls) == 1, "one pass decides nothing: the only decode is refine's report (entropy, logits)"
    calls.clear()
    engine.refine(model, w, max_loop=4, min_loop=4, tol=0.0)
    assert len(calls) == 1 + 1, "min_loop = max_loop: one decode before the last test is all there is"
    calls.clear()
    engine.refine(model, w, max_loop=5, tol=-1.0)
    assert len(calls) == 1, "tol < 0: a fixed depth, no test at all"
    calls.clear()
    _, used = engine.refine(model, w, max_loop=5, tol=0.0)
    assert used == 5 and len(calls) == 5 + 1, "before pass 1, after passes 1..4, and the report"


@pytest.fixture(scope='module')
def slow_converger():
    """A re-injected, bounded recurrence: its rows converge after different numbers of passes."""
    return train_pattern_model(steps=60, n_future=6, pos_emb='rope', n_loop=3, inject='add', bound='rms', max_loop=60)


def test_converged_rows_stop_being_computed_and_the_others_do_not_change(slow_converger):
    model, tol = slow_converger, 1e-5
    idx = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [3, 4, 5, 6, 0, 1, 2, 3, 4, 8], [8, 8, 1, 2, 3, 4, 5, 6, 0, 1]])
    together, used = engine.refine(model, engine.start(model, idx), tol=tol)
    trace = together.stats['trace']
    alone = [engine.refine(model, engine.start(model, idx[r:r + 1]), tol=tol)[0] for r in range(3)]
    steps = [w.stats['trace'].steps for w in alone]
    assert len(set(steps)) > 1, "rows that converge at different passes"
    assert trace.calls == sum(steps) < 3 * used, "a converged row is not computed any more"
    for r in range(3):
        assert torch.allclose(together.future[r], alone[r].future[0], atol=1e-5)


@pytest.mark.parametrize('kind', ['gpt', 'wfc', 'speculative'])
def test_batched_rows_are_the_single_runs(kind):
    model = tiny(**({} if kind == 'gpt' else dict(n_future=4, pos_emb='rope', past_loss=1.0))).eval()
    idx = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(0))
    s = Settings(temperature=0, sampler='collapse' if kind == 'wfc' else 'auto')
    batched, _ = generate(model, idx, 30, s)
    for row in range(3):
        single, _ = generate(model, idx[row:row + 1], 30, s)
        assert torch.equal(batched[row:row + 1], single)


@pytest.mark.slow  # bench.py in a subprocess
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
    assert data['rows'][1]['acceptance'] and all(0 <= a <= 1 for a in data['rows'][1]['acceptance'])  # the WFC drafts
    assert all(0 < r['batch_stack_share'] <= 1 for r in data['rows'])


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
    warmed = stderr + 'compiled the samplers: a warm-up of 74 tokens took 3.0 s\n@@generate {"seconds": 0.25, "ids": [[6]]}\n'
    assert vs_nanogpt.generations(warmed) == [(0.25, [[6]])], "a compiled sampler's warm-up is not timed"


def test_vs_nanogpt_finds_a_judge_before_it_samples(debug_gpt, tmp_path):
    """No judge at --judge: our GPT job's first-repeat checkpoint judges; none at all is refused up
    front (it once failed only after every sampler had run)."""
    import argparse
    import shutil
    args = argparse.Namespace(judge=str(tmp_path / 'none'))
    shutil.copytree(debug_gpt, tmp_path / 'gpt_rope_0')
    assert vs_nanogpt.load_judge(args, str(tmp_path), ['nano', 'wfc', 'gpt_rope'])[0] == str(tmp_path / 'gpt_rope_0')
    with pytest.raises(SystemExit):
        vs_nanogpt.load_judge(args, str(tmp_path), ['nano', 'wfc'])


def test_step_profile_splits_a_step_and_refuses_a_folder_without_nanogpt(tmp_path):
    result = run_script('tools/step_profile.py', '--steps=2', timeout=120)
    assert '| ours |' in result.stdout and '% of its time in matrix products' in result.stdout, result.stdout
    result = run_script('tools/step_profile.py', f'--nanogpt={tmp_path}', check=False)
    assert result.returncode == 2 and 'holds no model.py' in result.stderr


@pytest.fixture
def debug_gpt(pattern_data, tmp_path):
    """A run folder of train_debug.py's GPT on the pattern corpus, whose vocabulary has a newline
    (sample.py's default prompt)."""
    import pickle
    chars = '\nabcdefgh'
    with open(os.path.join(pattern_data, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': 9, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}, f)
    run = tmp_path / 'gpt'
    assert run_inprocess('train.py', 'config/train_debug.py', f'--dataset={pattern_data}', f'--out_dir={run}')[0] == 0
    return run


def test_vs_nanogpt_times_our_sampler_through_its_wrapper(debug_gpt):
    """The wrapper patches generation.sampling.generate in a real sample.py run and reads its record
    (it imported a module that had moved, and every sampling comparison failed)."""
    import argparse
    import subprocess
    run = debug_gpt
    cmd, cwd = vs_nanogpt.sample_command('gpt', str(run), argparse.Namespace(tokens=5, slide=0, sampler='auto'), 2)
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr
    [(seconds, ids)] = vs_nanogpt.generations(result.stderr)
    assert seconds > 0 and [len(row) for row in ids] == [5, 5]


def test_sample_profile_prints_the_ops_table(debug_gpt, pattern_data):
    run = debug_gpt
    result = run_script('tools/sample_profile.py', f'--out_dir={run}', '--tokens=8', '--rows=3', timeout=120)
    assert 'tokens/s unprofiled' in result.stdout and 'steps/s' in result.stdout
    assert sum(line.startswith('| aten::') for line in result.stdout.splitlines()) == 3, result.stdout
    result = run_script('tools/sample_profile.py', f'--out_dir={run}', '--sampler=speculative', check=False)
    assert result.returncode == 2 and 'needs a WFC model' in result.stderr
    wfc = run.parent / 'wfc'  # a WFC checkpoint: the products of a round's six positions against one position's
    assert run_inprocess('train.py', 'config/train_debug.py', f'--dataset={pattern_data}', '--n_future=2',
                         '--pos_emb=rope', '--past_loss=1.0', f'--out_dir={wfc}')[0] == 0
    result = run_script('tools/sample_profile.py', f'--out_dir={wfc}', '--tokens=8', '--rows=3', timeout=120)
    assert 'over 6 (a speculative round of F = 2)' in result.stdout, result.stdout
