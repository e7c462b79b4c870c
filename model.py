"""
WFC-GPT: a "Wave Function Collapse" language model and its GPT baseline, in one file.

With n_future = 0 this is nanoGPT's GPT (its checkpoints load into it unchanged).

- Weight-tied refinement: one core of blocks runs pass after pass (`GPT.update`, the rule of every
  stream), with the input re-injected, a decay and a bound on the state when asked: what a
  recurrence needs for a fixed point. A sandwich adds a prelude and a coda that run once each.
- Past and future: decided past tokens, and n_future future slots that start at e_max (the
  embedding of the uniform distribution). 'pinned': the past is a causal stream that never sees the
  future; 'bidirectional': every slot sees every slot (the rule: layout.visibility).
- The architecture is GPTConfig; training is recipe.Recipe, inference solving solver.Solver.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from modeling.attention import Rotary, sparse_attention
from modeling.layout import Context, training_layout, visibility
from modeling.recipe import (Recipe, capabilities, check_fits, draw_depth, kept_blocks, run_passes, start_state,
                             training_loss, warm_rows)
from modeling.solver import Solver, Trace

CHOICES = dict(pos_emb=('learned', 'rope'), attn=('pinned', 'bidirectional'), attn_fn=('softmax', 'entmax', 'adaptive'),
               inject=('none', 'add', 'adapter', 'contract'), bound=('none', 'rms', 'norm'))


@dataclass(frozen=True)
class GPTConfig:
    """The architecture: everything that decides the parameters and what one pass computes."""
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
    attn_fn: str = 'softmax'  # attention weights: 'softmax', 'entmax' (alpha = entmax_alpha), 'adaptive' (alpha in (1, 2) per head and query, learned)
    entmax_alpha: float = 1.5  # attn_fn='entmax': 1 = softmax, 1.5 = entmax15, 2 = sparsemax; in [1, 2]
    n_future: int = 0         # F, future slots; 0 = a plain causal GPT
    attn: str = 'pinned'      # WFC: 'pinned' (the past is causal and never sees the future) or 'bidirectional'
    spec_window: int = -1     # a future slot sees future slots up to this many ahead; -1 = all
    n_loop: int = 1           # passes of the causal stream's core; > 1 with n_future = 0 is a looped GPT
    inject: str = 'none'      # every pass re-adds each slot's input: 'none', 'add' (x + x0), 'adapter' (Linear on [x, x0], Huginn)
                              # or 'contract' (a x + (1 - a) x0, a in (0, 1) learned per channel: contractive in x, Parcae)
    decay: float = 0.0        # > 0: a learned per-channel decay a in (0, 1) starting here, x <- a x + delta (Parcae); 0 = off
    bound: str = 'none'       # after every pass: 'none', 'rms' (each slot rescaled to the embeddings' RMS) or 'norm' (a learned LayerNorm)

    def __post_init__(self):
        problems = [f"{k} must be one of {v}, got {getattr(self, k)!r}" for k, v in CHOICES.items() if getattr(self, k) not in v]
        if min(self.n_layer, self.n_head, self.n_embd, self.vocab_size, self.n_loop, self.block_size) < 1:
            problems.append("n_layer, n_head, n_embd, vocab_size, n_loop and block_size must be >= 1")
        if self.n_embd % self.n_head:
            problems.append(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        elif self.pos_emb == 'rope' and (self.n_embd // self.n_head) % 2:
            problems.append("rope needs an even head size (n_embd / n_head)")
        if min(self.n_future, self.n_prelude, self.n_coda) < 0 or self.spec_window < -1:
            problems.append("n_future, n_prelude and n_coda must be >= 0, spec_window >= -1")
        if self.n_prelude + self.n_coda >= self.n_layer:
            problems.append(f"n_prelude + n_coda = {self.n_prelude + self.n_coda} leaves no looped core in n_layer = {self.n_layer}")
        if not (0 <= self.decay < 1 and 0 <= self.dropout < 1 and 1 <= self.entmax_alpha <= 2 and math.isfinite(self.rope_base)):
            problems.append(f"need 0 <= decay < 1, 0 <= dropout < 1, 1 <= entmax_alpha <= 2, a finite rope_base "
                            f"(got {self.decay}, {self.dropout}, {self.entmax_alpha}, {self.rope_base})")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    n_positions = property(lambda self: self.block_size + self.n_future)  # the past's positions, then the future's


@dataclass
class WFCOutput:
    """GPT.wfc_forward's result: logits (B, S, V), loss, per-slot cross-entropy ce (B, S) (logits_at: the
    logits after the recorded passes), the layout's dist and targets, the `scored` slots (B, S), the trace."""
    logits: torch.Tensor
    loss: torch.Tensor
    ce: torch.Tensor
    dist: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor
    trace: Trace
    logits_at: dict


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
        """x (B, T, C) attends to the `prefix` keys/values (a fixed context such as the past, or a ring
        cache's layer, which stores this call's) and to itself. mask: None (all visible), 'causal', or
        bool (..., T, T_prefix + T). queries (inference): outputs for the last `queries` positions only
        (0 = none). rotary: the positions' Rotation. Returns the output and this call's own (k, v)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        own = (k, v)
        if hasattr(prefix, 'attend_to'):  # a ring cache: writes k, v in place, returns what to attend to
            (k, v), prefix = prefix.attend_to(k, v), None
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
        else:  # entmax weights need the scores themselves
            y = sparse_attention(q, k, v, mask, self.attn_fn, self.alpha, getattr(self, 'alpha_gain', None),
                                 getattr(self, 'alpha_bias', None), dropout)
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
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
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
    `wfc_forward`: the WFC forward's options and whole result. recipe, solver: defaults (stored in checkpoints)."""

    def __init__(self, config, recipe=None, solver=None):
        super().__init__()
        self.config, C = config, config.n_embd
        self.recipe, self.solver = recipe or Recipe(), solver or Solver()
        check_fits(config, self.recipe)
        self.capabilities = capabilities(config, self.recipe)  # what the samplers may ask of it (a checkpoint may store its own)
        modules = dict(wte=nn.Embedding(config.vocab_size, C), drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]), ln_f=nn.LayerNorm(C, bias=config.bias))
        if config.pos_emb == 'learned':
            modules['wpe'] = nn.Embedding(config.n_positions, C)  # the past's positions, then the future's
        if config.inject == 'adapter':
            modules['adapter'] = nn.Linear(2 * C, C, bias=config.bias)
        if config.bound == 'norm':
            modules['ln_state'] = nn.LayerNorm(C, bias=config.bias)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: embed and decode share W_e
        self.rotary = Rotary(C // config.n_head, config.n_positions, config.rope_base) if config.pos_emb == 'rope' else None
        if config.decay:  # a = sigmoid(decay_logit) lies in (0, 1) by construction
            self.decay_logit = nn.Parameter(torch.full((C,), math.log(config.decay / (1 - config.decay))))
        if config.inject == 'contract':  # a = sigmoid(inject_logit) in (0, 1), starting at 1/2
            self.inject_logit = nn.Parameter(torch.zeros(C))
        # the sandwich: the prelude and coda run once per slot, the core is the looped part
        self.prelude, self.coda = range(config.n_prelude), range(config.n_layer - config.n_coda, config.n_layer)
        self.core = range(config.n_prelude, config.n_layer - config.n_coda)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.inject == 'adapter':  # starts as inject='add' (x + x0) and learns from there
            with torch.no_grad():
                self.transformer.adapter.weight.copy_(torch.cat((torch.eye(C), torch.eye(C)), 1))

    can_verify = property(lambda self: self.capabilities['can_verify'])  # its causal stream verifies drafts
    warm_starts = property(lambda self: self.capabilities['warm_starts'])  # refinement may continue from a carried state

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameters, without the position table by default (nanoGPT); the tied token table counts."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and 'wpe' in self.transformer else n

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices only (the tied embedding is one and decays, as in nanoGPT); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')

    # ---- the maps between spaces ----

    def e_max(self):
        """(C,) the max-entropy embedding: embed(uniform) = mean of the embedding rows, from the current
        weights. Without gradient it is kept until the weights change (the sampler needs it every step)."""
        w = self.transformer.wte.weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # dynamo cannot trace the key (a pointer)
            return w.mean(0)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if getattr(self, '_e_max', (None,))[0] != key:
            self._e_max = (key, w.mean(0))
        return self._e_max[1]

    def embedding_rms(self):
        """The RMS of the token embeddings: the scale the 'rms' bound holds every state at."""
        return self.transformer.wte.weight.detach().pow(2).mean().sqrt()

    def logits(self, x):
        return self.lm_head(self.transformer.ln_f(x))

    def decode(self, x):
        """States (..., C) -> probabilities (..., V)."""
        return F.softmax(self.logits(x).float(), dim=-1)

    def token_states(self, idx, pos):
        """Token ids at positions -> their states before the first pass (+ learned position)."""
        x = self.transformer.wte(idx)
        return x + self.transformer.wpe(pos) if 'wpe' in self.transformer else x

    def fresh_slots(self, pos):
        """Fresh future slots at positions pos (...) -> (..., C): e_max (+ learned position)."""
        x = self.e_max().expand(*pos.shape, -1)
        return x + self.transformer.wpe(pos) if 'wpe' in self.transformer else x

    # ---- passes of the weight-tied stack ----

    def stack(self, x, pos, mask, prefixes=None, queries=None, layers=None):
        """The blocks in `layers` (a range; default every block) once each, the rotary tables gathered once.
        prefixes: per layer of the whole stack the (k, v) of a fixed context (or a ring cache's layers).
        queries: the last block outputs the last `queries` positions only. Returns it and each layer's (k, v)."""
        layers = range(len(self.transformer.h)) if layers is None else layers
        kvs, rotary = [], None if self.rotary is None else self.rotary.at(pos)
        for i in layers:
            x, kv = self.transformer.h[i](x, pos, mask, rotary, None if prefixes is None else prefixes[i],
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
        """One pass of the recurrence, the rule of every stream: inp = x, x + x0, adapter([x, x0]) or
        a x + (1 - a) x0; x <- core(inp), or a_decay x + (core(inp) - inp) with an injection or decay;
        then the bound. frozen (B, S) slots keep theirs. Returns the new state and the core's (k, v)."""
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
        if c.inject == 'none' and not c.decay:
            new = out  # the plain stack: nanoGPT's forward, bit for bit
        else:
            new = (torch.sigmoid(self.decay_logit) * x if c.decay else x) + (out - inp)
        if c.bound == 'rms':
            new = new * (self.embedding_rms() * torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + 1e-12))
        elif c.bound == 'norm':
            new = self.transformer.ln_state(new)
        return (new if frozen is None else torch.where(frozen[..., None], x, new)), kvs

    def once_through(self, x, ctx, n_loop=1, queries=None):
        """A stream through the whole sandwich: the prelude once (its output becomes ctx.x0, what the
        core re-injects), the core n_loop times, the coda once. Returns the core's state, the coda's
        output (the state to decode: the core's state when there is no coda) and every layer's (k, v)
        (the core's from its last pass). queries: the last block outputs the last `queries` slots only."""
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

    def causal_stream(self, x, pos, past=None, queries=None, window=0, mask=None):
        """The causal stream (GPT, and the past of pinned WFC): n_loop passes over x (B, T, C) at positions
        pos (T,). past (a sampler's cache): per pass the per-layer (k, v) of the tokens before these (window
        > 0: those within `window` positions), or a ring cache's layers with their `mask`. Returns the final
        states (of the last `queries` when given), per pass each layer's (k, v) (a sandwich: one pass)."""
        if mask is None and past is not None:
            P = past[0][0][0].size(2)
            keys = torch.arange(int(pos[0]) - P, int(pos[0]) + x.size(1), device=pos.device)
            mask = None if x.size(1) == 1 and (window <= 0 or P < window) else visibility(pos, None, None, keys, window=window)
        mask = 'causal' if mask is None else mask
        ctx, new, n_loop = Context(x, pos, mask), [], self.config.n_loop
        if self.sandwiched():
            if past is not None and n_loop > 1:
                raise NotImplementedError("a key/value cache of a sandwich looped more than once is not built")
            ctx.prefixes = None if past is None else past[0]
            _, x, kvs = self.once_through(x, ctx, n_loop, queries)  # prelude once, core n_loop times, coda once
            return x, [kvs]
        for p in range(n_loop):
            ctx.prefixes = None if past is None else past[p]
            x, kvs = self.update(x, ctx, queries=queries if p == n_loop - 1 else None)
            new.append(kvs)
        return x, new

    # ---- the training / evaluation forward ----

    def forward(self, idx, targets=None, **wfc):
        """GPT: (logits, loss) as nanoGPT's (the last position's logits only without targets). WFC:
        the training/evaluation layout (wfc_forward's options in wfc, e.g. recipe=, depth=)."""
        c = self.config
        assert idx.size(1) <= c.block_size, f"sequence of {idx.size(1)} tokens > block_size {c.block_size}"
        if c.n_future:
            if targets is None:
                raise ValueError("the WFC forward is the training/evaluation layout and needs targets; "
                                 "generate with engine.py (start -> refine -> collapse -> shift)")
            out = self.wfc_forward(idx, targets, **wfc)
            return out.logits, out.loss
        if wfc:
            raise TypeError(f"GPT mode (n_future=0) takes no WFC options, got {sorted(wfc)}")
        pos = torch.arange(idx.size(1), device=idx.device)
        x, _ = self.causal_stream(self.transformer.drop(self.token_states(idx, pos)), pos)
        if targets is None:  # inference: only the last position's logits are needed
            return self.logits(x[:, [-1], :]), None
        logits = self.logits(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def wfc_forward(self, idx, targets, recipe=None, depth=None, converge=False, record=(), n_future=None, phase=None,
                    split=None, pins=None, warm=None, init=None):
        """The WFC forward on (B, T <= block_size) windows. recipe: default self.recipe. depth: training
        passes (None: drawn per the recipe), an int or a (B,) tensor (a depth per row). converge: run
        self.solver instead (evaluation). record: pass counts whose logits to keep (logits_at). phase
        (B,) block phase, split (B,) past end, pins (B, S) slots pinned to their target, warm (B,) rows
        started one sampler step earlier: drawn per the recipe when None (and training). init='random':
        open slots start at a random state (path independence). Returns a WFCOutput."""
        c, r, (B, T), dev = self.config, recipe or self.recipe, idx.shape, idx.device
        n_future, depth = n_future or c.n_future, draw_depth(c, r) if depth is None else depth
        warm = warm_rows(r, B, self.training, dev) if warm is None else warm
        x_past = past_kv = slots = None
        if c.attn == 'pinned':
            pos = torch.arange(T, device=dev)
            x_past, kvs = self.causal_stream(self.transformer.drop(self.token_states(idx, pos)), pos)
            past_kv, phase = kvs[-1], torch.randint(0, n_future, (B,), device=dev) if phase is None else phase
            slots = kept_blocks(r, phase, T, n_future, self.training)
        else:
            split = torch.randint(0, T, (B,), device=dev) if split is None else split
        layout = training_layout(self, idx, targets, n_future, past_kv, phase, split, slots)
        x = start_state(self, layout, (idx, targets, n_future, past_kv, phase, split, slots), r, pins, warm, init)
        states, trace = run_passes(self, x, layout, depth, record, r, converge)
        loss, logits, ce = training_loss(self, states, layout, None if x_past is None else self.logits(x_past), idx, targets, r)
        logits_at = {k: self.readout(v, layout.ctx) for k, v in trace.states.items()}
        return WFCOutput(logits, loss, ce.detach(), layout.dist, layout.targets, layout.watch, trace, logits_at)
