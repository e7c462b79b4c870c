"""The speculative sampler (speculative.py) is exact. Greedy, it writes token for token what the
causal stream writes greedily on its own (several prompts and checkpoints, across the block edge);
sampled, the first three tokens follow the causal stream's filtered next-token distribution
(total variation and a chi-square test at significance 0.001, for temperature 1, temperature
0.7 with top-k and top-p), while the drafts alone do not (the check has the power to see a wrong
rule). One stack call per round; the cache is extended and truncated, never rebuilt. Batched, every
row of a batch advances in the same stack call, accepting its own number of drafts: each row writes
the causal stream's greedy text (and what it writes alone), and the cache entries each row keeps are
its committed tokens' keys/values, its rejected drafts' holes never seen."""

import itertools
import math

import pytest
import torch

from conftest import tiny, train_pattern_model
from generation import engine
from generation import speculative
from generation.decoding import Settings, filtered_probs
from generation.sampling import generate


@pytest.fixture(scope='module')
def checkpoints():
    """A trained pattern model with F = 2, one with F = 4 and a prelude / core / coda sandwich with
    F = 2 (their drafts are often accepted), and an untrained one (often rejected)."""
    return {'F2': train_pattern_model(steps=150, n_future=2, pos_emb='rope', past_loss=1.0),
            'F4': train_pattern_model(steps=150, n_future=4, pos_emb='rope', past_loss=1.0, dist_power=1.0),
            'untrained': tiny(vocab_size=9, n_future=3, pos_emb='rope', past_loss=1.0).eval(),
            'sandwich': train_pattern_model(steps=150, n_future=2, pos_emb='rope', past_loss=1.0, n_layer=3, n_prelude=1,
                                            n_coda=1, bound='rms', inject='contract')}


@pytest.mark.parametrize('name', ['F2', 'F4', 'sandwich', 'untrained'])
def test_greedy_speculation_is_the_causal_streams_greedy_text(checkpoints, name):
    model = checkpoints[name]
    prompts = [torch.tensor([[0, 1, 2]]), torch.tensor([[5]]), torch.tensor([[3, 3, 8, 1, 2, 3, 4, 5]])]
    for idx in prompts:  # 60 tokens: far across the block edge (block_size 16)
        causal, _ = generate(model, idx, 60, Settings(temperature=0, sampler='causal'))
        spec, stats = generate(model, idx, 60, Settings(temperature=0, sampler='speculative'))
        assert torch.equal(spec, causal), name
        assert stats.summary()['tokens_per_call'] >= 1.0
    if name != 'untrained':
        assert stats.summary()['tokens_per_call'] > 1.2, "a trained model's drafts are mostly accepted"


def exact_first_tokens(model, prompt, n, s):
    """{(x1, .., xn): probability} under the causal stream's filtered next-token distribution."""
    V, table = model.config.vocab_size, {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=n):
            ids = torch.tensor([prompt + list(seq)])
            pos = torch.arange(ids.size(1))
            logits = model.logits(model.causal_stream(model.token_states(ids, pos), pos)[0])[0]
            probs = filtered_probs(logits[len(prompt) - 1:-1], s.temperature, s.top_k, s.top_p, s.min_p)
            table[seq] = math.prod(probs[t, x].item() for t, x in enumerate(seq))
    return table


def draws(model, prompt, n, s, rows, seed):
    idx = torch.tensor([prompt] * rows)
    out, stats = generate(model, idx, n, s, torch.Generator().manual_seed(seed))
    assert len(stats.steps) <= n, "the rows ran as one batch: each round is one stack call for all of them"
    counts = {}
    for row in out.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def distance(counts, table):
    """(total variation, chi-square p-value) of the empirical counts against the exact table. Outcomes
    expected fewer than 5 times are pooled into one cell: the chi-square law holds only for cells that
    are not nearly empty (one draw of an outcome expected 0.03 times alone would weigh 30)."""
    N = sum(counts.values())
    tv = 0.5 * sum(abs(counts.get(k, 0) / N - p) for k, p in table.items())
    tv += 0.5 * sum(c / N for k, c in counts.items() if k not in table)
    cells = [(counts.get(k, 0), N * p) for k, p in table.items() if N * p >= 5]
    rare = [(counts.get(k, 0), N * p) for k, p in table.items() if 0 < N * p < 5]
    cells += [(sum(o for o, _ in rare), sum(e for _, e in rare))] if rare else []
    outside = sum(c for k, c in counts.items() if table.get(k, 0) == 0)
    if outside:
        return tv, 0.0
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    p_value = torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2, dtype=torch.float64),
                                      torch.tensor(chi2 / 2, dtype=torch.float64)).item()
    return tv, p_value


@pytest.mark.parametrize('settings', [dict(temperature=1.0, top_k=0), dict(temperature=0.7, top_k=3),
                                      dict(temperature=1.0, top_k=0, top_p=0.9)])
@pytest.mark.slow  # thousands of draws
def test_sampled_tokens_follow_the_causal_distribution(settings):
    torch.manual_seed(3)  # a small model with a spread-out distribution over 4 tokens, untrained: drafts often wrong
    model = tiny(vocab_size=4, n_future=3, pos_emb='rope', past_loss=1.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper, more varied distributions than the near-uniform init
    prompt, s = [1, 2], Settings(sampler='speculative', **settings)
    table = exact_first_tokens(model, prompt, 3, s)
    counts = draws(model, prompt, 3, s, 2000, seed=0)
    tv, p_value = distance(counts, table)
    support = sum(p > 0 for p in table.values())
    assert support > 8 and tv < 0.07 and p_value > 1e-3, (support, tv, p_value)
    # the check can fail: the drafts' own distribution (slots 1..3 of the first window) is another one
    w, _ = engine.refine(model, engine.start(model, torch.tensor([prompt])))
    q = filtered_probs(w.stats['logits'][0], s.temperature, s.top_k, s.top_p, s.min_p)
    drafts_table = {k: math.prod(q[t, x].item() for t, x in enumerate(k)) for k in table}
    assert distance(counts, drafts_table)[1] < 1e-3


def test_one_stack_call_per_round_and_the_cache_is_never_rebuilt(checkpoints, monkeypatch):
    model = checkpoints['F4']
    calls, caches = [], []
    stack, init = model.stack, engine.RingCache.__init__
    monkeypatch.setattr(model, 'stack', lambda *a, **k: (calls.append(1), stack(*a, **k))[1])
    monkeypatch.setattr(engine.RingCache, '__init__', lambda self, *a, **k: (caches.append(1), init(self, *a, **k))[1])
    out, stats = generate(model, torch.tensor([[0, 1, 2]]), 50, Settings(temperature=1.0, top_k=0, sampler='speculative'),
                          torch.Generator().manual_seed(0))
    rounds = len(stats.steps)
    assert len(calls) == rounds + 1, "the prompt's prefill, then one call per round"
    assert len(caches) == 1, "one cache for the whole generation: never rebuilt, past the block edge too"
    assert out.size(1) == 50 and rounds < 50, "some rounds commit several tokens"
    summary = stats.summary()
    assert len(summary['acceptance']) == 3 and all(0 <= a <= 1 for a in summary['acceptance'])
    assert summary['acceptance'][0] >= summary['acceptance'][-1], "a far draft is accepted less often"


@pytest.mark.parametrize('name', ['F2', 'F4', 'sandwich', 'untrained'])
def test_the_cache_holds_exactly_the_committed_tokens(checkpoints, name):
    """After any mix of accepted and rejected drafts the cache equals the causal stream recomputed from
    scratch over the committed tokens (the last one is still pending): truncation keeps the accepted."""
    from generation.decoding import Request, Stats
    from test_performance import recomputed_causal
    model, idx = checkpoints[name], torch.tensor([[0, 1, 2]])
    s = Settings(temperature=1.0, top_k=0, sampler='speculative')
    req = Request(12, torch.Generator().manual_seed(1), stats=Stats())
    out, cache = speculative.sample_row(model, idx, s, req)
    assert len(req.stats.steps) < 12, "some rounds committed several tokens"
    committed = torch.cat((idx, out), 1)[:, :-1]
    _, kvs = recomputed_causal(model, committed)
    expected = torch.stack([torch.stack(kv) for kv in kvs[0]])  # (layers, 2, B, heads, n, head size)
    views, pos = cache.views()
    live = (pos[0] != engine.RingCache.HOLE).nonzero()[:, 0]
    order = live[pos[0, live].argsort()]
    assert pos[0, order].tolist() == list(range(committed.size(1)))
    held = torch.stack([torch.stack((k[..., order, :], v[..., order, :])) for k, v in views])
    assert torch.allclose(held, expected, atol=1e-5)


PROMPTS = torch.tensor([[0, 1, 2], [5, 6, 0], [3, 3, 8], [8, 2, 7]])  # same length, different rows


@pytest.mark.parametrize('name', ['F2', 'F4', 'sandwich', 'untrained'])
def test_batched_greedy_speculation_is_each_rows_causal_greedy_text(checkpoints, name):
    model = checkpoints[name]
    causal, _ = generate(model, PROMPTS, 60, Settings(temperature=0, sampler='causal'))  # 60 tokens: across the block edge
    for extra in ({}, dict(future='auto', tau=2.0), dict(max_loop=2)):  # auto: rows draft different numbers of tokens
        spec, stats = generate(model, PROMPTS, 60, Settings(temperature=0, sampler='speculative', **extra))
        assert torch.equal(spec, causal), (name, extra)
        assert any(step['emitted'] != int(step['emitted']) for step in stats.steps), "rows that accepted differently"


@pytest.mark.parametrize('name', ['F4', 'untrained'])
def test_a_rows_greedy_text_does_not_depend_on_its_batch(checkpoints, name):
    model, s = checkpoints[name], Settings(temperature=0, sampler='speculative')
    together, _ = generate(model, PROMPTS, 40, s)
    for r in range(len(PROMPTS)):
        alone, _ = generate(model, PROMPTS[r:r + 1], 40, s)
        assert torch.equal(together[r:r + 1], alone), (name, r)


@pytest.mark.parametrize('name', ['F4', 'sandwich', 'untrained'])
def test_a_whole_round_as_one_function_draws_what_the_grouped_round_draws(checkpoints, name, monkeypatch):
    """decided_round (the round without a constraint, one function of tensors that compiles whole) and
    the grouped round (drafts drawn per group of rows, any constraint) read the same noise the same
    way: from the same seed, the same text, sampled and greedy, with rows of the batch finishing at
    different lengths."""
    model, runs = checkpoints[name], []
    for s in (Settings(temperature=0.8, top_k=5, sampler='speculative'), Settings(temperature=0, sampler='speculative')):
        for grouped in (False, True):
            if grouped:
                monkeypatch.setattr(speculative, 'decides', lambda *a: False)
            stats = []
            out, record = generate(model, PROMPTS, 30, s, torch.Generator().manual_seed(4),
                                   on_tokens=lambda b, ids: b == 1 and record_len(stats, ids) >= 12)
            runs.append((out, record.summary()['acceptance']))
            monkeypatch.undo()
        assert torch.equal(runs[-2][0], runs[-1][0]) and runs[-2][1] == runs[-1][1], (name, s.temperature)
        assert (runs[-1][0][1] == -1).any(), "row 1 ended early"


@pytest.mark.parametrize('temperature', [0.8, 0])
def test_several_rounds_per_call_write_the_text_of_one_round_per_call(checkpoints, temperature, monkeypatch):
    """decided_rounds (what a compiled sampler runs: runtime.ROUNDS_PER_CALL rounds per call) and one
    round per call: from the same seed the same text and the same acceptance, with a row that
    on_tokens ends inside a call and rows that reach max_new_tokens inside one (the rounds after a
    row's end are run and thrown away). The rounds counted are those some row still needed."""
    model, s, runs = checkpoints['F4'], Settings(temperature=temperature, top_k=5, sampler='speculative'), []
    step = speculative.decided_rounds
    for rounds in (1, 3):
        monkeypatch.setattr(model, 'rounds_per_call', rounds, raising=False)
        stats, calls = [], []
        monkeypatch.setattr(speculative, 'decided_rounds', lambda *a: calls.append(a[-1]) or step(*a))
        out, record = generate(model, PROMPTS, 31, s, torch.Generator().manual_seed(4),
                               on_tokens=lambda b, ids: b == 1 and record_len(stats, ids) >= 12)
        runs.append((out, record.summary()['acceptance'], record.summary()['steps']))
        assert set(calls[1:]) == {rounds} and calls[0] == 1, calls  # the first round has no drafts: one round
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert (runs[0][0][1] == -1).any() and (runs[0][0] != -1).all(1).any(), "row 1 ended early, another ran to the end"


def record_len(stats, ids):
    stats.extend(ids)
    return len(stats)


def test_one_stack_call_per_round_for_the_whole_batch(checkpoints, monkeypatch):
    model = checkpoints['F4']
    calls, stack = [], model.stack
    monkeypatch.setattr(model, 'stack', lambda *a, **k: (calls.append(a[0].size(0)), stack(*a, **k))[1])
    out, stats = generate(model, PROMPTS, 50, Settings(temperature=1.0, top_k=0, sampler='speculative'),
                          torch.Generator().manual_seed(0))
    rounds = len(stats.steps)
    assert len(calls) == rounds + 1, "the prompts' prefill, then one call per round for every row"
    assert calls[:2] == [len(PROMPTS)] * 2, "the rows run together"
    assert out.shape == (len(PROMPTS), 50) and (out >= 0).all() and rounds < 50


@pytest.mark.parametrize('name', ['F2', 'F4', 'sandwich', 'untrained'])
def test_each_rows_cache_entries_are_its_committed_tokens(checkpoints, name, monkeypatch):
    """Before every round of a batched run (100 tokens: past the block edge, so the ring wraps
    around), each row's entries that are not holes hold the keys/values of the causal stream
    recomputed from scratch over that row's text, at distinct positions before its pending token,
    and every position of the window is there."""
    from test_performance import recomputed_causal
    model, seen, wrapped, round_call = checkpoints[name], [], [], speculative.round_call
    def spy(model, cache, tokens, ends, *args):  # the stack call of every round, whichever path runs it
        views, pos = cache.views()
        if views and pos.size(0) == len(PROMPTS):  # every row still running: rows in prompt order
            seen.append((pos.clone(), torch.stack([torch.stack(kv) for kv in views]).clone(), ends.clone()))
            wrapped.append(int(cache.pointer) > cache.capacity)
        return round_call(model, cache, tokens, ends, *args)
    monkeypatch.setattr(speculative, 'round_call', spy)
    out, _ = generate(model, PROMPTS, 100, Settings(temperature=1.0, top_k=0, sampler='speculative'),
                      torch.Generator().manual_seed(1))
    _, kvs = recomputed_causal(model, torch.cat((PROMPTS, out), 1))
    expected = torch.stack([torch.stack(kv) for kv in kvs[0]])  # (layers, 2, B, heads, n, head size)
    window = model.config.block_size - 1
    assert len(seen) > 5 and not (seen[-1][0][0] == 0).any(), "the first row's cache rolled past position 0"
    assert wrapped[-1], "the ring's columns were written over"
    for pos, buf, ends in seen:
        for r in range(len(PROMPTS)):
            live = pos[r] != engine.RingCache.HOLE
            kept = pos[r][live]
            assert len(set(kept.tolist())) == len(kept) and int(kept.max()) == int(ends[r]) - 1
            assert set(range(max(0, int(ends[r]) - window), int(ends[r]))) <= set(kept.tolist())
            assert torch.allclose(buf[:, :, r][..., live, :], expected[:, :, r][..., kept, :], atol=1e-5)
