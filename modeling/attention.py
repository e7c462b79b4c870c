"""
Attention beyond nanoGPT's softmax over learned absolute positions: rotary positions (the state
carries no absolute position, so a window can roll past the block edge) and sparse attention
weights (alpha-entmax, fixed or adaptive per query). model.py's SelfAttention uses both.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): q and k rotate by their absolute position, so
    attention scores depend only on the offset. Tables are buffers, extended on demand (ensure);
    at(pos) gathers them for some positions (a Rotation, which rotates q and k)."""

    def __init__(self, head_size, n_positions, base):
        super().__init__()
        self.head_size, self.base = head_size, base
        self.ensure(n_positions)

    def ensure(self, n_positions, device=None):
        """Tables for positions 0..n_positions - 1 (a sampler past the block edge needs more)."""
        if hasattr(self, 'cos') and self.cos.size(0) >= n_positions:
            return
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_size, 2).float() / self.head_size))
        angles = torch.outer(torch.arange(n_positions).float(), inv_freq)  # (n_pos, hs / 2)
        # full-width tables: a rotation is x * cos + swap_halves(x) * sin, fewer kernels than rotating halves
        device = device or (self.cos.device if hasattr(self, 'cos') else None)
        self.register_buffer('cos', torch.cat((angles.cos(), angles.cos()), 1).to(device), persistent=False)
        self.register_buffer('sin', torch.cat((-angles.sin(), angles.sin()), 1).to(device), persistent=False)

    def at(self, pos):
        """The rotation of the positions pos (T,) or (B, T) long: its tables are gathered once and serve
        every layer of a stack call (q and k of each)."""
        cos, sin = self.cos[pos], self.sin[pos]
        if pos.dim() == 2:  # a position per row: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        return Rotation(cos, sin)


class Rotation:
    """Rotary tables gathered for some positions (Rotary.at); calling it rotates x (B, nh, T, hs)."""

    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin

    def __call__(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * self.sin.to(x.dtype)


def sparse_attention_weights(scores, attn_fn, alpha, alpha_gain=None, alpha_bias=None, visible=None):
    """Sparse attention rows (B, nh, Tq, Tk) of scores whose masked entries are already -inf-like.
    'entmax': alpha-entmax with a fixed alpha (Peters et al. 2019; 1 = softmax, 2 = sparsemax).
    'adaptive': alpha = 1 + sigmoid(gain_h (1 - h) + bias_h) per head h and query, h the entropy
    of the softmax row over its visible keys divided by its maximum: a sure (low-entropy) row gets
    sparser, an unsure one stays dense. gain and bias are learned."""
    import entmax  # only the sparse attentions need it
    if attn_fn == 'adaptive':
        p = torch.softmax(scores, -1)
        h = -(p * torch.log(p.clamp(min=1e-30))).sum(-1) / torch.log(visible.clamp(min=2))
        alpha = 1 + torch.sigmoid(alpha_gain[:, None] * (1 - h) + alpha_bias[:, None])
        return entmax.entmax_bisect(scores, alpha[..., None], dim=-1, n_iter=30)
    if alpha == 1:
        return torch.softmax(scores, -1)
    if alpha == 1.5:
        return entmax.entmax15(scores, dim=-1)
    return entmax.sparsemax(scores, dim=-1) if alpha == 2 else entmax.entmax_bisect(scores, alpha, dim=-1, n_iter=30)


def sparse_attention(q, k, v, mask, attn_fn, alpha, alpha_gain, alpha_bias, dropout):
    """Attention output (B, nh, Tq, hs) with entmax weights; mask None or bool (..., Tq, Tk)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # masked keys get exactly zero weight
    visible = mask.sum(-1).to(scores.dtype) if mask is not None else torch.tensor(float(k.size(2)), device=q.device)
    weights = sparse_attention_weights(scores, attn_fn, alpha, alpha_gain, alpha_bias, visible)
    return F.dropout(weights, dropout) @ v
