"""The rules the samplers share are each written once and mean what they say: the block edge
(engine.block_edge) for every kind of model, "0 or -1 means the model's value" (Settings.limits),
and the capabilities a model carries (can_verify, warm_starts), which the samplers ask instead of
reading training knobs: a stored capability decides, whatever the config says; and the count of
leading accepted drafts or decided slots (leading_true)."""

import torch

from conftest import tiny
from generation import engine
from generation.decoding import Settings, leading_true
from generation.sampling import generate, pick_sampler, warm_start


def test_block_edge_rolls_only_a_rotary_causal_stream():
    gpt_rope, gpt_learned = engine.block_edge(tiny(pos_emb='rope')), engine.block_edge(tiny())
    assert (gpt_rope.rolls, gpt_rope.keep, gpt_rope.window, gpt_rope.recent(3)) == (True, 15, 16, 19)
    assert (gpt_learned.rolls, gpt_learned.keep, gpt_learned.window, gpt_learned.recent(3)) == (False, 0, 0, 0)
    assert engine.block_edge(tiny(n_future=3, pos_emb='rope')).rolls
    bidirectional = engine.block_edge(tiny(n_future=3, pos_emb='rope', attn='bidirectional'))
    assert not bidirectional.rolls and bidirectional.max_past == 16, "re-encoded, but rotary: the whole block"
    learned = tiny(n_future=3)
    assert engine.block_edge(learned).max_past == 14, "learned positions: the future slots stay on trained positions"
    assert engine.block_edge(learned, n_future=2).max_past == 15


def test_a_window_never_holds_more_than_max_past():
    model = tiny(n_future=3).eval()
    w = engine.start(model, torch.randint(0, 13, (1, 40)))
    assert w.past.size(1) == engine.block_edge(model).max_past
    out, _ = generate(model, torch.randint(0, 13, (1, 5)), 30, Settings(temperature=0, sampler='collapse'))
    assert out.shape == (1, 30)


def test_limits_resolve_zero_and_negative_against_the_model():
    model = tiny(n_future=2, max_loop=7, tol=0.25)
    assert Settings().limits(model) == dict(max_loop=7, tol=0.25)
    assert Settings().limits(model, drafts=True) == dict(max_loop=1, tol=0.25)
    assert Settings(max_loop=3, tol=0.0).limits(model, drafts=True) == dict(max_loop=3, tol=0.0)


def test_capabilities_come_from_the_config_once_and_a_stored_one_decides():
    verifier = tiny(n_future=2, pos_emb='rope', past_loss=1.0)
    assert verifier.capabilities == dict(can_verify=True, warm_starts=False)
    assert tiny(n_future=2, pos_emb='rope', past_loss=1.0, past_target='self').capabilities['can_verify'] is False
    assert tiny(n_future=2, warm_prob=0.5).warm_starts and tiny(n_future=2, bound='norm').warm_starts
    assert pick_sampler(verifier, Settings()) == 'speculative'
    verifier.capabilities = dict(verifier.capabilities, can_verify=False)  # as a checkpoint could store it
    assert pick_sampler(verifier, Settings()) == 'collapse'
    verifier.capabilities['warm_starts'] = True
    assert warm_start(verifier, Settings()) and not warm_start(verifier, Settings(warm='off'))


def test_leading_true_counts_the_trues_before_the_first_false():
    """The acceptance rule's count (how many drafts before the first rejection), the shift's decided
    prefix and future='auto''s slots below tau: for every mask, the cumulative product's sum."""
    assert leading_true(torch.tensor([[True, True, False, True], [False, True, True, True], [True] * 4])).tolist() == [2, 0, 4]
    assert leading_true(torch.zeros(3, 0, dtype=torch.bool)).tolist() == [0, 0, 0], "no drafts: none accepted"
    g = torch.Generator().manual_seed(0)
    for shape in [(5,), (4, 1), (8, 3), (2, 3, 7)]:
        mask = torch.rand(shape, generator=g) < 0.7
        assert torch.equal(leading_true(mask), mask.long().cumprod(-1).sum(-1)), shape
