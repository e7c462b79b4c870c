"""
Exact speculative sampling for pinned WFC models: the future slots draft, the causal stream verifies.

A round, for one row (rows run one after another):
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
A round commits 1..k + 1 tokens for one stack call. With a temperature schedule the temperature
advances per round. Draft length: k = F - 1, or with future='auto' the rule of
decoding.live_slots on the drafts' entropies (the same rule that sizes the collapse sampler's window).
"""

import functools

import torch

import engine
from layout import Context, visibility
from decoding import draw, entropy_bits, filtered_probs, live_slots, token_probs


@torch.no_grad()
def generate_speculative(model, idx, s, req, on_tokens):
    """sampling.generate's speculative sampler (req: a decoding.Request): (B, n) new tokens, rows that
    on_tokens ended early padded with -1."""
    rows = [sample_row(model, idx[r:r + 1], s, req, None if on_tokens is None else (lambda ids, r=r: on_tokens(r, ids)))[0]
            for r in range(idx.size(0))]
    n = max(row.size(1) for row in rows)
    return torch.cat([torch.nn.functional.pad(row, (0, n - row.size(1)), value=-1) for row in rows])


@functools.lru_cache(maxsize=64)
def round_layout(n, L, n_future, spec_window, window, device):
    """What a round's call looks like relative to its first new token (it repeats, so it is built
    once): the future slots' position offsets (n F,), their blocks and indices, and the visibility of
    [n causal queries, n blocks of F future queries] over [L cached keys, n new keys, n F future keys]."""
    rel = torch.arange(n, device=device)  # the causal queries' positions, relative to the first one
    offsets = (rel[:, None] + torch.arange(1, n_future + 1, device=device)).flatten()  # block b: the F positions after token b
    block, index = rel.repeat_interleave(n_future), torch.arange(n_future, device=device).repeat(n)
    mask = visibility(torch.cat((rel, rel.repeat_interleave(n_future))), torch.cat((block.new_full((n,), -1), block)),
                      torch.cat((index.new_zeros(n), index)), torch.arange(-L, n, device=device), block, index,
                      spec_window, window=window)[None, None]
    return offsets, block, index, mask


def verify(model, cache, tokens, max_loop=1, tol=None):
    """The round's one stack call: the causal stream on tokens (1, n) = [pending, drafts] after the
    cache, and F future slots behind each of them. Appends the n tokens' keys/values to the cache.
    Returns the causal logits (1, n, V) (row i: the distribution of the token after tokens[:, i])
    and the future blocks' logits (1, n, F, V)."""
    c, n, n_future, dev = model.config, tokens.size(1), model.config.n_future, tokens.device
    edge, P0 = engine.block_edge(model), cache.end
    engine.ensure_positions(model, P0 + n + n_future)
    prefixes = cache.views(0, edge.keep) if cache.length else None
    offsets, block, index, mask = round_layout(n, prefixes[0][0].size(2) if prefixes else 0, n_future, c.spec_window,
                                               edge.window, str(dev))
    pos_c, pos_f = torch.arange(P0, P0 + n, device=dev), P0 + offsets
    x0 = torch.cat((model.input(tokens, pos_c), model.blank(pos_f)[None]), 1)
    ctx = Context(x0, torch.cat((pos_c, pos_f)), mask, prefixes)
    core, out, kvs = model.once_through(x0, ctx)  # a sandwich: prelude, one core pass, coda
    cache.append([[(k[:, :, :n], v[:, :, :n]) for k, v in kvs]], keep=edge.keep)
    future_logits = model.logits(out[:, n:])
    if max_loop > 1:  # more passes for the drafts, against the past now in the cache
        views = cache.views(0, edge.recent(n))
        keys = torch.arange(cache.end - views[0][0].size(2), cache.end, device=dev)
        ctx = Context(ctx.x0[:, n:], pos_f, visibility(pos_c.repeat_interleave(n_future), block, index, keys, block, index,
                                                       c.spec_window, window=edge.window)[None, None], views)
        none = torch.zeros(1, n * n_future, dtype=torch.bool, device=dev)
        future, _ = model.iterate(ctx.x0, ctx, none, ~none, max_loop=max_loop, tol=tol, first=core[:, n:])
        future_logits = model.readout(future, ctx)
    return model.logits(out[:, :n]), future_logits.view(1, n, n_future, -1)


def target_probs(logits, s, temperature, req, text, drafts, produced):
    """The filtered distributions (n, V) of logits (1, n, V), position i after text and drafts[:i];
    with a constraint, the tokens that would break it are removed (greedy: from the plain softmax)."""
    probs = token_probs(logits[0], s, temperature)
    if req.constraint is None:
        return probs
    pieces = [req.constraint.pieces[t] for t in drafts[0].tolist()]
    texts = [text + ''.join(pieces[:i]) for i in range(len(probs))]
    return torch.cat([req.constraint.filter(probs[i:i + 1], texts[i:i + 1], produced + i == req.max_new_tokens - 1)[0]
                      for i in range(len(probs))])


def accept(p, q, drafts, generator):
    """The acceptance rule. p (k + 1, V) the verifier's filtered distributions, q (k, V) the drafts'
    (None when greedy: accept while the draft is the argmax), drafts (1, k). Returns the number of
    accepted drafts a and the token that follows them (1, 1): a residual draw at the rejection, or the bonus."""
    k = drafts.size(1)
    if q is None:
        target = p.argmax(-1)[None]
        a = int((drafts == target[:, :k]).long().cumprod(1).sum())
        return a, target[:, a:a + 1]
    a = 0
    if k:
        rows = torch.arange(k, device=p.device)
        u = torch.rand(k, device=p.device, generator=generator)
        a = int((u * q[rows, drafts[0]] < p[rows, drafts[0]]).long().cumprod(0).sum())  # u < p / q, in order
    if a == k:
        return a, draw(p[k], generator).view(1, 1)
    residual = (p[a] - q[a]).clamp(min=0)
    total = residual.sum()
    return a, draw(residual / total if total > 0 else p[a], generator).view(1, 1)


def draft(draft_logits, s, temperature, req, text, produced, generator):
    """Draft tokens (1, k) and their distributions q (k, V) (None when greedy) from the logits (1, k, V)
    of the draft slots, one after another (a constraint sees the drafts before each); future='auto'
    keeps the leading slots the rule allows."""
    if s.future == 'auto' and draft_logits.size(1):
        draft_logits = draft_logits[:, :live_slots(entropy_bits(draft_logits)[0], s.tau)]
    if req.constraint is None:
        if temperature == 0:
            return draft_logits.argmax(-1), None
        q = filtered_probs(draft_logits[0], temperature, s.top_k, s.top_p, s.min_p)
        return draw(q, generator)[None], q
    tokens, q = [], []
    for i in range(draft_logits.size(1)):
        probs = target_probs(draft_logits[:, i:i + 1], s, temperature, req, text + ''.join(req.constraint.pieces[t] for t in tokens),
                             torch.tensor([[]], dtype=torch.long), produced + i)
        tokens.append(int(probs[0].argmax()) if temperature == 0 else int(draw(probs[0], generator)))
        q.append(probs[0])
    drafts = torch.tensor([tokens], dtype=torch.long, device=draft_logits.device)
    return drafts, (None if temperature == 0 else torch.stack(q) if q else draft_logits.new_zeros(0, draft_logits.size(-1)))


def sample_row(model, idx, s, req, on_tokens=None):
    """One row (idx (1, P)): its new tokens (1, n) and the cache at the end (every committed token's
    keys/values but the last one's, which is pending)."""
    c = model.config
    edge = engine.block_edge(model)
    if not edge.rolls:
        raise ValueError("the speculative sampler needs a window that rolls (a pinned model with pos_emb='rope')")
    cache, prompt = engine.KVCache(), idx[:, -edge.block_size:]
    if prompt.size(1) > 1:
        engine.run_causal(model, prompt[:, :-1], cache, queries=0)
    pending, draft_logits, out, produced, text = prompt[:, -1:], idx.new_zeros(1, 0, c.vocab_size).float(), [], 0, ''
    limits = s.limits(model, drafts=True)  # drafts: one pass unless asked
    max_loop, tol = limits['max_loop'], limits['tol']
    while produced < req.max_new_tokens:
        temperature = req.temperature(s, produced)
        drafts, q = draft(draft_logits, s, temperature, req, text, produced, req.generator)
        k = drafts.size(1)
        start = cache.end
        p_logits, future_logits = verify(model, cache, torch.cat((pending, drafts), 1), max_loop, tol)
        p = target_probs(p_logits, s, temperature, req, text, drafts, produced)
        a, token = accept(p, q, drafts, req.generator)
        committed = torch.cat((drafts[:, :a], token), 1)[:, :req.max_new_tokens - produced]
        cache.truncate(start + committed.size(1))  # pending and the accepted drafts stay; the rejected go
        produced, pending = produced + committed.size(1), committed[:, -1:]
        text = text if req.constraint is None else req.constraint.extend([text], committed)[0]
        draft_logits = future_logits[:, a, 1:]  # the block behind the last accepted token: slot 1 is `token`
        req.stats.add(max_loop, committed.size(1), [entropy_bits(p_logits[0, a])[0].item()] if req.stats.detail else (),
                      calls=max_loop)
        req.stats.drafts(k, a)
        out.append(committed)
        if on_tokens is not None and on_tokens(committed[0].tolist()):
            break
    return torch.cat(out, 1), cache
