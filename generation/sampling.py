"""
Generation loops; sample.py is their command line, evaluation and steering reuse them. The
settings, filters, draws and constraint they share live in decoding.py.

- generate(model, idx, n, settings) picks the sampler (Settings.sampler):
  causal       token by token from the causal stream with its KV cache: a GPT, or a pinned WFC
               model's past stream read out directly (the "GPT inside")
  speculative  WFC: the future slots draft the next tokens, the causal stream verifies them in one
               call; exact: the output follows the causal stream's distribution (speculative.py)
  collapse     WFC: converge -> collapse -> shift with a policy and a collapse mode, and pins/goals
  auto         speculative where the model can verify its drafts, else collapse (GPT: causal)

Collapse policies (which future slots to collapse each step):
  first      the first open slot: one token per step (the seed's default)
  threshold  every leading open slot whose entropy is below tau bits, at least one: several tokens per step
  lowest     the open slot with the least entropy, anywhere (non-causal; a step may emit nothing)
  median     the first open slot, plus a partial nudge of the median-entropy open slot toward a sample
  entropy    per row, from the entropy and varentropy (bits) of the first open slot (entropix-style):
             certain -> greedy, several slots; forked (high varentropy) -> branch and keep the
             candidate that leaves the future most certain; very uncertain -> refine more; else sample
Pins put given tokens at future offsets before the first step (goal-directed infill).
"""

import torch
from torch.nn import functional as F

from generation import engine
from generation.decoding import LN2, Request, Settings, Stats, entropy_bits, filtered_probs, live_slots, sample_tokens
from generation.speculative import generate_speculative
from modeling.solver import entropy_of_logits


def pick_sampler(model, s, goal=None):
    """The sampler that runs for settings s (and a goal), or a ValueError saying why the asked one cannot."""
    c = model.config
    if c.n_future == 0:
        if s.sampler not in ('auto', 'causal') or goal is not None:
            raise ValueError(f"{'a goal' if goal is not None else f'sampler={s.sampler!r}'} needs a WFC model "
                             f"(n_future > 0): it uses the future slots; a GPT samples with 'causal'")
        return 'causal'
    if s.sampler in ('speculative', 'causal') and not model.can_verify:
        raise ValueError(f"sampler={s.sampler!r} reads the causal stream's next-token head, which this model did not "
                         f"train (it needs attn='pinned', past_loss > 0 and past_target='next'); use --sampler=collapse")
    if s.sampler == 'speculative' and (c.n_loop != 1 or model.rotary is None):
        raise ValueError("sampler='speculative' needs n_loop = 1 and rotary positions (pos_emb='rope'), so that drafts "
                         "verify in one call and the window rolls; use --sampler=collapse")
    if goal is not None and s.sampler in ('speculative', 'causal'):
        raise ValueError(f"a goal pins future slots, which sampler={s.sampler!r} does not refine; use --sampler=collapse")
    if s.sampler == 'auto':
        fast = model.can_verify and c.n_loop == 1 and model.rotary is not None and s.policy == 'first' and goal is None
        return 'speculative' if fast else 'collapse'
    return s.sampler


@torch.no_grad()
def generate(model, idx, max_new_tokens, s, generator=None, goal=None, on_tokens=None, schedule=None, detail=False,
             constraint=None):
    """Continue idx (B, P) by max_new_tokens tokens. goal = (offset, token ids): the text must hold
    these tokens at generated offset (1 = the first new token): each is pinned as its future slot
    comes into the window (collapse sampler; see pin_goal). on_tokens(row, ids) is called as tokens
    are decided; returning True ends that row (the batch ends when every row has). schedule(progress
    in [0, 1)) -> the temperature of a step (steering.schedule makes them); None keeps s.temperature.
    constraint: a Constraint the generated text must match (tokens that would break it are never
    drawn). Returns (new tokens (B, n), Stats)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    s.check()
    sampler = pick_sampler(model, s, goal)
    if s.policy != 'first' and sampler != 'collapse':
        raise ValueError(f"policy={s.policy!r} needs the collapse sampler (--sampler=collapse)")
    if constraint is not None and s.policy != 'first':
        raise ValueError("a match constraint decides one token at a time: it needs policy 'first'")
    req = Request(max_new_tokens, generator, goal, schedule, constraint, Stats(detail))
    if sampler == 'speculative':
        out = generate_speculative(model, idx, s, req, on_tokens)
    elif sampler == 'causal':
        out = _generate_causal(model, idx, s, req, Emitter(on_tokens, idx.size(0)))
    else:
        out = _generate_collapse(model, idx, s, req, Emitter(on_tokens, idx.size(0)))
    return out, req.stats


def warm_up(model, idx, s):
    """Generate past the block edge at the batch of idx (B, P), untimed, so that compiled samplers
    (runtime.compile_samplers) meet every shape a generation will. The speculative sampler's rows
    leave the batch as they finish, down to one, and its compiled round has a graph for B rows, one
    for any size between (dynamo makes the second size it meets dynamic) and one for 1: it also
    runs at B - 1 rows and at 1. Returns the tokens a generation ran."""
    n, B = model.config.block_size + model.config.n_future + 8, idx.size(0)
    shrinks = pick_sampler(model, s) == 'speculative'
    for rows in sorted({B, max(1, B - 1), 1} if shrinks else {B}, reverse=True):
        generate(model, idx[:rows], n, s, torch.Generator(device=idx.device).manual_seed(0))
    return n


class Emitter:
    """Hands decided tokens to on_tokens row by row and tracks which rows are finished."""

    def __init__(self, on_tokens, B):
        self.on_tokens, self.done = on_tokens, [False] * B

    def __call__(self, new):
        """new (B, n) tokens; returns True when every row is finished."""
        if self.on_tokens is None or not new.size(1):
            return False
        for row, ids in enumerate(new.tolist()):
            if not self.done[row]:
                self.done[row] = bool(self.on_tokens(row, ids))
        return all(self.done)


def _generate_causal(model, idx, s, req, emit):
    """Token by token from the causal stream; the cache rolls past the block edge (rotary) or is
    rebuilt from the last block_size - slide tokens (learned positions)."""
    edge, out, texts, n = engine.block_edge(model), [], [''] * idx.size(0), req.max_new_tokens
    bs = edge.block_size
    window = idx[:, -bs:]
    if edge.rolls:  # rotary: a ring of fixed shape, written in place; every step has the same shapes
        cache = engine.causal_ring(model, idx.size(0))
        x = engine.decode_ring(model, window, cache, queries=1)
    else:
        cache = engine.KVCache()
        x = engine.run_causal(model, window, cache, queries=1)
    if edge.rolls and req.constraint is None and not req.stats.detail:
        return _generate_decided(model, x, cache, s, req, emit)
    for step in range(n):
        logits = model.logits(x[:, -1])
        token = sample_tokens(logits, s, req.generator, req.temperature(s, step), req.constraint, texts, step == n - 1)[:, None]
        out.append(token)
        texts = texts if req.constraint is None else req.constraint.extend(texts, token)
        req.stats.add(model.config.n_loop, 1, [(entropy_of_logits(logits[0]) / LN2).item()] if req.stats.detail else ())
        if emit(token) or step == n - 1:
            break
        if edge.rolls:
            x = engine.decode_ring(model, token, cache, queries=1)
            continue
        window = torch.cat((window, token), 1)[:, -bs:]
        if cache.end >= bs:  # learned positions: re-encode the last tokens
            window, cache = window[:, -max(1, bs - s.slide):], engine.KVCache()
            x = engine.run_causal(model, window, cache, queries=1)
        else:
            x = engine.run_causal(model, token, cache, queries=1)
    return torch.cat(out, 1)


def _generate_decided(model, x, cache, s, req, emit):
    """The causal sampler of a rolling model without a constraint: the first token drawn from the
    prompt's states x, then the steps as engine.decided_steps (the last token through the stream,
    then the next one drawn; compiled whole by runtime.compile_samplers, which sets how many steps a
    call runs: model.rounds_per_call; one eagerly, and one while a temperature schedule moves) on
    uniforms drawn before them as decoding.draw draws them: the same text as drawing eagerly, one
    step at a time, from the same seed. A call may run past the end; what it drew there is dropped."""
    out, n, (B, V) = [], req.max_new_tokens, (x.size(0), model.config.vocab_size)
    token = sample_tokens(model.logits(x[:, -1]), s, req.generator, req.temperature(s, 0))[:, None]
    step_fn = getattr(model, 'compiled_decided_steps', None) or engine.decided_steps
    per_call = req.rounds_per_call(model)
    drawn = [token]  # tokens drawn, not yet handed out
    while True:
        for token in drawn:
            out.append(token)
            req.stats.add(model.config.n_loop, 1)
            if emit(token) or len(out) == n:
                return torch.cat(out, 1)
        temperature = req.temperature(s, len(out))
        engine.ensure_positions(model, cache.end + per_call)
        greedy = temperature == 0
        tokens = step_fn(model, token, cache, None if greedy else torch.full((B,), float(temperature), device=x.device),
                         None if greedy else torch.rand(per_call, B, V, generator=req.generator, device=x.device),
                         (s.top_k, s.top_p, s.min_p), per_call)
        cache.end += per_call
        drawn = tokens.split(1, 1)


def choose_slots(policy, bits, open_, tau):
    """(B, F) bool: the slots to collapse this step. bits (B, F) entropy; open_ (B, F) undecided."""
    n_future = bits.size(1)
    first = F.one_hot(open_.float().argmax(1), n_future).bool() & open_  # first open slot of each row
    if policy in ('first', 'median'):
        return first
    if policy in ('threshold', 'entropy'):  # entropy: tau = ent_low, for the rows that are certain
        after_first = open_.long().cumsum(1) >= 1
        certain = (bits < tau) & open_
        run = (certain | ~after_first).long().cumprod(1).bool() & after_first  # leading certain open slots
        return run | first
    if policy == 'lowest':
        return F.one_hot(bits.masked_fill(~open_, float('inf')).argmin(1), n_future).bool() & open_
    raise ValueError(f"unknown policy {policy!r}")


def median_slot(bits, candidates):
    """(B, F) bool: the candidate slot with the median entropy (none where a row has no candidate)."""
    ranked = bits.masked_fill(~candidates, float('inf')).argsort(1)
    count = candidates.sum(1)
    pick = ranked.gather(1, (count // 2).clamp(max=bits.size(1) - 1)[:, None])[:, 0]
    return F.one_hot(pick, bits.size(1)).bool() & candidates & (count > 0)[:, None]


def entropy_step(model, w, logits, s, generator, temperature):
    """The entropy policy's decision, per row, from the entropy H and varentropy V (bits) of its
    first open slot (entropix's quadrants; thresholds in Settings):
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
        sub, extra = engine.refine(model, w.select(rows), max_loop=s.boost_loop, tol=s.limits(model)['tol'], min_loop=s.boost_loop)
        w.future[rows] = sub.future
        if w.past_x is not None:
            w.past_x[rows] = sub.past_x
        logits = engine.future_logits(model, w)
    tokens = sample_tokens(logits, s, generator, temperature)
    tokens = torch.where(certain[:, None], logits.argmax(-1), tokens)
    slots = torch.where(certain[:, None], choose_slots('entropy', bits, open_, s.ent_low), first)
    if fork.any():
        rows = fork.nonzero()[:, 0]
        picked, used = branch_tokens(model, w, rows, first, logits, s, generator, temperature)
        tokens[rows] = torch.where(first[rows], picked[:, None], tokens[rows])
        extra += used
    return w, slots, tokens, extra


def branch_tokens(model, w, rows, first, logits, s, generator, temperature):
    """A one-step lookahead (tree search) for the forked rows: draw s.branch distinct candidates for
    the first open slot, collapse each in a copy of the row, refine the copies, and keep the
    candidate after which the remaining open slots are most certain (lowest mean entropy).
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
    copies = engine.collapse(model, copies, slot, candidates.reshape(-1, 1).expand_as(slot), mode=s.mode, eps=s.eps, lam=s.lam)
    copies, used = engine.refine(model, copies if warm_start(model, s) else engine.forget(model, copies), **s.limits(model))
    open_ = copies.decided < 0
    bits = entropy_bits(engine.future_logits(model, copies))[0]
    spread = (bits * open_).sum(1) / open_.sum(1).clamp(min=1)  # (R * k,) mean entropy of the open slots
    return candidates.gather(1, spread.view(-1, k).argmin(1)[:, None])[:, 0], used


def warm_start(model, s):
    """Whether to refine from the carried state. A model refined a fixed number of times from e_max
    in training has never seen a carried state and needs a cold start; one trained to warm-start
    (warm_prob > 0) or to converge (a bounded state) continues from where it was."""
    return s.warm == 'on' or (s.warm == 'auto' and model.warm_starts)


def parse_goal(spec, encode):
    """'offset:text' -> (offset, token ids), or None for ''."""
    if not spec:
        return None
    offset, sep, text = spec.partition(':')
    if not sep or not offset.strip().isdigit() or int(offset) < 1 or not text:
        raise ValueError(f"goal must look like 'offset:text' with offset >= 1 (e.g. '24:the king'), got {spec!r}")
    return int(offset), encode(text)


def pin_goal(model, w, goal, produced, s):
    """Pin the goal's tokens whose slots are in the window and still open. goal = (offset, ids):
    ids at generated positions offset, offset + 1, ... (1 = the first generated token); a goal far
    beyond the window is pinned slot by slot as it comes into reach, so the infill is refined toward it."""
    if goal is None:
        return w
    offset, ids = goal
    slots, tokens = torch.zeros_like(w.decided, dtype=torch.bool), torch.zeros_like(w.decided)
    for j, token in enumerate(ids):
        slot = offset + j - 1 - produced
        if 0 <= slot < slots.size(1):
            slots[:, slot], tokens[:, slot] = True, token
    slots &= w.decided < 0
    return engine.collapse(model, w, slots, tokens, mode=s.mode, eps=s.eps, lam=s.lam) if slots.any() else w


def collapse_step(model, w, s, req, produced, texts):
    """One converge -> collapse -> shift step of the collapse sampler. Returns w, the moved tokens
    (B, n), the passes, the window's entropy (bits) and the collapsed slots."""
    w = pin_goal(model, w, req.goal, produced, s)
    w, used = engine.refine(model, w if warm_start(model, s) else engine.forget(model, w), **s.limits(model))
    logits, bits, open_ = w.stats['logits'], w.stats['entropy'] / LN2, w.decided < 0
    temperature = req.temperature(s, produced)
    if s.policy == 'entropy' and open_.any():
        w, slots, tokens, extra = entropy_step(model, w, logits, s, req.generator, temperature)
        used += extra
    else:
        slots = choose_slots(s.policy, bits, open_, s.tau) if open_.any() else open_
        tokens = sample_tokens(logits, s, req.generator, temperature)
    if req.constraint is not None and slots.any():  # policy first: one slot per row, drawn under the constraint
        first = slots.float().argmax(1)
        rows = torch.arange(len(first), device=first.device)
        last = produced == req.max_new_tokens - 1
        tokens[rows, first] = sample_tokens(logits[rows, first], s, req.generator, temperature, req.constraint, texts, last)
    w = engine.collapse(model, w, slots, tokens, mode=s.mode, eps=s.eps, lam=s.lam)
    if s.policy == 'median':
        w = engine.collapse(model, w, median_slot(bits, open_ & ~slots), tokens, mode='partial', lam=s.lam, decide=False)
    length = live_slots(bits, s.tau) if s.future == 'auto' else None
    w, moved = engine.shift(model, w, slide=s.slide, length=length)
    return w, moved, used, bits, slots


def _generate_collapse(model, idx, s, req, emit):
    out, produced, texts = [], 0, [''] * idx.size(0)
    w = engine.start(model, idx)
    while produced < req.max_new_tokens:
        w, moved, used, bits, slots = collapse_step(model, w, s, req, produced, texts)
        moved = moved[:, :req.max_new_tokens - produced]
        produced += moved.size(1)
        texts = texts if req.constraint is None else req.constraint.extend(texts, moved)
        detail = (bits[0][slots[0]].tolist(), bits[0].tolist()) if req.stats.detail else ((), ())
        req.stats.add(used, moved.size(1), *detail, live=w.future.size(1))
        if moved.size(1):
            out.append(moved)
            if emit(moved):
                break
    return torch.cat(out, 1)


def inapplicable(model, s, sampler):
    """The settings of s, changed from their defaults, that the chosen sampler would ignore, each with
    what would use it: an option without effect is refused, not silently dropped."""
    d, c = Settings(), model.config
    rolling = engine.block_edge(model).rolls
    uses = dict(
        sampler=(c.n_future > 0, "a WFC checkpoint"),
        future=(sampler in ('collapse', 'speculative'), "the collapse or speculative sampler of a WFC checkpoint"),
        policy=(sampler == 'collapse', "the collapse sampler (--sampler=collapse, WFC)"),
        mode=(sampler == 'collapse', "the collapse sampler (--sampler=collapse, WFC)"),
        warm=(sampler == 'collapse', "the collapse sampler (--sampler=collapse, WFC)"),
        eps=(sampler == 'collapse' and s.mode == 'nearest', "--mode=nearest"),
        lam=(sampler == 'collapse' and (s.mode == 'partial' or s.policy == 'median'), "--mode=partial or --policy=median"),
        tau=(sampler == 'collapse' and s.policy == 'threshold' or s.future == 'auto', "--policy=threshold or --future=auto"),
        max_loop=(sampler in ('collapse', 'speculative'), "the refinement of a WFC sampler"),
        tol=(sampler == 'collapse' or sampler == 'speculative' and s.max_loop > 1,
             "refinement over several passes (--max_loop > 1; the speculative sampler drafts from one pass unless asked)"),
        slide=(sampler in ('causal', 'collapse') and not rolling,
               "a window that is rebuilt at the block edge (learned positions, or bidirectional WFC); a rotary one rolls"),
        **{k: (sampler == 'collapse' and s.policy == 'entropy', "--policy=entropy")
           for k in ('ent_low', 'ent_high', 'var_high', 'branch', 'boost_loop')})
    return [f"--{k}={getattr(s, k)!r} has no effect with the {sampler} sampler of this checkpoint; it is used by {why}"
            for k, (applies, why) in uses.items() if getattr(s, k) != getattr(d, k) and not applies]
