"""
WFC-GPT: a "Wave Function Collapse" language model and its GPT baseline, in one file.

With n_future = 0 and the default recurrence this is nanoGPT's causal decoder (learned positions,
LayerNorm, GELU MLP, tied lm_head, GPT-2 init); nanoGPT checkpoints load into it unchanged.

- Weight-tied delta refinement. One stack of blocks is applied pass after pass, each pass adding a
  delta to the state. How a pass updates the state is one function, `GPT.update`, used by every
  stream: optional re-injection of each slot's input (added, or Huginn's adapter on [state, input];
  Geiping et al. 2025), a step size, a learned decay a < 1 (Parcae) and a bound on the state
  (rescaled to the embeddings' RMS, or a learned norm): what a recurrence needs to have a fixed
  point. n_loop > 1 with n_future = 0 is a "looped GPT" baseline.
- Past and future. The window holds decided past tokens and n_future future slots that start at
  e_max, the embedding of the uniform distribution (the mean embedding row). 'pinned': the past is
  a causal stream that never sees the future, so its keys/values are a fixed context the future
  iterates against (and a cache); 'bidirectional': every slot sees every slot. Who may see whom is
  one rule (layout.visibility), used by training, evaluation and sampling alike.
- Training: the vectorised layouts of layout.py, random depth per step (fixed, uniform or
  Poisson-lognormal), truncated backprop, supervision of the last passes, random pins and warm
  starts from a detached state of one sampler step earlier (train as you sample).
- Inference is an iterative solver: `iterate` runs passes until every open slot has converged
  (KL between successive decoded distributions, or the relative step) or max_loop; a row stops
  when its slots have, and with slot_exit a converged slot keeps its state while others go on.
  The sampler's windows and caches live in engine.py.
- Attention weights: softmax (fused SDPA) or sparse alpha-entmax. Maps: embed, decode, entropy, e_max.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from layout import Active, Context, keep_blocks, training_layout, visibility

CHOICES = dict(pos_emb=('learned', 'rope'), attn=('pinned', 'bidirectional'), attn_fn=('softmax', 'entmax', 'adaptive'),
               inject=('none', 'add', 'adapter', 'contract'), bound=('none', 'rms', 'norm'), loop_law=('fixed', 'uniform', 'poisson'),
               past_target=('next', 'self'), depth_per=('step', 'row'), exit_rule=('kl', 'delta', 'entropy', 'accel'))


@dataclass
class GPTConfig:
    block_size: int = 256     # most past tokens in the window (the training context length), >= 1
    vocab_size: int = 50304   # tokens in the vocabulary (GPT-2's 50257 padded to a multiple of 64)
    n_layer: int = 12         # blocks in the stack: n_prelude + the looped core + n_coda
    n_prelude: int = 0        # sandwich: first blocks, run once per slot before the looped core (Huginn, Parcae); 0 = none
    n_coda: int = 0           # sandwich: last blocks, run once after the core to decode a slot; 0 = none
    n_head: int = 12          # attention heads; must divide n_embd
    n_embd: int = 768         # width of the state, C
    dropout: float = 0.0      # dropout probability in [0, 1); 0 for pretraining
    bias: bool = True         # biases in Linear and LayerNorm layers (GPT-2: True)
    pos_emb: str = 'learned'  # 'learned' (absolute, nanoGPT) or 'rope' (rotary: the state carries no absolute position)
    rope_base: float = 10000.0  # rotary frequency base (pos_emb='rope')
    attn_fn: str = 'softmax'  # attention weights: 'softmax', 'entmax' (alpha = entmax_alpha), 'adaptive' (alpha in (1, 2) per head and query from the row's entropy, learned)
    entmax_alpha: float = 1.5  # attn_fn='entmax': 1 = softmax, 1.5 = entmax15, 2 = sparsemax; in [1, 2]
    n_future: int = 0         # F, future slots; 0 = a plain causal GPT
    attn: str = 'pinned'      # WFC: 'pinned' (the past is causal and never sees the future) or 'bidirectional'
    spec_window: int = -1     # a future slot sees future slots up to this many ahead; -1 = all
    future_frac: float = 1.0  # training (pinned): fraction of each row's future blocks that run, (0, 1]; fewer = cheaper steps
    n_loop: int = 1           # passes of the causal stream (GPT, the pinned past); > 1 with n_future = 0 is a looped GPT
    inject: str = 'none'      # every pass re-adds each slot's input: 'none', 'add' (x + x0), 'adapter' (Linear on [x, x0], Huginn)
                              # or 'contract' (a x + (1 - a) x0, a in (0, 1) learned per channel: contractive in x, Parcae)
    step_size: float = 1.0    # scale of the delta a pass adds, in (0, 1]
    decay: float = 0.0        # > 0: a learned per-channel decay a in (0, 1) starting here, x <- a x + delta (Parcae); 0 = off
    bound: str = 'none'       # after every pass: 'none', 'rms' (each slot rescaled to the embeddings' RMS) or 'norm' (a learned LayerNorm)
    train_depth: int = 0      # WFC future passes per training step: the value ('fixed'), the max ('uniform'), the mean ('poisson'); 0 = n_loop
    loop_law: str = 'fixed'   # how the depth is drawn per step: 'fixed', 'uniform' (1..train_depth), 'poisson' (Poisson-lognormal, <= 3 x mean)
    depth_per: str = 'step'   # one depth drawn per training 'step', or per 'row' (each sequence its own, Parcae)
    bptt: int = 0             # last training passes that carry gradient (truncated backprop); 0 = all
    supervise: int = 1        # last training passes whose decoded output is supervised, 1..bptt
    consistency: float = 0.0  # weight of KL(last pass || pass k) for every earlier pass k that carries gradient (CLLM); 0 = off
    dist_power: float = 0.0   # future loss weight of distance d is d ** -dist_power (0 = uniform, 1 = 1/d)
    past_loss: float = 0.0    # weight of the auxiliary loss on the past stream (0 = off)
    past_target: str = 'next' # past slots predict the 'next' token (pinned only) or their own token ('self')
    pin_prob: float = 0.0     # training: probability that a future slot is pinned to its true token
    warm_prob: float = 0.0    # training: probability that a row starts from a detached state of one step earlier
    max_loop: int = 1         # inference cap on refinement passes (WFC), >= 1
    min_loop: int = 1         # inference floor on refinement passes (WFC)
    tol: float = 1e-3         # a slot has converged when its exit_rule measure falls below tol (< 0: never, run max_loop)
    exit_rule: str = 'kl'     # 'kl': KL(new || old) of the decoded slot, nats; 'delta': ||x_new - x_old|| / ||x_old||;
                              # 'entropy': |H_new - H_old| of the decoded slot, nats; 'accel': ||step_new - step_old|| / ||x_new||
    slot_exit: bool = False   # inference: a converged slot keeps its state while others go on (else a row stops when all have)

    def __post_init__(self):
        problems = config_problems(self)
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @property
    def n_positions(self):  # future slots sit after the past: positions run up to block_size + n_future - 1
        return self.block_size + self.n_future

    @property
    def depth(self):  # the future's training depth (see train_depth)
        return self.train_depth or self.n_loop


def config_problems(c):
    """Every way a GPTConfig can be wrong, as sentences."""
    problems = [f"{k} must be one of {v}, got {getattr(c, k)!r}" for k, v in CHOICES.items() if getattr(c, k) not in v]
    if c.n_embd % c.n_head:
        problems.append(f"n_head={c.n_head} must divide n_embd={c.n_embd}")
    if c.pos_emb == 'rope' and (c.n_embd // max(c.n_head, 1)) % 2:
        problems.append("rope needs an even head size (n_embd / n_head)")
    if c.past_target == 'next' and c.attn == 'bidirectional' and c.past_loss > 0:
        problems.append("past_target='next' leaks the answer in bidirectional attention; use 'self'")
    if min(c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_loop, c.max_loop, c.block_size, c.supervise, c.min_loop) < 1:
        problems.append("n_layer, n_head, n_embd, vocab_size, n_loop, max_loop, min_loop, block_size and supervise must be >= 1")
    if min(c.n_future, c.train_depth, c.bptt, c.n_prelude, c.n_coda, c.consistency) < 0 or c.spec_window < -1:
        problems.append("n_future, train_depth, bptt, n_prelude, n_coda and consistency must be >= 0, spec_window >= -1")
    if c.n_prelude + c.n_coda >= c.n_layer:
        problems.append(f"n_prelude + n_coda = {c.n_prelude + c.n_coda} leaves no looped core in n_layer = {c.n_layer}")
    for name, low, high in (('future_frac', 0, 1), ('step_size', 0, 1)):
        if not low < getattr(c, name) <= high:
            problems.append(f"{name} must be in ({low}, {high}], got {getattr(c, name)}")
    if not 0 <= c.decay < 1 or not 0 <= c.dropout < 1 or not 1 <= c.entmax_alpha <= 2:
        problems.append(f"need 0 <= decay < 1, 0 <= dropout < 1, 1 <= entmax_alpha <= 2 (got {c.decay}, {c.dropout}, {c.entmax_alpha})")
    if not (0 <= c.pin_prob <= 1 and 0 <= c.warm_prob <= 1) or c.dist_power < 0 or c.past_loss < 0:
        problems.append("pin_prob and warm_prob must be in [0, 1], dist_power and past_loss >= 0")
    if not all(math.isfinite(v) for v in (c.tol, c.rope_base, c.dist_power, c.past_loss, c.consistency)):
        problems.append("tol, rope_base, dist_power, past_loss and consistency must be finite")
    return problems


def capabilities(c):
    """What a model trained with config c can do at inference (train.py stores it in checkpoints).
    can_verify: its causal stream's next-token head was trained (pinned, past_loss > 0, past_target
    'next'), so it verifies drafts and samples alone. warm_starts: it was trained to continue from a
    carried state (warm_prob > 0) or to converge (a bounded state)."""
    return dict(can_verify=c.attn == 'pinned' and c.past_loss > 0 and c.past_target == 'next',
                warm_starts=c.warm_prob > 0 or c.bound != 'none')


@dataclass
class Trace:
    """What an inference run of the recurrence did: passes each slot moved (B, S), row-passes
    computed, passes run, the mean state norm of the watched slots after each pass, and the states
    after the passes asked for in `record`."""
    passes: torch.Tensor
    calls: int = 0
    steps: int = 0
    norms: list = field(default_factory=list)
    states: dict = field(default_factory=dict)


@dataclass
class Scored:
    """The WFC forward's result (GPT.score): final logits (B, S, V) and loss, per-slot
    cross-entropy ce (B, S) of the final state (and ce_at {passes: (B, S)} for recorded depths),
    the layout's dist and targets, scored (B, S) slots that carry a loss, and the trace."""
    logits: torch.Tensor
    loss: torch.Tensor
    ce: torch.Tensor
    dist: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor
    trace: Trace
    ce_at: dict = field(default_factory=dict)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): q and k rotate by their absolute position, so
    attention scores depend only on the offset. Tables are buffers, extended on demand (ensure)."""

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

    def forward(self, x, pos):  # x (B, nh, T, hs), pos (T,) or (B, T) long
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        if pos.dim() == 2:  # a position per row: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * sin


def attention_weights(scores, attn_fn, alpha, alpha_gain=None, alpha_bias=None, visible=None):
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


class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.attn_fn, self.alpha = config.n_head, config.dropout, config.attn_fn, config.entmax_alpha
        if config.attn_fn == 'adaptive':  # starts near alpha 1.5 for a row of medium entropy
            self.alpha_gain, self.alpha_bias = nn.Parameter(torch.full((config.n_head,), 2.0)), nn.Parameter(torch.full((config.n_head,), -1.0))

    def forward(self, x, pos, mask, rotary=None, prefix=None, queries=None):
        """x (B, T, C) attends to the `prefix` keys/values (a fixed context such as the past) and to
        itself. mask: None (all visible), 'causal', or bool (..., T, T_prefix + T). queries
        (inference): outputs for the last `queries` positions only (0 = none), when the others are
        wanted only for their keys/values. Returns the output and this call's own (k, v)."""
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
        S, cut = k.size(2), queries is not None and queries < T
        if isinstance(mask, str) and (cut or S != T or self.attn_fn != 'softmax'):
            # the causal rule as a tensor (row t sees keys up to S - T + t); the last row sees every key
            mask = None if queries == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        if cut:
            q, mask = q[:, :, T - queries:], None if mask is None else mask[..., T - queries:, :]
        dropout = self.dropout if self.training else 0.0
        if self.attn_fn == 'softmax':
            causal = isinstance(mask, str)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal, dropout_p=dropout)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # masked keys get exactly zero weight
            visible = mask.sum(-1).to(scores.dtype) if mask is not None else torch.tensor(float(S), device=x.device)
            weights = attention_weights(scores, self.attn_fn, self.alpha, getattr(self, 'alpha_gain', None),
                                        getattr(self, 'alpha_bias', None), visible)
            y = F.dropout(weights, dropout) @ v
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


class GPT(nn.Module):
    """forward(idx, targets) -> (logits, loss), nanoGPT's contract in every mode: logits[:, j]
    predicts targets[:, j] (= idx[:, j + 1] in nanoGPT's batches).
    - GPT / looped GPT (n_future = 0): causal, logits[:, j] sees idx[:, :j + 1].
    - WFC pinned: future slot j starts at e_max and sees the past idx[:, :s(j) + 1] (s(j): first slot
      of j's block of n_future slots, blocks at a random phase per row) and its block's slots;
      distance d = j - s(j) + 1. Every target is predicted once, at some distance.
    - WFC bidirectional: one split per row; (B, T + F, V) window logits, targets aligned.
    `score` is the WFC forward with its options and its whole result (per-slot losses, passes);
    generation-time state (windows, caches, collapse, shift) lives in engine.py."""

    def __init__(self, config):
        super().__init__()
        self.config, C = config, config.n_embd
        self.capabilities = capabilities(config)  # what the samplers may ask of it (see capabilities)
        modules = dict(wte=nn.Embedding(config.vocab_size, C), drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]), ln_f=LayerNorm(C, bias=config.bias))
        if config.pos_emb == 'learned':
            modules['wpe'] = nn.Embedding(config.block_size if config.n_future == 0 else config.n_positions, C)
        if config.inject == 'adapter':
            modules['adapter'] = nn.Linear(2 * C, C, bias=config.bias)
        if config.bound == 'norm':
            modules['ln_state'] = LayerNorm(C, bias=config.bias)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: embed and decode share W_e
        self.rotary = Rotary(C // config.n_head, config.n_positions, config.rope_base) if config.pos_emb == 'rope' else None
        if config.decay:  # a = sigmoid(decay_logit) lies in (0, 1) by construction
            self.decay_logit = nn.Parameter(torch.full((C,), math.log(config.decay / (1 - config.decay))))
        if config.inject == 'contract':  # a = sigmoid(inject_logit) in (0, 1), starting at 1/2
            self.inject_logit = nn.Parameter(torch.zeros(C))
        # the sandwich: the prelude and coda run once per slot, the core is the looped part
        self.prelude = range(config.n_prelude)
        self.core = range(config.n_prelude, config.n_layer - config.n_coda)
        self.coda = range(config.n_layer - config.n_coda, config.n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.inject == 'adapter':  # starts as inject='add' (x + x0) and learns from there
            with torch.no_grad():
                self.transformer.adapter.weight.copy_(torch.cat((torch.eye(C), torch.eye(C)), 1))

    @property
    def can_verify(self):  # the causal stream can verify drafts (see capabilities)
        return self.capabilities['can_verify']

    @property
    def warm_starts(self):  # refinement may continue from a carried state (see capabilities)
        return self.capabilities['warm_starts']

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameters; the position table is excluded by default (as nanoGPT does). The token table
        counts: it is also the output layer."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and 'wpe' in self.transformer else n

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices only (the tied embedding is one and decays, as in nanoGPT); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')

    def flops_per_iter(self, B, T, passes=None):
        from runtime import training_flops  # FLOPs accounting lives with the MFU arithmetic
        return training_flops(self.config, self.get_num_params(), B, T, passes)

    # ---- the maps between spaces ----

    def e_max(self):
        """(C,) the max-entropy embedding: embed(uniform) = mean of the embedding rows, from the current
        weights. Without gradient it is kept until the weights change (the sampler needs it every step)."""
        w = self.transformer.wte.weight
        if torch.is_grad_enabled():
            return w.mean(0)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if getattr(self, '_e_max', (None,))[0] != key:
            self._e_max = (key, w.mean(0))
        return self._e_max[1]

    def embedding_rms(self):
        """The RMS of the token embeddings: the scale the 'rms' bound holds every state at."""
        return self.transformer.wte.weight.detach().pow(2).mean().sqrt()

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
        """States (..., C) -> entropy of the decoded distribution (...), in nats (at most ln V)."""
        return self.entropy_of_logits(self.logits(x))

    def input(self, idx, pos):
        """Token ids at positions -> their states before the first pass (+ learned position)."""
        x = self.transformer.wte(idx)
        return x + self.transformer.wpe(pos) if 'wpe' in self.transformer else x

    def blank(self, pos):
        """Fresh future slots at positions pos (...) -> (..., C): e_max (+ learned position)."""
        x = self.e_max().expand(*pos.shape, -1)
        return x + self.transformer.wpe(pos) if 'wpe' in self.transformer else x

    # ---- passes of the weight-tied stack ----

    def stack(self, x, pos, mask, prefixes=None, queries=None, layers=None):
        """The blocks in `layers` (a range; default every block) once each. prefixes: per layer of the
        whole stack the (k, v) of a fixed context to attend to. queries: the last block outputs the
        last `queries` positions only. Returns the output and each run layer's (k, v)."""
        layers = range(len(self.transformer.h)) if layers is None else layers
        kvs = []
        for i in layers:
            x, kv = self.transformer.h[i](x, pos, mask, self.rotary, None if prefixes is None else prefixes[i],
                                          queries if i == layers[-1] else None)
            kvs.append(kv)
        return x, kvs

    def sandwiched(self):
        return len(self.core) < len(self.transformer.h)

    def prelude_of(self, x, ctx):
        """A stream's input through the prelude blocks (identity without a prelude): the core's x0."""
        return self.stack(x, ctx.pos, ctx.mask, ctx.prefixes, layers=self.prelude)[0] if len(self.prelude) else x

    def readout(self, x, ctx):
        """Logits (..., V) of core states: through the coda blocks (attending as the stream does), then
        the tied head. Without a coda this is `logits`."""
        if len(self.coda):
            x = self.stack(x, ctx.pos, ctx.mask, ctx.prefixes, layers=self.coda)[0]
        return self.logits(x)

    def update(self, x, ctx, frozen=None, queries=None):
        """One pass of the recurrence, the rule of every stream: inp = x, x + x0 or adapter([x, x0]);
        out = stack(inp); x <- a * x + step_size * (out - inp), then the bound. frozen (B, S) slots keep
        their state. Returns the new state (its last `queries` slots when given) and the layers' (k, v)."""
        c = self.config
        if c.inject == 'contract':
            a = torch.sigmoid(self.inject_logit)
            inp = a * x + (1 - a) * ctx.x0
        else:
            inp = x if c.inject == 'none' else x + ctx.x0 if c.inject == 'add' else self.transformer.adapter(torch.cat((x, ctx.x0), -1))
        out, kvs = self.stack(inp, ctx.pos, ctx.mask, ctx.prefixes, queries, layers=self.core)
        if queries is not None:
            x, inp = x[:, x.size(1) - queries:], inp[:, inp.size(1) - queries:]
            frozen = None if frozen is None else frozen[:, frozen.size(1) - queries:]
        if c.inject == 'none' and c.step_size == 1 and not c.decay:
            new = out  # the plain stack: nanoGPT's forward, bit for bit
        else:
            new = (torch.sigmoid(self.decay_logit) * x if c.decay else x) + c.step_size * (out - inp)
        if c.bound == 'rms':
            new = new * (self.embedding_rms() * torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + 1e-12))
        elif c.bound == 'norm':
            new = self.transformer.ln_state(new)
        return (new if frozen is None else torch.where(frozen[..., None], x, new)), kvs

    def compile_passes(self):
        """torch.compile one pass of the recurrence (update) instead of the whole forward: a WFC step
        draws its depth at random and switches gradients off for the passes before the truncation,
        which a whole-forward graph would have to re-trace for every depth (dynamo refused it). One
        pass is the same graph at every depth: a few graphs in all (string or boolean mask, gradient
        on or off, input requiring grad or not), none per depth."""
        self.update = torch.compile(self.update)
        return self

    def once_through(self, x, ctx, n_loop=1, queries=None):
        """A stream through the whole sandwich: the prelude once (its output becomes ctx.x0, what the
        core re-injects), the core n_loop times, the coda once. Returns the core's state, the coda's
        output (the state to decode: the core's state when there is no coda) and every layer's (k, v)
        (the core's from its last pass). queries: the last block outputs the last `queries` slots only.
        Without a prelude and coda this is n_loop passes of `update`."""
        kvs_prelude, kvs_coda = [], []
        if len(self.prelude):
            x, kvs_prelude = self.stack(x, ctx.pos, ctx.mask, ctx.prefixes, layers=self.prelude)
        ctx.x0 = x
        for p in range(n_loop):
            x, kvs = self.update(x, ctx, queries=queries if p == n_loop - 1 and not len(self.coda) else None)
        out = x
        if len(self.coda):
            out, kvs_coda = self.stack(x, ctx.pos, ctx.mask, ctx.prefixes, queries, layers=self.coda)
        return x, out, kvs_prelude + kvs + kvs_coda

    def causal(self, x, pos, past=None, queries=None, window=0):
        """The causal stream (GPT, and the past of pinned WFC): n_loop passes over x (B, T, C) at
        positions pos (T,). past (inference with a cache): per pass, the per-layer (k, v) of the
        tokens just before these, which they all see (window > 0: those within `window` positions).
        Returns the final states (of the last `queries` tokens when given) and per pass the per-layer
        (k, v) of these tokens."""
        mask = 'causal'
        if past is not None:
            P = past[0][0][0].size(2)
            keys = torch.arange(int(pos[0]) - P, int(pos[0]) + x.size(1), device=pos.device)
            mask = None if x.size(1) == 1 and (window <= 0 or P < window) else visibility(pos, None, None, keys, window=window)
        ctx, new, n_loop = Context(x, pos, mask), [], self.config.n_loop
        if self.sandwiched():  # prelude once, the core n_loop times, coda once: one cache entry of every layer
            if past is not None and n_loop > 1:
                raise NotImplementedError("a key/value cache of a sandwich looped more than once is not built")
            ctx.prefixes = None if past is None else past[0]
            _, x, kvs = self.once_through(x, ctx, n_loop, queries)
            return x, [kvs]
        for p in range(n_loop):
            ctx.prefixes = None if past is None else past[p]
            x, kvs = self.update(x, ctx, queries=queries if p == n_loop - 1 else None)
            new.append(kvs)
        return x, new

    def draw_depth(self, rows=1):
        """Future passes of one training step per loop_law, from torch's RNG (seeded per micro-step):
        an int, or with depth_per='row' a (rows,) long tensor, a depth per sequence."""
        c, n = self.config, self.config.depth
        if c.n_future == 0 or c.loop_law == 'fixed':
            return n
        shape = (rows,) if c.depth_per == 'row' else ()
        if c.loop_law == 'uniform':
            depth = torch.randint(1, n + 1, shape)
        else:  # Poisson-lognormal (Huginn): a log-normal rate around the mean, then a Poisson count
            rate = torch.exp(torch.randn(shape) * 0.5 + math.log(max(n - 1, 1e-3)) - 0.125)
            depth = (1 + torch.poisson(rate)).clamp(max=3 * n).long()
        return depth if c.depth_per == 'row' else int(depth)

    def unroll(self, x, ctx, frozen, depth):
        """Training passes: gradient through the last bptt only (truncated backprop). depth: an int, or
        (B,) passes per row (a row of depth d waits out the first max - d passes, so every row's last
        passes line up with the truncation and supervision windows). Returns the states after the
        last `supervise` passes (with consistency: after every pass with gradient)."""
        c = self.config
        passes = int(depth.max()) if torch.is_tensor(depth) else depth
        bptt = passes if c.bptt <= 0 else min(c.bptt, passes)
        keep = bptt if c.consistency > 0 else min(c.supervise, bptt)
        states = []
        for k in range(passes):
            waiting = frozen if not torch.is_tensor(depth) else frozen | (k < passes - depth.to(x.device))[:, None]
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= passes - bptt):
                x = self.update(x, ctx, waiting)[0]
            if k >= passes - keep:
                states.append(x)
        return states

    def _exit_ref(self, x, ctx, ref=None):
        """What the exit test compares between passes, per slot: the decoded log-probabilities ('kl'),
        the decoded entropy ('entropy'), the state ('delta'), or the state and the step that reached
        it from the state in ref ('accel': the second-order step size, arXiv 2509.23314)."""
        rule = self.config.exit_rule
        if rule in ('kl', 'entropy'):
            logits = self.readout(x, ctx)
            return F.log_softmax(logits.float(), -1) if rule == 'kl' else self.entropy_of_logits(logits)[..., None]
        if rule == 'delta':
            return x.float()
        step = torch.zeros_like(x, dtype=torch.float) if ref is None else x.float() - ref[..., :x.size(-1)]
        return torch.cat((x.float(), step), -1)

    def _change(self, old, new):
        """The exit measure (B, S) between two exit references (see _exit_ref)."""
        rule = self.config.exit_rule
        if rule == 'kl':
            return (new.exp() * (new - old)).sum(-1)
        if rule == 'entropy':
            return (new - old).abs()[..., 0]
        if rule == 'delta':
            return (new - old).norm(dim=-1) / old.norm(dim=-1).clamp(min=1e-12)
        C = new.size(-1) // 2
        return (new[..., C:] - old[..., C:]).norm(dim=-1) / new[..., :C].norm(dim=-1).clamp(min=1e-12)

    @torch.no_grad()
    def iterate(self, x, ctx, frozen, watch, max_loop=None, tol=None, min_loop=None, slot_exit=None, record=(), first=None):
        """Inference passes from x (B, S, C) until every watched slot has converged (its exit_rule
        measure below tol after min_loop passes) or max_loop. A row whose watched slots have all
        converged stops and is no longer computed; with slot_exit a converged slot also keeps its
        state, and a slot that has exited and that no open slot attends to is no longer computed
        (see Active). frozen slots keep theirs throughout. record: passes after which to keep the
        state (and the norms). first: the state after pass 1, when the caller computed it (engine.py
        joins it with the past's pending tokens). Returns x and a Trace."""
        c = self.config
        max_loop, min_loop = max_loop or c.max_loop, min_loop or c.min_loop
        tol, slot_exit = c.tol if tol is None else tol, c.slot_exit if slot_exit is None else slot_exit
        trace = Trace(passes=torch.zeros(watch.shape, dtype=torch.long, device=x.device))
        live, stopped = Active(torch.arange(x.size(0), device=x.device)), frozen.clone()
        ref = self._exit_ref(x, ctx) if tol >= 0 and min_loop <= 1 < max_loop else None
        for k in range(1, max_loop + 1):
            sub = live.context(ctx)
            new = first if k == 1 and first is not None else self.update(live.gather(x), sub, live.gather(stopped))[0]
            x = live.scatter(x, new)
            trace.passes += live.scatter(torch.zeros_like(stopped), ~live.gather(stopped))  # the slots this pass moved
            trace.calls, trace.steps = trace.calls + len(live.rows), k
            if k in record:
                trace.states[k] = x
                trace.norms.append((k, x[watch].norm(dim=-1).mean().item()))
            if tol < 0 or not min_loop - 1 <= k < max_loop:
                continue
            new_ref = self._exit_ref(x, ctx) if ref is None else live.scatter(ref, self._exit_ref(new, sub, live.gather(ref)))
            if k >= min_loop:
                done = (self._change(ref, new_ref) < tol) | ~watch | stopped
                if slot_exit:
                    stopped |= done & watch
                live = live.narrow(~done[live.rows].all(1), watch & ~stopped if slot_exit else None, ctx.mask)
                if not len(live.rows):
                    break
            ref = new_ref
        return x, trace

    # ---- the training / evaluation forward ----

    def forward(self, idx, targets=None, **wfc):
        c = self.config
        if c.n_future:
            if targets is None:
                raise ValueError("the WFC forward is the training/evaluation layout and needs targets; "
                                 "generate with engine.py (start -> refine -> collapse -> shift)")
            out = self.score(idx, targets, **wfc)
            return out.logits, out.loss
        if wfc:
            raise TypeError(f"GPT mode (n_future=0) takes no WFC options, got {sorted(wfc)}")
        assert idx.size(1) <= c.block_size, f"sequence of {idx.size(1)} tokens > block_size {c.block_size}"
        pos = torch.arange(idx.size(1), device=idx.device)
        x, _ = self.causal(self.transformer.drop(self.input(idx, pos)), pos)
        if targets is None:  # inference: only the last position's logits are needed
            return self.logits(x[:, [-1], :]), None
        logits = self.logits(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def score(self, idx, targets, depth=None, record=(), n_future=None, phase=None, split=None, pins=None, warm=None,
              init=None):
        """The WFC forward. depth: training passes (None: drawn per loop_law), an int (fixed) or
        'converge' (iterate to tol / max_loop). record: pass counts whose per-slot loss to keep
        (ce_at). phase (B,) block phase, split (B,) past end, pins (B, S) slots pinned to their
        target, warm (B,) rows started from a detached state of one step earlier: drawn per the
        config when None (and training). init='random': open slots start at a random state of the
        embeddings' scale instead of e_max (path independence). Returns a Scored."""
        c, (B, T), dev = self.config, idx.shape, idx.device
        assert T <= c.block_size, f"sequence of {T} tokens > block_size {c.block_size}"
        F_, depth = n_future or c.n_future, self.draw_depth() if depth is None else depth
        if warm is None and self.training and c.warm_prob > 0:
            warm = torch.rand(B, device=dev) < c.warm_prob
        x_c = past_kv = slots = None
        if c.attn == 'pinned':
            pos = torch.arange(T, device=dev)
            x_c, kvs = self.causal(self.transformer.drop(self.input(idx, pos)), pos)
            past_kv, phase = kvs[-1], torch.randint(0, F_, (B,), device=dev) if phase is None else phase
            if self.training and c.future_frac < 1:  # a random subset of the future blocks: a cheaper step
                slots = keep_blocks(phase, T, F_, c.future_frac)
        else:
            split = torch.randint(0, T, (B,), device=dev) if split is None else split
        lay = training_layout(self, idx, targets, F_, past_kv, phase, split, slots)
        x = self._start(lay, idx, targets, F_, past_kv, phase, split, slots, pins, warm, init)
        per_row = torch.is_tensor(depth)
        if not per_row and (depth == 'converge' or record or not torch.is_grad_enabled()):
            limits = {} if depth == 'converge' else dict(max_loop=depth, tol=-1.0)
            x, trace = self.iterate(x, lay.ctx, lay.frozen, lay.watch, record=record, **limits)
            states = [x]
        else:
            states = self.unroll(x, lay.ctx, lay.frozen, depth)
            steps = int(depth.max()) if per_row else depth  # every row is computed on every pass
            trace = Trace(passes=lay.watch.long() * (depth.to(dev)[:, None] if per_row else depth), calls=B * steps, steps=steps)
        return self._scored(states, lay, x_c, targets if c.past_target == 'next' else idx, trace)

    def _start(self, lay, idx, targets, F_, past_kv, phase, split, slots, pins, warm, init):
        """The state the future starts from: e_max, pinned slots at their token's row, warm rows at
        the detached state of one sampler step earlier (train as you sample), or a random state."""
        c, dev = self.config, idx.device
        if pins is None and self.training and c.pin_prob > 0:
            pins = torch.rand(lay.watch.shape, device=dev) < c.pin_prob
        if pins is not None:
            pins = pins & lay.watch
            lay.ctx.x0 = torch.where(pins[..., None], self.input(lay.targets.clamp(min=0), lay.ctx.pos), lay.ctx.x0)
            lay.frozen, lay.watch = lay.frozen | pins, lay.watch & ~pins
        x = lay.ctx.x0 = self.prelude_of(lay.ctx.x0, lay.ctx)
        if warm is not None and split is not None:
            warm = warm & (split > 0)  # no earlier step at split 0
        if warm is not None and warm.any():
            with torch.no_grad():  # one step earlier: every block one token less advanced, refined 1..depth passes
                prev = training_layout(self, idx, targets, F_, past_kv, None if phase is None else (phase - 1) % F_,
                                   None if split is None else (split - 1).clamp(min=0), slots)
                prev.ctx.x0 = self.prelude_of(prev.ctx.x0, prev.ctx)
                x_prev, _ = self.iterate(prev.ctx.x0, prev.ctx, prev.frozen, prev.watch,
                                         max_loop=int(torch.randint(1, c.depth + 1, ())), tol=-1.0)
            x = torch.where((warm[:, None] & ~lay.fresh & ~lay.frozen)[..., None], x_prev, x)
        if init == 'random':
            x = torch.where(lay.watch[..., None], torch.randn_like(x) * self.embedding_rms(), x)
        return x

    def _ce(self, logits, targets):
        return F.cross_entropy(logits.transpose(1, 2).float(), targets.clamp(min=0), reduction='none')

    def _scored(self, states, lay, x_c, past_targets, trace):
        """Losses of the trained states: the mean over the last `supervise` of the distance-weighted
        future cross-entropy; plus consistency x the mean over the earlier states of KL(last || earlier)
        (the last pass detached: only the earlier passes move, toward where the refinement ends, so an
        early exit loses little; CLLM, Kou et al. 2024); plus past_loss x the past stream's own loss."""
        c = self.config
        weight = lay.dist.float().pow(-c.dist_power) * lay.watch
        per_slot_mean = lambda v: (v * weight).sum() / weight.sum().clamp(min=1e-8)  # noqa: E731
        all_logits = [self.readout(x, lay.ctx) for x in states]
        ces = [self._ce(logits, lay.targets) for logits in all_logits[-min(c.supervise, len(states)):]]
        logits, ce = all_logits[-1], ces[-1]
        loss = torch.stack([per_slot_mean(v) for v in ces]).mean()
        if c.consistency > 0 and len(states) > 1:
            goal = F.log_softmax(logits.detach().float(), -1)
            kls = [(goal.exp() * (goal - F.log_softmax(v.float(), -1))).sum(-1) for v in all_logits[:-1]]
            loss = loss + c.consistency * torch.stack([per_slot_mean(v) for v in kls]).mean()
        if c.past_loss > 0:  # pinned: the causal stream's own next-token (or own-token) loss; bidirectional: past slots
            past_logits, past_targets = (self.logits(x_c), past_targets) if x_c is not None else (logits, lay.self_targets)
            loss = loss + c.past_loss * F.cross_entropy(past_logits.flatten(0, 1), past_targets.flatten(), ignore_index=-1)
        ce_at = {k: self._ce(self.readout(v, lay.ctx), lay.targets) for k, v in trace.states.items()}
        return Scored(logits, loss, ce.detach(), lay.dist, lay.targets, lay.watch, trace, ce_at)
