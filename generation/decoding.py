"""
From logits to tokens, shared by the samplers (sampling.py, speculative.py) and steering.py; it
imports neither sampler.

- Settings: the sampler and WFC settings (sample.py's keys); Request: one generation's asks beside them.
- filtered_probs / draw / sample_tokens: temperature / top_k / top_p / min_p; temperature 0 is argmax.
- Constraint: a format constraint on the generated text (tokens that would break it are never drawn).
- entropy_bits, live_slots: a distribution's entropy and varentropy; how many future slots are worth keeping.
- Stats: the per-step record of a generation.
"""

import math
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

LN2 = math.log(2)
POLICIES = ('first', 'threshold', 'lowest', 'median', 'entropy')
MODES = ('token', 'nearest', 'partial')
SAMPLERS = ('auto', 'speculative', 'collapse', 'causal')


@dataclass
class Settings:
    temperature: float = 0.8   # 0 = argmax
    top_k: int = 200           # keep the k likeliest tokens (0 = all)
    top_p: float = 1.0         # keep the smallest set with this much probability (1 = all)
    min_p: float = 0.0         # drop tokens below min_p x the top probability (0 = none)
    sampler: str = 'auto'      # 'auto', 'speculative', 'collapse', 'causal' (see above)
    future: str = 'fixed'      # WFC: 'fixed' (all n_future slots) or 'auto' (the live slots follow the entropy curve, see tau)
    policy: str = 'first'      # collapse sampler: which slots to collapse (see above)
    tau: float = 1.0           # entropy limit, bits: the threshold policy's, and future='auto's (a slot below it is worth speculating)
    mode: str = 'token'        # collapse: 'token', 'nearest' or 'partial'
    eps: float = 0.1           # nearest collapse: the state decodes to its token with p >= 1 - eps
    lam: float = 0.5           # partial collapse / median nudge: fraction of the way to the token
    max_loop: int = 0          # WFC refinement cap per step (0 = the model's max_loop; speculative drafts: 1 pass)
    tol: float = -1.0          # WFC convergence tolerance (< 0 = the model's tol)
    slide: int = 0             # learned positions: at the block edge drop this many extra old tokens (0 = exact sliding)
    warm: str = 'auto'         # collapse: refine from the carried state ('on'), from e_max every step ('off'), or
                               # 'auto': warm only for models trained to warm-start (warm_prob > 0) or to converge (bound set)
    # entropy policy thresholds (`sample.py --calibrate=True` prints the percentiles for a model)
    ent_low: float = 1.9       # entropy (bits) below this: certain, collapse greedily (every leading slot below it)
    ent_high: float = 4.3      # entropy (bits) at or above this: very uncertain, refine boost_loop more passes first
    var_high: float = 5.3      # varentropy (bits^2) at or above this: the slot forks between modes: branch
    branch: int = 4            # candidates tried at a fork, one refine each (< 2 = never branch)
    boost_loop: int = 0        # extra refinement passes when very uncertain (0 = none)

    def check(self):
        problems = []
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.top_k < 0:
            problems.append("need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= min_p < 1")
        for name, allowed in (('policy', POLICIES), ('mode', MODES), ('sampler', SAMPLERS), ('warm', ('auto', 'on', 'off')),
                              ('future', ('fixed', 'auto'))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.ent_low <= self.ent_high or self.var_high < 0 or min(self.branch, self.boost_loop) < 0:
            problems.append("entropy policy: need 0 <= ent_low <= ent_high, var_high >= 0, branch >= 0, boost_loop >= 0")
        if min(self.max_loop, self.slide) < 0 or not (self.tau >= 0 and 0 < self.eps < 1 and 0 <= self.lam <= 1):
            problems.append("need max_loop >= 0, slide >= 0, tau >= 0, 0 < eps < 1 and 0 <= lam <= 1")
        if problems:
            raise ValueError('; '.join(problems))
        return self

    def limits(self, model, drafts=False):
        """The refinement limits for engine.refine, resolved against the model: the one place "0 or
        -1 means the model's value" is read. max_loop 0 is the model's max_loop (drafts=True, the
        speculative sampler's drafts: one pass, their exactness does not depend on it), tol < 0 the
        model's tol."""
        solver = model.solver
        return dict(max_loop=self.max_loop or (1 if drafts else solver.max_loop), tol=solver.tol if self.tol < 0 else self.tol)


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


def token_probs(logits, s, temperature):
    """logits (..., V) -> the distribution a token is drawn from under the settings s: filtered, or
    at temperature 0 the plain softmax (its argmax is the greedy token; what a constraint filters)."""
    if temperature == 0:
        return torch.softmax(logits.float(), -1)
    return filtered_probs(logits, temperature, s.top_k, s.top_p, s.min_p)


def draw(probs, generator=None):
    """One token per row of probs (..., V): an exponential race (race) on uniforms drawn from generator,
    the same draw a compiled sampler step makes from uniforms drawn before it."""
    return race(probs, exponential(torch.rand(probs.shape, generator=generator, device=probs.device)))


def exponential(uniform):
    """Exp(1) noise from uniforms in [0, 1), kept above 0 so that a token of probability 0 never wins a race."""
    return (-torch.log1p(-uniform)).clamp(min=torch.finfo(uniform.dtype).tiny)


def race(probs, noise):
    """One token per row of probs (..., V), the winner of an exponential race: argmax p / E with E (..., V)
    iid Exp(1) picks token i with probability p_i (torch.multinomial draws one sample this way). The
    noise comes in drawn, so a compiled sampler step holds no generator (speculative.decided_round)."""
    return (probs / noise).argmax(-1)


def sample_tokens(logits, s, generator=None, temperature=None, constraint=None, texts=None, last=False):
    """logits (..., V) -> token ids (...) under the settings s; temperature (a schedule's value for
    this step, see steering.py) overrides s.temperature. constraint (with texts, the rows' text so
    far, logits (B, V)): tokens after which a row's text could no longer match get probability 0."""
    temperature = s.temperature if temperature is None else temperature
    if constraint is None:
        return logits.argmax(-1) if temperature == 0 else draw(filtered_probs(logits, temperature, s.top_k, s.top_p, s.min_p), generator)
    probs = constraint.filter(token_probs(logits, s, temperature), texts, last)[0]
    return logits.masked_fill(probs == 0, float('-inf')).argmax(-1) if temperature == 0 else draw(probs, generator)


class Constraint:
    """A positive format constraint on generated text ("hard islands"): prefix_ok(text) says whether
    text can still become a match (a partial match), complete(text) whether it is one; pieces[t] is
    token t's text (for BPE a token's own text: a character split across tokens shows as U+FFFD).
    The samplers zero every token after which a row could no longer match, and on a row's last token
    keep only the tokens that complete a match, where one does (else the run reports the miss)."""

    def __init__(self, prefix_ok, complete, pieces):
        self.prefix_ok, self.complete, self.pieces = prefix_ok, complete, pieces

    def filter(self, probs, texts, last=False):
        """probs (B, V) -> (probs without the ruled-out tokens, renormalized; all zero where nothing
        is allowed, and the kept mass (B,)): only tokens of nonzero probability are checked."""
        out = probs.clone()
        for b, text in enumerate(texts):
            candidates = probs[b].nonzero()[:, 0].tolist()
            ok = {t for t in candidates if self.prefix_ok(text + self.pieces[t])}
            if last:
                full = {t for t in ok if self.complete(text + self.pieces[t])}
                ok = full or ok
            if ok:  # a row with no way left keeps its draw: the run reports the miss at the end
                out[b, [t for t in candidates if t not in ok]] = 0.0
        mass = out.sum(-1) / probs.sum(-1)
        return out / out.sum(-1, keepdim=True), mass

    def extend(self, texts, tokens):
        """The rows' texts after tokens (B, n)."""
        return [text + ''.join(self.pieces[t] for t in row) for text, row in zip(texts, tokens.tolist())]


def entropy_bits(logits):
    """logits (..., V) -> entropy (bits) and varentropy (bits^2, the variance of -log2 p(token)): a
    flat distribution has high entropy and low varentropy, a fork between a few likely tokens and a
    long tail has high varentropy."""
    logp = F.log_softmax(logits.float(), dim=-1) / LN2
    p = logp.exp2()
    bits = -(p * logp).sum(-1)
    return bits, (p * (logp + bits[..., None]) ** 2).sum(-1)


class Stats:
    """Per-step record of a generation: passes, tokens emitted per row (a batched speculative round:
    the batch's tokens over its rows, as its rows accept different numbers of drafts), stack calls, the entropy (bits) of
    what collapsed and the window's entropy curve (row 0; detail=True only, it costs a sync per step),
    and for the speculative sampler drafts proposed and accepted by distance."""

    def __init__(self, detail=False):
        self.steps, self.t0, self.detail = [], time.time(), detail
        self.proposed, self.accepted = [], []

    def add(self, passes, emitted, collapsed_bits=(), window_bits=(), calls=1, live=None):
        self.steps.append(dict(passes=passes, emitted=emitted, calls=calls, collapsed_bits=collapsed_bits,
                               window_bits=window_bits, live=live))

    def drafts(self, proposed, accepted):
        """Speculation bookkeeping: drafts at distances 1..proposed, the first `accepted` of them taken."""
        grow = proposed - len(self.proposed)
        self.proposed, self.accepted = self.proposed + [0] * max(0, grow), self.accepted + [0] * max(0, grow)
        for d in range(proposed):
            self.proposed[d] += 1
            self.accepted[d] += d < accepted

    def summary(self):
        tokens = sum(s['emitted'] for s in self.steps)
        seconds, calls = time.time() - self.t0, sum(s['calls'] for s in self.steps)
        out = dict(tokens=tokens, steps=len(self.steps), seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
                   passes_per_token=sum(s['passes'] for s in self.steps) / max(tokens, 1),
                   tokens_per_step=tokens / max(len(self.steps), 1), tokens_per_call=tokens / max(calls, 1))
        if self.proposed:
            out['acceptance'] = [a / max(p, 1) for a, p in zip(self.accepted, self.proposed)]
        return out


@dataclass
class Request:
    """One generation's asks beside the model and the settings (see sampling.generate)."""
    max_new_tokens: int
    generator: object = None
    goal: tuple = None
    schedule: object = None
    constraint: object = None
    stats: object = None

    def temperature(self, s, produced):
        return s.temperature if self.schedule is None else self.schedule(produced / self.max_new_tokens)

    def rounds_per_call(self, model):
        """How many steps (causal) or rounds (speculative) one call of a sampler runs:
        model.rounds_per_call where runtime.compile_samplers set it (1 eagerly), and 1 while a
        temperature schedule moves the temperature from one to the next."""
        return getattr(model, 'rounds_per_call', 1) if self.schedule is None else 1


def leading_true(mask):
    """(..., n) bool -> (...,) how many entries of the last dimension are True before the first False
    (argmin's first-occurrence rule, over the mask with a False appended). The same count as
    mask.cumprod(-1).sum(-1), as a reduction that inductor fuses into a compiled round; cumprod ran as
    a call of its own there, every round."""
    return torch.cat((mask, mask.new_zeros(mask.shape[:-1] + (1,))), -1).int().argmin(-1)


def live_slots(bits, tau):
    """future='auto': how many future slots are worth keeping, from row 0's entropy curve (bits): the
    leading slots below tau and one beyond them (the frontier), within [1, F]. Where the curve reaches
    its plateau further slots would be guesses that cost a slot each."""
    below = leading_true(bits[0] < tau).item()
    return int(min(bits.size(1), below + 1))
