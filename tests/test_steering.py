"""Steering (steering.py, the entropy policy in sampling.py): a -inf potential is never violated
by the particles SMC returns; with a constant potential SMC is plain sampling, token for token;
resampling triggers exactly when the ESS falls below its threshold (or a particle dies) and never
draws a dead particle; best-of-N and the tree return the argmax of the score; calibration
percentiles are monotone and are the percentiles of what the sampler saw; goals land at their
offset beyond the window; a lookahead reads the future and leaves the target unchanged;
Window.select indexes every row tensor; schedules and the entropy policy reduce to the plain
sampler where they should, and its branching keeps the candidate that leaves the future most
certain; the command line steers, calibrates and rejects a malformed potential."""

import math
import pickle
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import run_script, tiny
from generation import engine
from generation import steering
from generation.decoding import Settings
from generation.sampling import generate

V = 13
decode = lambda ids: ''.join(' ' if i < 3 else chr(ord('a') + i) for i in ids)  # noqa: E731  (0, 1, 2 are spaces)
PROMPT = torch.tensor([3, 1, 4, 1, 5])


@pytest.fixture(scope='module')
def wfc():
    return tiny(n_future=4, pos_emb='rope').eval()


def g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('potential', [steering.forbid_regex('[de]'), steering.must_contain('e', within=16)])
def test_a_hard_constraint_is_never_violated_by_returned_particles(wfc, potential):
    s = Settings(temperature=1.0, top_k=0)
    plain, _ = generate(wfc, PROMPT[None].expand(16, -1), 30, s, g(0))
    assert not all(steering.satisfies(potential, decode, row) for row in plain.tolist()), "the constraint must bite"
    alive = 0
    for seed in range(4):
        r = steering.smc(wfc, PROMPT, 30, potential, decode, particles=16, s=s, generator=g(seed))
        if r.died_at >= 0:  # every particle died: reported, and no particle is offered as a sample
            assert r.log_z == -math.inf and r.weights.sum() == 0
            continue
        alive += 1
        assert math.isfinite(r.log_z) and r.log_z < 0
        assert r.tokens.shape == (16, 30) and math.isclose(r.weights.sum().item(), 1.0)
        assert all(steering.satisfies(potential, decode, row) for row in r.tokens.tolist()), r.texts
        assert r.texts == [decode(row) for row in r.tokens.tolist()]
    assert alive >= 3


def test_every_particle_dying_is_reported(wfc):
    r = steering.smc(wfc, PROMPT, 10, steering.forbid_regex('.'), decode, particles=4, s=Settings(), generator=g(0))
    assert r.died_at == 0 and r.log_z == -math.inf and r.weights.sum() == 0


@pytest.mark.parametrize('particles,warm', [(1, 'off'), (3, 'on')])
def test_constant_potential_smc_is_plain_sampling(wfc, particles, warm):
    s = Settings(temperature=1.0, top_k=0, warm=warm)
    r = steering.smc(wfc, PROMPT, 25, lambda text, n: 0.0, decode, particles=particles, s=s, generator=g(7))
    plain, _ = generate(wfc, PROMPT[None].expand(particles, -1), 25, s, g(7))
    assert torch.equal(r.tokens, plain)
    assert r.log_z == 0.0 and not any(r.resampled) and torch.allclose(r.weights, torch.full((particles,), 1 / particles, dtype=torch.float64))


def test_resampling_triggers_exactly_below_the_ess_threshold(wfc):
    log = lambda *w: torch.tensor(w, dtype=torch.float64).log()  # noqa: E731
    # N = 4, threshold 0.5: ESS([a, 1, 1, 1]) = (a + 3)^2 / (a^2 + 3) crosses 2 at a = 3 + sqrt(12) = 6.46
    assert steering.ess(log(6.4, 1, 1, 1)) > 2 > steering.ess(log(6.5, 1, 1, 1))
    assert not steering.should_resample(log(6.4, 1, 1, 1), 0.5)
    assert steering.should_resample(log(6.5, 1, 1, 1), 0.5)
    assert not steering.should_resample(log(1, 1, 1, 1), 0.5) and math.isclose(steering.ess(log(1, 1, 1, 1)), 4)
    for n in (3, 5, 8):  # equal weights: ESS is exactly N, which is not below N
        assert steering.ess(torch.zeros(n, dtype=torch.float64)) == n and not steering.should_resample(torch.zeros(n), 1.0)
    assert steering.should_resample(log(1, 1, 1, 0), 0.5), "a dead particle is always resampled away"
    # ESS([1, 1, 1, 1.5]) = 4.5^2 / 5.25 = 3.857: above 0.96 x 4, below 0.97 x 4
    assert not steering.should_resample(log(1, 1, 1, 1.5), 0.96) and steering.should_resample(log(1, 1, 1, 1.5), 0.97)
    for method in ('systematic', 'multinomial'):  # a particle of weight 0 is never drawn
        for seed in range(50):
            ancestors = steering.resample(log(0, 3, 0, 1, 0), g(seed), method)
            assert set(ancestors.tolist()) <= {1, 3} and len(ancestors) == 5
    # in the loop: a soft potential (letters 'f' are rewarded) resamples exactly at the low-ESS steps
    r = steering.smc(wfc, PROMPT, 30, lambda text, n: 2.0 * text.count('f'), decode, particles=6,
                     s=Settings(temperature=1.0, top_k=0), generator=g(1))
    assert r.resampled == [e < 0.5 * 6 for e in r.ess]
    assert any(r.resampled) and not all(r.resampled)


def test_a_lookahead_reads_the_future_and_leaves_the_target_unchanged(wfc):
    """The must_contain lookahead scores the best alignment of the word's rest on the future's
    marginals; a twist enters each step's weight and leaves at the end, so a constant one changes
    neither the particles nor log Z."""
    encode = lambda text: [0 if ch == ' ' else ord(ch) - ord('a') for ch in text]  # noqa: E731
    letters = lambda ids: ''.join(' ' if i == 0 else chr(ord('a') + i) for i in ids)  # noqa: E731
    logprobs = torch.full((4, V), math.log(0.01))
    logprobs[0, 2], logprobs[1, 6] = math.log(0.5), math.log(0.25)  # 'c' then 'g' ahead
    twist = steering.contain_lookahead('bcg', encode)
    assert math.isclose(twist('xx b', logprobs), math.log(0.5) + math.log(0.25), rel_tol=1e-6)  # 'b' begun
    assert twist('xxb', logprobs) < twist('xx b', logprobs), "'b' inside a word begins nothing"
    assert twist('xx ', logprobs) < twist('xx b', logprobs), "a fresh start needs 'b' too"
    assert twist('a bcg', logprobs) == 0.0 and twist('abcg', logprobs) < 0, "whole words only"
    assert steering.satisfies(steering.must_contain('bcg', 4), letters, encode('bcg h'))
    assert not steering.satisfies(steering.must_contain('bcg', 5), letters, encode('abcgh'))
    assert not steering.satisfies(steering.must_contain('bcg', 3), letters, encode('bcgh')), "it must stay a word"
    s = Settings(temperature=1.0, top_k=0)
    plain = steering.smc(wfc, PROMPT, 12, None, decode, particles=3, s=s, generator=g(5))
    flat = steering.smc(wfc, PROMPT, 12, None, decode, particles=3, s=s, generator=g(5), lookahead=lambda t, lp: -7.0)
    assert torch.equal(flat.tokens, plain.tokens) and abs(flat.log_z) < 1e-9 and not any(flat.resampled)
    steered = steering.smc(wfc, PROMPT, 12, None, decode, particles=3, s=s, generator=g(5),
                           lookahead=lambda t, lp: 100 * lp[0, 2].item())  # a sharp twist
    assert any(steered.resampled) and math.isfinite(steered.log_z)


def test_best_of_n_and_tree_return_the_argmax_of_the_score(wfc):
    score = lambda tokens: tokens.count(3) - 0.01 * tokens.count(5)  # noqa: E731
    s = Settings(temperature=1.0, top_k=0)
    c = steering.best_of_n(wfc, PROMPT, 12, score, n=6, s=s, generator=g(0))
    assert c.tokens.shape == (6, 12) and c.passes == 6 * 12
    assert c.scores == [score(row) for row in c.tokens.tolist()], "every candidate is returned with its own score"
    assert c.scores[0] == max(c.scores) and c.scores == sorted(c.scores, reverse=True)
    assert len(set(c.scores)) > 1, "the candidates must differ for the argmax to mean anything"
    t = steering.tree(wfc, PROMPT, 12, score, width=2, branch=3, segment=5, s=s, generator=g(0))
    assert t.tokens.shape == (6, 12) and t.scores == [score(row) for row in t.tokens.tolist()]
    assert t.scores[0] == max(t.scores)


def test_calibration_percentiles_are_monotone_and_are_the_percentiles_of_what_the_sampler_saw():
    model = tiny(n_future=4, pos_emb='rope').eval()
    with torch.no_grad():  # sharper decodes, so the entropies spread out
        model.transformer.wte.weight.mul_(40)
    x = torch.randint(0, V, (3, 20))
    cal = steering.calibrate(model, x)
    for name in ('entropy', 'varentropy'):
        table, values = cal[name], cal['values'][name]
        assert table.shape == (5, 4) and values.shape == (3 * 19, 4)
        assert (table[1:] >= table[:-1]).all(), f"{name} percentiles must not decrease"
        assert (table[-1] > table[0]).any()
        expected = np.percentile(values.numpy(), cal['percentiles'], axis=0)
        assert np.allclose(table.numpy(), expected, atol=1e-4)
    assert (cal['values']['entropy'] >= 0).all() and (cal['values']['entropy'] <= math.log2(V) + 1e-4).all()
    low, high = cal['suggested']['ent_low'], cal['suggested']['ent_high']
    assert low <= high and math.isclose(low, np.percentile(cal['values']['entropy'][:, 0].numpy(), 25), abs_tol=1e-4)


def test_a_goal_beyond_the_window_lands_at_its_offset(wfc):
    goal = (9, [7, 8, 9])  # the window holds 4 future slots: pinned as it comes into reach
    s = Settings(temperature=1.0, top_k=0)
    r = steering.smc(wfc, PROMPT, 16, None, decode, particles=3, s=s, goal=goal, generator=g(0))
    assert (r.tokens[:, 8:11] == torch.tensor([7, 8, 9])).all()
    plain, _ = generate(wfc, PROMPT[None].expand(3, -1), 16, s, g(0))
    assert not (plain[:, 8:11] == torch.tensor([7, 8, 9])).all(1).any(), "without the goal it is not there"
    c = steering.best_of_n(wfc, PROMPT, 16, lambda t: -t.count(0), n=3, s=s, generator=g(0), goal=goal)
    assert (c.tokens[:, 8:11] == torch.tensor([7, 8, 9])).all()
    w = steering.pin_goal(wfc, engine.start(wfc, PROMPT[None]), goal, 5, s)  # 5 tokens in: the goal's first token is 4 ahead
    assert w.decided.tolist() == [[-1, -1, -1, 7]], "a goal token is pinned as soon as its slot is in the window"


@pytest.mark.parametrize('attn', ['pinned', 'bidirectional'])
def test_window_select_indexes_every_row_tensor(attn):
    model = tiny(n_future=4, pos_emb='rope', attn=attn).eval()
    idx = torch.randint(0, V, (3, 6))
    rows = torch.tensor([2, 0, 2])
    picked, _ = engine.refine(model, engine.start(model, idx).select(rows))
    direct, _ = engine.refine(model, engine.start(model, idx[rows]))
    assert torch.allclose(picked.future, direct.future, atol=1e-5) and torch.equal(picked.past, direct.past)
    w = engine.start(model, idx)
    w.decided[0, 2] = 5  # original row 0 is selected row 1
    assert w.select(rows).decided[1, 2] == 5 and w.select(rows).decided[0, 2] == -1


def test_schedules_run_from_hot_to_cool_and_a_flat_one_changes_nothing(wfc):
    for kind in ('linear', 'cosine', 'exp'):
        heat = steering.schedule(f'{kind}:2.0:0.5', 1.0)
        temps = [heat(u / 10) for u in range(11)]
        assert math.isclose(temps[0], 2.0) and math.isclose(temps[-1], 0.5)
        assert all(a >= b for a, b in zip(temps, temps[1:]))
    assert steering.schedule('', 1.0) is None and math.isclose(steering.schedule('linear:3', 1.0)(1.0), 1.0)
    with pytest.raises(ValueError, match='schedule'):
        steering.schedule('warm:2', 1.0)
    s = Settings(temperature=0.9, top_k=0)
    idx = PROMPT[None].expand(2, -1)
    flat, _ = generate(wfc, idx, 20, s, g(3), schedule=steering.schedule('linear:0.9:0.9', 0.9))
    assert torch.equal(flat, generate(wfc, idx, 20, s, g(3))[0])
    cold, _ = generate(wfc, idx, 20, s, g(3), schedule=steering.schedule('linear:0:0', 0.9))
    assert torch.equal(cold, generate(wfc, idx, 20, Settings(temperature=0), g(3))[0])
    hot, _ = generate(wfc, idx, 20, s, g(3), schedule=steering.schedule('linear:5:0.9', 0.9))
    assert not torch.equal(hot, flat)


def test_entropy_policy_reduces_to_first_and_to_greedy_and_pays_for_branches(wfc):
    idx = PROMPT[None].expand(2, -1)
    s = dict(temperature=1.0, top_k=0)
    never = dict(ent_low=0.0, ent_high=1e9, var_high=1e9)  # never certain, never forked, never very uncertain
    out, _ = generate(wfc, idx, 20, Settings(policy='entropy', **s, **never), g(4))
    assert torch.equal(out, generate(wfc, idx, 20, Settings(policy='first', **s), g(4))[0])
    always = dict(ent_low=1e8, ent_high=1e9, var_high=1e9)  # always certain: greedy over the whole window
    out, stats = generate(wfc, idx, 20, Settings(policy='entropy', **s, **always), g(4))
    assert torch.equal(out, generate(wfc, idx, 20, Settings(policy='threshold', tau=1e8, temperature=0), g(4))[0])
    assert stats.summary()['tokens_per_step'] > 1
    fork = dict(ent_low=0.0, ent_high=1e9, var_high=0.0, branch=3)  # always forked: one extra refine per step
    out, stats = generate(wfc, idx, 10, Settings(policy='entropy', **s, **fork), g(4))
    assert out.shape == (2, 10) and all(step['passes'] == 2 for step in stats.steps)
    boost = dict(ent_low=0.0, ent_high=0.0, var_high=1e9, boost_loop=3)  # always very uncertain: 3 more passes
    _, stats = generate(wfc, idx, 10, Settings(policy='entropy', **s, **boost), g(4))
    assert all(step['passes'] == 4 for step in stats.steps)


def test_branching_keeps_the_candidate_that_leaves_the_future_most_certain(wfc):
    """The lookahead recomputed by hand: each candidate collapsed, refined, its open slots' entropy."""
    from generation.decoding import entropy_bits
    from generation.sampling import branch_tokens
    s = Settings(temperature=0, branch=4)
    w, _ = engine.refine(wfc, engine.start(wfc, PROMPT[None].expand(2, -1).contiguous()))
    logits = w.stats['logits']
    first = torch.zeros(2, 4, dtype=torch.bool)
    first[:, 0] = True
    picked, _ = branch_tokens(wfc, w, torch.arange(2), first, logits, s, None, None)
    for row in range(2):
        spreads = {}
        for token in logits[row, 0].topk(4).indices.tolist():
            copy = engine.collapse(wfc, w.select(torch.tensor([row])), first[:1], torch.full((1, 4), token))
            copy, _ = engine.refine(wfc, engine.forget(wfc, copy))
            spreads[token] = entropy_bits(copy.stats['logits'])[0][0, 1:].mean().item()
        assert picked[row].item() == min(spreads, key=spreads.get)


@pytest.mark.slow  # sample.py in subprocesses
def test_command_line_steers_and_calibrates(tmp_path):
    model = tiny(n_future=4, pos_emb='rope')
    chars = [chr(ord('a') + i) for i in range(V)]
    meta = {'vocab_size': V, 'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}}
    data = tmp_path / 'letters'
    data.mkdir()
    for split in ('train', 'val'):
        np.random.default_rng(0).integers(0, V, 4000).astype(np.uint16).tofile(data / f'{split}.bin')
    with open(data / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)
    path = tmp_path / 'ckpt.pt'
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config), meta=meta, config={'dataset': str(data)}), path)
    common = (f'--init_from={path}', '--device=cpu', '--dtype=float32', '--start=abc', '--max_new_tokens=20')
    out = run_script('sample.py', *common, '--steer=smc', '--potential=regex:[ab]', '--particles=6', '--num_samples=2').stdout
    assert 'constraint satisfied 2/2 (100%)' in out and 'steer=smc: 2 runs, 120 passes/run' in out
    out = run_script('sample.py', *common, '--steer=best_of_n', '--potential=contain:cd:30', '--num_samples=1',
                     '--schedule=linear:1.5:0.5').stdout
    assert 'steer=best_of_n: 1 runs' in out
    out = run_script('sample.py', *common, '--calibrate=True').stdout
    assert 'entropy d=1 (bits)' in out and 'suggested: --ent_low=' in out
    bad = run_script('sample.py', *common, '--steer=smc', '--potential=forbid', check=False)
    assert bad.returncode == 2 and "potential must be 'forbid:w1,w2'" in bad.stderr


class PairCodec:
    """A BPE-like codec: token t is two characters long, so a constraint must check whole pieces."""
    vocab_size, eos = V, None

    def decode(self, ids):
        return ''.join('  ' if i < 3 else chr(ord('a') + i) * 2 for i in ids)

    def encode(self, text):
        return [ord(text[k]) - ord('a') for k in range(0, len(text), 2)]


@pytest.mark.parametrize('codec', ['char', 'pairs'])
def test_a_match_constraint_holds_in_every_method(wfc, codec):
    """match:REGEX: every run of SMC, best-of-N and plain sampling matches the pattern in full; the
    invalid pattern is refused; rejection (unconstrained proposals) is the baseline that mostly fails."""
    pattern = '(?:[de]+ )+[de]*' if codec == 'char' else '(?:dd|ee)+(?:  (?:dd|ee)+)*'
    dec = decode if codec == 'char' else PairCodec().decode
    potential = steering.Match(pattern, dec, V)
    s = Settings(temperature=1.0, top_k=0)
    for run in range(8):
        r = steering.smc(wfc, PROMPT, 16, potential, dec, particles=4, s=s, generator=g(run))
        assert steering.satisfies(potential, dec, r.tokens[r.pick(g(run))].tolist()), dec(r.tokens[0].tolist())
    plain, _ = steering.sample_n(wfc, PROMPT, 16, 8, s, g(0), constraint=potential.constraint)[:2]
    assert all(steering.satisfies(potential, dec, row.tolist()) for row in plain)
    c = steering.best_of_n(wfc, PROMPT, 16, lambda t: -t.count(3), n=4, s=s, generator=g(1), constraint=potential.constraint)
    assert all(steering.satisfies(potential, dec, row.tolist()) for row in c.tokens)
    free, _, _ = steering.sample_n(wfc, PROMPT, 16, 8, s, g(0))
    assert not all(steering.satisfies(potential, dec, row.tolist()) for row in free), "the check can fail"
    with pytest.raises(ValueError, match='match: invalid pattern'):
        steering.Match('([de', dec, V)
