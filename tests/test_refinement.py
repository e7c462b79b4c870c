"""The refinement levers: the prelude / looped core / coda sandwich, the consistency loss, the exit
rules and the per-slot exit that leaves exited slots out of the computation.

Proves: an empty prelude and coda are today's model (the same blocks, the same maps); a sandwich
runs its prelude and coda once per stream and only its core per pass; the consistency loss moves
the earlier passes toward the (detached) last one and never the last; the agreement loss moves the
future toward the (detached) causal head that predicts the same token; every exit rule stops a
converged refinement and none changes a slot after it exited; leaving exited slots out gives the
same states and pass counts as computing them; the sampler's window runs a sandwich as training's
layout does; the samplers refuse what they cannot run."""

import pytest
import torch

from generation import engine
from modeling import layout
from modeling.layout import training_layout
from modeling.recipe import draw_depth, training_loss
from modeling.solver import iterate
from plumbing import checkpoint
from plumbing import runtime

TINY = dict(block_size=16, vocab_size=11, n_layer=4, n_head=2, n_embd=16, n_future=2, pos_emb='rope', past_loss=1.0)


def tiny(**kw):
    torch.manual_seed(0)
    return checkpoint.build(**{**TINY, **kw})


def batch(B=3, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (B, T), generator=g), torch.randint(0, 11, (B, T), generator=g)


def test_an_empty_sandwich_is_the_plain_stack():
    model = tiny()
    x = torch.randn(2, 5, 16)
    assert list(model.core) == [0, 1, 2, 3] and not model.sandwiched()
    ctx = layout.Context(x, torch.arange(5))
    assert model.prelude_of(x, ctx) is x
    assert torch.equal(model.readout(x, ctx), model.logits(x))


def test_the_sandwich_loops_only_its_core():
    model = tiny(n_prelude=1, n_coda=1, bound='rms', max_loop=5)
    calls = [0] * 4
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    idx, targets = batch()
    model.eval()
    with torch.no_grad():
        model.wfc_forward(idx, targets, depth=5, phase=torch.zeros(3, dtype=torch.long))
    # causal stream: every block once; future: prelude once, core 5 times, coda once (the final readout)
    assert calls == [2, 6, 6, 2]
    assert model.get_num_params() == tiny().get_num_params()  # same blocks, only the schedule differs


def test_a_looped_sandwich_gpt_trains():
    model = tiny(n_future=0, n_prelude=1, n_coda=1, n_loop=3, past_loss=0.0)
    idx, targets = batch()
    logits, loss = model(idx, targets)
    loss.backward()
    assert logits.shape == (3, 16, 11) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_config_refuses_a_sandwich_without_a_core():
    with pytest.raises(ValueError, match='no looped core'):
        checkpoint.build(**{**TINY, 'n_prelude': 2, 'n_coda': 2})


def scored_from(model, states_requiring_grad):
    """recipe.training_loss on given future states (the layout of one fixed-phase step)."""
    idx, targets = batch()
    pos = torch.arange(16)
    x_c, kvs = model.causal_stream(model.token_states(idx, pos), pos)
    lay = training_layout(model, idx, targets, 2, kvs[-1], torch.zeros(3, dtype=torch.long), None, None)
    return training_loss(model, states_requiring_grad, lay, model.logits(x_c.detach()), idx, targets, model.recipe)[0]


def test_consistency_moves_the_earlier_passes_only():
    model = tiny(consistency=1.0, bptt=0, supervise=1)
    early, last = (torch.randn(3, 16, 16, requires_grad=True) for _ in range(2))
    scored_from(model, [early, last]).backward()
    with_consistency = last.grad.clone()
    assert early.grad is not None and early.grad.abs().sum() > 0  # pulled toward the last pass
    plain = tiny(consistency=0.0, bptt=0, supervise=1)
    plain.load_state_dict(model.state_dict())
    early2, last2 = (t.detach().clone().requires_grad_() for t in (early, last))
    scored_from(plain, [early2, last2]).backward()
    assert early2.grad is None or early2.grad.abs().sum() == 0  # no consistency: only the last pass is trained
    torch.testing.assert_close(with_consistency, last2.grad)  # the target of the consistency term is detached


def test_agreement_pulls_the_future_toward_the_detached_causal_head():
    """agree > 0: each slot's teacher is the causal position that predicts the same token; the
    term is a KL (positive for random states), moves the future's states and never the teacher."""
    import dataclasses
    model = tiny(agree=1.0)
    idx, targets = batch()
    pos = torch.arange(16)
    x_c, kvs = model.causal_stream(model.token_states(idx, pos), pos)
    lay = training_layout(model, idx, targets, 2, kvs[-1], torch.zeros(3, dtype=torch.long), None, None)
    assert torch.equal(lay.targets, targets.gather(1, lay.source))  # the teacher predicts the slot's token
    past_logits = model.logits(x_c).detach().requires_grad_()
    state = torch.randn(3, 16, 16, requires_grad=True)
    agreed = training_loss(model, [state], lay, past_logits, idx, targets, model.recipe)[0]
    plain = training_loss(model, [state], lay, past_logits, idx, targets, dataclasses.replace(model.recipe, agree=0.0))[0]
    assert agreed > plain
    teacher_grad, state_grad = torch.autograd.grad(agreed - plain, (past_logits, state))
    assert teacher_grad.abs().max() == 0 and state_grad.abs().sum() > 0
    with pytest.raises(ValueError, match='agree > 0'):
        tiny(agree=1.0, past_loss=0.0)


@pytest.mark.parametrize('rule', ['kl', 'delta', 'entropy', 'accel'])
def test_every_exit_rule_stops_and_never_moves_an_exited_slot(rule):
    model = tiny(bound='rms', exit_rule=rule, max_loop=40, tol=1e-3).eval()
    idx, targets = batch()
    with torch.no_grad():
        out = model.wfc_forward(idx, targets, converge=True, phase=torch.zeros(3, dtype=torch.long))
        never = model.wfc_forward(idx, targets, depth=7, phase=torch.zeros(3, dtype=torch.long))  # tol < 0: exactly 7 passes
    assert 1 <= out.trace.steps <= 40 and never.trace.steps == 7
    x0 = torch.randn(2, 6, 16)
    ctx = layout.Context(x0, torch.arange(6))
    none = torch.zeros(2, 6, dtype=torch.bool)
    with torch.no_grad():
        _, trace = iterate(model, x0, ctx, none, ~none, model.solver.but(max_loop=30, tol=1e-3, slot_exit=True), record=tuple(range(1, 31)))
    for row in range(2):
        for slot in range(6):
            stop = int(trace.passes[row, slot])
            later = [trace.states[k][row, slot] for k in range(stop, trace.steps + 1)]
            assert all(torch.equal(later[0], v) for v in later)  # an exited slot keeps its state


def test_leaving_exited_slots_out_changes_nothing(monkeypatch):
    model = tiny(bound='rms', max_loop=32, tol=1e-3, slot_exit=True).eval()
    idx, targets = batch(4)
    phase = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        compact = model.wfc_forward(idx, targets, converge=True, phase=phase)
        narrow = layout.Active.narrow
        monkeypatch.setattr(layout.Active, 'narrow', lambda self, keep, open_slots=None, mask=None: narrow(self, keep))
        full = model.wfc_forward(idx, targets, converge=True, phase=phase)
    torch.testing.assert_close(compact.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(compact.trace.passes, full.trace.passes)


def parallel_block(model, idx, past, depth, pins=None):
    """score's logits (B, F, V) of the training layout's future block whose past is idx[:, :past]."""
    n_future = model.config.n_future
    phase = torch.full((idx.size(0),), (past - 1) % n_future)  # a block starts at slot past - 1
    out = model.wfc_forward(idx, idx.roll(-1, 1), depth=depth, phase=phase, pins=pins)
    assert bool((out.dist[:, past - 1] == 1).all())
    return out.logits[:, past - 1:past - 1 + n_future]


@pytest.mark.parametrize('depth', [1, 3])
def test_a_sandwich_window_refines_as_training_scores_it(depth):
    """The sampler's window (engine.py) runs a sandwich as the training layout does: after every
    collapse and shift, a cold refine gives the logits of the parallel block with the same past,
    also with a slot pinned to a goal token (its state starts at the prelude of the token)."""
    model = tiny(n_prelude=1, n_coda=1, bound='rms', inject='contract', max_loop=4).eval()
    idx, _ = batch(B=2)
    w = engine.start(model, idx[:, :5])
    with torch.no_grad():
        for step in range(5):
            past, pins = w.past.size(1), None
            if step == 2:  # a goal: slot 2 decided before slot 1
                w = engine.collapse(model, w, torch.tensor([[False, True]] * 2), idx[:, past + 1:past + 2].expand(2, 2).contiguous())
                pins = torch.zeros(2, 16, dtype=torch.bool)
                pins[:, past] = True
            w, _ = engine.refine(model, engine.forget(model, w), max_loop=depth, tol=-1.0)
            torch.testing.assert_close(w.stats['logits'], parallel_block(model, idx, past, depth, pins), atol=1e-5, rtol=1e-5)
            first = torch.tensor([[True, False]] * 2)
            w, _ = engine.shift(model, engine.collapse(model, w, first, idx[:, past:past + 1].expand(2, 2).contiguous()))
        assert w.past.size(1) == 5 + 5 + 1  # the goal's step moved two decided tokens


def test_what_the_samplers_refuse_of_a_sandwich():
    model = tiny(n_prelude=1, n_coda=1).eval()
    assert engine.unsupported(model) == ''
    assert 'not built' in engine.unsupported(tiny(n_prelude=1, n_coda=1, attn='bidirectional', past_loss=0.0))
    assert 'not built' in engine.unsupported(tiny(n_future=0, n_prelude=1, n_coda=1, n_loop=2, past_loss=0.0))
    with pytest.raises(ValueError, match='sandwich'):
        engine.start(tiny(n_prelude=1, n_coda=1, n_loop=2), torch.zeros(1, 4, dtype=torch.long))
    w, _ = engine.refine(model, engine.start(model, torch.zeros(1, 4, dtype=torch.long)))
    for mode in ('nearest', 'partial'):  # they move a state toward an embedding row: not a sandwich core's space
        with pytest.raises(ValueError, match='mode=token'):
            engine.collapse(model, w, w.decided < 0, w.decided.clamp(min=0), mode=mode)


def test_a_depth_per_row_is_each_row_run_at_its_own_depth():
    model = tiny(bound='rms', train_depth=6, loop_law='uniform', depth_per='row', bptt=2, supervise=2).eval()
    depth = draw_depth(model.config, model.recipe, 3)
    assert depth.shape == (3,) and 1 <= int(depth.min()) and int(depth.max()) <= 6
    idx, targets = batch()
    phase = torch.zeros(3, dtype=torch.long)
    rows = model.wfc_forward(idx, targets, depth=torch.tensor([2, 5, 3]), phase=phase)
    for r, k in enumerate([2, 5, 3]):
        alone = model.wfc_forward(idx, targets, depth=k, phase=phase)
        torch.testing.assert_close(rows.logits[r], alone.logits[r])
        assert int(rows.trace.passes[r].max()) == k


def test_a_sandwich_pass_costs_only_its_core_in_the_flops_count():
    """train.py's MFU counts what runs: an extra pass without gradient costs the core's share of the
    blocks (here 2 of 4), and a looped sandwich GPT loops only its core."""
    plain, sandwich = tiny(bptt=2), tiny(bptt=2, n_prelude=1, n_coda=1)
    extra = lambda m: runtime.training_flops(m, 4, 16, passes=6) - runtime.training_flops(m, 4, 16, passes=5)  # noqa: E731
    assert extra(sandwich) == pytest.approx(extra(plain) / 2)
    gpt = lambda **kw: runtime.training_flops(tiny(n_future=0, past_loss=0.0, **kw), 4, 16)  # noqa: E731
    once, looped = gpt(n_prelude=1, n_coda=1), gpt(n_prelude=1, n_coda=1, n_loop=3)
    assert looped - once == pytest.approx(gpt(n_loop=2) - gpt())  # two more passes of a 2-block core = one of 4 blocks
