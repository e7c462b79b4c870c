"""
Steering: control over what a WFC model writes, built on the sampler (sampling.py). The entropy
policy itself lives in sampling.py (policy='entropy'); this file holds what runs around it.

- schedule(spec, temperature): temperature by progress, hot to explore then cool to settle
  (simulated annealing, seed 003); every method here and sampling.generate take one.
- potentials: functions potential(text, n_tokens) -> log-weight of the decided text (-inf rules it
  out): forbid, forbid_regex, must_contain, judge_potential.
- smc: sequential Monte Carlo steering (seed 004; Lew et al. 2023, "SMC steering of LLMs"): N
  particles are the N rows of one Window (past, future, warm state), reweighted by the potential's
  increments after each step and resampled when the effective sample size falls below a threshold.
- rejection: draw whole samples until a pass budget is spent, keep the ones the potential allows.
- best_of_n, tree: candidates scored by a function (the judge's NLL by default), all returned.
- goal=(offset, ids): text pinned at a generated offset that may lie beyond the window; each goal
  token is pinned as its slot comes into reach, so the infill is refined toward it.
- calibrate: percentiles of entropy and varentropy (bits) the sampler meets on real text, per
  distance, to set the entropy policy's thresholds for a model.
Budgets are counted in model passes x rows, so methods compare at equal cost.
"""

import math
import re
import time
from dataclasses import dataclass, field

import torch

from eval import distinct_n, sequence_nll
from generation import engine
from generation.decoding import Constraint, Settings, draw, entropy_bits, sample_tokens, token_probs
from generation.sampling import choose_slots, generate, parse_goal, pin_goal, warm_start

NEG_INF = float('-inf')


# ---- temperature schedules ----

def schedule(spec, temperature):
    """'' -> None (constant temperature). 'linear:T0[:T1]', 'cosine:T0[:T1]', 'exp:T0[:T1]': from T0
    at the first step to T1 (default: the sampler's temperature) at the last. Returns a function
    progress in [0, 1) -> temperature."""
    if not spec:
        return None
    kind, *temps = spec.split(':')
    try:
        t0, t1 = float(temps[0]), float(temps[1]) if len(temps) > 1 else temperature
    except (IndexError, ValueError):
        raise ValueError(f"schedule must look like 'linear:1.5' or 'cosine:1.5:0.5', got {spec!r}") from None
    shapes = dict(linear=lambda u: t0 + (t1 - t0) * u,
                  cosine=lambda u: t1 + (t0 - t1) * (1 + math.cos(math.pi * u)) / 2,
                  exp=lambda u: t0 * (t1 / t0) ** u if min(t0, t1) > 0 else t0 + (t1 - t0) * u)
    if kind not in shapes or min(t0, t1) < 0:
        raise ValueError(f"schedule: kind must be one of {sorted(shapes)} with temperatures >= 0, got {spec!r}")
    return shapes[kind]


# ---- potentials: potential(text, n_tokens) -> log-weight; text is the decided continuation ----

def forbid_regex(pattern):
    """-inf once the text contains a match of the regular expression."""
    compiled = re.compile(pattern)
    return lambda text, n: NEG_INF if compiled.search(text) else 0.0


def forbid(words):
    """Never use these words (whole words; one at the very end counts, even if more letters might follow)."""
    return forbid_regex(r'\b(?:' + '|'.join(map(re.escape, words)) + r')\b')


def _word_start(text, k):
    """Whether a word can begin k characters before the end of text (at its start, or after a
    non-word character); k = 0: whether the text ends at a word boundary."""
    return len(text) == k or not (text[-k - 1].isalnum() or text[-k - 1] == '_')


def must_contain(word, within, shaping=1.0):
    """From its `within`-th token on, the text must contain `word` as a whole word (the end of the
    text counts as a boundary): -inf if it does not. Before that, a shaping bonus of `shaping` per
    letter of the word begun at the end of the text guides resampling toward it; it telescopes
    away once the word is there, so the target stays exact."""
    found = re.compile(r'\b' + re.escape(word) + r'\b').search

    def potential(text, n):
        if found(text):
            return 0.0
        if n >= within:
            return NEG_INF
        return shaping * max((k for k in range(1, len(word)) if text.endswith(word[:k]) and _word_start(text, k)),
                             default=0)
    potential.found = found
    return potential


def contain_lookahead(word, encode, weight=1.0):
    """A lookahead for must_contain that only a WFC model can offer: weight x log P(the speculated
    future spells the rest of the word), from the future slots' marginals, at the best alignment:
    the letters already begun at a word start at the end of the text, or a fresh start at the next
    slot (after a word boundary) or after a space at any slot; letters past the window use the last
    slot's marginal. 0 once the word is there. It steers the particles before the deadline decides."""
    found, space = must_contain(word, 0).found, encode(' ')

    def twist(text, logprobs):  # logprobs (F, V)
        if found(text):
            return 0.0
        n_future, best = logprobs.size(0), NEG_INF
        spell = lambda rest, at: sum(logprobs[min(at + j, n_future - 1), t].item() for j, t in enumerate(rest))
        for k in range(1, len(word)):  # begun
            if text.endswith(word[:k]) and _word_start(text, k):
                best = max(best, spell(encode(word[k:]), 0))
        rest = encode(word)
        if _word_start(text, 0):  # the text ends at a boundary: start right away
            best = max(best, spell(rest, 0))
        for at in range(len(space), n_future):  # a space, then the word
            best = max(best, spell(space, at - len(space)) + spell(rest, at))
        return weight * best
    return twist


def satisfies(potential, decode, ids):
    """Whether a finished token list is allowed at every step, as SMC checks it (e.g. must_contain
    wants the word from its `within`-th token on, not just somewhere in the final text), and, for a
    match constraint, whether the final text matches in full."""
    ok = all(potential(decode(ids[:k]), k) > NEG_INF for k in range(len(ids) + 1))
    return ok and (not hasattr(potential, 'constraint') or potential.constraint.complete(decode(ids)))


class Match:
    """match:REGEX, a positive format constraint ("hard islands"): the generated text must match the
    pattern in full. As a potential it is 0 while the text can still become a match (every prefix
    is checked with the regex package's partial matching) and -inf once it cannot; its constraint
    (decoding.Constraint) keeps the samplers from drawing the tokens that would break it, and on
    the last token asks for a complete match."""

    def __init__(self, pattern, decode, vocab_size):
        import regex
        try:
            self.compiled = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"match: invalid pattern {pattern!r}: {e}") from None
        self.constraint = Constraint(self.prefix_ok, lambda text: self.compiled.fullmatch(text) is not None,
                                     [decode([t]) for t in range(vocab_size)])

    def prefix_ok(self, text):
        return self.compiled.fullmatch(text, partial=True) is not None

    def __call__(self, text, n):
        return 0.0 if self.prefix_ok(text) else NEG_INF


def judge_potential(judge, encode, prompt, weight=1.0):
    """weight x the judge GPT's log-likelihood (nats) of the text after the prompt ids: a soft
    potential toward text a stronger model finds likely (the target is a product of experts)."""
    device = next(judge.parameters()).device

    def potential(text, n):
        ids = encode(text)
        if not ids:
            return 0.0
        seq = torch.tensor([list(prompt) + ids], device=device)
        return -weight * sequence_nll(judge, seq, len(prompt)) * len(ids)
    return potential


def judge_score(judge, prompt):
    """score(tokens) -> minus the judge's mean NLL per token of tokens after prompt (higher is better)."""
    device = next(judge.parameters()).device
    return lambda tokens: -sequence_nll(judge, torch.tensor([list(prompt) + list(tokens)], device=device), len(prompt))


# ---- sequential Monte Carlo ----

def ess(logw):
    """Effective sample size of log-weights (N,): (sum w)^2 / sum w^2, in 0..N (rounded to 1e-9, so
    equal weights give exactly N whatever the float error)."""
    return round(torch.exp(2 * torch.logsumexp(logw, 0) - torch.logsumexp(2 * logw, 0)).item(), 9)


def should_resample(logw, threshold):
    """Resample when the ESS falls below threshold x N, or when a particle has died (weight 0):
    a dead particle never recovers, its passes would be wasted."""
    return ess(logw) < threshold * len(logw) or bool(torch.isinf(logw).any())


def resample(logw, generator=None, method='systematic'):
    """Ancestor indices (N,) drawn in proportion to the weights; a particle of weight 0 is never drawn.
    systematic: one uniform u, points (u + k) / N on the weights' CDF (less variance than multinomial)."""
    N = len(logw)
    weights = torch.softmax(logw.double(), 0)
    device = generator.device if generator is not None else logw.device
    if method == 'multinomial':
        return torch.multinomial(weights.float().to(device), N, replacement=True, generator=generator).to(logw.device)
    cdf = weights.cumsum(0)
    cdf[-1] = 1.0  # u < 1 always lands on a live particle, whatever the rounding
    points = (torch.rand(1, generator=generator, device=device).double().to(logw.device) + torch.arange(N, device=logw.device)) / N
    return torch.searchsorted(cdf, points, right=True).clamp(max=N - 1)


@dataclass
class SMCResult:
    tokens: torch.Tensor  # (N, n) the particles' generated tokens
    texts: list           # their decoded text
    weights: torch.Tensor  # (N,) normalised weights (all 0 when every particle died)
    log_z: float          # log estimate of Z = E[exp(G(text))] under the sampler (-inf: all died)
    ess: list = field(default_factory=list)        # ESS after each step's reweighting
    resampled: list = field(default_factory=list)  # whether each step resampled
    passes: int = 0       # model passes x rows
    died_at: int = -1     # the step at which every particle had died (-1: never)
    ess_threshold: float = 0.5  # resample when the ESS falls below this x N

    def pick(self, generator=None):
        """One particle drawn by weight: a sample of the steered distribution."""
        if self.died_at >= 0:
            return 0
        weights = self.weights.float().to(generator.device if generator is not None else 'cpu')
        return int(torch.multinomial(weights, 1, generator=generator))


@torch.no_grad()
def smc(model, prompt, max_new_tokens, potential, decode, particles=8, s=None, ess_threshold=0.5,
        schedule=None, goal=None, generator=None, method='systematic', lookahead=None):
    """SMC steering of a WFC model from prompt ids (P,): the particles sample one token per step
    (policy 'first') and are reweighted by potential(text now) - potential(text before), so the
    target is the sampler's distribution times exp(potential(final text)) (Feynman-Kac). The
    proposal is the sampler itself, so the potential alone makes the weights; a match potential's
    constraint keeps the proposal from breaking it, and the probability mass it kept joins the
    weight. potential None: constant, plain sampling. lookahead(text, logprobs (F, V) of the refined
    future) -> log-twist: what the speculated future promises (twisted SMC); it joins each step's
    weight and leaves at the end, so the final target is unchanged. Returns an SMCResult."""
    s = s or Settings()
    if model.config.n_future == 0 or s.policy != 'first':
        raise ValueError("SMC steers a WFC model (n_future > 0) with policy 'first' (one token per particle per step)")
    s.check()
    potential = potential or (lambda text, n: 0.0)
    constraint = getattr(potential, 'constraint', None)
    N, device = particles, model.e_max().device
    idx = torch.as_tensor(prompt, dtype=torch.long, device=device).view(1, -1).expand(N, -1)
    w, warm = engine.start(model, idx), warm_start(model, s)
    generated, texts = idx[:, :0], [''] * N
    pot = torch.full((N,), float(potential('', 0)), dtype=torch.float64)
    if pot[0] == NEG_INF:
        raise ValueError("the potential rules out the empty text: nothing can satisfy it")
    result = SMCResult(generated, texts, None, pot[0].item(), ess_threshold=ess_threshold)
    logw, twist, new_pot, kept = (torch.zeros(N, dtype=torch.float64) for _ in range(4))
    new_pot += pot
    while True:
        finished = generated.size(1) >= max_new_tokens
        if not finished:
            w = pin_goal(model, w, goal, generated.size(1), s)
            w, used = engine.refine(model, w if warm else engine.forget(model, w), **s.limits(model))
            result.passes += used * N
            logits = w.stats['logits']
        if generated.size(1):  # reweight by the last step's text (and what the refined future promises)
            new_twist = torch.zeros(N, dtype=torch.float64)
            if lookahead is not None and not finished:
                logprobs = torch.log_softmax(logits.float(), -1)
                new_twist = torch.tensor([float(lookahead(t, lp)) for t, lp in zip(texts, logprobs)], dtype=torch.float64)
            logw = reweight(result, logw, new_pot - pot + new_twist - twist + kept)
            pot, twist = new_pot, new_twist
            if result.died_at >= 0:
                break
            if result.resampled[-1]:
                ancestors = resample(logw, generator, method)
                w, generated, pot, twist = w.select(ancestors), generated[ancestors], pot[ancestors], twist[ancestors]
                texts, logits = [texts[a] for a in ancestors.tolist()], logits[ancestors] if not finished else None
                logw = torch.zeros(N, dtype=torch.float64)  # uniform; log Z already holds this step's mean
        if finished:
            break
        temperature = None if schedule is None else schedule(generated.size(1) / max_new_tokens)
        w, moved, kept = propose(model, w, logits, s, temperature, constraint, texts,
                                 generated.size(1) == max_new_tokens - 1, generator)
        generated = torch.cat((generated, moved[:, :max_new_tokens - generated.size(1)]), 1)
        texts = [decode(row) for row in generated.tolist()]
        new_pot = torch.tensor([float(potential(t, generated.size(1))) for t in texts], dtype=torch.float64)
    result.tokens, result.texts = generated, texts
    result.weights = torch.softmax(logw, 0) if result.died_at < 0 else torch.zeros(N, dtype=torch.float64)
    result.log_z = result.log_z if result.died_at < 0 else NEG_INF
    return result


def reweight(result, logw, increment):
    """One step's log-increments (N,) into the weights (the dead stay dead) and into log Z; records
    the ESS, whether to resample, or that every particle died. Returns the new log-weights."""
    step = torch.where(torch.isinf(logw), NEG_INF, increment)
    result.log_z += (torch.logsumexp(logw + step, 0) - torch.logsumexp(logw, 0)).item()
    logw = logw + step
    if torch.isinf(logw).all():
        result.died_at = len(result.ess)
        result.ess.append(0.0)
        result.resampled.append(False)
    else:
        result.ess.append(ess(logw))
        result.resampled.append(should_resample(logw, result.ess_threshold))
    return logw


def propose(model, w, logits, s, temperature, constraint, texts, last, generator):
    """The particles' next token: the first open slot of each row, drawn as generate draws it (every
    slot, the same RNG), or under the constraint. Returns w (collapsed and shifted), the moved tokens
    and the log of the probability mass the constraint kept (N,) (0 without one)."""
    open_ = w.decided < 0
    tokens = sample_tokens(logits, s, generator, temperature)
    slots = choose_slots('first', logits[..., 0], open_, 0.0) if open_.any() else open_
    kept = torch.zeros(len(tokens), dtype=torch.float64)
    if constraint is not None and slots.any():
        first, t = slots.float().argmax(1), s.temperature if temperature is None else temperature
        rows = torch.arange(len(first), device=first.device)
        probs, mass = constraint.filter(token_probs(logits[rows, first], s, t), texts, last)
        tokens[rows, first] = probs.argmax(-1) if t == 0 else draw(probs, generator)
        kept = torch.log(mass.double().clamp(min=1e-300)) if t else kept
    w, moved = engine.shift(model, engine.collapse(model, w, slots, tokens, mode=s.mode, eps=s.eps, lam=s.lam), slide=s.slide)
    return w, moved, kept


# ---- rejection, best-of-N, tree ----

def sample_n(model, prompt, max_new_tokens, n, s, generator=None, schedule=None, goal=None, constraint=None):
    """n independent samples (n, max_new_tokens) as one batch, their passes x rows and the sampler's
    steps. A goal runs the collapse sampler, which pins it as it comes into the window; a constraint
    (match) is kept while sampling."""
    idx = torch.as_tensor(prompt, dtype=torch.long, device=model.e_max().device).view(1, -1).expand(n, -1)
    tokens, stats = generate(model, idx, max_new_tokens, s, generator, goal=goal, schedule=schedule, constraint=constraint)
    return tokens, sum(step['passes'] for step in stats.steps) * n, len(stats.steps)


@dataclass
class Candidates:
    tokens: torch.Tensor  # (K, n) every candidate, best first
    scores: list          # their scores (higher is better), descending
    passes: int = 0       # model passes x rows
    accepted: int = 0     # rejection: candidates the potential allowed (they come first)
    tried: int = 0        # rejection: candidates drawn


@torch.no_grad()
def rejection(model, prompt, max_new_tokens, potential, decode, budget, batch=8, s=None, generator=None,
              schedule=None, goal=None):
    """Draw batches of whole samples until `budget` passes x rows are spent (at least one batch);
    a sample is accepted when the potential allows it at every step (satisfies). Returns Candidates whose
    first `accepted` rows are the accepted samples, in the order drawn."""
    s, out = s or Settings(), Candidates(None, [])
    kept, rest = [], []
    while out.passes == 0 or out.passes + cost <= budget:
        tokens, cost, _ = sample_n(model, prompt, max_new_tokens, batch, s, generator, schedule, goal)
        out.passes += cost
        for row in tokens:
            (kept if satisfies(potential, decode, row.tolist()) else rest).append(row)
    out.tokens, out.accepted, out.tried = torch.stack(kept + rest), len(kept), len(kept) + len(rest)
    out.scores = [0.0] * len(kept) + [NEG_INF] * len(rest)
    return out


def _ranked(tokens, score, passes):
    scores = [float(score(row.tolist())) for row in tokens]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return Candidates(tokens[order], [scores[i] for i in order], passes)


@torch.no_grad()
def best_of_n(model, prompt, max_new_tokens, score, n=8, s=None, generator=None, schedule=None, goal=None, constraint=None):
    """n samples, each scored by score(token list) -> float (higher is better; judge_score makes the
    default: minus the judge's NLL). Returns every candidate, best first."""
    tokens, passes, _ = sample_n(model, prompt, max_new_tokens, n, s or Settings(), generator, schedule, goal, constraint)
    return _ranked(tokens, score, passes)


@torch.no_grad()
def tree(model, prompt, max_new_tokens, score, width=2, branch=4, segment=16, s=None, generator=None, schedule=None):
    """Tree search (seed 003): keep the `width` best partial texts; each round every one continues
    `branch` ways for `segment` tokens, and all width x branch children are scored. Returns the last
    round's candidates, best first."""
    s, device = s or Settings(), model.e_max().device
    root = torch.as_tensor(prompt, dtype=torch.long, device=device).view(1, -1)
    nodes, done, passes, P = root.expand(width, -1), 0, 0, root.size(1)
    while done < max_new_tokens:
        n = min(segment, max_new_tokens - done)
        parents = nodes.repeat_interleave(branch, 0)
        later = None if schedule is None else (lambda u, done=done, n=n: schedule((done + u * n) / max_new_tokens))
        new, stats = generate(model, parents, n, s, generator, schedule=later)
        passes += sum(step['passes'] for step in stats.steps) * len(parents)
        ranked = _ranked(torch.cat((parents, new), 1)[:, P:], score, passes)
        nodes, done = torch.cat((root.expand(width, -1), ranked.tokens[:width]), 1), done + n
    return ranked


# ---- calibration of the entropy policy ----

@torch.no_grad()
def calibrate(model, x, percentiles=(10, 25, 50, 75, 90), s=None):
    """Teacher-forced run of the sampler over token rows x (B, T): at every position refine the
    window (warm or cold, as the sampler would), record each future slot's entropy (bits) and
    varentropy (bits^2), then collapse the true next token and shift. Returns dict(percentiles,
    entropy (len(p), F), varentropy (len(p), F): percentiles per distance d = 1..F, values, and
    suggested ent_low / ent_high / var_high from distance 1)."""
    if model.config.n_future == 0:
        raise ValueError("calibration reads the future slots of a WFC model (n_future > 0)")
    s = s or Settings()
    w, warm = engine.start(model, x[:, :1]), warm_start(model, s)
    bits, var = [], []
    for t in range(1, x.size(1)):
        w, _ = engine.refine(model, w if warm else engine.forget(model, w), **s.limits(model))
        h, v = entropy_bits(w.stats['logits'])
        bits.append(h)
        var.append(v)
        slots = torch.zeros_like(w.decided, dtype=torch.bool)
        slots[:, 0] = True
        w, _ = engine.shift(model, engine.collapse(model, w, slots, x[:, t:t + 1].expand_as(w.decided).contiguous()))
    values = dict(entropy=torch.cat(bits).float(), varentropy=torch.cat(var).float())  # (B * (T - 1), F)
    q = torch.tensor(percentiles, dtype=torch.float) / 100
    out = dict(percentiles=list(percentiles), values=values,
               **{k: torch.quantile(v.cpu(), q, dim=0) for k, v in values.items()})
    first = lambda name, p: torch.quantile(values[name][:, 0].cpu(), p / 100).item()
    out['suggested'] = dict(ent_low=first('entropy', 25), ent_high=first('entropy', 90), var_high=first('varentropy', 90))
    return out


def calibration_table(cal):
    lines = [f"{'':24s}" + ''.join(f"{'p' + str(p):>8s}" for p in cal['percentiles'])]
    for name, unit in (('entropy', 'bits'), ('varentropy', 'bits^2')):
        for d in range(cal[name].size(1)):
            lines.append(f"{name} d={d + 1} ({unit})".ljust(24) + ''.join(f"{v:8.3f}" for v in cal[name][:, d].tolist()))
    lines.append('suggested: ' + ' '.join(f"--{k}={v:.2f}" for k, v in cal['suggested'].items()))
    return '\n'.join(lines)


# ---- sample.py's steering modes (--steer, --calibrate) ----

def make_potential(spec, codec, prompt, scorer=None, vocab_size=None):
    """'' -> None; 'forbid:w1,w2' | 'regex:PATTERN' (forbidden) | 'match:REGEX' (required, in full) |
    'contain:word:within[:lookahead weight]' | 'judge[:weight]' (the scorer GPT's log-likelihood)."""
    if not spec:
        return None
    kind, _, arg = spec.partition(':')
    encode = codec.encode
    if kind == 'match' and arg:
        return Match(arg, codec.decode, vocab_size or codec.vocab_size)
    if kind == 'forbid' and arg:
        return forbid([w for w in arg.split(',') if w])
    if kind == 'regex' and arg:
        return forbid_regex(arg)
    parts = arg.split(':')
    if kind == 'contain' and len(parts) in (2, 3) and parts[0] and parts[1].isdigit():
        potential = must_contain(parts[0], int(parts[1]))
        if len(parts) == 3:  # a lookahead weight: read the speculated future (SMC only)
            potential.lookahead = contain_lookahead(parts[0], encode, float(parts[2]))
        return potential
    if kind == 'judge' and scorer is not None:
        return judge_potential(scorer, encode, prompt, float(arg or 1.0))
    raise ValueError(f"potential must be 'forbid:w1,w2', 'regex:PATTERN', 'match:REGEX', 'contain:word:within[:weight]' or "
                     f"'judge[:weight]' (judge needs --judge or --scorer), got {spec!r}")


def command(model, codec, prompt, s, options, judge=None, scorer=None):
    """Run options['steer'] ('plain' | 'smc' | 'rejection' | 'best_of_n' | 'tree') options['num_samples'] times
    from the prompt ids, print each run's text and a summary: constraint satisfied, judge NLL,
    passes, tokens/s. options holds sample.py's options. Returns the per-run records."""
    n, N = options['max_new_tokens'], options['particles']
    potential = make_potential(options['potential'], codec, prompt, scorer, model.config.vocab_size)
    constraint = getattr(potential, 'constraint', None)
    heat = schedule(options['schedule'], s.temperature)
    goal = parse_goal(options['goal'], codec.encode)
    score = judge_score(scorer, prompt) if scorer is not None else \
        None if potential is None else (lambda ids: potential(codec.decode(ids), len(ids)))
    if options['steer'] == 'tree' and goal is not None:
        raise ValueError("tree does not take a goal: use best_of_n or smc")
    if options['steer'] in ('best_of_n', 'tree') and score is None:
        raise ValueError(f"{options['steer']} needs a score: --judge (or --scorer) for the judge's NLL, or --potential")
    g = torch.Generator(device=model.e_max().device).manual_seed(options['seed'])
    records = []
    for run in range(options['num_samples']):
        t0, extra, steps = time.time(), '', None
        if options['steer'] == 'plain':
            tokens, passes, steps = sample_n(model, prompt, n, 1, s, g, heat, goal, constraint)
            tokens = tokens[0]
        elif options['steer'] == 'smc':
            r = smc(model, prompt, n, potential, codec.decode, N, s, options['ess'], heat, goal, g,
                    lookahead=getattr(potential, 'lookahead', None))
            tokens, passes = r.tokens[r.pick(g)], r.passes
            extra = f" log Z {r.log_z:.3f}, resampled {sum(r.resampled)}/{len(r.resampled)}" + \
                    (f", ALL {N} PARTICLES DIED at step {r.died_at}: nothing satisfied the potential" if r.died_at >= 0 else '')
        elif options['steer'] == 'rejection':
            if potential is None:
                raise ValueError("rejection needs --potential")
            c = rejection(model, prompt, n, potential, codec.decode, N * n * s.limits(model)['max_loop'], N,
                          s, g, heat, goal)
            tokens, passes, extra = c.tokens[0], c.passes, f" accepted {c.accepted}/{c.tried}"
        elif options['steer'] == 'best_of_n':
            c = best_of_n(model, prompt, n, score, N, s, g, heat, goal, constraint)
            tokens, passes, extra = c.tokens[0], c.passes, f" scores {' '.join(f'{v:.3f}' for v in c.scores)}"
        elif options['steer'] == 'tree':
            c = tree(model, prompt, n, score, max(1, N // max(s.branch, 1)), max(s.branch, 1), options['segment'], s, g, heat)
            tokens, passes, extra = c.tokens[0], c.passes, f" best score {c.scores[0]:.3f}"
        else:
            raise ValueError(f"steer must be 'plain', 'smc', 'rejection', 'best_of_n' or 'tree', got {options['steer']!r}")
        ids = tokens.tolist()
        text = codec.decode(ids)
        rec = dict(text=text, passes=passes, seconds=time.time() - t0, tokens=len(ids), ids=ids)
        if steps:
            rec['tokens_per_step'] = len(ids) / steps
        if potential is not None and not options['potential'].startswith('judge'):
            rec['satisfied'] = satisfies(potential, codec.decode, ids)
        if judge is not None:
            device = next(judge.parameters()).device
            rec['judge_nll'] = sequence_nll(judge, torch.tensor([list(prompt) + ids], device=device), len(prompt))
        records.append(rec)
        print(codec.decode(list(prompt)) + text)
        print(f"--------------- run {run}: {passes} passes" + ''.join(f", {k} {rec[k]:.3f}" if k == 'judge_nll' else
              f", {k} {rec[k]}" for k in ('satisfied', 'judge_nll', 'tokens_per_step') if k in rec) + extra)
    print(summary(options['steer'], records, options.get('nll_ref', 0.0)))
    return records


def summary(steer, records, nll_ref=0.0):
    runs, seconds = len(records), sum(r['seconds'] for r in records)
    line = (f"[steer={steer}: {runs} runs, {sum(r['passes'] for r in records) / runs:.0f} passes/run, "
            f"{sum(r['tokens'] for r in records) / max(seconds, 1e-9):.1f} tokens/s, "
            f"distinct-3 {distinct_n([r['ids'] for r in records], 3):.3f}")
    if 'tokens_per_step' in records[0]:
        line += f", {sum(r['tokens_per_step'] for r in records) / runs:.2f} tokens/step"
    if 'satisfied' in records[0]:
        ok = sum(r['satisfied'] for r in records)
        line += f", constraint satisfied {ok}/{runs} ({100 * ok / runs:.0f}%)"
    if 'judge_nll' in records[0]:
        nll = sorted(r['judge_nll'] for r in records)
        mean = sum(nll) / runs
        error = math.sqrt(sum((v - mean) ** 2 for v in nll) / max(runs - 1, 1) / runs)  # standard error of the mean
        line += f", judge NLL mean {mean:.3f} +- {error:.3f} median {nll[runs // 2]:.3f} nats/token"
        if nll_ref > 0:
            ok = sum(v <= nll_ref for v in nll)
            line += f", judged coherent (NLL <= {nll_ref}) {ok}/{runs} ({100 * ok / runs:.0f}%)"
    return line + ']'


def calibrate_command(model, data_dir, s, rows=8, positions=64, seed=1234):
    """sample.py --calibrate=True: the percentile table on the validation split."""
    from plumbing.dataloader import TokenShards
    data = TokenShards(data_dir, 'val', model.config.block_size, model.config.vocab_size)
    x = data.batch(rows, seed)[0][:, :positions + 1].to(model.e_max().device)
    cal = calibrate(model, x, s=s)
    print(f"entropy / varentropy of the future slots over {rows} x {x.size(1) - 1} validation positions "
          f"(teacher-forced, as the sampler sees them):")
    print(calibration_table(cal))
    return cal
