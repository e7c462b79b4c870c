"""The collapse sampler (sampling.py) and the window operations behind it (engine.py): seeded
determinism, real warm starts, cold starts equal to a fresh window, the threshold policy's
multi-token steps, nearest collapse, goals (near and beyond the window), future='auto' windows,
sliding past block_size, the GPT KV cache against nanoGPT's loop, and the sampling filters."""

import math

import pytest
import torch

from conftest import tiny, train_pattern_model
from generation import engine
from generation.decoding import Settings, filtered_probs, live_slots
from generation.sampling import choose_slots, generate, warm_up
from plumbing import runtime

COLLAPSE = dict(sampler='collapse')


@pytest.fixture(scope='module')
def looped():
    """Trained to be refined repeatedly and to warm-start (random passes, supervised twice)."""
    return train_pattern_model(n_future=4, pos_emb='rope', n_loop=4, loop_law='uniform', warm_prob=0.5,
                               supervise=2, max_loop=12, tol=1e-3)


def test_same_seed_same_text_and_another_seed_differs():
    model = tiny(n_future=4, pos_emb='rope').eval()
    idx = torch.randint(0, 13, (1, 5))
    for s in (Settings(temperature=1.0, top_k=0, **COLLAPSE), Settings(temperature=1.0, top_k=0)):
        run = lambda seed: generate(model, idx, 40, s, torch.Generator().manual_seed(seed))[0]
        assert torch.equal(run(1), run(1))
        assert not torch.equal(run(1), run(2))
    s = Settings(temperature=1.0, top_k=0)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_warm_start_carries_the_state_and_saves_passes(looped):
    idx = torch.arange(10)[None] % 7
    w, _ = engine.refine(looped, engine.start(looped, idx))
    warm, cold = [], []
    for _ in range(6):
        before = w.future.clone()
        slots = torch.tensor([[True, False, False, False]])
        w = engine.collapse(looped, w, slots, w.stats['logits'].argmax(-1))
        w, _ = engine.shift(looped, w)
        assert torch.equal(w.future[:, :3], before[:, 1:]), "the carried slots must keep their refined state"
        assert torch.allclose(w.future[:, 3], looped.e_max()), "the new slot starts at e_max"
        w, used = engine.refine(looped, w)
        warm.append(used)
        cold.append(engine.refine(looped, engine.start(looped, w.past))[1])
    assert sum(warm) < sum(cold), (warm, cold)


@pytest.mark.parametrize('attn', ['pinned', 'bidirectional'])
def test_a_cold_start_sees_what_a_fresh_window_sees(attn):
    """warm='off' (forget) must restart from the state training starts from: after several
    collapse/shift steps, the refined future equals that of a new window on the same tokens. In
    bidirectional mode refine also moves the past's states, so forget must reset them too."""
    model = tiny(n_future=3, pos_emb='rope', attn=attn).eval()
    w, _ = engine.refine(model, engine.start(model, torch.arange(6)[None] % 5))
    for _ in range(4):
        slots = torch.tensor([[True, False, False]])
        w, _ = engine.shift(model, engine.collapse(model, w, slots, w.stats['logits'].argmax(-1)))
        w, _ = engine.refine(model, engine.forget(model, w))
    fresh, _ = engine.refine(model, engine.start(model, w.past))
    assert torch.allclose(w.future, fresh.future, atol=1e-5)


def test_threshold_commits_several_certain_tokens_and_exactly_one_otherwise(looped):
    idx = torch.arange(10)[None] % 7
    _, stats = generate(looped, idx, 24, Settings(temperature=0, policy='threshold', tau=1.0, **COLLAPSE))
    assert max(s['emitted'] for s in stats.steps) > 1
    _, stats = generate(looped, idx, 12, Settings(temperature=0, policy='threshold', tau=0.0, **COLLAPSE))
    assert all(s['emitted'] == 1 for s in stats.steps)
    bits = torch.tensor([[0.1, 0.2, 3.0, 0.1], [2.0, 0.1, 0.1, 0.1]])
    open_ = torch.tensor([[True, True, True, True], [True, True, True, True]])
    assert choose_slots('threshold', bits, open_, 1.0).tolist() == [[True, True, False, False], [True, False, False, False]]


def test_nearest_collapse_is_sure_and_no_farther_than_the_token_row():
    model = tiny(n_future=4, pos_emb='rope').eval()
    with torch.no_grad():  # embedding rows that decode to themselves with confidence
        model.transformer.wte.weight.copy_(3.0 * torch.linalg.qr(torch.randn(32, 13))[0].T)
    w = engine.start(model, torch.randint(0, 13, (2, 5)))
    w.future = w.future + 0.3 * torch.randn_like(w.future)
    before = w.future.clone()
    tokens = torch.randint(0, 13, (2, 4))
    slots = torch.ones(2, 4, dtype=torch.bool)
    w = engine.collapse(model, w, slots, tokens, mode='nearest', eps=0.1)
    p = model.decode(w.future).gather(-1, tokens[..., None])[..., 0]
    assert (p >= 0.9 - 1e-4).all()
    rows = model.transformer.wte.weight[tokens]
    assert ((w.future - before).norm(dim=-1) <= (rows - before).norm(dim=-1) + 1e-5).all()
    assert ((w.future - before).norm(dim=-1) < (rows - before).norm(dim=-1) - 1e-3).any(), "never short of the row"


@pytest.mark.parametrize('policy', ['first', 'threshold', 'lowest', 'median'])
@pytest.mark.parametrize('offset', [3, 9])
def test_a_goal_appears_at_its_offset_and_generation_continues(looped, policy, offset):
    """Offset 3 lies in the first window (what pins used to be); offset 9 lies beyond it and is
    pinned as its slots come into reach."""
    idx = torch.arange(10)[None] % 7  # next tokens would be 3 4 5 6 ...
    goal = [6, 6]
    out, _ = generate(looped, idx, 14, Settings(temperature=0, policy=policy), goal=(offset, goal))
    assert out.size(1) == 14
    assert out[0, offset - 1:offset + 1].tolist() == goal


def test_future_auto_follows_the_entropy_curve(looped):
    assert live_slots(torch.tensor([[0.1, 0.2, 3.0, 0.1]]), 1.0) == 3  # two sure slots and the frontier
    assert live_slots(torch.tensor([[2.0, 0.1, 0.1, 0.1]]), 1.0) == 1
    assert live_slots(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), 1.0) == 4
    idx = torch.arange(10)[None] % 7
    for tau, expect in ((0.0, {1}), (50.0, {4})):  # nothing is sure: one slot; everything is: all four
        _, stats = generate(looped, idx, 12, Settings(temperature=0, future='auto', tau=tau, **COLLAPSE))
        assert {s['live'] for s in stats.steps} == expect
    out, stats = generate(looped, idx, 30, Settings(temperature=0, future='auto', tau=1.0, **COLLAPSE))
    assert out.shape == (1, 30) and 1 <= min(s['live'] for s in stats.steps)


@pytest.mark.parametrize('kind', ['gpt', 'pinned-rope', 'pinned-learned', 'bidirectional-learned'])
def test_generation_slides_past_block_size(kind):
    overrides = dict(gpt={}, **{'pinned-rope': dict(n_future=4, pos_emb='rope'),
                                'pinned-learned': dict(n_future=4, pos_emb='learned'),
                                'bidirectional-learned': dict(n_future=4, attn='bidirectional')})[kind]
    model = tiny(**overrides).eval()
    for slide in (0, 5):
        if slide and kind == 'pinned-rope':
            continue  # a rotary pinned window rolls: slide does not apply
        out, stats = generate(model, torch.randint(0, 13, (2, 3)), 50, Settings(temperature=1.0, slide=slide, **(
            {} if kind == 'gpt' else COLLAPSE)), torch.Generator().manual_seed(0))
        assert out.shape == (2, 50) and 0 <= out.min() and out.max() < 13


def test_gpt_kv_cache_matches_the_plain_sliding_loop():
    model = tiny(n_loop=2).eval()
    idx = torch.randint(0, 13, (2, 4))
    out, _ = generate(model, idx, 30, Settings(temperature=0))
    seq = idx
    for _ in range(30):  # nanoGPT's loop: crop to block_size, full forward, argmax of the last position
        logits, _ = model(seq[:, -model.config.block_size:])
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq[:, 4:])


def test_bad_sampler_inputs_are_clear_errors(looped):
    idx = torch.arange(10)[None] % 7
    with pytest.raises(ValueError, match='max_new_tokens must be > 0'):
        generate(looped, idx, 0, Settings())
    with pytest.raises(ValueError, match='a goal needs a WFC model'):
        generate(tiny().eval(), idx, 5, Settings(), goal=(1, [1]))
    with pytest.raises(ValueError, match="did not train"):  # no past_loss: its causal head cannot verify
        generate(looped, idx, 5, Settings(sampler='speculative'))
    with pytest.raises(ValueError, match="a goal pins future slots"):
        generate(tiny(n_future=2, pos_emb='rope', past_loss=1.0).eval(), idx, 5, Settings(sampler='speculative'), goal=(1, [1]))
    with pytest.raises(ValueError, match='policy must be one of'):
        generate(looped, idx, 5, Settings(policy='best'))


def test_filters_keep_what_they_should():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (filtered_probs(logits, 1.0, top_k=2) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(logits, 1.0, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(logits, 1.0, top_p=0.9) > 0).tolist() == [True, True, True, False]
    assert (filtered_probs(logits, 1.0, min_p=0.25) > 0).tolist() == [True, True, True, False]
    assert torch.allclose(filtered_probs(logits, 1.0), logits.exp())
    assert math.isclose(filtered_probs(logits, 0.5, top_k=3).sum().item(), 1.0, rel_tol=1e-6)


def test_warm_auto_warm_starts_only_models_trained_to():
    from generation.sampling import warm_start
    s = Settings()
    assert not warm_start(tiny(n_future=2), s), "a one-pass model never saw a carried state"
    assert warm_start(tiny(n_future=2, warm_prob=0.5), s) and warm_start(tiny(n_future=2, bound='rms'), s)
    assert warm_start(tiny(n_future=2), Settings(warm='on')) and not warm_start(tiny(n_future=2, bound='rms'), Settings(warm='off'))


def test_a_sandwich_runs_every_sampler_past_the_block_edge():
    """A prelude / core / coda sandwich (its window runs the prelude on fresh and decided slots and
    decodes through the coda): every sampler and policy writes the pattern it learned, across the
    block edge, and a goal lands at its offset; the collapse modes that work in embedding space are refused."""
    model = train_pattern_model(steps=150, n_future=2, pos_emb='rope', past_loss=1.0, n_layer=3, n_prelude=1, n_coda=1,
                                bound='rms', inject='contract', train_depth=4, loop_law='uniform', bptt=2, supervise=2,
                                max_loop=4)
    idx = torch.arange(10)[None] % 7
    pattern = ((torch.arange(10, 50) % 7)[None]).tolist()
    for s in (Settings(temperature=0, sampler='causal'), Settings(temperature=0, sampler='speculative'),
              Settings(temperature=0, **COLLAPSE), Settings(temperature=0, policy='threshold', tau=2.0, **COLLAPSE),
              Settings(temperature=0, policy='entropy', **COLLAPSE), Settings(temperature=0, warm='off', **COLLAPSE)):
        out, _ = generate(model, idx, 40, s)
        assert out.tolist() == pattern, s
    out, _ = generate(model, idx, 14, Settings(temperature=0, **COLLAPSE), goal=(9, [6, 6]))
    assert out[0, 8:10].tolist() == [6, 6] and out.size(1) == 14
    with pytest.raises(ValueError, match='mode=token'):
        generate(model, idx, 5, Settings(temperature=0, policy='median', **COLLAPSE))


def test_compile_samplers_refuses_fewer_than_one_round_per_call_and_leaves_the_model_eager():
    model = tiny(n_future=2, pos_emb='rope')
    with pytest.raises(ValueError, match='rounds_per_call must be at least 1'):
        runtime.compile_samplers(model, backend='eager', rounds_per_call=0)
    assert not hasattr(model, 'compiled_decided_rounds') and not hasattr(model.transformer.h[0], '_orig_mod')


@pytest.mark.parametrize('sampler,rows,temperature', [('causal', 1, 0), ('causal', 2, 0.8), ('speculative', 1, 0),
                                                      ('speculative', 3, 0.8)])  # greedy rows leaving: tests above
def test_compiled_samplers_write_the_same_text_and_compile_nothing_after_a_warm_up(sampler, rows, temperature):
    """runtime.compile_samplers (sample.py --compile): the same text as eager (greedy, and sampled
    from the same seed: a compiled step or round draws on noise drawn before it), and once
    sampling.warm_up has run past the block edge, a longer generation compiles no new graph (the
    rotary tables do not grow under it; the ring cache keeps its shapes; rows that leave a batch
    meet batch sizes the warm-up met). The 'eager' backend traces as inductor would, without the C++ build;
    2 rounds per call (not the samplers' 4) still hand state from round to round inside a graph, in
    half the tracing time."""
    import torch._dynamo
    model = train_pattern_model(n_future=2, pos_emb='rope', past_loss=1.0)  # a fresh model: rotary tables at their first size
    idx = (torch.arange(10)[None] + torch.arange(rows)[:, None]) % 7
    s, seed = Settings(temperature=temperature, top_k=5, sampler=sampler), lambda: torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    try:
        runtime.compile_samplers(model, backend='eager', rounds_per_call=2)
        warm_up(model, idx, s)  # what sample.py runs before its samples
        graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
        compiled, _ = generate(model, idx, 200, s, seed())  # far past the warm-up's positions
        for fewer in range(1, rows if sampler == 'speculative' else 1):  # every batch size its rows may leave behind
            generate(model, idx[:fewer], 30, s)
        assert torch._dynamo.utils.counters['stats']['unique_graphs'] == graphs, "a graph was compiled after the warm-up"
    finally:
        runtime.uncompile_samplers(model)
        torch._dynamo.reset()
    eager, _ = generate(model, idx, 200, s, seed())
    assert torch.equal(compiled, eager)
