"""
Exact speculative sampling for pinned WFC models: the future slots draft, the causal stream verifies.

A round, for each row (every row of the batch in the same stack call):
1. Drafts d_1..d_k are drawn from q_1..q_k, the filtered distributions of future slots 2..k + 1 of
   the block behind the last token the cache has seen (slot 1 of that block predicts the token
   committed last, which is already known).
2. ONE stack call runs the causal stream on [pending, d_1..d_k] (pending: the token committed
   last, not yet in the cache) and, in the same call, a block of F future slots behind each of
   them. It gives p_1..p_{k+1}, the causal stream's next-token distributions after pending, d_1,
   .., d_k, and the next round's drafts for every possible outcome.
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)). At the first rejection a token is
   drawn from norm(max(0, p_i - q_i)) and the round ends; when every draft is accepted a bonus
   token is drawn from p_{k+1} (Leviathan et al. 2023; Chen et al. 2023). Temperature, top-k,
   top-p and min-p filter p and q alike, so the text follows the causal stream's filtered
   distribution exactly, token for token. Greedy (temperature 0): accept while d_i = argmax p_i,
   which gives exactly the causal stream's greedy text.
4. The cache keeps the keys/values of pending and the accepted drafts and forgets the rest; the
   token committed last becomes the next round's pending token.
A round commits 1..k + 1 tokens per row for one stack call. With a temperature schedule the
temperature advances per round, per row (rows are at different lengths).

Batched: every row feeds 1 + k tokens (k the most drafts of any row; a row with fewer pads with
tokens it never keeps) at its own positions, so rows drift apart in length. The cache
(engine.RingCache, of fixed shape and written in place) gives every row the same columns and keeps
per row each entry's position; what a row rejects becomes a hole (its position set past every
horizon), so no entry moves. The masks are
written on positions (layout.visibility): a query sees its row's entries at positions up to its
horizon and within block_size of it, which is the rolling window of the block edge with holes
skipped. Finished rows leave the batch. Two ways to run a round, which read the same noise the same
way (so they write the same text from a seed):
- decided_round, without a constraint: the whole round as one function of tensors (drafts, the
  stack call, the acceptance rule, the cache's holes; each row's temperature a tensor entry), which
  runtime.compile_samplers compiles as one graph of several rounds (decided_rounds: the state
  between rounds stays in tensors). Its randomness is drawn before it (noise, per row of the whole
  batch) and every token is drawn by an exponential race (decoding.race), so a graph holds no
  generator, and the text from a seed is the same whatever the rounds per call.
- grouped_round, for the rest: drafting and the acceptance rule run on the rows that share a
  temperature together (per row under a constraint, which reads each row's text, or
  future='auto', which sizes each row's drafts); the stack call runs once.
Draft length: k = F - 1, or with future='auto' the rule of decoding.live_slots on the drafts'
entropies (the same rule that sizes the collapse sampler's window).
"""

import functools
from dataclasses import dataclass, field

import torch

from generation import engine
from generation.decoding import entropy_bits, exponential, filtered_probs, leading_true, live_slots, race, token_probs
from modeling.layout import Context, visibility
from modeling.solver import iterate


@torch.no_grad()
def generate_speculative(model, idx, s, req, on_tokens):
    """sampling.generate's speculative sampler (req: a decoding.Request): (B, n) new tokens, rows that
    on_tokens ended early padded with -1."""
    rows, _ = sample_rows(model, idx, s, req, on_tokens)
    n = max(row.size(1) for row in rows)
    return torch.cat([torch.nn.functional.pad(row, (0, n - row.size(1)), value=-1) for row in rows])


@functools.lru_cache(maxsize=64)
def round_layout(n, n_future, device):
    """What a round's call looks like relative to its first new token, the same in every row and
    every round (so built once): the future slots' position offsets (n F,), their blocks and indices
    (n F,), and per query of [n causal, n blocks of F future] its horizon offset, block and index."""
    rel = torch.arange(n, device=device)  # the causal queries' positions, relative to the first one
    offsets = (rel[:, None] + torch.arange(1, n_future + 1, device=device)).flatten()  # block b: the F positions after token b
    block, index = rel.repeat_interleave(n_future), torch.arange(n_future, device=device).repeat(n)
    queries = (torch.cat((rel, block)), torch.cat((block.new_full((n,), -1), block)), torch.cat((index.new_zeros(n), index)))
    return offsets, block, index, queries


def round_positions(ends, n, layout):
    """The positions of a round's n causal tokens (B, n) and of its future slots (B, n F), for rows
    whose first new token sits at ends (B,)."""
    return ends[:, None] + torch.arange(n, device=ends.device), ends[:, None] + layout[0]


def round_mask(layout, ends, key_pos, spec_window, window):
    """The visibility (B, 1, queries, keys) of a round's queries over [the cache's columns at
    positions key_pos (B, capacity) (the round's n tokens among them; RingCache.HOLE: a hole), n F
    future keys], for rows whose first new token sits at position ends (B,)."""
    _, block, index, (horizon, query_block, query_index) = layout
    B = ends.size(0)
    return visibility(ends[:, None] + horizon, query_block.expand(B, -1), query_index.expand(B, -1), key_pos[:, None],
                      block, index, spec_window, window=window)[:, None]


def round_call(model, cache, tokens, ends, pos_c, pos_f, layout):
    """The stack call of a round (torch.compile builds it once per token count: runtime.compile_samplers):
    the causal stream on tokens (B, n) at positions pos_c (B, n) (from ends (B,) on), written into the
    ring, and F future slots behind each at pos_f (B, n F). Returns the logits (B, n + n F, V), the
    core's states (B, n + n F, C) and the prelude's output (those two for more passes)."""
    cache.begin(pos_c)
    x0 = torch.cat((model.token_states(tokens, pos_c), model.fresh_slots(pos_f)), 1)
    mask = round_mask(layout, ends, cache.pos, model.config.spec_window, cache.block_size)
    ctx = Context(x0, torch.cat((pos_c, pos_f), 1), mask, cache.layers[0])
    core, out, _ = model.once_through(x0, ctx)  # a sandwich: prelude, one core pass, coda
    return model.logits(out), core, ctx.x0


def verify(model, cache, tokens, ends, max_loop=1, tol=None):
    """The round's one stack call for the whole batch: the causal stream on tokens (B, n) = [pending,
    drafts] of each row, at positions ends (B,) onward after the row's entries of the RingCache, and F
    future slots behind each of them. Writes the n tokens' keys/values into the cache (sample_rows
    then keeps what each row accepts). Returns the causal logits (B, n, V) (row i: the distribution of
    the token after tokens[:, i]) and the future blocks' logits (B, n, F, V)."""
    (B, n), n_future = tokens.shape, model.config.n_future
    engine.ensure_positions(model, int(ends.max()) + n + n_future)
    layout = round_layout(n, n_future, str(tokens.device))
    pos_c, pos_f = round_positions(ends, n, layout)
    call = getattr(model, 'compiled_round', None) or round_call
    logits, core, x0 = call(model, cache, tokens, ends, pos_c, pos_f, layout)
    future_logits = logits[:, n:]
    if max_loop > 1:
        future_logits = more_draft_passes(model, cache, x0[:, n:], core[:, n:], pos_c, pos_f, layout, max_loop, tol)
    return logits[:, :n], future_logits.reshape(B, n, n_future, -1)


def more_draft_passes(model, cache, x0, first, pos_c, pos_f, layout, max_loop, tol):
    """Passes 2..max_loop of the future blocks (B, n F) against the past now in the cache (the round's
    tokens included, each block seeing up to its own token); returns their logits (B, n F, V)."""
    c, B = model.config, x0.size(0)
    _, block, index, _ = layout
    views, key_pos = cache.views()
    horizon = pos_c.repeat_interleave(c.n_future, 1)  # block b sits behind token b
    mask = visibility(horizon, block.expand(B, -1), index.expand(B, -1), key_pos[:, None], block, index, c.spec_window,
                      window=cache.block_size)[:, None]
    ctx = Context(x0, pos_f, mask, views)
    none = torch.zeros(B, x0.size(1), dtype=torch.bool, device=x0.device)
    future, _ = iterate(model, x0, ctx, none, ~none, model.solver.but(max_loop=max_loop, tol=tol), first=first)
    return model.readout(future, ctx)


def target_probs(logits, s, temperature, req, text, drafts, produced):
    """The filtered distributions (B, n, V) of logits (B, n, V), position i after text and drafts[:, :i];
    with a constraint (one row: it reads the row's text), the tokens that would break it are removed
    (greedy: from the plain softmax)."""
    probs = token_probs(logits, s, temperature)
    if req.constraint is None:
        return probs
    pieces = [req.constraint.pieces[t] for t in drafts[0].tolist()]
    texts = [text + ''.join(pieces[:i]) for i in range(probs.size(1))]
    return torch.cat([req.constraint.filter(probs[0, i:i + 1], texts[i:i + 1], produced + i == req.max_new_tokens - 1)[0]
                      for i in range(probs.size(1))])[None]


def noise(rows, k, V, generator, device, rounds=1):
    """The randomness of `rounds` rounds for a batch of `rows` rows with k drafts, drawn before them
    (a compiled round then holds no generator): uniforms (rounds, rows, k + (k + 1) V), which
    split_noise turns into what draft and accept read. Drawn for every row of the batch, finished
    or not, so a row's noise does not depend on when the others finish, nor, on the CPU, on how many
    rounds a call runs (its generator fills a tensor in order: one draw of R rounds is R draws of
    one; CUDA's is counter-based, so there the text differs, its distribution does not)."""
    return torch.rand(rounds, rows, k + (k + 1) * V, generator=generator, device=device)


def split_noise(u, k, V):
    """noise's uniforms (B, k + (k + 1) V) -> the acceptance uniforms (B, k), the drafts' race noise
    (B, k, V) and the noise of the token drawn after them (B, V) (decoding.race)."""
    races = exponential(u[:, k:]).view(u.size(0), k + 1, V)
    return u[:, :k], races[:, :k], races[:, k]


def accept(p, q, drafts, uniform, last_noise):
    """The acceptance rule for B rows. p (B, k + 1, V) the verifier's filtered distributions, q (B, k, V)
    the drafts' (None when greedy: accept while the draft is the argmax), drafts (B, k); uniform (B, k)
    and last_noise (B, V) from split_noise. Returns the number of accepted drafts a (B,) and the token
    that follows them (B, 1): a residual draw at the rejection, or the bonus."""
    (B, k), rows = drafts.shape, torch.arange(drafts.size(0), device=p.device)
    if q is None:
        target = p.argmax(-1)
        a = leading_true(drafts == target[:, :k])
        return a, target.gather(1, a[:, None])
    a = drafts.new_zeros(B)
    if k:
        p_d, q_d = p[:, :k].gather(2, drafts[..., None])[..., 0], q.gather(2, drafts[..., None])[..., 0]
        a = leading_true(uniform * q_d < p_d)  # u < p / q, in order
    after = p[rows, a]  # (B, V) the bonus distribution where every draft was accepted
    if k:
        residual = (after - q[rows, a.clamp(max=k - 1)]).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        rejected = (a < k)[:, None] & (total > 0)
        after = torch.where(rejected, residual / total.clamp(min=torch.finfo(total.dtype).tiny), after)
    return a, race(after, last_noise)[:, None]


def draft(draft_logits, s, temperature, req, text, produced, races):
    """Draft tokens (B, k) and their distributions q (B, k, V) (None when greedy) from the logits
    (B, k, V) of the draft slots, drawn by the race noise races (B, >= k, V) (split_noise). One row
    only with a constraint (the drafts are drawn one after another, the constraint seeing the drafts
    before each) or future='auto' (it keeps the leading slots the rule allows for the row)."""
    if s.future == 'auto' and draft_logits.size(1):
        draft_logits = draft_logits[:, :live_slots(entropy_bits(draft_logits)[0], s.tau)]
    if req.constraint is None:
        if temperature == 0:
            return draft_logits.argmax(-1), None
        q = filtered_probs(draft_logits, temperature, s.top_k, s.top_p, s.min_p)
        return race(q, races[:, :q.size(1)]), q
    tokens, q = [], []
    for i in range(draft_logits.size(1)):
        probs = target_probs(draft_logits[:, i:i + 1], s, temperature, req, text + ''.join(req.constraint.pieces[t] for t in tokens),
                             torch.tensor([[]], dtype=torch.long), produced + i)[0, 0]
        tokens.append(int(probs.argmax()) if temperature == 0 else int(race(probs, races[0, i])))
        q.append(probs)
    drafts = torch.tensor([tokens], dtype=torch.long, device=draft_logits.device)
    return drafts, (None if temperature == 0 else torch.stack(q)[None] if q else draft_logits.new_zeros(1, 0, draft_logits.size(-1)))


@dataclass
class Row:
    """One row's speculation between rounds."""
    pending: torch.Tensor       # (1, 1) the token committed last, not yet in the cache
    end: int                    # its position
    draft_logits: torch.Tensor  # (1, k, V) the draft slots behind it: the next round's drafts
    produced: int = 0           # tokens committed so far
    text: str = ''              # their text (kept for a constraint only)
    out: list = field(default_factory=list)  # the committed tokens, round by round (1, m) each


def prefill(model, idx):
    """The cache of the prompt idx (B, P) (its last block_size tokens but the last, which is pending)
    and one Row per batch row. A round writes at most n_future tokens and a row keeps at least one,
    so the ring holds every row's window in n_future (block_size + 1) columns (RingCache), then
    scratch columns for a round's future slots. (A single row would need block_size + n_future - 1:
    its pointer moves by what it keeps; attending to half the columns gained 1% at batch 1.)"""
    edge, n_future, B = engine.block_edge(model), model.config.n_future, idx.size(0)
    if not edge.rolls:
        raise ValueError("the speculative sampler needs a window that rolls (a pinned model with pos_emb='rope')")
    cache = engine.RingCache(model, B, n_future * (edge.block_size + 1), scratch=n_future * n_future)
    prompt = idx[:, -edge.block_size:]
    if prompt.size(1) > 1:
        engine.decode_ring(model, prompt[:, :-1], cache, queries=0)
    no_drafts = idx.new_zeros(1, 0, model.config.vocab_size).float()
    rows = [Row(prompt[b:b + 1, -1:], prompt.size(1) - 1, no_drafts) for b in range(idx.size(0))]
    return cache, rows


def groups(live, temperatures, s, req):
    """The rows (indices into live) whose drafts are drawn and judged together: those that share a
    temperature (a schedule moves each row's with its length), or each row alone under a constraint
    (it reads the row's text) or future='auto' (it sizes the row's drafts)."""
    if req.constraint is not None or s.future == 'auto':
        return [[i] for i in range(len(live))]
    shared = {}
    for i, temperature in enumerate(temperatures):
        shared.setdefault(temperature, []).append(i)
    return list(shared.values())


def propose(live, temperatures, s, req, races):
    """The round's drafts, group by group: [(rows, temperature, drafts (G, k), q (G, k, V) or None)];
    races: the drafts' race noise (len(live), k, V) (split_noise; None when every row is greedy)."""
    proposals = []
    for rows in groups(live, temperatures, s, req):
        first, logits = live[rows[0]], torch.cat([live[i].draft_logits for i in rows])
        drafts, q = draft(logits, s, temperatures[rows[0]], req, first.text, first.produced, None if races is None else races[rows])
        proposals.append((rows, temperatures[rows[0]], drafts, q))
    return proposals


def round_tokens(live, proposals):
    """[pending, drafts] of every row (B, 1 + k), k the most drafts of any row: a row with fewer is
    padded with token 0, whose entries it never keeps (its acceptance stops at its own drafts)."""
    k = max(drafts.size(1) for _, _, drafts, _ in proposals)
    tokens = torch.zeros(len(live), 1 + k, dtype=torch.long, device=live[0].pending.device)
    tokens[:, :1] = torch.cat([row.pending for row in live])
    for rows, _, drafts, _ in proposals:
        tokens[rows, 1:1 + drafts.size(1)] = drafts
    return tokens


def commit(row, committed, accepted, proposed, draft_logits, req):
    """Row's bookkeeping after a round: it commits `committed` (1, m) (cut at max_new_tokens), having
    accepted `accepted` of `proposed` drafts; draft_logits (1, k, V) are its next round's drafts."""
    committed = committed[:, :req.max_new_tokens - row.produced]
    row.produced, row.pending, row.end = row.produced + committed.size(1), committed[:, -1:], row.end + committed.size(1)
    row.text = row.text if req.constraint is None else req.constraint.extend([row.text], committed)[0]
    row.draft_logits = draft_logits
    row.out.append(committed)
    req.stats.drafts(proposed, accepted)
    return committed, accepted


def settle(rows, p_logits, future_logits, drafts, q, temperature, s, req, uniform, last_noise):
    """Judge a group's drafts (G, k) against its verifier logits p_logits (G, n >= k + 1, V) and commit
    what the acceptance rule gives (uniform, last_noise: the group's, from split_noise; None when
    greedy); future_logits (G, n, F, V) give the next round's drafts. Returns per row the committed
    tokens (1, m) (pending and the accepted drafts are what the cache keeps: m entries) and the
    number of accepted drafts."""
    k = drafts.size(1)
    p = target_probs(p_logits[:, :k + 1], s, temperature, req, rows[0].text, drafts, rows[0].produced)
    accepted, tokens = accept(p, q, drafts, None if uniform is None else uniform[:, :k], last_noise)
    return [commit(row, torch.cat((drafts[j:j + 1, :a], tokens[j:j + 1]), 1), a, k, future_logits[j:j + 1, a, 1:], req)
            for j, (row, a) in enumerate(zip(rows, accepted.tolist()))]  # the block behind the last accepted token


def settle_all(live, proposals, p_logits, future_logits, s, req, uniform, last_noise):
    """settle for every group of the round: per row of live, (committed tokens (1, m), accepted drafts)."""
    settled = [None] * len(live)
    for rows, temperature, drafts, q in proposals:
        index = torch.tensor(rows, device=p_logits.device)
        noise_of = (None, None) if uniform is None else (uniform[index], last_noise[index])
        for i, result in zip(rows, settle([live[i] for i in rows], p_logits[index], future_logits[index], drafts, q,
                                          temperature, s, req, *noise_of)):
            settled[i] = result
    return settled


def grouped_round(model, cache, live, running, batch, temperatures, s, req, max_loop, tol):
    """A round drawn group by group (see groups): any constraint, future='auto', more draft passes,
    temperatures of both kinds. live: the Rows of the batch rows `running` (of `batch`). Returns per
    row of live (committed tokens (1, m), accepted drafts) and the round's verifier logits
    (len(live), n, V)."""
    k, V = live[0].draft_logits.size(1), model.config.vocab_size
    uniform = races = last_noise = None
    if any(t > 0 for t in temperatures):
        u = noise(batch, k, V, req.generator, live[0].pending.device)[0, running]
        uniform, races, last_noise = split_noise(u, k, V)
    proposals = propose(live, temperatures, s, req, races)
    tokens = round_tokens(live, proposals)
    ends = torch.tensor([row.end for row in live], device=tokens.device)
    p_logits, future_logits = verify(model, cache, tokens, ends, max_loop, tol)
    settled = settle_all(live, proposals, p_logits, future_logits, s, req, uniform, last_noise)
    cache.advance(torch.tensor([committed.size(1) for committed, _ in settled], device=tokens.device))
    return settled, p_logits


def decided_round(model, cache, pending, ends, draft_logits, temperature, limit, u, filters, layout):
    """A whole round as one function of tensors (runtime.compile_samplers compiles it as one graph, the
    stack call, the draws, the acceptance rule and the cache's bookkeeping together), for rows that
    draw alike: no constraint, drafts of fixed length from one pass. pending (B, 1), ends (B,) its
    positions, draft_logits (B, k, V), temperature (B,) (None: greedy), limit (B,) the tokens each row
    may still commit, u the round's noise (None when greedy), filters (top_k, top_p, min_p), layout
    round_layout's. Returns the committed tokens (B, k + 1) (row b: its first kept[b]), (accepted a,
    kept) (2, B) and the next round's draft logits (B, k', V), the block behind each row's last
    accepted token."""
    (B, k, V), n_future = draft_logits.shape, layout[0].size(0) // (draft_logits.size(1) + 1)
    uniform = last_noise = q = None
    if temperature is None:
        drafts = draft_logits.argmax(-1)
    else:
        uniform, races, last_noise = split_noise(u, k, V)
        q = filtered_probs(draft_logits, temperature[:, None, None], *filters)
        drafts = race(q, races)
    tokens = torch.cat((pending, drafts), 1)
    n = k + 1
    pos_c, pos_f = round_positions(ends, n, layout)
    logits, _, _ = round_call(model, cache, tokens, ends, pos_c, pos_f, layout)
    verifier = logits[:, :n]
    p = verifier if temperature is None else filtered_probs(verifier, temperature[:, None, None], *filters)  # greedy: accept reads argmax
    a, last = accept(p, q, drafts, uniform, last_noise)
    kept = torch.minimum(a + 1, limit)
    cache.advance(kept)
    committed = torch.cat((drafts, last), 1).scatter(1, a[:, None], last)  # row b: drafts[:a], then last
    future = logits[:, n:].reshape(B, n, n_future, V)
    return committed, torch.stack((a, kept)), future[torch.arange(B, device=a.device), a, 1:]


def decided_rounds(model, cache, pending, ends, draft_logits, temperature, limit, u, filters, layout, rounds):
    """`rounds` rounds of decided_round in one function (runtime.compile_samplers compiles it as one
    graph: a call's fixed cost, dynamo's guards and the Python around it, is then paid once per
    `rounds` rounds). The state a round hands the next stays in tensors: its last kept token becomes
    pending, positions and limits move by what each row kept. A row that reaches its limit keeps
    nothing in the rounds after. u: (rounds, B, ...) noise (None when greedy); the rest as
    decided_round. Returns the committed tokens (rounds, B, k + 1), (a, kept) (rounds, 2, B) and the
    draft logits behind each row's last accepted token after the last round."""
    committed, counts = [], []
    for r in range(rounds):
        tokens, count, draft_logits = decided_round(model, cache, pending, ends, draft_logits, temperature, limit,
                                                    None if u is None else u[r], filters, layout)
        kept = count[1]
        pending = tokens.gather(1, (kept - 1).clamp(min=0)[:, None])  # a row at its limit keeps nothing: its feed is moot
        ends, limit = ends + kept, limit - kept
        committed.append(tokens)
        counts.append(count)
    return torch.stack(committed), torch.stack(counts), draft_logits


def decide(model, cache, live, running, batch, temperatures, s, req):
    """Rounds through decided_rounds (compiled when runtime.compile_samplers made
    model.compiled_decided_rounds, which also sets how many a call runs: model.rounds_per_call; one
    eagerly, and one while drafting starts or a temperature schedule moves). live: the Rows of the
    batch rows `running` (of `batch`). Returns per round, per row of live, (committed tokens (1, m),
    accepted drafts) and the next round's draft logits (len(live), k, V)."""
    device, k, V = live[0].pending.device, live[0].draft_logits.size(1), model.config.vocab_size
    rounds = req.rounds_per_call(model) if k else 1  # the first round has no drafts: a shape of its own
    engine.ensure_positions(model, max(row.end for row in live) + rounds * (1 + k) + model.config.n_future)
    greedy = temperatures[0] == 0
    step = getattr(model, 'compiled_decided_rounds', None) or decided_rounds
    committed, counts, next_drafts = step(
        model, cache, torch.cat([row.pending for row in live]), torch.tensor([row.end for row in live], device=device),
        torch.cat([row.draft_logits for row in live]), None if greedy else torch.tensor(temperatures, device=device),
        torch.tensor([req.max_new_tokens - row.produced for row in live], device=device),
        None if greedy else noise(batch, k, V, req.generator, device, rounds)[:, running], (s.top_k, s.top_p, s.min_p),
        round_layout(k + 1, model.config.n_future, str(device)), rounds)
    return [[(committed[r, j:j + 1, :kept], a) for j, (a, kept) in enumerate(zip(*count))]
            for r, count in enumerate(counts.tolist())], next_drafts  # one read-back per call


def decides(s, req, temperatures, max_loop):
    """Whether a round can run as decided_round: no constraint, drafts of fixed length from one pass,
    every row greedy or every row sampling, and no entropy record (it reads the verifier's logits)."""
    return (req.constraint is None and s.future == 'fixed' and max_loop == 1 and not req.stats.detail
            and (all(t == 0 for t in temperatures) or all(t > 0 for t in temperatures)))


def sample_rows(model, idx, s, req, on_tokens=None):
    """Every row of idx (B, P) at once, one stack call per round for the whole batch (each row
    accepts its own number of drafts; its rejected entries stay in the cache as holes). Returns each
    row's new tokens [(1, n_b)] (a row ends at max_new_tokens or when on_tokens(b, ids) says so) and
    the cache of the rows that ran the last round (per row, the keys/values of every committed token
    in the window but the last one's, which is pending; a row that on_tokens ended inside a call of
    several rounds (decide) also holds what it committed after)."""
    cache, rows = prefill(model, idx)
    limits = s.limits(model, drafts=True)  # drafts: one pass unless asked
    max_loop, running = limits['max_loop'], list(range(idx.size(0)))
    while running:
        live = [rows[b] for b in running]
        temperatures = [req.temperature(s, row.produced) for row in live]
        going = list(range(len(live)))  # the rows of live that have not ended
        if decides(s, req, temperatures, max_loop):
            proposed = live[0].draft_logits.size(1)
            results, next_drafts = decide(model, cache, live, running, len(rows), temperatures, s, req)
            for result in results:  # a call's rounds in order; a row that ends skips the rest
                settled = {i: commit(live[i], *result[i], proposed, next_drafts[i:i + 1], req) for i in going}
                going = close_round(rows, running, going, settled, (), max_loop, req, on_tokens)
        else:
            settled, p_logits = grouped_round(model, cache, live, running, len(rows), temperatures, s, req, max_loop,
                                              limits['tol'])
            bits = [entropy_bits(p_logits[0, settled[0][1]])[0].item()] if req.stats.detail else ()  # the first running row's
            going = close_round(rows, running, going, dict(enumerate(settled)), bits, max_loop, req, on_tokens)
        if going and len(going) < len(running):  # the others leave the batch; the last rows keep the cache
            cache = cache.select(torch.tensor(going, dtype=torch.long, device=idx.device))
        running = [running[i] for i in going]
    return [torch.cat(row.out, 1) for row in rows], cache


def close_round(rows, running, going, settled, bits, max_loop, req, on_tokens):
    """A round's statistics and endings: settled maps each row of `going` (indices into running) to
    what it committed (committed tokens (1, m), accepted drafts); returns the rows still going."""
    if not going:
        return going  # a round a call ran after every row had ended: nothing to count
    kept = sum(settled[i][0].size(1) for i in going)
    req.stats.add(max_loop, kept / len(rows), bits, calls=max_loop)  # per row of the batch: they sum to a row's length
    return [i for i in going if not ended(rows[running[i]], running[i], settled[i][0], req, on_tokens)]


def ended(row, b, committed, req, on_tokens):
    """Whether row b is done after committing `committed` (1, m): on_tokens(b, ids) hears every
    commit and may end it; max_new_tokens ends it."""
    stop = on_tokens is not None and bool(on_tokens(b, committed[0].tolist()))
    return stop or row.produced >= req.max_new_tokens


def sample_row(model, idx, s, req, on_tokens=None):
    """One row (idx (1, P)): its new tokens (1, n) and the cache at the end: the keys/values of every
    committed token in the window but the last one's, which is pending (at batch 1 the next round
    writes over a rejected draft's columns, so the live columns hold no hole)."""
    rows, cache = sample_rows(model, idx, s, req, None if on_tokens is None else (lambda b, ids: on_tokens(ids)))
    return rows[0], cache
