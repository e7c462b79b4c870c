"""
Who may see whom, and the layouts a WFC model trains and is evaluated on.

`visibility` is the one attention rule of every layout: the vectorised training layouts here, the
evaluation (eval.py runs every block phase) and the sampler's windows (engine.py, speculative.py).
A query has a horizon (the last past token it may know) and a block; it sees the past keys up to its
horizon and the future keys of its own block (up to spec_window slots ahead of itself). The causal
stream is the special case of a query whose horizon is its own position.

Pinned training layout (vectorised, as in block diffusion): the causal stream runs over the whole
sequence once; the future stream holds one slot per token, in blocks of F slots at a random phase
per row, so every token is a future target once per sequence. Future slot j predicts token j + 1
from the past up to s(j), the first slot of its block, at distance d = j - s(j) + 1.
Bidirectional layout: one window per row, the past idx[:, :s + 1] and F future slots after it,
everything valid seeing everything valid.
"""

from dataclasses import dataclass

import torch


def visibility(horizon, block, index, key_pos, key_block=None, key_index=None, spec_window=-1, window=0):
    """Who may see whom: the one attention rule of every layout (training, evaluation, sampling).
    Keys are past keys at positions key_pos (Tp,) (the causal stream's keys/values; (B, 1, Tp) when
    rows keep different keys, with per-row horizons (B, Tq)) and, optionally,
    future keys of block key_block at index key_index (..., Tf). A query sees a past key iff its
    position is <= the query's horizon (the last token the query may know; window > 0: and more than
    horizon - window), and a future key iff it is in the query's block and at most spec_window
    slots ahead of the query (-1: any). horizon, block, index: (..., Tq). The causal rule is
    horizon = the query's own position and no future keys. Returns bool (..., Tq, Tp + Tf)."""
    see = key_pos <= horizon[..., None]
    if window > 0:
        see = see & (key_pos > horizon[..., None] - window)
    if key_block is None:
        return see
    same = key_block[..., None, :] == block[..., :, None]
    if spec_window >= 0:
        same = same & (key_index[..., None, :] <= index[..., :, None] + spec_window)
    return torch.cat((see, same), -1)


def block_starts(phase, T, n_future):
    """(B, T) first slot of each future slot's block: blocks start at 0 and at phase + k n_future."""
    j, ph = torch.arange(T, device=phase.device), phase[:, None]
    return torch.where(j < ph, 0, ph + (j - ph).div(n_future, rounding_mode='floor') * n_future)


def keep_blocks(phase, T, n_future, frac):
    """A random fraction of each row's future blocks (at least one): (B, n) indices of the kept
    slots in order, padded to the longest row, and (B, n) bool of the real ones."""
    start = block_starts(phase, T, n_future)
    block = torch.where(start == 0, 0, (start - phase[:, None]).div(n_future, rounding_mode='floor') + 1)  # (B, T)
    n_blocks = block[:, -1] + 1
    draw = torch.rand(len(phase), T, device=phase.device).masked_fill(
        torch.arange(T, device=phase.device)[None] >= n_blocks[:, None], 2.0)  # only real blocks compete
    keep = draw.argsort(1).argsort(1).gather(1, block) < (frac * n_blocks).ceil().long()[:, None]
    order = (~keep).int().sort(dim=1, stable=True).indices[:, :int(keep.sum(1).max())]
    return order, keep.gather(1, order)


@dataclass
class Context:
    """What a pass needs besides the state: each slot's input x0 (B, S, C) (re-injected when inject
    != 'none'), positions pos (S,) or (B, S), the mask (None = all visible, 'causal', or bool
    (B or 1, 1, S, keys)) and per layer the (k, v) of the fixed keys it attends to (or a sampler's
    ring cache layers: engine.RingCache), or None."""
    x0: torch.Tensor
    pos: torch.Tensor
    mask: object = None
    prefixes: list = None

    def rows(self, idx):
        """The context of the batch rows idx (1-D long)."""
        pos = self.pos[idx] if self.pos.dim() == 2 else self.pos  # positions per row, or shared
        per_row = torch.is_tensor(self.mask) and self.mask.dim() == 4 and self.mask.size(0) > 1
        prefixes = None if self.prefixes is None else [(k[idx], v[idx]) for k, v in self.prefixes]
        return Context(self.x0[idx], pos, self.mask[idx] if per_row else self.mask, prefixes)

    def slots(self, order):
        """The context of the slots order (B, n) of each row, for a bool mask (B or 1, 1, S, keys)
        whose last S keys are the stream's own slots (every `visibility` mask)."""
        S, B = self.x0.size(1), order.size(0)
        x0 = self.x0.gather(1, order[..., None].expand(-1, -1, self.x0.size(-1)))
        pos = (self.pos.expand(B, -1) if self.pos.dim() == 1 else self.pos).gather(1, order)
        mask = self.mask.expand(B, -1, -1, -1)
        mask = mask.gather(2, order[:, None, :, None].expand(-1, mask.size(1), -1, mask.size(-1)))  # the queries
        fixed, own = mask[..., :mask.size(-1) - S], mask[..., mask.size(-1) - S:]
        own = own.gather(3, order[:, None, None, :].expand(-1, own.size(1), own.size(2), -1))  # their own keys
        return Context(x0, pos, torch.cat((fixed, own), -1), self.prefixes)


class Active:
    """What an inference pass computes: rows (R,) of the batch and, per row, the slots (R, n) of the
    stream (None: every slot). Once slots exit one by one, a slot that has exited and that no open
    slot attends to is left out, so the passes the exit saves are also time saved."""

    def __init__(self, rows, slots=None):
        self.rows, self.slots = rows, slots

    def _index(self, t):  # slots (R, n) broadcast over t's trailing dimensions
        return self.slots.view(*self.slots.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])

    def gather(self, t):
        """(B, S, ...) -> (R, n, ...)."""
        t = t[self.rows]
        return t if self.slots is None else t.gather(1, self._index(t))

    def scatter(self, full, part):
        """full (B, S, ...) with the computed part (R, n, ...) written back."""
        if self.slots is not None:
            part = full[self.rows].scatter(1, self._index(part), part)
        return part if len(self.rows) == full.size(0) and self.slots is None else full.index_copy(0, self.rows, part)

    def context(self, ctx):
        sub = ctx if len(self.rows) == ctx.x0.size(0) else ctx.rows(self.rows)
        return sub if self.slots is None else sub.slots(self.slots)

    def narrow(self, keep, open_slots=None, mask=None):
        """The rows still running (keep (R,) bool); with open_slots (B, S) and a mask, only the slots
        that are open or that an open slot attends to."""
        rows = self.rows[keep]
        if open_slots is None or not torch.is_tensor(mask) or mask.dim() != 4 or not len(rows):
            return Active(rows)
        S, opened = open_slots.size(1), open_slots[rows]
        own = (mask if mask.size(0) == 1 else mask[rows])[:, 0, :, mask.size(-1) - S:]  # (R, S queries, S keys)
        needed = opened | (own & opened[..., None]).any(1)
        order = (~needed).int().sort(dim=1, stable=True).indices[:, :int(needed.sum(1).max())]
        return Active(rows, order)


@dataclass
class Layout:
    """A WFC training/evaluation layout: the future stream's context and start state, the target
    and distance of every slot, which slots are open (watched) and which keep their state."""
    ctx: Context
    targets: torch.Tensor  # (B, S) token each slot predicts, -1 for none
    dist: torch.Tensor     # (B, S) distance from the last visible past token, 1 = next token
    fresh: torch.Tensor    # (B, S) slots that did not exist one sampler step earlier (warm starts)
    watch: torch.Tensor    # (B, S) open future slots
    frozen: torch.Tensor   # (B, S) slots that keep their state (pins; the pinned past is not in the stream)
    self_targets: torch.Tensor = None  # bidirectional: (B, S) a past slot's own token (its past loss), -1 elsewhere
    source: torch.Tensor = None        # pinned: (B, S) the causal position whose next-token head predicts a slot's token


def training_layout(model, idx, targets, n_future, past_kv=None, phase=None, split=None, slots=None):
    """The future stream of a WFC step. Pinned: slot j (predicting token j + 1, at position j + 1)
    is in the block of n_future slots starting at s(j); slots = (indices, real) runs only those. Bidirectional:
    the past idx[:, :s + 1] at slots 0..s, future slots s + 1..s + n_future (slot i predicts token i), padding after."""
    (B, T), dev = idx.shape, idx.device
    if model.config.attn == 'pinned':
        start, j = block_starts(phase, T, n_future), torch.arange(T, device=dev).expand(B, T)
        real = torch.ones(B, T, dtype=torch.bool, device=dev)
        if slots is not None:
            j, real = slots
            start = start.gather(1, j)
        mask = visibility(start, start, j, torch.arange(T, device=dev), torch.where(real, start, -2), j,
                          model.config.spec_window)[:, None]  # padding slots are nobody's keys
        tg, dist = targets.gather(1, j).masked_fill(~real, -1), j - start + 1
        ctx = Context(model.fresh_slots(j + 1), j[0] + 1 if slots is None else j + 1, mask, past_kv)
        return Layout(ctx, tg, dist, dist == n_future, real & (tg >= 0), torch.zeros_like(real), source=j)
    i, s = torch.arange(T + n_future, device=dev), split[:, None]
    past, future = i <= s, (i > s) & (i <= s + n_future)
    mask = visibility((s + n_future).expand(B, T + n_future), None, None, i)[:, None]  # everything valid sees everything valid
    tokens = torch.cat((idx, idx.new_zeros(B, n_future)), 1)
    tg = torch.cat((targets.new_full((B, 1), -1), targets, targets.new_full((B, n_future - 1), -1)), 1).masked_fill(~future, -1)
    ctx = Context(torch.where(past[..., None], model.token_states(tokens, i), model.fresh_slots(i)), i, mask)
    return Layout(ctx, tg, (i - s).clamp(min=1), (i == s) | (i == s + n_future) | ~(past | future), future & (tg >= 0),
                  past & False, tokens.masked_fill(~past, -1))
