"""
Inference is an iterative solver: passes of the weight-tied core until every open slot has
converged, or a cap. `Solver` holds its settings (stored in a checkpoint when trained, overridable
per call); `iterate` runs it. The exit test compares what a slot decodes to (or its state) between
passes under one of four rules:
  'kl'      KL(new || old) of the decoded distribution, nats
  'entropy' |H_new - H_old| of the decoded distribution, nats
  'delta'   ||x_new - x_old|| / ||x_old||, the relative step
  'accel'   ||step_new - step_old|| / ||x_new||, the second-order step size (arXiv 2509.23314)
A row stops when its watched slots have converged; with slot_exit a converged slot keeps its state
while the others go on.
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from modeling.layout import Active

EXIT_RULES = ('kl', 'delta', 'entropy', 'accel')


@dataclass(frozen=True)
class Solver:
    max_loop: int = 1         # cap on refinement passes, >= 1
    min_loop: int = 1         # floor on refinement passes, >= 1
    tol: float = 1e-3         # a slot has converged when its exit measure falls below tol (< 0: never, run max_loop)
    exit_rule: str = 'kl'     # 'kl', 'entropy', 'delta' or 'accel' (see the module docstring); tol is in its units
    slot_exit: bool = False   # a converged slot keeps its state while others go on (else a row stops when all have)

    def __post_init__(self):
        if min(self.max_loop, self.min_loop) < 1 or self.exit_rule not in EXIT_RULES or not math.isfinite(self.tol):
            raise ValueError(f"invalid Solver: need max_loop, min_loop >= 1, a finite tol and exit_rule in {EXIT_RULES} "
                             f"(got {self.max_loop}, {self.min_loop}, {self.tol}, {self.exit_rule!r})")

    def but(self, **changes):
        """This solver with the given settings changed; a value of None keeps the setting (and with
        nothing changed it is this solver: refine calls it every step)."""
        changes = {k: v for k, v in changes.items() if v is not None and v != getattr(self, k)}
        return dataclasses.replace(self, **changes) if changes else self


@dataclass
class Trace:
    """What an inference run of the recurrence did: passes each slot moved (B, S), row-passes
    computed, passes run, the mean state norm of the watched slots after each pass, and the states
    after the passes asked for in `record`."""
    passes: torch.Tensor
    calls: int = 0
    steps: int = 0
    norms: list = field(default_factory=list)
    states: dict = field(default_factory=dict)


def exit_reference(model, rule, x, ctx, ref=None):
    """What the exit test compares between passes, per slot: the decoded log-probabilities ('kl'),
    the decoded entropy ('entropy'), the state ('delta'), or the state and the step that reached it
    from the state in ref ('accel')."""
    if rule in ('kl', 'entropy'):
        logits = model.readout(x, ctx)
        return F.log_softmax(logits.float(), -1) if rule == 'kl' else entropy_of_logits(logits)[..., None]
    if rule == 'delta':
        return x.float()
    step = torch.zeros_like(x, dtype=torch.float) if ref is None else x.float() - ref[..., :x.size(-1)]
    return torch.cat((x.float(), step), -1)


def exit_measure(rule, old, new):
    """The exit measure (B, S) between two exit references (see exit_reference)."""
    if rule == 'kl':
        return (new.exp() * (new - old)).sum(-1)
    if rule == 'entropy':
        return (new - old).abs()[..., 0]
    if rule == 'delta':
        return (new - old).norm(dim=-1) / old.norm(dim=-1).clamp(min=1e-12)
    C = new.size(-1) // 2
    return (new[..., C:] - old[..., C:]).norm(dim=-1) / new[..., :C].norm(dim=-1).clamp(min=1e-12)


def entropy_of_logits(logits):
    """Entropy (...) in nats of the distributions with these logits (..., V)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def iterate(model, x, ctx, frozen, watch, solver, record=(), first=None):
    """Passes of model.update from x (B, S, C) until every watched (B, S) slot has converged (its
    exit measure below tol after min_loop passes) or max_loop. A row whose watched slots have all
    converged stops and is no longer computed; with slot_exit a converged slot also keeps its state,
    and a slot that has exited and that no open slot attends to is no longer computed (see Active).
    frozen slots keep theirs throughout. record: passes after which to keep the state (and the
    norms). first: the state after pass 1, when the caller computed it (engine.py joins it with the
    past's pending tokens). Returns x and a Trace."""
    s, rule = solver, solver.exit_rule
    trace = Trace(passes=torch.zeros(watch.shape, dtype=torch.long, device=x.device))
    live, stopped = Active(torch.arange(x.size(0), device=x.device)), frozen.clone()
    ref = exit_reference(model, rule, x, ctx) if s.tol >= 0 and s.min_loop <= 1 < s.max_loop else None
    for k in range(1, s.max_loop + 1):
        sub = live.context(ctx)
        new = first if k == 1 and first is not None else model.update(live.gather(x), sub, live.gather(stopped))[0]
        x = live.scatter(x, new)
        trace.passes += live.scatter(torch.zeros_like(stopped), ~live.gather(stopped))  # the slots this pass moved
        trace.calls, trace.steps = trace.calls + len(live.rows), k
        if k in record:
            trace.states[k] = x
            trace.norms.append((k, x[watch].norm(dim=-1).mean().item()))
        if s.tol < 0 or not s.min_loop - 1 <= k < s.max_loop:
            continue
        new_ref = exit_reference(model, rule, x, ctx) if ref is None else \
            live.scatter(ref, exit_reference(model, rule, new, sub, live.gather(ref)))
        if k >= s.min_loop:
            done = (exit_measure(rule, ref, new_ref) < s.tol) | ~watch | stopped
            if s.slot_exit:
                stopped |= done & watch
            live = live.narrow(~done[live.rows].all(1), watch & ~stopped if s.slot_exit else None, ctx.mask)
            if not len(live.rows):
                break
        ref = new_ref
    return x, trace
