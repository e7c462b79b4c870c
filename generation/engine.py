"""
Generation-time state: the causal stream's key/value cache, the WFC sampler's window, and one
sampler step's parts (converge -> collapse -> shift). model.py holds the trainable model; this
file holds what a sampler carries from token to token, as nanochat keeps its engine apart.

- KVCache: keys/values of the causal stream for B rows, per pass and layer, in one buffer that
  grows by doubling: append, truncate, select rows (SMC), compact (the collapse sampler's pinned
  past, and learned-position models, whose window is re-encoded at the block edge).
- RingCache: keys/values of a rolling (rotary) causal stream in buffers of fixed shape, written in
  place (the causal and speculative samplers): per-row positions, so rows may keep different entries
  (batched speculation: a rejected draft's entries become holes that masks never show).
- The block edge (BlockEdge, block_edge(model): the one place the rule is written, used by this
  file, sampling.py and speculative.py). A rotary model keeps its cache when the context outgrows block_size: each new
  token sees the block_size - 1 tokens before it, whose keys/values were computed when they were
  new (a rolling window: nothing is rebuilt, cost per token stays flat). A learned-position model
  must re-encode positions, so it rebuilds its cache from the last max_past - slide tokens
  (slide = 0: every token, as nanoGPT recomputes its cropped window).
- Window, start, refine, forget, collapse, shift: the WFC sampler's state and steps. Pinned: the
  past's keys/values are a cache and the newest decided tokens wait as `pending` until the next
  refine runs them together with the future's first pass (one stack call per step).
"""

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from generation.decoding import exponential, filtered_probs, leading_true, race
from modeling.layout import Context, visibility
from modeling.solver import entropy_of_logits, iterate


class KVCache:
    """Keys/values of the causal stream: buf (passes, layers, 2, B, n_head, capacity, head_size),
    of which the first `length` entries hold the tokens at absolute positions start.. start + length - 1."""

    def __init__(self, buf=None, start=0, length=0):
        self.buf, self.start, self.length = buf, start, length

    @property
    def end(self):
        """The absolute position of the next token."""
        return self.start + self.length

    def views(self, p, keep=0):
        """Per layer (k, v) of pass p: the last `keep` entries (0: all)."""
        lo = max(0, self.length - keep) if keep else 0
        return [(layer[0, :, :, lo:self.length], layer[1, :, :, lo:self.length]) for layer in self.buf[p]]

    def append(self, kvs, keep=0):
        """Add per pass the per-layer (k, v) (B, n_head, n, head_size) of n new tokens. When the buffer
        is full: keep > 0 drops all but the last `keep` entries first (a rolling window), else it doubles."""
        k0 = kvs[0][0][0]
        n = k0.size(2)
        if self.buf is None:
            self.buf = k0.new_empty(len(kvs), len(kvs[0]), 2, k0.size(0), k0.size(1), max(64, 2 * n), k0.size(3))
        if self.length + n > self.buf.size(5):
            if keep and keep + n <= self.buf.size(5):
                self.compact(keep)
            else:
                grown = self.buf.new_empty(*self.buf.shape[:5], 2 * (self.length + n), self.buf.size(6))
                grown[..., :self.length, :] = self.buf[..., :self.length, :]
                self.buf = grown
        for p, layers in enumerate(kvs):
            for i, (k, v) in enumerate(layers):
                self.buf[p, i, 0, :, :, self.length:self.length + n] = k
                self.buf[p, i, 1, :, :, self.length:self.length + n] = v
        self.length += n

    def compact(self, keep):
        """Keep only the newest `keep` entries."""
        drop = self.length - keep
        if drop > 0:
            self.buf[..., :keep, :] = self.buf[..., drop:self.length, :].clone()
            self.start, self.length = self.start + drop, keep

    def truncate(self, end):
        """Forget the entries at absolute positions >= end."""
        self.length = max(0, min(self.length, end - self.start))

    def select(self, rows):
        return KVCache(None if self.buf is None else self.buf[:, :, :, rows], self.start, self.length)


class RingCache:
    """Keys/values of a rolling (rotary) causal stream in buffers whose shapes never change, as
    gpt-fast keeps its cache: the causal sampler's and the speculative sampler's. Per pass and layer
    a ring of `capacity` columns written in place, then `scratch` columns for keys a call attends to
    without keeping (a speculative round's future slots). pos (R, capacity) holds each column's
    position per row (R = 1 when every row keeps the same positions), HOLE where a row keeps nothing
    (unwritten, or a draft it rejected). Masks read pos (layout.visibility works on positions), so a
    hole is never seen, the block edge is a window of positions per row, and no entry ever moves.
    A call writes its n tokens at the next n columns (the same in every row); `advance` then turns
    what each row rejects into holes and moves the pointer on by the most any row kept. A call of
    n tokens overwrites only columns no query sees: rows that advance in step (the causal sampler)
    need block_size + n - 1 columns; rows that keep 1..n tokens a call need n (block_size + 1), since
    a row's window (its last block_size positions) then spans at most that many columns. No
    concatenation per token, and every call of n tokens has the same shapes: what lets torch.compile
    build a sampler's step once (runtime.compile_samplers)."""
    HOLE = 2 ** 62  # a position after every query's horizon: nobody sees it

    def __init__(self, model, batch, capacity, scratch=0, per_row=True):
        require_supported(model)
        edge = block_edge(model)
        if not edge.rolls:
            raise ValueError("a ring cache needs a causal stream that rolls at the block edge (rotary positions); "
                             "learned positions re-encode the window there: use KVCache")
        device = model.transformer.wte.weight.device
        self.block_size, self.capacity = edge.block_size, capacity
        self.n_pass = 1 if model.sandwiched() else model.config.n_loop
        self.pos = torch.full((batch if per_row else 1, capacity), self.HOLE, dtype=torch.long, device=device)
        self.pointer = torch.zeros((), dtype=torch.long, device=device)  # a tensor: a compiled step sees no new constant
        self.end = 0  # causal sampler: the next position, a Python int for the rotary tables
        self.slots = None  # the columns of the call being run
        c, dtype = model.config, model.transformer.wte.weight.dtype
        if torch.is_autocast_enabled(device.type):  # keys come in the autocast dtype
            dtype = torch.get_autocast_dtype(device.type)
        shape = (batch, c.n_head, capacity + scratch, c.n_embd // c.n_head)
        # a tensor per pass and layer, never a view of a larger one: a compiled step then writes into it
        # in place (a write into a view makes inductor copy the whole base tensor each call)
        self.k = [[torch.zeros(shape, dtype=dtype, device=device) for _ in model.transformer.h] for _ in range(self.n_pass)]
        self.v = [[torch.zeros(shape, dtype=dtype, device=device) for _ in model.transformer.h] for _ in range(self.n_pass)]
        self.layers = self._layers()

    def _layers(self):
        """What SelfAttention gets as its prefixes: per pass, a _RingLayer per layer."""
        return [[_RingLayer(self, k, v) for k, v in zip(ks, vs)] for ks, vs in zip(self.k, self.v)]

    def begin(self, pos):
        """Give the call's n tokens at positions pos ((n,), or (R, n) per row) the next n columns."""
        self.slots = (self.pointer + torch.arange(pos.size(-1), device=pos.device)) % self.capacity
        self.pos[:, self.slots] = pos

    def advance(self, kept=None):
        """After the call: row b keeps the first kept[b] (kept (B,) long; None: all) of its n tokens,
        the others become holes, and the pointer moves on by the most any row kept."""
        if kept is None:
            self.pointer += self.slots.size(0)
            return
        dropped = torch.arange(self.slots.size(0), device=kept.device) >= kept[:, None]  # (B, n)
        self.pos[:, self.slots] = self.pos[:, self.slots].masked_fill(dropped, self.HOLE)
        self.pointer += kept.max()

    def views(self, p=0):
        """Pass p's per-layer (k, v) of the ring's columns (no scratch), and their positions (R, capacity)."""
        kvs = [(k[:, :, :self.capacity], v[:, :, :self.capacity]) for k, v in zip(self.k[p], self.v[p])]
        return kvs, self.pos

    def select(self, rows):
        """The cache of the batch rows `rows` (1-D long); the new cache shares nothing it may write."""
        ring = RingCache.__new__(RingCache)
        ring.__dict__.update(self.__dict__)
        ring.k, ring.v = ([[t[rows] for t in layers] for layers in kv] for kv in (self.k, self.v))
        ring.pos = self.pos[rows] if self.pos.size(0) > 1 else self.pos.clone()
        ring.pointer = self.pointer.clone()
        ring.layers = ring._layers()
        return ring


class _RingLayer:
    """What SelfAttention gets as its prefix from a RingCache: one pass's one layer. It holds its
    tensors itself, so a compiled block sees tensors, not indices it would bake in as constants."""

    def __init__(self, cache, keys, values):
        self.cache, self.keys, self.values = cache, keys, values

    def attend_to(self, k, v):
        """Store the call's keys/values (B, n_head, T, head_size): the first n at the columns `begin`
        gave, the rest in scratch columns; return what the call attends to, the ring's columns and
        the scratch ones in use (masks decide who sees which)."""
        cache, keys, values = self.cache, self.keys, self.values
        n, end = cache.slots.size(0), cache.capacity + k.size(2) - cache.slots.size(0)
        keys[:, :, cache.slots] = k[:, :, :n].to(keys.dtype)
        values[:, :, cache.slots] = v[:, :, :n].to(values.dtype)
        if end > cache.capacity:
            keys[:, :, cache.capacity:end] = k[:, :, n:]
            values[:, :, cache.capacity:end] = v[:, :, n:]
        return keys[:, :, :end], values[:, :, :end]


@dataclass(frozen=True)
class BlockEdge:
    """The block-edge rule, written once: how far back a token may look in a sampler's window and
    what the window does when the context outgrows block_size. A causal stream with rotary positions
    (a GPT, the past of a pinned WFC window) rolls: each new token sees the block_size - 1 tokens
    before it, whose keys/values were computed when they were new, and positions keep counting.
    Otherwise (learned positions, a bidirectional window) the window is rebuilt from position 0."""
    block_size: int  # positions a token's attention spans, itself included (the training context)
    rolls: bool      # the window rolls on past the edge (else it is rebuilt)
    max_past: int    # most past tokens a WFC window holds (learned positions: fewer, so the future
                     # slots stay on positions seen in training)

    @property
    def keep(self):
        """Cache entries kept behind new tokens: block_size - 1 when rolling, else all (0)."""
        return self.block_size - 1 if self.rolls else 0

    @property
    def window(self):
        """The attention window in positions for visibility masks (0: none)."""
        return self.block_size if self.rolls else 0

    def recent(self, n=0):
        """Cache entries that queries placed after n new tokens may see (0: all)."""
        return self.block_size + n if self.rolls else 0


def block_edge(model, n_future=None):
    """The model's BlockEdge (for a window of n_future future slots; default the model's)."""
    c = model.config
    n_future = c.n_future if n_future is None else n_future
    rotary = model.rotary is not None
    return BlockEdge(block_size=c.block_size, rolls=rotary and (c.n_future == 0 or c.attn == 'pinned'),
                     max_past=c.block_size if rotary or n_future == 0 else c.block_size - n_future + 1)


def unsupported(model):
    """Why the samplers cannot run this model ('' when they can). A sandwich (n_prelude, n_coda > 0)
    keeps one cache entry per layer, so its causal stream may run its core once only, and its future
    slots need a pinned window (the prelude and coda read the past's cached keys/values)."""
    c = model.config
    if model.sandwiched() and (c.n_loop > 1 or c.n_future and c.attn != 'pinned'):
        return ("sampling a sandwich model (n_prelude/n_coda > 0) with n_loop > 1 or bidirectional attention is not "
                "built yet; eval.py measures its parallel losses")
    return ''


def require_supported(model):
    reason = unsupported(model)
    if reason:
        raise ValueError(reason)


def ensure_positions(model, end):
    """Rotary tables up to position end (a rolling window keeps counting positions)."""
    if model.rotary is not None and end > model.rotary.cos.size(0):
        model.rotary.ensure(2 * end)


@torch.no_grad()
def run_causal(model, idx, cache, queries=None):
    """Run the causal stream on the tokens idx (B, n) that follow the cache, append their keys/values
    (keeping a rolling window for rotary models) and return the final states (of the last `queries`)."""
    require_supported(model)
    edge, n = block_edge(model), idx.size(1)
    ensure_positions(model, cache.end + n)
    pos = torch.arange(cache.end, cache.end + n, device=idx.device)
    past = None if not cache.length else [cache.views(p, edge.keep) for p in range(model.config.n_loop)]
    x, kvs = model.causal_stream(model.token_states(idx, pos), pos, past, queries, window=edge.window)
    cache.append(kvs, keep=edge.keep)
    return x


def run_ring(model, idx, cache, queries=None):
    """run_causal on a RingCache whose rows advance in step (every call keeps all its tokens, so the
    pointer counts positions): the tokens idx (B, n) at the next positions, their keys/values written
    in place. Every call of n tokens has the same shapes, so torch.compile builds it once
    (runtime.compile_samplers); the rotary tables must already reach the positions (decode_ring)."""
    pos = cache.pointer + torch.arange(idx.size(1), device=idx.device)
    cache.begin(pos)
    mask = visibility(pos, None, None, cache.pos[:, None], window=cache.block_size)[:, None]  # (R, 1, n, capacity)
    x, _ = model.causal_stream(model.token_states(idx, pos), pos, cache.layers, queries, mask=mask)
    cache.advance()
    return x


def decided_step(model, token, cache, temperature, u, filters):
    """The causal sampler's step as one function of tensors (runtime.compile_samplers compiles it whole):
    the tokens (B, 1) through the stream into the ring (run_ring), then the next token (B, 1) drawn from
    the head: greedy when temperature is None, else filtered by temperature (B,) and filters (top_k,
    top_p, min_p) and drawn by an exponential race on the uniforms u (B, V) (decoding.race)."""
    logits = model.logits(run_ring(model, token, cache, queries=1)[:, -1])
    if temperature is None:
        return logits.argmax(-1, keepdim=True)
    return race(filtered_probs(logits, temperature[:, None], *filters), exponential(u))[:, None]


def decided_steps(model, token, cache, temperature, u, filters, steps):
    """`steps` decided_steps in one function, each feeding the token the one before drew (what
    runtime.compile_samplers compiles: a call's fixed cost paid once per `steps` tokens). u: (steps,
    B, V) uniforms (None when greedy). Returns the drawn tokens (B, steps)."""
    drawn = []
    for i in range(steps):
        token = decided_step(model, token, cache, temperature, None if u is None else u[i], filters)
        drawn.append(token)
    return torch.cat(drawn, 1)


@torch.no_grad()
def decode_ring(model, idx, cache, queries=None):
    """Run idx (B, n) after a RingCache whose rows advance in step and return the final states (of the
    last `queries`): a token a row through the model's compiled step when runtime.compile_samplers
    made one; the prompt runs eagerly (prompts come in any length, each a new graph)."""
    most = cache.capacity - cache.block_size + 1 if cache.end else cache.capacity
    if idx.size(1) > most:
        raise ValueError(f"{idx.size(1)} tokens at once would overwrite cache entries they must see (at most {most}: "
                         f"capacity {cache.capacity}, block_size {cache.block_size})")
    ensure_positions(model, cache.end + idx.size(1))
    step = getattr(model, 'compiled_decode', None) if idx.size(1) == 1 and cache.end else None
    x = (step or run_ring)(model, idx, cache, queries)
    cache.end += idx.size(1)
    return x


def causal_ring(model, batch, most_per_call=1):
    """The RingCache of a causal sampler's batch rows, whose calls after the prompt add at most
    most_per_call tokens (positions shared by every row)."""
    return RingCache(model, batch, block_edge(model).block_size + most_per_call - 1, per_row=False)


@dataclass
class Window:
    """What the WFC sampler carries from step to step, for B rows. past (B, P): the decided tokens
    (the last max_past of them), the first at absolute position `start`. future (B, F, C): the
    future slots' states. decided (B, F): token of a collapsed or pinned slot, -1 while open.
    Bidirectional: past_x (B, P, C) the past's states. Pinned: cache, the causal stream's keys/values
    of all but the last `pending` past tokens (the next refine runs those with its first pass).
    fresh (B, F): slots at e_max that no refine has run yet (a sandwich starts them at its prelude's output)."""
    past: torch.Tensor
    future: torch.Tensor
    decided: torch.Tensor
    start: int = 0
    past_x: torch.Tensor = None
    cache: KVCache = None
    pending: int = 0
    stats: dict = field(default_factory=dict)
    fresh: torch.Tensor = None

    def select(self, rows):
        """A window made of the batch rows `rows` (1-D long, repeats allowed): how SMC resamples
        particles that run as the rows of one batch, and how a branch copies a row."""
        B = self.past.size(0)
        stats = {k: v[rows] if torch.is_tensor(v) and v.dim() and v.size(0) == B else v for k, v in self.stats.items()}
        return Window(self.past[rows], self.future[rows], self.decided[rows], self.start,
                      None if self.past_x is None else self.past_x[rows],
                      None if self.cache is None else self.cache.select(rows), self.pending, stats, self.fresh[rows])

    def future_pos(self):
        P, n_future = self.past.size(1), self.decided.size(1)
        return torch.arange(self.start + P, self.start + P + n_future, device=self.past.device)


@torch.no_grad()
def start(model, idx, n_future=None):
    """A window for the prompt idx (B, P): its last max_past tokens as the past, F fresh e_max slots."""
    require_supported(model)
    n_future = n_future or model.config.n_future
    idx = idx[:, -block_edge(model, n_future).max_past:]
    B, P = idx.shape
    w = Window(past=idx, future=None, decided=torch.full((B, n_future), -1, dtype=torch.long, device=idx.device),
               fresh=torch.ones(B, n_future, dtype=torch.bool, device=idx.device))
    w.future = model.fresh_slots(w.future_pos()).expand(B, n_future, -1).clone()
    if model.config.attn == 'pinned':
        w.cache = KVCache()
        run_causal(model, idx, w.cache, queries=0)  # the future reads only the past's keys/values
    else:
        w.past_x = model.token_states(idx, torch.arange(P, device=idx.device))
    return w


def future_mask(model, n_keys, n_future, device):
    """The future slots' visibility in a sampler window (one block after n_keys past keys), or None
    when every slot sees every key; (1, 1, F, n_keys + F)."""
    if model.config.spec_window < 0:
        return None
    j = torch.arange(n_future, device=device)
    horizon = torch.full((n_future,), n_keys - 1, device=device)
    return visibility(horizon, j * 0, j, torch.arange(n_keys, device=device), j * 0, j, model.config.spec_window)[None, None]


def _pending_pass(model, w, x0, pos_f):
    """The pinned window's first pass, joined with the causal stream on the pending past tokens in
    one stack call: they see the past (and each other, causally), the future sees them; their
    keys/values extend the cache. Returns the future's state after pass 1."""
    n, (B, P), n_future, c = w.pending, w.past.shape, w.future.size(1), model.config
    edge, dev = block_edge(model), w.past.device
    ensure_positions(model, w.start + P + n_future)
    pos_n = torch.arange(w.start + P - n, w.start + P, device=dev)
    prefixes = None if not w.cache.length else w.cache.views(0, edge.keep)
    L = 0 if prefixes is None else prefixes[0][0].size(2)
    j = torch.arange(n_future, device=dev)
    horizon = torch.cat((pos_n, pos_n[-1:].expand(n_future)))  # pending tokens: causal; future: all of the past
    block = torch.cat((j.new_full((n,), -1), j * 0))
    mask = visibility(horizon, block, torch.cat((j.new_zeros(n), j)), torch.arange(int(pos_n[0]) - L, int(pos_n[-1]) + 1, device=dev),
                      j * 0, j, c.spec_window, window=edge.window)[None, None]
    x_n = model.token_states(w.past[:, P - n:], pos_n)
    ctx = Context(torch.cat((x_n, x0), 1), torch.cat((pos_n, pos_f)), mask, prefixes)
    frozen = torch.cat((w.decided.new_zeros(B, n, dtype=torch.bool), w.decided >= 0), 1)
    first, kvs = model.update(torch.cat((x_n, w.future), 1), ctx, frozen, queries=n_future)
    w.cache.append([[(k[:, :, :n], v[:, :, :n]) for k, v in kvs]], keep=edge.keep)
    w.pending = 0
    return first


def future_context(model, w, x0=None):
    """A pinned window's context for its future slots: inputs x0, positions, visibility and the
    cache's keys/values they may see."""
    prefixes = w.cache.views(model.config.n_loop - 1, block_edge(model).recent())
    return Context(x0, w.future_pos(), future_mask(model, prefixes[0][0].size(2), w.future.size(1), w.past.device), prefixes)


@torch.no_grad()
def refine(model, w, max_loop=None, tol=None, min_loop=None, slot_exit=None):
    """Run passes from the window's current (warm) state until its open future slots converge or
    max_loop (solver.iterate; None keeps the model's solver setting). Returns w and the passes run; w.stats holds entropy (B, F) in nats,
    logits (B, F, V) of the future and the Trace."""
    c, (B, P), n_future = model.config, w.past.shape, w.future.size(1)
    decided = w.decided >= 0
    pos_f = w.future_pos()
    ensure_positions(model, int(pos_f[-1]) + 1)
    x0 = torch.where(decided[..., None], model.token_states(w.decided.clamp(min=0), pos_f), model.fresh_slots(pos_f))
    solver = model.solver.but(max_loop=max_loop, tol=tol, min_loop=min_loop, slot_exit=slot_exit)
    if c.attn == 'pinned':
        first = _pending_pass(model, w, x0, pos_f) if w.pending else None
        ctx = future_context(model, w, x0)
        if model.sandwiched():  # the core's input: the prelude's output, anew as the past grows (as in training,
            ctx.x0 = model.prelude_of(x0, ctx)  # where decided slots are pins); fresh and decided slots start there
            w.future = torch.where((decided | w.fresh)[..., None], ctx.x0.to(w.future.dtype), w.future)
        w.future, trace = iterate(model, w.future, ctx, decided, ~decided, solver, first=first)
    else:
        none = torch.zeros(B, P, dtype=torch.bool, device=w.past.device)
        pos = torch.arange(P + n_future, device=w.past.device)
        ctx = Context(torch.cat((model.token_states(w.past, pos[:P]), x0), 1), pos)
        x, trace = iterate(model, torch.cat((w.past_x, w.future), 1), ctx, torch.cat((none, decided), 1),
                           torch.cat((none, ~decided), 1), solver)
        w.past_x, w.future = x[:, :P], x[:, P:]
    logits = model.readout(w.future, ctx)  # (B, F, V), decoded once per step for the sampler
    w.fresh = torch.zeros_like(decided)
    w.stats = dict(passes=trace.steps, entropy=entropy_of_logits(logits), logits=logits, trace=trace)
    return w, trace.steps


@torch.no_grad()
def forget(model, w):
    """A cold start, the state training's refinement starts from (for models not trained to
    warm-start): open future slots back to e_max and, bidirectional, the past back to its token
    embeddings (refine moves the past's states too; carried over steps they drift)."""
    w.future = torch.where((w.decided < 0)[..., None], model.fresh_slots(w.future_pos()).to(w.future.dtype), w.future)
    w.fresh = w.fresh | (w.decided < 0)
    if w.past_x is not None:
        w.past_x = model.token_states(w.past, torch.arange(w.past.size(1), device=w.past.device)).to(w.past_x.dtype)
    return w


def future_logits(model, w):
    """(B, F, V) logits of the future slots (a sandwich decodes them through its coda, which
    attends to the window as the refinement does)."""
    return model.readout(w.future, future_context(model, w)) if len(model.coda) else model.logits(w.future)


@torch.no_grad()
def collapse(model, w, slots, tokens, mode='token', eps=0.1, lam=0.5, decide=True):
    """Measure future slots (B, F) bool as tokens (B, F). mode 'token' writes the token's embedding
    row (as a GPT would); 'partial' moves lam of the way there; 'nearest' writes the closest state on
    the way from the current state to the row that decodes to the token with p >= 1 - eps (the seed's
    proposal: keep the nuance). decide=False leaves the slots open (a nudge, as the median policy does)."""
    if model.sandwiched() and mode != 'token':
        raise ValueError(f"collapse mode {mode!r} moves a slot's state toward a token's embedding row, and a sandwich "
                         "model's looped core does not work in embedding space: use --mode=token and a policy other than median")
    rows = model.token_states(tokens.clamp(min=0), w.future_pos())
    if mode == 'token':
        new = rows
    elif mode == 'partial':
        new = w.future + lam * (rows - w.future)
    elif mode == 'nearest':
        new = nearest(model, w.future, rows, tokens.clamp(min=0), eps)
    else:
        raise ValueError(f"collapse mode must be 'token', 'nearest' or 'partial', got {mode!r}")
    w.future = torch.where(slots[..., None], new.to(w.future.dtype), w.future)
    if decide:
        w.decided = torch.where(slots, tokens, w.decided)
    return w


def nearest(model, x, rows, tokens, eps, steps=20):
    """Bisection on the segment x -> row (extended along the ray when the row itself decodes with
    p < 1 - eps) for the smallest move that gives the token p >= 1 - eps."""
    def ok(lam):
        logp = F.log_softmax(model.logits(x + lam[..., None] * (rows - x)).float(), -1)
        return logp.gather(-1, tokens[..., None])[..., 0] >= math.log(1 - eps)
    lo, hi = torch.zeros(x.shape[:-1], device=x.device), torch.ones(x.shape[:-1], device=x.device)
    already = ok(lo)
    for _ in range(4):  # the row itself is not enough: try 2, 4, 8, 16 times as far
        short = ~ok(hi)
        lo, hi = torch.where(short, hi, lo), torch.where(short, 2 * hi, hi)
    reachable = ok(hi)
    for _ in range(steps):  # invariant: ok(hi), not ok(lo)
        mid = (lo + hi) / 2
        good = ok(mid)
        lo, hi = torch.where(good, lo, mid), torch.where(good, mid, hi)
    lam = torch.where(already, 0.0, torch.where(reachable, hi, 1.0))  # unreachable: the row
    return x + lam[..., None] * (rows - x)


def rebase(model, x, old_pos, new_pos):
    """Move states from positions old_pos to new_pos: learned positions are part of the state."""
    if 'wpe' not in model.transformer:
        return x
    return x + model.transformer.wpe(new_pos) - model.transformer.wpe(old_pos)


def _past_into_cache(model, w, past, moved, drop, rolling):
    """Pinned: give the cache the keys/values of the tokens it lacks after a shift (the moved ones,
    or after a rebuild from position 0 the whole new past): a one-pass stream leaves them pending
    for the next refine's first pass, a looped one runs them now."""
    rebuild = drop and not rolling  # learned positions: re-encode the past from position 0
    if rebuild:
        w.cache, w.pending = KVCache(), 0
    missing = past[:, drop:] if rebuild else moved  # tokens whose keys/values the cache lacks
    if model.config.n_loop == 1 and not model.sandwiched():
        w.pending += missing.size(1)  # the next refine runs them with its first pass
    else:  # a looped stream or a sandwich cannot join the future's first pass: run them now
        run_causal(model, missing, w.cache, queries=0)
    w.start += drop if rolling else 0


def _refill_future(model, w, carried, n, length):
    """After n slots moved into the past: keep the carried slots (every pinned one, and up to
    `length` slots in all; default as many as before) and append fresh e_max slots."""
    B, n_future = w.decided.size(0), w.future.size(1)
    decided = w.decided[:, n:]
    pinned_to = int(((decided >= 0).any(0).nonzero().max() + 1) if (decided >= 0).any() else 0)
    keep = max(pinned_to, min(n_future if length is None else length, n_future - n))
    fresh = max(0, (n_future if length is None else length) - keep)
    w.decided = torch.cat((decided[:, :keep], decided.new_full((B, fresh), -1)), 1)
    w.fresh = torch.cat((w.fresh[:, n:][:, :keep], w.fresh.new_ones(B, fresh)), 1)
    first_fresh = w.start + w.past.size(1) + keep
    fresh_pos = torch.arange(first_fresh, first_fresh + fresh, device=w.past.device)
    w.future = torch.cat((carried[:, :keep], model.fresh_slots(fresh_pos).expand(B, fresh, -1)), 1)
    return w


@torch.no_grad()
def shift(model, w, slide=0, length=None):
    """Move the decided prefix (the leading decided slots, as many as every row has) into the past
    and append fresh e_max slots, up to `length` future slots (default: as many as before; fewer
    drops the last carried open slots, never a decided one). Past max_past the oldest tokens leave
    the window: a pinned rotary window rolls on (its cache is kept, positions keep counting);
    otherwise positions restart at 0 and the past is re-encoded (slide: drop that many more, to
    rebuild less often). Returns w and the moved tokens (B, n)."""
    n = int(leading_true(w.decided >= 0).min())
    if n == 0:
        return w, w.past[:, :0]
    P, edge = w.past.size(1), block_edge(model)
    moved, past = w.decided[:, :n], torch.cat((w.past, w.decided[:, :n]), 1)
    over, rolling = max(0, past.size(1) - edge.max_past), edge.rolls
    drop = over if rolling or not over else min(past.size(1) - 1, over + slide)
    carried, old_pos = w.future[:, n:], w.future_pos()[n:]
    if model.config.attn == 'pinned':
        _past_into_cache(model, w, past, moved, drop, rolling)
    else:
        w.past_x = torch.cat((w.past_x, w.future[:, :n]), 1)[:, drop:]
    if drop and not rolling:
        pos = torch.arange(P + n, device=past.device)
        if w.past_x is not None:
            w.past_x = rebase(model, w.past_x, pos[drop:], pos[:P + n - drop])
        carried = rebase(model, carried, old_pos, old_pos - drop)
    w.past = past[:, drop:]
    return _refill_future(model, w, carried, n, length), moved
