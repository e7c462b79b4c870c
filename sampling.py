"""
Generation engines; sample.py is their command line, evaluation and steering reuse them.

- sample_tokens: temperature / top_k / top_p / min_p; temperature 0 is argmax.
- generate: a GPT (or looped GPT) decodes token by token with a KV cache; a WFC model runs
  converge -> collapse -> shift (DESIGN.md section 5) with a collapse policy and mode, and pins.

Policies (which future slots to collapse each step):
  first      the first open slot: one token per step (the seed's default)
  threshold  every leading open slot whose entropy is below tau bits, at least one: several tokens per step
  lowest     the open slot with the least entropy, anywhere (non-causal; a step may emit nothing)
  median     the first open slot, plus a partial nudge of the median-entropy open slot toward a sample
             (the seed's way of drawing the speculation horizon further out)
  entropy    per row, from the entropy and varentropy (bits) of the first open slot (entropix-style,
             seed 002): certain -> greedy, several slots; forked (high varentropy) -> branch and keep
             the candidate that leaves the future most certain; very uncertain -> refine more; else sample
Pins put given tokens at future offsets before the first step (goal-directed infill).
"""

import math
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

LN2 = math.log(2)
POLICIES = ('first', 'threshold', 'lowest', 'median', 'entropy')
MODES = ('token', 'nearest', 'partial')


@dataclass
class Settings:
    temperature: float = 0.8   # 0 = argmax
    top_k: int = 200           # keep the k likeliest tokens (0 = all)
    top_p: float = 1.0         # keep the smallest set with this much probability (1 = all)
    min_p: float = 0.0         # drop tokens below min_p x the top probability (0 = none)
    policy: str = 'first'      # WFC: which slots to collapse (see above)
    tau: float = 1.0           # WFC threshold policy: entropy limit, bits
    mode: str = 'token'        # WFC collapse: 'token', 'nearest' or 'partial'
    eps: float = 0.1           # WFC nearest collapse: the state decodes to its token with p >= 1 - eps
    lam: float = 0.5           # WFC partial collapse / median nudge: fraction of the way to the token
    max_loop: int = 0          # WFC refinement cap per step (0 = the model's max_loop)
    tol: float = -1.0          # WFC convergence tolerance (< 0 = the model's tol)
    slide: int = 0             # when the window is full, drop this many extra old tokens (0 = exact sliding)
    warm: str = 'auto'         # WFC: refine from the carried state ('on'), from e_max every step ('off'), or
                               # 'auto': warm only for models trained to warm-start (warm_prob > 0)
    # entropy policy thresholds (`sample.py --calibrate=True` prints the percentiles for a model: fixed
    # values do not transfer between models). Defaults: out-shakespeare-char-wfc's p25, p90, p90 at d = 1.
    ent_low: float = 1.9       # entropy (bits) below this: certain, collapse greedily (every leading slot below it)
    ent_high: float = 4.3      # entropy (bits) at or above this: very uncertain, refine boost_loop more passes first
    var_high: float = 5.3      # varentropy (bits^2) at or above this: the slot forks between modes: branch
    branch: int = 4            # candidates tried at a fork, one refine each (< 2 = never branch)
    boost_loop: int = 0        # extra refinement passes when very uncertain (0 = none; a one-pass model gains nothing)

    def check(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            problems.append("need top_k >= 0, 0 < top_p <= 1 and 0 <= min_p < 1")
        if self.policy not in POLICIES:
            problems.append(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.warm not in ('auto', 'on', 'off'):
            problems.append(f"warm must be 'auto', 'on' or 'off', got {self.warm!r}")
        if self.mode not in MODES:
            problems.append(f"collapse mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.ent_low <= self.ent_high or self.var_high < 0 or min(self.branch, self.boost_loop) < 0:
            problems.append("entropy policy: need 0 <= ent_low <= ent_high, var_high >= 0, branch >= 0, boost_loop >= 0")
        if problems:
            raise ValueError('; '.join(problems))
        return self


def filtered_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """logits (..., V) -> the sampling distribution after temperature and the filters."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    probs = F.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep tokens until the mass reaches top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_tokens(logits, s, generator=None, temperature=None):
    """logits (..., V) -> token ids (...) under the settings s; temperature (a schedule's value for
    this step, see steering.py) overrides s.temperature."""
    temperature = s.temperature if temperature is None else temperature
    if temperature == 0:
        return logits.argmax(-1)
    probs = filtered_probs(logits, temperature, s.top_k, s.top_p, s.min_p)
    return torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1])


def entropy_bits(logits):
    """logits (..., V) -> entropy (bits) and varentropy (bits^2, the variance of -log2 p(token)): a
    flat distribution has high entropy and low varentropy, a fork between a few likely tokens and a
    long tail has high varentropy."""
    logp = F.log_softmax(logits.float(), dim=-1) / LN2
    p = logp.exp2()
    bits = -(p * logp).sum(-1)
    return bits, (p * (logp + bits[..., None]) ** 2).sum(-1)


class Stats:
    """Per-step record of a generation: passes, tokens emitted, entropy (bits) of what collapsed,
    and the entropy curve of the window (row 0)."""

    def __init__(self):
        self.steps, self.t0 = [], time.time()

    def add(self, passes, emitted, collapsed_bits, window_bits):
        self.steps.append(dict(passes=passes, emitted=emitted, collapsed_bits=collapsed_bits, window_bits=window_bits))

    def summary(self):
        tokens = sum(s['emitted'] for s in self.steps)
        seconds = time.time() - self.t0
        return dict(tokens=tokens, steps=len(self.steps), seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
                    passes_per_token=sum(s['passes'] for s in self.steps) / max(tokens, 1),
                    tokens_per_step=tokens / max(len(self.steps), 1))


@torch.no_grad()
def generate(model, idx, max_new_tokens, s, generator=None, pins=(), on_tokens=None, schedule=None):
    """Continue idx (B, P) by max_new_tokens tokens. pins: [(offset, token ids)] placed at future
    slots offset, offset + 1, ... (offset 1 = the next token; WFC only). on_tokens(new (B, n))
    is called as tokens are decided; returning True stops. schedule(progress in [0, 1)) -> the
    temperature of a step (steering.schedule makes them); None keeps s.temperature. Returns
    (new tokens (B, n), Stats)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    s.check()
    if model.config.n_future == 0:
        if pins:
            raise ValueError("pins need a WFC model (n_future > 0): a GPT has no future slots to pin")
        if s.policy == 'entropy':
            raise ValueError("the entropy policy needs a WFC model (n_future > 0)")
        return _generate_gpt(model, idx, max_new_tokens, s, generator, on_tokens, schedule)
    return _generate_wfc(model, idx, max_new_tokens, s, generator, pins, on_tokens, schedule)


def _generate_gpt(model, idx, max_new_tokens, s, generator, on_tokens, schedule):
    stats, out = Stats(), []
    window = idx[:, -model.max_past():]
    cache, x = model.cache_past(window, queries=1)  # the last position's state is all the logits need
    for step in range(max_new_tokens):
        logits = model.logits(x[:, -1])
        temperature = None if schedule is None else schedule(step / max_new_tokens)
        token = sample_tokens(logits, s, generator, temperature)[:, None]
        out.append(token)
        stats.add(model.config.n_loop, 1, (model.entropy_of_logits(logits[0]) / LN2).item(), [])
        if on_tokens is not None and on_tokens(token):
            break
        window = torch.cat((window, token), 1)
        if window.size(1) > model.max_past():  # slide: rebuild the cache on the most recent tokens
            window = window[:, -max(1, model.max_past() - s.slide):]
            cache, x = model.cache_past(window, queries=1)
        else:
            cache, x = model.cache_past(token, cache, start=window.size(1) - 1)
    return torch.cat(out, 1), stats


def choose_slots(policy, bits, open_, tau):
    """(B, F) bool: the slots to collapse this step. bits (B, F) entropy; open_ (B, F) undecided."""
    B, F_ = bits.shape
    first = F.one_hot(open_.float().argmax(1), F_).bool() & open_  # first open slot of each row
    if policy in ('first', 'median'):
        return first
    if policy in ('threshold', 'entropy'):  # entropy: tau = ent_low, for the rows that are certain
        after_first = open_.long().cumsum(1) >= 1
        certain = (bits < tau) & open_
        run = (certain | ~after_first).long().cumprod(1).bool() & after_first  # leading certain open slots
        return run | first
    if policy == 'lowest':
        return F.one_hot(bits.masked_fill(~open_, float('inf')).argmin(1), F_).bool() & open_
    raise ValueError(f"unknown policy {policy!r}")


def median_slot(bits, candidates):
    """(B, F) bool: the candidate slot with the median entropy (none where a row has no candidate)."""
    ranked = bits.masked_fill(~candidates, float('inf')).argsort(1)
    count = candidates.sum(1)
    pick = ranked.gather(1, (count // 2).clamp(max=bits.size(1) - 1)[:, None])[:, 0]
    return F.one_hot(pick, bits.size(1)).bool() & candidates & (count > 0)[:, None]


def entropy_step(model, w, logits, s, generator, temperature, limits):
    """The entropy policy's decision, per row, from the entropy H and varentropy V (bits) of its
    first open slot (entropix's quadrants, seed 002; thresholds in Settings):
      H < ent_low, V < var_high   certain: every leading open slot below ent_low, argmax
      V >= var_high               forked between modes: branch (see branch_tokens), one slot
      H >= ent_high               very uncertain: boost_loop more passes on that row, then sample
      otherwise                   sample the first open slot
    Returns w, the slots (B, F) and tokens (B, F) to collapse, and the extra passes."""
    bits, var = entropy_bits(logits)
    open_ = w.decided < 0
    first = choose_slots('first', bits, open_, 0.0)
    h, v = (bits * first).sum(1), (var * first).sum(1)
    certain = (h < s.ent_low) & (v < s.var_high)
    fork = ~certain & (v >= s.var_high) & (s.branch > 1)
    unsure = ~certain & ~fork & (h >= s.ent_high)
    extra = 0
    if s.boost_loop and unsure.any():
        rows = unsure.nonzero()[:, 0]
        sub, extra = model.refine(w.select(rows), max_loop=s.boost_loop, tol=limits['tol'], min_loop=s.boost_loop)
        w.future[rows] = sub.future
        if w.past_x is not None:
            w.past_x[rows] = sub.past_x
        logits = model.future_logits(w)
    tokens = sample_tokens(logits, s, generator, temperature)
    tokens = torch.where(certain[:, None], logits.argmax(-1), tokens)
    slots = torch.where(certain[:, None], choose_slots('entropy', bits, open_, s.ent_low), first)
    if fork.any():
        rows = fork.nonzero()[:, 0]
        picked, used = branch_tokens(model, w, rows, first, logits, s, generator, temperature, limits)
        tokens[rows] = torch.where(first[rows], picked[:, None], tokens[rows])
        extra += used
    return w, slots, tokens, extra


def branch_tokens(model, w, rows, first, logits, s, generator, temperature, limits):
    """A one-step lookahead (tree search, seed 003) for the forked rows: draw s.branch distinct
    candidates for the first open slot, collapse each in a copy of the row, refine the copies, and
    keep the candidate after which the remaining open slots are most certain (lowest mean entropy).
    Returns the chosen tokens (R,) and the passes of that refine."""
    t = s.temperature if temperature is None else temperature
    slot_logits = logits[rows][first[rows]]  # (R, V)
    if t == 0:
        candidates = slot_logits.topk(min(s.branch, slot_logits.size(-1)), -1).indices
    else:
        probs = filtered_probs(slot_logits, t, s.top_k, s.top_p, s.min_p)
        k = min(s.branch, int((probs > 0).sum(-1).min()))
        candidates = torch.multinomial(probs, k, replacement=False, generator=generator)  # (R, k)
    k = candidates.size(1)
    copies = w.select(rows.repeat_interleave(k))
    slot = first[rows].repeat_interleave(k, 0)
    copies = model.collapse(copies, slot, candidates.reshape(-1, 1).expand_as(slot), mode=s.mode, eps=s.eps, lam=s.lam)
    copies, used = model.refine(copies if warm_start(model, s) else model.forget(copies), **limits)
    open_ = copies.decided < 0
    bits = entropy_bits(model.future_logits(copies))[0]
    spread = (bits * open_).sum(1) / open_.sum(1).clamp(min=1)  # (R * k,) mean entropy of the open slots
    best = spread.view(-1, k).argmin(1)
    return candidates.gather(1, best[:, None])[:, 0], used


def warm_start(model, s):
    """Whether to refine from the carried state: a model refined once per step in training has
    never seen a carried state, it needs a cold start."""
    return s.warm == 'on' or (s.warm == 'auto' and model.config.warm_prob > 0)


def place_pins(model, w, pins, s):
    F_ = w.future.size(1)
    for offset, ids in pins:
        ids = torch.as_tensor(ids, dtype=torch.long, device=w.past.device)
        if offset < 1 or offset + len(ids) - 1 > F_:
            raise ValueError(f"a pin of {len(ids)} tokens at offset {offset} does not fit the {F_} future slots: "
                             f"offsets run 1..{F_ - len(ids) + 1} for this pin (or train with a larger n_future)")
        slots = torch.zeros_like(w.decided, dtype=torch.bool)
        slots[:, offset - 1:offset - 1 + len(ids)] = True
        tokens = torch.zeros_like(w.decided)
        tokens[:, offset - 1:offset - 1 + len(ids)] = ids
        if (w.decided[slots] >= 0).any():
            raise ValueError(f"pins overlap at offset {offset}")
        w = model.collapse(w, slots, tokens, mode=s.mode, eps=s.eps, lam=s.lam)
    return w


def _generate_wfc(model, idx, max_new_tokens, s, generator, pins, on_tokens, schedule):
    stats, out, produced = Stats(), [], 0
    limits = dict(max_loop=s.max_loop or None, tol=None if s.tol < 0 else s.tol)
    w = place_pins(model, model.start(idx), pins, s)
    warm = warm_start(model, s)
    while produced < max_new_tokens:
        w, used = model.refine(w if warm else model.forget(w), **limits)
        logits = w.stats['logits']  # model.future_logits(w), decoded once by refine
        bits = w.stats['entropy'] / LN2
        open_ = w.decided < 0
        temperature = None if schedule is None else schedule(produced / max_new_tokens)
        if s.policy == 'entropy' and open_.any():
            w, slots, tokens, extra = entropy_step(model, w, logits, s, generator, temperature, limits)
            used += extra
        else:
            slots = choose_slots(s.policy, bits, open_, s.tau) if open_.any() else open_
            tokens = sample_tokens(logits, s, generator, temperature)
        w = model.collapse(w, slots, tokens, mode=s.mode, eps=s.eps, lam=s.lam)
        if s.policy == 'median':
            w = model.collapse(w, median_slot(bits, open_ & ~slots), tokens, mode='partial', lam=s.lam, decide=False)
        w, moved = model.shift(w, slide=s.slide)
        moved = moved[:, :max_new_tokens - produced]
        produced += moved.size(1)
        stats.add(used, moved.size(1), bits[0][slots[0]].tolist(), bits[0].tolist())
        if moved.size(1):
            out.append(moved)
            if on_tokens is not None and on_tokens(moved):
                break
    return torch.cat(out, 1), stats
