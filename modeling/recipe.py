"""
The training recipe of a WFC model: how many passes a step runs, which of them carry gradient and
loss, and which slots start pinned or warm. None of it changes the architecture (model.GPTConfig)
or how a trained model is sampled (solver.Solver); it reaches the forward as an argument
(`model(idx, targets, recipe=...)`; the model's own `model.recipe` when none is given).

Depth: fixed, uniform in 1..train_depth or Poisson-lognormal around it (Huginn), one per step or one
per sequence (Parcae). Truncated backprop through the last `bptt` passes, a loss on the last
`supervise`, and optionally a consistency loss that pulls every earlier pass toward the last (CLLM)
and an agreement loss that pulls every future slot toward the causal stream's next-token
distribution for the same token (the distribution that verifies its draft).
Pins start a slot at its true token (goal pinning at sampling time); warm rows start from the
detached state of one sampler step earlier (train as you sample).
"""

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from modeling.layout import keep_blocks, training_layout
from modeling.solver import Trace, iterate

RECIPE_CHOICES = dict(loop_law=('fixed', 'uniform', 'poisson'), past_target=('next', 'self'), depth_per=('step', 'row'))


@dataclass(frozen=True)
class Recipe:
    future_frac: float = 1.0  # pinned: fraction of each row's future blocks that run, (0, 1]; fewer = cheaper steps
    train_depth: int = 0      # future passes per step: the value ('fixed'), the max ('uniform'), the mean ('poisson'); 0 = n_loop
    loop_law: str = 'fixed'   # how the depth is drawn: 'fixed', 'uniform' (1..train_depth), 'poisson' (Poisson-lognormal, <= 3 x mean)
    depth_per: str = 'step'   # one depth drawn per training 'step', or per 'row' (each sequence its own, Parcae)
    bptt: int = 0             # last passes that carry gradient (truncated backprop); 0 = all
    supervise: int = 1        # last passes whose decoded output is supervised, 1..bptt
    consistency: float = 0.0  # weight of KL(last pass || pass k) for every earlier pass k that carries gradient (CLLM); 0 = off
    agree: float = 0.0        # weight of KL(causal stream's next-token distribution, detached || future slot) for the same token; 0 = off
    dist_power: float = 0.0   # future loss weight of distance d is d ** -dist_power (0 = uniform, 1 = 1/d)
    past_loss: float = 0.0    # weight of the auxiliary loss on the past stream (0 = off)
    past_target: str = 'next' # past slots predict the 'next' token (pinned only) or their own token ('self')
    pin_prob: float = 0.0     # probability that a future slot is pinned to its true token
    warm_prob: float = 0.0    # probability that a row starts from a detached state of one step earlier

    def __post_init__(self):
        problems = [f"{k} must be one of {v}, got {getattr(self, k)!r}" for k, v in RECIPE_CHOICES.items() if getattr(self, k) not in v]
        if self.supervise < 1 or min(self.train_depth, self.bptt, self.consistency, self.agree, self.dist_power, self.past_loss) < 0:
            problems.append("supervise must be >= 1; train_depth, bptt, consistency, agree, dist_power and past_loss >= 0")
        if not 0 < self.future_frac <= 1 or not (0 <= self.pin_prob <= 1 and 0 <= self.warm_prob <= 1):
            problems.append(f"need 0 < future_frac <= 1 and pin_prob, warm_prob in [0, 1] "
                            f"(got {self.future_frac}, {self.pin_prob}, {self.warm_prob})")
        if not all(math.isfinite(v) for v in (self.dist_power, self.past_loss, self.consistency, self.agree)):
            problems.append("dist_power, past_loss, consistency and agree must be finite")
        if problems:
            raise ValueError("invalid Recipe: " + "; ".join(problems))

    def depth(self, config):
        """The future's training depth for an architecture (train_depth, or its n_loop)."""
        return self.train_depth or config.n_loop


def capabilities(config, recipe):
    """What a model of architecture `config` trained with `recipe` can do at inference (train.py
    stores it in checkpoints). can_verify: its causal stream's next-token head was trained (pinned,
    past_loss > 0, past_target 'next'), so it verifies drafts and samples alone. warm_starts: it was
    trained to continue from a carried state (warm_prob > 0) or to converge (a bounded state)."""
    return dict(can_verify=config.attn == 'pinned' and recipe.past_loss > 0 and recipe.past_target == 'next',
                warm_starts=recipe.warm_prob > 0 or config.bound != 'none')


def check_fits(config, recipe):
    """A recipe that cannot train this architecture, as a ValueError."""
    if recipe.past_target == 'next' and config.attn == 'bidirectional' and recipe.past_loss > 0:
        raise ValueError("invalid Recipe: past_target='next' leaks the answer in bidirectional attention; use 'self'")
    if recipe.agree > 0 and not capabilities(config, recipe)['can_verify']:
        raise ValueError("invalid Recipe: agree > 0 pulls the future toward the causal stream's next-token head, which "
                         "only a pinned model with past_loss > 0 and past_target='next' trains")


def draw_depth(config, recipe, rows=1):
    """Future passes of one training step, from torch's RNG (seeded per micro-step): an int, or with
    depth_per='row' a (rows,) long tensor, a depth per sequence."""
    n = recipe.depth(config)
    if config.n_future == 0 or recipe.loop_law == 'fixed':
        return n
    shape = (rows,) if recipe.depth_per == 'row' else ()
    if recipe.loop_law == 'uniform':
        depth = torch.randint(1, n + 1, shape)
    else:  # Poisson-lognormal (Huginn): a log-normal rate around the mean, then a Poisson count
        rate = torch.exp(torch.randn(shape) * 0.5 + math.log(max(n - 1, 1e-3)) - 0.125)
        depth = (1 + torch.poisson(rate)).clamp(max=3 * n).long()
    return depth if recipe.depth_per == 'row' else int(depth)


def warm_rows(recipe, B, training, device):
    """(B,) rows that start warm this step, drawn with warm_prob while training (else None)."""
    return torch.rand(B, device=device) < recipe.warm_prob if training and recipe.warm_prob > 0 else None


def kept_blocks(recipe, phase, T, n_future, training):
    """Pinned training with future_frac < 1: the random subset of future blocks that runs (a cheaper
    step; see layout.keep_blocks); None = all of them."""
    return keep_blocks(phase, T, n_future, recipe.future_frac) if training and recipe.future_frac < 1 else None


def run_passes(model, x, layout, depth, record, recipe, converge=False):
    """The future's passes from x on layout layout: the recipe's training passes (unroll: truncated
    backprop, a depth per step or per row), or without gradient, with `record` or converge the
    solver (converge: the model's solver; else exactly `depth` passes). Returns the states to score and a Trace."""
    per_row = torch.is_tensor(depth)
    if converge or (not per_row and (record or not torch.is_grad_enabled())):
        solver = model.solver if converge else model.solver.but(max_loop=depth, tol=-1.0)
        x, trace = iterate(model, x, layout.ctx, layout.frozen, layout.watch, solver, record=record)
        return [x], trace
    states = unroll(model, x, layout.ctx, layout.frozen, depth, recipe)
    steps = int(depth.max()) if per_row else depth  # every row is computed on every pass
    passes = layout.watch.long() * (depth.to(x.device)[:, None] if per_row else depth)
    return states, Trace(passes=passes, calls=x.size(0) * steps, steps=steps)


def unroll(model, x, ctx, frozen, depth, recipe):
    """Training passes: gradient through the last bptt only (truncated backprop). depth: an int, or
    (B,) passes per row (a row of depth d waits out the first max - d passes, so every row's last
    passes line up with the truncation and supervision windows). Returns the states after the last
    `supervise` passes (with consistency: after every pass with gradient)."""
    passes = int(depth.max()) if torch.is_tensor(depth) else depth
    bptt = passes if recipe.bptt <= 0 else min(recipe.bptt, passes)
    keep = bptt if recipe.consistency > 0 else min(recipe.supervise, bptt)
    states = []
    for k in range(passes):
        waiting = frozen if not torch.is_tensor(depth) else frozen | (k < passes - depth.to(x.device))[:, None]
        with torch.set_grad_enabled(torch.is_grad_enabled() and k >= passes - bptt):
            x = model.update(x, ctx, waiting)[0]
        if k >= passes - keep:
            states.append(x)
    return states


def pin_slots(model, layout, pins):
    """Start the (B, S) slots `pins` at their true token's state: they are frozen and not scored."""
    pins = pins & layout.watch
    layout.ctx.x0 = torch.where(pins[..., None], model.token_states(layout.targets.clamp(min=0), layout.ctx.pos), layout.ctx.x0)
    layout.frozen, layout.watch = layout.frozen | pins, layout.watch & ~pins


def warm_state(model, layout, warm, x, draws, recipe):
    """Rows `warm` (B,) start from the detached state of one sampler step earlier: every block one
    token less advanced (the layout of draws shifted back one), refined 1..depth passes."""
    idx, targets, n_future, past_kv, phase, split, slots = draws
    with torch.no_grad():
        prev = training_layout(model, idx, targets, n_future, past_kv, None if phase is None else (phase - 1) % n_future,
                               None if split is None else (split - 1).clamp(min=0), slots)
        prev.ctx.x0 = model.prelude_of(prev.ctx.x0, prev.ctx)
        depth = int(torch.randint(1, recipe.depth(model.config) + 1, ()))
        x_prev, _ = iterate(model, prev.ctx.x0, prev.ctx, prev.frozen, prev.watch, model.solver.but(max_loop=depth, tol=-1.0))
    return torch.where((warm[:, None] & ~layout.fresh & ~layout.frozen)[..., None], x_prev, x)


def start_state(model, layout, draws, recipe, pins=None, warm=None, init=None):
    """The state the future starts from: e_max through the prelude, pinned slots at their token's
    state, warm rows at the detached state of one sampler step earlier (train as you sample), or a
    random state. draws: the layout's (idx, targets, n_future, past_kv, phase, split, slots)."""
    dev, split = layout.watch.device, draws[5]
    if pins is None and model.training and recipe.pin_prob > 0:
        pins = torch.rand(layout.watch.shape, device=dev) < recipe.pin_prob
    if pins is not None:
        pin_slots(model, layout, pins)
    x = layout.ctx.x0 = model.prelude_of(layout.ctx.x0, layout.ctx)
    if warm is not None and split is not None:
        warm = warm & (split > 0)  # no earlier step at split 0
    if warm is not None and warm.any():
        x = warm_state(model, layout, warm, x, draws, recipe)
    if init == 'random':
        x = torch.where(layout.watch[..., None], torch.randn_like(x) * model.embedding_rms(), x)
    return x


def cross_entropy(logits, targets):
    """Per-slot cross-entropy (B, S) of logits (B, S, V); negative targets (padding) read as 0."""
    return F.cross_entropy(logits.transpose(1, 2).float(), targets.clamp(min=0), reduction='none')


def kl(goal, logits):
    """Per-slot KL(goal || softmax(logits)), goal given as log-probabilities (B, S, V)."""
    return (goal.exp() * (goal - F.log_softmax(logits.float(), -1))).sum(-1)


def training_loss(model, states, layout, past_logits, idx, targets, recipe):
    """The loss of the trained states: the mean over the last `supervise` of the distance-weighted
    future cross-entropy; plus consistency x the mean over the earlier states of KL(last || earlier)
    (the last pass detached: only the earlier passes move, toward where the refinement ends, so an
    early exit loses little; CLLM, Kou et al. 2024); plus past_loss x the past stream's own loss
    (past_logits: the pinned causal stream's; its targets are the next tokens or idx itself); plus
    agree x the mean KL from the causal stream's detached next-token distribution for the same token
    (layout.source: the distribution that accepts or rejects the slot's draft in the speculative
    sampler) to the last state's: only the future moves.
    Returns (loss, the last state's logits, its per-slot cross-entropy)."""
    weight = layout.dist.float().pow(-recipe.dist_power) * layout.watch
    per_slot_mean = lambda v: (v * weight).sum() / weight.sum().clamp(min=1e-8)  # noqa: E731
    all_logits = [model.readout(x, layout.ctx) for x in states]
    ces = [cross_entropy(logits, layout.targets) for logits in all_logits[-min(recipe.supervise, len(states)):]]
    logits, ce = all_logits[-1], ces[-1]
    loss = torch.stack([per_slot_mean(v) for v in ces]).mean()
    if recipe.consistency > 0 and len(states) > 1:
        goal = F.log_softmax(logits.detach().float(), -1)
        loss = loss + recipe.consistency * torch.stack([per_slot_mean(kl(goal, v)) for v in all_logits[:-1]]).mean()
    if recipe.agree > 0:
        teacher = F.log_softmax(past_logits.detach().float(), -1)
        teacher = teacher.gather(1, layout.source[..., None].expand(-1, -1, teacher.size(-1)))
        loss = loss + recipe.agree * per_slot_mean(kl(teacher, logits))
    if recipe.past_loss > 0:  # pinned: the causal stream's own next-token (or own-token) loss; bidirectional: past slots
        past_targets = (targets if recipe.past_target == 'next' else idx) if past_logits is not None else layout.self_targets
        past_logits = logits if past_logits is None else past_logits
        loss = loss + recipe.past_loss * F.cross_entropy(past_logits.flatten(0, 1), past_targets.flatten(), ignore_index=-1)
    return loss, logits, ce
