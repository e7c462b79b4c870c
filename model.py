"""
WFC-GPT: a "Wave Function Collapse" language model and its plain GPT baseline, in one file.

With n_future = 0 this is nanoGPT's causal decoder (learned positions, LayerNorm, GELU MLP,
tied lm_head, GPT-2 init); nanoGPT checkpoints load into it unchanged. Notable features:

- Weight-tied delta refinement: one stack of blocks is applied pass after pass, each pass adding
  a delta to the state (x <- x + step_size * delta(x)); n_loop > 1 with n_future = 0 is a
  "looped GPT" baseline. Optional input injection re-adds the decided embeddings every pass
  (Huginn, Geiping et al. 2025).
- Past / future segments: the window holds decided past tokens plus n_future future slots that
  start at e_max, the embedding of the uniform distribution (mean of the embedding rows).
  `attn='pinned'`: the past is a causal stream that never sees the future, so its keys/values
  are a fixed context the future slots iterate against (cacheable). `attn='bidirectional'`:
  every slot sees every slot and the past is re-contextualised by the future.
- Vectorised training (pinned): a clean stream and a future stream in one step with a block
  mask, so every token is a future target exactly once per sequence (as in block diffusion,
  Arriola et al. 2025). Random passes, truncated backprop, several supervised passes, random
  future pins and warm starts from a detached, shifted state: train as you sample.
- Inference as an iterative solver: `refine` runs passes until the future stops moving (or
  max_loop); `collapse` writes chosen slots (token row, nearest state, or partial), `shift`
  moves the decided prefix into the past and appends fresh e_max slots (warm start).
- The maps between spaces (DESIGN.md section 2): embed, decode, entropy, e_max.
- Rotary positions (recommended for WFC: the state carries no absolute position) or learned.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 256     # max past tokens in the window (training context length), >= 1
    vocab_size: int = 50304   # tokens in the vocabulary (GPT-2's 50257 padded to a multiple of 64)
    n_layer: int = 12         # blocks in the (weight-tied) stack
    n_head: int = 12          # attention heads; must divide n_embd
    n_embd: int = 768         # width of the state, C
    dropout: float = 0.0      # dropout probability in [0, 1); 0 for pretraining, 0.1+ to finetune
    bias: bool = True         # biases in Linear and LayerNorm layers (GPT-2: True)
    pos_emb: str = 'learned'  # 'learned' (absolute, nanoGPT) or 'rope' (rotary, recommended for WFC)
    rope_base: float = 10000.0  # rotary frequency base (only for pos_emb='rope')
    n_future: int = 0         # F, future slots; 0 = a plain causal GPT
    attn: str = 'pinned'      # WFC attention: 'pinned' (past causal, never sees the future) or 'bidirectional'
    spec_window: int = -1     # per attention layer, a future slot sees future slots up to this many ahead; -1 = all
    n_loop: int = 1           # passes of the stack in training (the max when loop_law is random), >= 1
    loop_law: str = 'fixed'   # future passes per training step: 'fixed' (= n_loop) or 'uniform' (1..n_loop)
    bptt: int = 0             # training passes that carry gradient (the last ones); 0 = all
    supervise: int = 1        # last training passes whose decoded output is supervised, 1..bptt
    max_loop: int = 1         # inference cap on refinement passes (WFC), >= 1
    min_loop: int = 1         # inference floor on refinement passes (WFC)
    tol: float = 1e-3         # converged when the largest KL(new || old) between successive decoded distributions of an open future slot < tol, nats
    step_size: float = 1.0    # scale of the delta each pass adds, in (0, 1]
    inject: bool = False      # re-add the decided slots' input embeddings to the stack input every pass
    dist_power: float = 0.0   # future loss weight of distance d is d ** -dist_power (0 = uniform, 1 = 1/d)
    past_loss: float = 0.0    # weight of the auxiliary loss on past slots (0 = off)
    past_target: str = 'next' # past slots predict the 'next' token (pinned only) or their own token ('self')
    pin_prob: float = 0.0     # training: probability that a future slot is pinned to its true token
    warm_prob: float = 0.0    # training: probability that a row starts from a detached shifted state
    future_frac: float = 1.0  # training (pinned): fraction of each row's future blocks that run, (0, 1]; fewer = cheaper steps
    slot_exit: bool = False   # inference: per-slot early exit, a slot whose own KL < tol keeps its state from then on (pinned: and stops being computed)

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.pos_emb not in ('learned', 'rope'):
            problems.append(f"pos_emb must be 'learned' or 'rope', got {self.pos_emb!r}")
        if self.pos_emb == 'rope' and (self.n_embd // self.n_head) % 2:
            problems.append("rope needs an even head size (n_embd / n_head)")
        if self.attn not in ('pinned', 'bidirectional'):
            problems.append(f"attn must be 'pinned' or 'bidirectional', got {self.attn!r}")
        if self.loop_law not in ('fixed', 'uniform'):
            problems.append(f"loop_law must be 'fixed' or 'uniform', got {self.loop_law!r}")
        if self.past_target not in ('next', 'self'):
            problems.append(f"past_target must be 'next' or 'self', got {self.past_target!r}")
        if self.past_target == 'next' and self.attn == 'bidirectional' and self.past_loss > 0:
            problems.append("past_target='next' leaks the answer in bidirectional attention; use 'self'")
        if min(self.n_loop, self.max_loop, self.block_size, self.supervise) < 1 or self.n_future < 0:
            problems.append("n_loop, max_loop, block_size and supervise must be >= 1, n_future >= 0")
        if not 0 < self.future_frac <= 1:
            problems.append(f"future_frac must be in (0, 1], got {self.future_frac}")
        if not 0 < self.step_size <= 1:
            problems.append(f"step_size must be in (0, 1], got {self.step_size}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def n_positions(self):
        # future slots sit after the past, so positions run up to block_size + n_future - 1
        return self.block_size + self.n_future


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotates q and k by their absolute position so
    attention scores depend only on the relative offset. The tables are buffers, not weights."""

    def __init__(self, head_size, n_positions, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2).float() / head_size))
        angles = torch.outer(torch.arange(n_positions).float(), inv_freq)  # (n_pos, hs/2)
        # full-width tables, so a rotation is x * cos + swap_halves(x) * sin: fewer kernels than
        # rotating the halves apart, and the same numbers bit for bit (-b * s == -(b * s) in IEEE)
        self.register_buffer('cos', torch.cat((angles.cos(), angles.cos()), 1), persistent=False)
        self.register_buffer('sin', torch.cat((-angles.sin(), angles.sin()), 1), persistent=False)

    def forward(self, x, pos):  # x (B, nh, T, hs), pos (T,) or (B, T) long
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        if pos.dim() == 2:  # a position per row: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * sin


class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, pos, mask, rotary=None, prefix=None, queries=None):
        """x (B, T, C) attends to `prefix` keys/values (a fixed context, e.g. the past) and to
        itself. mask: None (all visible), 'causal', or a bool tensor (..., T, T_prefix + T).
        queries (inference): outputs for the last `queries` positions only (0 = none), when the
        others are wanted only for their keys/values. Returns the output and this call's own
        (k, v), for caches."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = rotary(q, pos), rotary(k, pos)
        own = (k, v)
        if queries == 0:
            return x[:, :0], own
        if prefix is not None:
            k, v = torch.cat((prefix[0], k), dim=2), torch.cat((prefix[1], v), dim=2)
        if queries is not None and queries < T:
            q, S = q[:, :, T - queries:], k.size(2)
            if isinstance(mask, str):  # causal rows of the last queries positions (the last one sees every key)
                mask = None if queries == 1 else torch.ones(queries, S, dtype=torch.bool, device=x.device).tril(S - queries)
            elif mask is not None:
                mask = mask[..., T - queries:, :]
        causal = isinstance(mask, str)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, q.size(2), C)
        return self.resid_dropout(self.c_proj(y)), own


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pos, mask, rotary, prefix, queries=None):
        a, kv = self.attn(self.ln_1(x), pos, mask, rotary, prefix, queries)
        x = (x if queries is None else x[:, x.size(1) - queries:]) + a
        return x + self.mlp(self.ln_2(x)), kv


@dataclass
class Window:
    """What the WFC sampler carries from step to step (DESIGN.md section 5), for B rows.
    past: (B, P) decided token ids. future: (B, F, C) future slot states. decided: (B, F) token
    of a collapsed or pinned slot, -1 while open. past_x (bidirectional): (B, P, C) past states.
    cache (pinned): keys/values of the past, per pass and layer: list[list[(k, v)]]. pending
    (pinned, n_loop = 1): the last `pending` past tokens are not in the cache yet; the next
    refine computes them in its first pass, with the future (None cache: the whole past)."""
    past: torch.Tensor
    future: torch.Tensor
    decided: torch.Tensor
    past_x: torch.Tensor = None
    cache: list = None
    stats: dict = field(default_factory=dict)
    pending: int = 0

    def select(self, rows):
        """A new window made of the batch rows `rows` (1-D long tensor; repeats allowed): how SMC
        resamples particles that run as the rows of one batch, and how a branch copies a row."""
        pick = lambda t: None if t is None else t[rows]
        cache = None if self.cache is None else [
            None if layers is None else [(k[rows], v[rows]) for k, v in layers] for layers in self.cache]
        B = self.past.size(0)
        stats = {k: v[rows] if torch.is_tensor(v) and v.dim() and v.size(0) == B else v for k, v in self.stats.items()}
        return Window(past=self.past[rows], future=self.future[rows], decided=self.decided[rows],
                      past_x=pick(self.past_x), cache=cache, stats=stats, pending=self.pending)


class GPT(nn.Module):
    """forward(idx, targets) -> (logits, loss), nanoGPT's contract in every mode: logits[:, j]
    predicts targets[:, j] (= idx[:, j + 1] in nanoGPT's batches).
    - GPT / looped GPT (n_future = 0): causal, logits[:, j] sees idx[:, :j + 1].
    - WFC pinned: future slot j starts at e_max, sees the past idx[:, :s(j) + 1] (s(j): first slot
      of j's block of n_future slots, blocks at a random phase per row) and its block's slots;
      distance d = j - s(j) + 1. Every target is predicted once, at some distance.
    - WFC bidirectional: one split per row; returns (B, T + F, V) window logits, targets aligned.
    Keyword options (drawn at random per the config when None, explicit for eval and tests):
    phase (B,) block phase, split (B,) past end, pins (B, T) bool future slots pinned to their
    target, warm (B,) bool rows started from a detached shifted state, passes (int) future passes,
    n_future (int) block size override (curriculum), converge (bool) iterate to tol / max_loop
    instead of training passes. WFC calls also fill self.last with distances, per-slot losses and
    passes for the caller's statistics."""

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        )
        if config.pos_emb == 'learned':
            n_pos = config.block_size if config.n_future == 0 else config.n_positions
            modules['wpe'] = nn.Embedding(n_pos, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: embed and decode share W_e
        self.rotary = (Rotary(config.n_embd // config.n_head, config.n_positions, config.rope_base)
                       if config.pos_emb == 'rope' else None)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.last = {}

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position table is excluded by default (as nanoGPT does). The
        token table counts: it is also the output layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    # ---- the maps between spaces (DESIGN.md section 2) ----

    def e_max(self):
        """(C,) the max-entropy embedding: embed(uniform) = mean of the embedding rows, computed
        from the current weights so it tracks training. Without gradient it is kept until the
        weights change (the sampler needs it every step; a 50k vocabulary makes it costly)."""
        w = self.transformer.wte.weight
        if torch.is_grad_enabled():
            return w.mean(0)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if getattr(self, '_e_max', (None,))[0] != key:
            self._e_max = (key, w.mean(0))
        return self._e_max[1]

    def embed(self, p):
        """Probabilities (..., V) -> states (..., C): the soft embedding p @ W_e."""
        return p.to(self.transformer.wte.weight.dtype) @ self.transformer.wte.weight

    def logits(self, x):
        return self.lm_head(self.transformer.ln_f(x))

    def decode(self, x):
        """States (..., C) -> probabilities (..., V)."""
        return F.softmax(self.logits(x).float(), dim=-1)

    @staticmethod
    def entropy_of_logits(logits):
        logp = F.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def entropy(self, x):
        """States (..., C) -> entropy of the decoded distribution (...), in nats (max ln V)."""
        return self.entropy_of_logits(self.logits(x))

    def _input(self, idx, pos):
        """Token ids at positions -> initial states (+ learned position)."""
        x = self.transformer.wte(idx)
        return x + self.transformer.wpe(pos) if 'wpe' in self.transformer else x

    def _blank(self, pos):
        """Fresh future slots at positions pos (T,) -> (T, C): e_max (+ learned position)."""
        x = self.e_max().expand(*pos.shape, -1)
        return x + self.transformer.wpe(pos) if 'wpe' in self.transformer else x

    # ---- one pass of the weight-tied stack ----

    def _stack(self, x, pos, mask, prefixes=None, queries=None):
        """Apply every block once. prefixes: per layer (k, v) of a fixed context to attend to.
        queries: the last block outputs only the last `queries` positions (see SelfAttention).
        Returns the output state and each layer's own (k, v)."""
        kvs, last = [], len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, pos, mask, self.rotary, None if prefixes is None else prefixes[i],
                          queries if i == last else None)
            kvs.append(kv)
        return x, kvs

    def _step(self, x, out, frozen=None):
        """x <- x + step_size * delta; frozen slots (B, T) keep their state."""
        new = out if self.config.step_size == 1.0 else x + self.config.step_size * (out - x)
        return new if frozen is None else torch.where(frozen[..., None], x, new)

    def _causal_passes(self, x, pos, caches=None, queries=None):
        """The causal stream: GPT, and the past of pinned WFC; n_loop passes. With caches (one
        entry per pass: None, or per-layer (k, v)), x holds new tokens that attend to the cached
        ones, and every pass's entry is extended. queries (inference): the final states of the
        last `queries` positions only (1: the next-token logits; 0: only the caches are wanted);
        the last block of the last pass then computes just keys and values for the others.
        Returns the final states and the last pass's per-layer (k, v) (of all cached tokens when
        cached)."""
        c, x0, T = self.config, x, x.size(1)
        fresh = caches is None or caches[0] is None
        if fresh:
            mask = 'causal'
        else:
            P = caches[0][0][0].size(2)
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
        for p in range(c.n_loop):
            injected = c.inject and p > 0
            inp = x + x0 if injected else x
            last = queries if p == c.n_loop - 1 else None
            out, kvs = self._stack(inp, pos, mask, None if fresh else caches[p], last)
            if last is not None:
                x, inp = x[:, T - last:], inp[:, T - last:]
            x = out if not injected and c.step_size == 1 else x + c.step_size * (out - inp)
            if caches is not None:
                caches[p] = kvs if fresh else [(torch.cat((ck, k), 2), torch.cat((cv, v), 2))
                                               for (ck, cv), (k, v) in zip(caches[p], kvs)]
        return x, kvs if caches is None else caches[-1]

    def _iterate(self, x, one_pass, frozen, watch, passes=None, sup=None, limits=None, slot_exit=False, partial=None):
        """Future passes x <- x + step_size * delta(x); frozen slots keep their state.
        Training (passes given): gradient through the last bptt passes only (truncated backprop),
        sup(x) after each of the last `supervise` ones. Inference (passes None): no gradient, until
        the decoded distributions of the watched slots stop moving, max KL(new || old) < tol (after
        min_loop), or max_loop; limits = (max_loop, tol, min_loop) overrides the config. The test is
        on decoded distributions, not states: the final LayerNorm ignores the state's scale, which
        keeps growing along the residual stream. States are decoded only where a test needs them.
        slot_exit: a watched slot whose own KL < tol keeps its state from then on (per-slot early
        exit); partial(x, cols) -> the pass's output for columns cols (T',) only, so that columns
        frozen in every row stop being computed and decoded. Returns x, passes."""
        c = self.config
        if passes is None:
            max_loop, tol, min_loop = limits or (c.max_loop, c.tol, c.min_loop)
            decode = lambda x: F.log_softmax(self.logits(x).float(), -1)
            with torch.no_grad():
                stop, cols = frozen, None  # slots that keep their state; columns computed (None = all)
                logp = decode(x) if min_loop <= 1 < max_loop else None  # the test after pass 1 needs it
                for k in range(1, max_loop + 1):
                    if cols is None:
                        x = self._step(x, one_pass(x), stop)
                    else:
                        x = x.index_copy(1, cols, self._step(x[:, cols], partial(x, cols), stop[:, cols]))
                    if k == max_loop or k < min_loop - 1:  # no test after this pass or the next one
                        continue
                    new_logp = decode(x) if cols is None else logp.index_copy(1, cols, decode(x[:, cols]))
                    if k >= min_loop:
                        kl = (new_logp.exp() * (new_logp - logp)).sum(-1)
                        if not (kl * watch).amax() >= tol:
                            break
                        if slot_exit:
                            stop = stop | (watch & (kl < tol))
                            open_cols = ~stop.all(0)
                            if partial is not None and open_cols.any() and not open_cols.all():
                                cols = open_cols.nonzero()[:, 0]
                    logp = new_logp
            return x, k
        bptt = passes if c.bptt <= 0 else min(c.bptt, passes)
        for k in range(passes):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= passes - bptt):
                x = self._step(x, one_pass(x), frozen)
            if sup is not None and k >= passes - min(c.supervise, bptt):
                sup(x)
        return x, passes

    def _injection(self, x0, decided):
        """What input injection re-adds every pass: the input embeddings of decided slots."""
        return x0 * decided[..., None] if self.config.inject else None

    def _one_pass(self, pos, mask, prefix, inject):
        """One pass as a function of the state: the delta is computed on x (+ re-injected
        embeddings of decided slots) and added to x."""
        def one_pass(x):
            inp = x if inject is None else x + inject
            out = self._stack(inp, pos, mask, prefix)[0]
            return out if inject is None else x + (out - inp)
        return one_pass

    def _future_passes(self, w, pos, mask, inject):
        """The pinned future's passes for refine, against the past's keys/values in w.cache[-1].
        one_pass(x): every future slot. Its first call also runs the causal stream (n_loop = 1)
        on the window's pending past tokens, in the same stack call (they see the past, the
        future sees them), and extends the cache with their keys/values: a sampler step costs
        one call of the stack, not one for the moved tokens and one for the future.
        partial(x, cols): only the slots cols (T',), the others entering attention through their
        keys/values from the last pass that computed them (per-slot early exit).
        mask: None or (T, P + T) bool over the whole past. Returns (one_pass, partial)."""
        if w.cache is None:
            w.cache = [[None] * self.config.n_layer]
        layers, kv, n, F_ = w.cache[-1], {}, w.pending, pos.size(0)
        if n:
            dev, P0 = pos.device, w.past.size(1) - n
            pos_n = torch.arange(P0, P0 + n, device=dev)
            x_n = self._input(w.past[:, P0:], pos_n)  # (B, n, C): the causal stream's input
            ahead = torch.ones(F_, F_, dtype=torch.bool, device=dev) if mask is None else mask[:, -F_:]
            joint_mask = torch.cat((  # (n + F, P0 + n + F): pending rows are causal, future rows see all of the past
                torch.cat((torch.ones(n, P0 + n, dtype=torch.bool, device=dev).tril(P0),
                           torch.zeros(n, F_, dtype=torch.bool, device=dev)), 1),
                torch.cat((torch.ones(F_, P0 + n, dtype=torch.bool, device=dev), ahead), 1)), 0)

        def one_pass(x):
            nonlocal n
            inp = x if inject is None else x + inject
            if n:  # the last block computes only the future's outputs (the pending tokens' keys/values suffice)
                out, kvs = self._stack(torch.cat((x_n, inp), 1), torch.cat((pos_n, pos)), joint_mask, layers, F_)
                for i, (k, v) in enumerate(kvs):
                    new = (k[:, :, :n], v[:, :, :n])
                    layers[i] = new if layers[i] is None else (torch.cat((layers[i][0], new[0]), 2),
                                                                torch.cat((layers[i][1], new[1]), 2))
                kv['slots'] = [(k[:, :, n:], v[:, :, n:]) for k, v in kvs]
                n = w.pending = 0
            else:
                out, kv['slots'] = self._stack(inp, pos, mask, layers)
            return out if inject is None else x + (out - inp)

        def partial(x, cols):
            P = layers[0][0].size(2)
            shut = torch.ones(x.size(1), dtype=torch.bool, device=x.device).index_fill(0, cols, False).nonzero()[:, 0]
            prefixes = [(torch.cat((ck, k[:, :, shut]), 2), torch.cat((cv, v[:, :, shut]), 2))
                        for (ck, cv), (k, v) in zip(layers, kv['slots'])]
            sub_mask = None if mask is None else torch.cat((mask[cols, :P], mask[cols][:, P + shut], mask[cols][:, P + cols]), 1)
            x = x[:, cols]
            inp = x if inject is None else x + inject[:, cols]
            out, new = self._stack(inp, pos[cols], sub_mask, prefixes)
            kv['slots'] = [(k.index_copy(2, cols, nk), v.index_copy(2, cols, nv)) for (k, v), (nk, nv) in zip(kv['slots'], new)]
            return out if inject is None else x + (out - inp)
        return one_pass, partial

    # ---- training forward ----

    def forward(self, idx, targets=None, **wfc):
        if self.config.n_future == 0:
            if wfc:
                raise TypeError(f"GPT mode (n_future=0) takes no WFC options, got {sorted(wfc)}")
            return self._forward_gpt(idx, targets)
        if targets is None:
            raise ValueError("the WFC forward needs targets (it is the training/eval layout); "
                             "generate with start -> refine -> collapse -> shift")
        return self._forward_wfc(idx, targets, **wfc)

    def _forward_gpt(self, idx, targets):
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x, _ = self._causal_passes(self.transformer.drop(self._input(idx, pos)), pos)
        if targets is None:  # inference: only the last position's logits are needed
            return self.logits(x[:, [-1], :]), None
        logits = self.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _block_starts(self, phase, T, F_):
        """(B, T) first slot of each future slot's block: blocks start at 0 and at phase + k F_."""
        j, ph = torch.arange(T, device=phase.device), phase[:, None]
        return torch.where(j < ph, 0, ph + (j - ph).div(F_, rounding_mode='floor') * F_)

    def _keep_blocks(self, phase, T, F_, frac):
        """A random fraction of each row's blocks (at least one): (B, n) indices of the kept
        slots in order, padded to the longest row, and (B, n) bool of the real ones."""
        start = self._block_starts(phase, T, F_)
        block = torch.where(start == 0, 0, (start - phase[:, None]).div(F_, rounding_mode='floor') + 1)  # (B, T)
        n_blocks = block[:, -1] + 1
        draw = torch.rand(len(phase), T, device=phase.device).masked_fill(
            torch.arange(T, device=phase.device)[None] >= n_blocks[:, None], 2.0)  # only real blocks compete
        rank = draw.argsort(1).argsort(1)
        keep = rank.gather(1, block) < (frac * n_blocks).ceil().long()[:, None]
        order = (~keep).int().sort(dim=1, stable=True).indices[:, :int(keep.sum(1).max())]
        return order, keep.gather(1, order)

    def _pinned_layout(self, phase, past_kv, T, F_, slots=None, real=None):
        """The vectorised pinned layout. Future slot j (predicting token j + 1, at position j + 1)
        is in the block of F_ slots that starts at s(j). It sees the clean stream up to s(j) and
        its block's slots up to spec_window ahead. slots (B, n): run only these (default all T),
        real (B, n): which of them are not padding. fresh: the newest slot of each block."""
        j = torch.arange(T, device=phase.device)
        start = self._block_starts(phase, T, F_)
        if slots is not None:
            j, start = slots, start.gather(1, slots)
        jj = j if j.dim() == 2 else j[None]
        see_past = torch.arange(T, device=phase.device)[None, None, :] <= start[:, :, None]
        same_block = start[:, :, None] == start[:, None, :]
        if real is not None:
            same_block = same_block & real[:, None, :]
        if self.config.spec_window >= 0:
            same_block = same_block & (jj[:, None, :] <= jj[:, :, None] + self.config.spec_window)
        mask = torch.cat((see_past, same_block), dim=2)[:, None]  # (B, 1, n, T + n)
        dist, pos = j - start + 1, j + 1
        future = torch.ones_like(dist, dtype=torch.bool) if real is None else real
        x0 = self._blank(pos).expand(len(phase), start.size(1), -1)
        return dict(x0=x0, pos=pos, mask=mask, prefix=past_kv, dist=dist, fresh=dist == F_, future=future,
                    slots=slots, real=real)

    def _bidirectional_layout(self, idx, split, F_):
        """One window per row: the past idx[:, :s + 1] at slots 0..s, future slots s + 1..s + F_
        (slot i predicts targets[:, i - 1]), padding after. Everything valid sees everything
        valid. fresh: slot s (just decided, one step earlier) and slot s + F_ (just added)."""
        B, T = idx.shape
        W, dev = T + F_, idx.device
        i, s = torch.arange(W, device=dev), split[:, None]
        past, future = i <= s, (i > s) & (i <= s + F_)
        valid = past | future
        mask = ((valid[:, None, :] & valid[:, :, None]) | torch.eye(W, dtype=torch.bool, device=dev))[:, None]
        tokens = torch.cat((idx, idx.new_zeros(B, F_)), 1)
        x0 = torch.where(past[..., None], self._input(tokens, i), self._blank(i))
        return dict(x0=x0, pos=i, mask=mask, prefix=None, dist=(i - s).clamp(min=1), past=past, tokens=tokens,
                    fresh=(i == s) | (i == s + F_) | ~valid, future=future)

    def _forward_wfc(self, idx, targets, phase=None, split=None, pins=None, warm=None, passes=None,
                     n_future=None, converge=False):
        c, (B, T), dev = self.config, idx.shape, idx.device
        assert T <= c.block_size, f"sequence of {T} tokens > block_size {c.block_size}"
        F_ = n_future or c.n_future
        if passes is None and not converge:
            passes = c.n_loop if c.loop_law == 'fixed' else int(torch.randint(1, c.n_loop + 1, ()))
        if warm is None and self.training and c.warm_prob > 0:
            warm = torch.rand(B, device=dev) < c.warm_prob
        pinned = c.attn == 'pinned'
        if pinned:
            pos_c = torch.arange(T, device=dev)
            x_c, past_kv = self._causal_passes(self.transformer.drop(self._input(idx, pos_c)), pos_c)
            phase = torch.randint(0, F_, (B,), device=dev) if phase is None else phase
            slots = real = None
            if self.training and c.future_frac < 1:  # run a random subset of future blocks: a cheaper step
                slots, real = self._keep_blocks(phase, T, F_, c.future_frac)
            lay = self._pinned_layout(phase, past_kv, T, F_, slots, real)
            slot_targets = targets if slots is None else targets.gather(1, slots).masked_fill(~real, -1)
        else:
            split = torch.randint(0, T, (B,), device=dev) if split is None else split
            lay = self._bidirectional_layout(idx, split, F_)
            slot_targets = torch.cat((targets.new_full((B, 1), -1), targets, targets.new_full((B, F_ - 1), -1)), 1)
            slot_targets = slot_targets.masked_fill(~lay['future'], -1)
            warm = None if warm is None else warm & (split > 0)  # no earlier step at split 0
        x0, S = lay['x0'], slot_targets.size(1)
        if pins is None and self.training and c.pin_prob > 0:
            pins = torch.rand(B, S, device=dev) < c.pin_prob
        pins = torch.zeros(B, S, dtype=torch.bool, device=dev) if pins is None else pins & lay['future'] & (slot_targets >= 0)
        x0 = torch.where(pins[..., None], self._input(slot_targets.clamp(min=0), lay['pos']), x0)
        inject = self._injection(x0, pins if pinned else pins | lay['past'])
        one_pass = self._one_pass(lay['pos'], lay['mask'], lay['prefix'], inject)
        watch = lay['future'] & ~pins
        if warm is not None and warm.any():
            # train as you sample: start from the state one step earlier, refined for a random
            # number of passes without gradient, for every slot that existed then (DESIGN.md 4)
            with torch.no_grad():
                if pinned:
                    prev = self._pinned_layout((phase - 1) % F_, past_kv, T, F_, lay['slots'], lay['real'])
                else:
                    prev = self._bidirectional_layout(idx, (split - 1).clamp(min=0), F_)
                prev_inject = self._injection(prev['x0'], prev.get('past', torch.zeros_like(pins)))
                prev_pass = self._one_pass(prev['pos'], prev['mask'], prev['prefix'], prev_inject)
                x_prev, _ = self._iterate(prev['x0'], prev_pass, torch.zeros_like(pins), watch,
                                          int(torch.randint(1, c.n_loop + 1, ())))
            carry = warm[:, None] & ~lay['fresh'] & ~pins
            x0 = torch.where(carry[..., None], x_prev, x0)
        terms, out = [], {}

        def supervise(x):
            logits = self.logits(x)
            ce = F.cross_entropy(logits.transpose(1, 2).float(), slot_targets.clamp(min=0), reduction='none')
            w = lay['dist'].float().pow(-c.dist_power) * (watch & (slot_targets >= 0))
            terms.append((ce * w).sum() / w.sum().clamp(min=1e-8))
            out.update(logits=logits, ce=ce, x=x)

        # only pins are frozen: in bidirectional mode the past updates too (re-contextualised)
        x, used = self._iterate(x0, one_pass, pins, watch, None if converge else passes,
                                None if converge else supervise)
        if converge:
            supervise(x)
        loss = torch.stack(terms).mean()
        if c.past_loss > 0:
            if pinned:
                past_logits, past_targets = self.logits(x_c), (targets if c.past_target == 'next' else idx)
            else:  # past slots reproduce their own token (the seed: past outputs equal their inputs)
                past_logits, past_targets = self.logits(out['x']), lay['tokens'].masked_fill(~lay['past'], -1)
            loss = loss + c.past_loss * F.cross_entropy(past_logits.reshape(-1, past_logits.size(-1)),
                                                        past_targets.reshape(-1), ignore_index=-1)
        self.last = dict(dist=lay['dist'], ce=out['ce'].detach(), passes=used,
                         scored=watch & (slot_targets >= 0), targets=slot_targets)
        return out['logits'], loss

    # ---- generation: converge -> collapse -> shift (DESIGN.md section 5) ----

    def max_past(self, n_future=None):
        """Most past tokens a window holds: block_size (learned WFC positions: less, so the future
        slots stay on positions seen in training)."""
        c = self.config
        F_ = c.n_future if n_future is None else n_future
        return c.block_size if self.rotary is not None or F_ == 0 else c.block_size - F_ + 1

    @torch.no_grad()
    def cache_past(self, idx, cache=None, start=0, queries=None):
        """Run the causal stream on idx (B, n) at positions start.. and append its keys/values to
        cache (a new one when None: one entry per pass). Returns the cache and the final states
        (of the last `queries` tokens only when given: 1 for the next-token logits, 0 for none)."""
        cache = [None] * self.config.n_loop if cache is None else cache
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        x, _ = self._causal_passes(self._input(idx, pos), pos, cache, queries)
        return cache, x

    @torch.no_grad()
    def start(self, idx, n_future=None):
        """A window for the prompt idx (B, P): its last max_past tokens as the past, and F fresh
        e_max future slots."""
        F_ = n_future or self.config.n_future
        idx = idx[:, -self.max_past(F_):]
        B, P = idx.shape
        pos_f = torch.arange(P, P + F_, device=idx.device)
        w = Window(past=idx, future=self._blank(pos_f).expand(B, F_, -1).clone(),
                   decided=torch.full((B, F_), -1, dtype=torch.long, device=idx.device))
        if self.config.attn == 'pinned':
            w.cache, _ = self.cache_past(idx, queries=0)  # the future reads only the past's keys/values
        else:
            w.past_x = self._input(idx, torch.arange(P, device=idx.device))
        return w

    @torch.no_grad()
    def refine(self, w, max_loop=None, tol=None, min_loop=None, slot_exit=None):
        """Run passes from the window's current (warm) state until the open future slots
        converge or max_loop (slot_exit: each slot stops on its own, see GPTConfig; None = the
        config's). Returns w and the passes used; w.stats['entropy'] is (B, F), nats, and
        w.stats['logits'] (B, F, V) the future's logits."""
        c, (B, P), F_ = self.config, w.past.shape, w.future.size(1)
        dev = w.past.device
        decided = w.decided >= 0
        pos_f = torch.arange(P, P + F_, device=dev)
        limits = (max_loop or c.max_loop, c.tol if tol is None else tol, min_loop or c.min_loop)
        slot_exit = c.slot_exit if slot_exit is None else slot_exit
        inject_f = self._injection(self._input(w.decided.clamp(min=0), pos_f), decided) if c.inject else None
        if c.attn == 'pinned':
            mask = None
            if c.spec_window >= 0:
                j = torch.arange(F_, device=dev)
                mask = torch.cat((torch.ones(F_, P, dtype=torch.bool, device=dev),
                                  j[None, :] <= j[:, None] + c.spec_window), 1)
            one_pass, partial = self._future_passes(w, pos_f, mask, inject_f)
            w.future, used = self._iterate(w.future, one_pass, decided, ~decided, limits=limits,
                                           slot_exit=slot_exit, partial=partial if slot_exit else None)
        else:
            pos = torch.arange(P + F_, device=dev)
            inject = None if inject_f is None else torch.cat((self._input(w.past, pos[:P]), inject_f), 1)
            frozen = torch.cat((torch.zeros(B, P, dtype=torch.bool, device=dev), decided), 1)
            one_pass = self._one_pass(pos, None, None, inject)
            watch = torch.cat((torch.zeros(B, P, dtype=torch.bool, device=dev), ~decided), 1)
            x, used = self._iterate(torch.cat((w.past_x, w.future), 1), one_pass, frozen, watch, limits=limits,
                                    slot_exit=slot_exit)
            w.past_x, w.future = x[:, :P], x[:, P:]
        logits = self.logits(w.future)  # (B, F, V), kept for the sampler (one decode per step)
        w.stats = dict(passes=used, entropy=self.entropy_of_logits(logits), logits=logits)
        return w, used

    @torch.no_grad()
    def forget(self, w):
        """A cold start, the state training's one refinement starts from (for models not trained to
        warm-start): open future slots back to e_max and, in bidirectional mode, the past back to
        its token embeddings (refine adds a delta to the past's states too; carried over steps, they
        drift where training never took them)."""
        P, F_ = w.past.size(1), w.future.size(1)
        pos = torch.arange(P + F_, device=w.past.device)
        blank = self._blank(pos[P:])
        w.future = torch.where((w.decided < 0)[..., None], blank.to(w.future.dtype), w.future)
        if w.past_x is not None:
            w.past_x = self._input(w.past, pos[:P]).to(w.past_x.dtype)
        return w

    def future_logits(self, w):
        """(B, F, V) logits of the future slots."""
        return self.logits(w.future)

    @torch.no_grad()
    def collapse(self, w, slots, tokens, mode='token', eps=0.1, lam=0.5, decide=True):
        """Measure future slots (B, F) bool as tokens (B, F). mode 'token' writes the token's
        embedding row (as a GPT would); 'partial' moves lam of the way there; 'nearest' writes the
        closest state on the way from the current state to the row that decodes to the token with
        p >= 1 - eps (the seed's proposal: keep the nuance). decide=False leaves the slots open (a
        nudge, as the median policy does)."""
        P = w.past.size(1)
        rows = self._input(tokens.clamp(min=0), torch.arange(P, P + w.future.size(1), device=tokens.device))
        if mode == 'token':
            new = rows
        elif mode == 'partial':
            new = w.future + lam * (rows - w.future)
        elif mode == 'nearest':
            new = self._nearest(w.future, rows, tokens.clamp(min=0), eps)
        else:
            raise ValueError(f"collapse mode must be 'token', 'nearest' or 'partial', got {mode!r}")
        w.future = torch.where(slots[..., None], new.to(w.future.dtype), w.future)
        if decide:
            w.decided = torch.where(slots, tokens, w.decided)
        return w

    def _nearest(self, x, rows, tokens, eps, steps=20):
        """Bisection on the segment x -> row (extended along the ray when the row itself decodes
        with p < 1 - eps) for the smallest move that gives the token p >= 1 - eps."""
        def ok(lam):
            logp = F.log_softmax(self.logits(x + lam[..., None] * (rows - x)).float(), -1)
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

    def _rebase(self, x, old_pos, new_pos):
        """Move states from positions old_pos to new_pos: learned positions are part of the state."""
        if 'wpe' not in self.transformer:
            return x
        return x + self.transformer.wpe(new_pos) - self.transformer.wpe(old_pos)

    @torch.no_grad()
    def shift(self, w, slide=0):
        """Move the decided prefix (leading decided slots, as many as every row has) into the
        past and append fresh e_max slots. When the past outgrows max_past, drop its oldest
        tokens (slide more than needed to rebuild the cache less often). Returns w and the
        moved tokens (B, n)."""
        n = int((w.decided >= 0).long().cumprod(1).sum(1).min())
        if n == 0:
            return w, w.past[:, :0]
        (B, P), F_, dev = w.past.shape, w.future.size(1), w.past.device
        moved = w.decided[:, :n]
        past = torch.cat((w.past, moved), 1)
        drop = max(0, past.size(1) - self.max_past(F_))
        drop = min(past.size(1) - 1, drop + slide) if drop else 0
        carried, first = w.future[:, n:], P + n  # carried future slots keep their positions
        if drop:
            carried = self._rebase(carried, torch.arange(first, P + F_, device=dev),
                                   torch.arange(first - drop, P + F_ - drop, device=dev))
        if self.config.attn == 'pinned' and self.config.n_loop == 1:  # the next refine computes them (Window.pending)
            w.cache, w.pending = (None, past.size(1) - drop) if drop else (w.cache, w.pending + n)
        elif self.config.attn == 'pinned':  # the future reads only the past's keys/values (queries=0)
            if drop:
                w.cache, _ = self.cache_past(past[:, drop:], queries=0)
            else:
                self.cache_past(moved, w.cache, start=P, queries=0)
        else:
            past_x = torch.cat((w.past_x, w.future[:, :n]), 1)
            if drop:
                past_x = self._rebase(past_x[:, drop:], torch.arange(drop, P + n, device=dev),
                                      torch.arange(P + n - drop, device=dev))
            w.past_x = past_x
        w.past = past[:, drop:]
        P2 = w.past.size(1)
        new_pos = torch.arange(P2 + F_ - n, P2 + F_, device=dev)
        w.future = torch.cat((carried, self._blank(new_pos).expand(B, n, -1)), 1)
        w.decided = torch.cat((w.decided[:, n:], w.decided.new_full((B, n), -1)), 1)
        return w, moved

    # ---- cost ----

    def flops_per_iter(self, B, T, passes=None):
        """Matmul FLOPs of one training forward + backward on B rows of T tokens (PaLM appendix B,
        as nanoGPT counts them), counting what WFC really computes: every pass, both streams of
        the pinned layout, dense attention over all keys, decodes of supervised passes, warm-start
        passes (expected). Passes without gradient count forward only."""
        c = self.config
        V, C, L = c.vocab_size, c.n_embd, c.n_layer
        stack = 2 * (self.get_num_params() - V * C)  # forward FLOPs per token per pass (dense part)
        attn = lambda keys: 4 * L * C * keys         # QK^T and AV, forward, per query token
        decode = 2 * V * C
        if c.n_future == 0:
            return 3 * B * T * (c.n_loop * (stack + attn(T)) + decode)
        passes = passes or (c.n_loop if c.loop_law == 'fixed' else (c.n_loop + 1) / 2)
        bptt = passes if c.bptt <= 0 else min(c.bptt, passes)
        S, keys = (T * c.future_frac, T * (1 + c.future_frac)) if c.attn == 'pinned' else (T + c.n_future, T + c.n_future)
        per_pass = stack + attn(keys)
        future = 3 * bptt * per_pass + (passes - bptt) * per_pass + 3 * min(c.supervise, bptt) * decode
        future += c.warm_prob * (c.n_loop + 1) / 2 * per_pass
        total = S * future
        if c.attn == 'pinned':
            total += 3 * T * (c.n_loop * (stack + attn(T)) + (decode if c.past_loss > 0 else 0))
        return B * total
