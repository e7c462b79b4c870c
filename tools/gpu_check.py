"""
One unattended command that proves the CUDA paths of this repo, sized for a GPU machine lent for
10 minutes; without CUDA it runs the same checks on CPU at tiny sizes (the dry run the tests keep
working: 97 s wall, 103 s of CPU time on a 2-core AMD EPYC with AVX2, 2026-12-07, most of it
torch.compile tracing the samplers' and training's graphs). Not yet run on a GPU.

    python tools/gpu_check.py                          # CUDA when present, else the CPU dry run
    python tools/gpu_check.py --device=cpu             # the dry run
    python tools/gpu_check.py --groups=agree,attention # some of the checks only

Checks (groups), each a row of the report with pass / fail / skip and the numbers behind it:
- agree: forward + loss of a tiny GPT and a tiny WFC model (the default WFC recipe: pinned, rotary,
  F = 2, a 1 / core / 1 sandwich with contractive injection, rms bound, past loss) on the device in fp32 (TF32 off) against the CPU in fp32, both as
  training runs it (truncated unroll, gradient on) and as sampling runs it (iterate, no gradient);
  the largest |logit difference| and |loss difference| must be <= tolerance. On the CPU dry run the
  reference is the same model in float64 (a CUDA-vs-CPU comparison is impossible there).
- train: train_steps steps of each tiny model with bf16 autocast and torch.compile (GPT:
  torch.compile(model); WFC: runtime.compile_passes(model), the random depth of train.py), fused AdamW on
  CUDA: every loss and gradient finite, the last loss below the first, and the compiled model's
  first fp32 loss equal to the eager one within tolerance.
- sample: every sampler (causal GPT, causal WFC past stream, speculative, collapse with policies
  first / threshold / entropy, goal, SMC steering) greedy (temperature 0) on the trained tiny models,
  on the device in fp32 against the reference (CPU fp32; dry run: float64): the texts must be equal;
  and the causal and speculative samplers compiled (runtime.compile_samplers: whole steps on a ring
  cache of fixed shape) after sampling.warm_up: the same greedy text as eager, with both times
  (the dry run compiles 2 rounds per call, not the samplers' 4: half the tracing).
- attention: which SDPA backend PyTorch picks (torch._fused_sdp_choice) for the causal stream, the
  WFC training mask (layout.visibility, pinned blocks) and the sampler window's mask, and the time
  of every backend that runs alone (torch.nn.attention.sdpa_kernel: flash, efficient, cudnn, math);
  then a FlexAttention block mask built from the same visibility tensor, with its time and its
  largest difference from SDPA in fp32 (compiled on CUDA; eager on the dry run).
- recipe: train.py on nanoGPT's shakespeare_char GPU recipe shape (6 x 384, block 256, batch 64;
  config/train_shakespeare_char_{gpt,wfc}_gpu.py) as GPT and as the default WFC, recipe_iters
  iterations each: median ms/iter after warm-up, train.py's MFU, the val loss reached; then the
  sampling tokens/s of the run's checkpoint at batch 1 and 64 (WFC: speculative at 1, collapse at
  64). Dry run: a 2 x 64 model, block 32, batch 8, eager (inductor's C++ build takes minutes on a
  small CPU; the train group compiles).
Writes report.json and report.md to out_dir and prints the tables. Exit codes: 0 every check passed
(or was skipped with its reason), 1 a check failed (one line on stderr names it), 2 bad settings.
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from configurator import UserError, cli, configure, fail, require  # noqa: E402
from generation import steering  # noqa: E402
from generation.sampling import Settings, generate, warm_up  # noqa: E402
from modeling.layout import block_starts, visibility  # noqa: E402
from modeling.recipe import draw_depth  # noqa: E402
from plumbing import checkpoint  # noqa: E402
from plumbing import runtime  # noqa: E402
from tools.vs_nanogpt import EVAL_LINE, ITER_LINE  # noqa: E402  (the log lines of train.py)

# -----------------------------------------------------------------------------
device = 'auto'            # 'auto' (cuda when present, else the CPU dry run), 'cpu', 'cuda', 'cuda:1'
out_dir = 'gpu-check'      # report.json, report.md and the recipe runs' folders go here
groups = 'agree,train,sample,attention,recipe'  # the checks to run (see above), comma-separated
tolerance = 1e-4           # fp32 agreement: largest |logit difference| and |loss difference| allowed (< 0 fails every comparison)
train_steps = 50           # bf16 autocast + compiled training steps of each tiny model
compile_backend = 'auto'   # torch.compile backend: 'auto' = inductor on CUDA, aot_eager on CPU (traces and
                           # differentiates the same graphs, skips the minutes of C++ codegen); or any backend name
sample_tokens = 40         # greedy tokens per sampler check
recipe_iters = 0           # train.py iterations of each recipe run (0 = 500 on CUDA, 6 on the dry run)
recipe_max_time = 150.0    # seconds of training after which a recipe run stops early (train.py --max_time)
budget = 540.0             # seconds for the whole run: a recipe run gets at most what is left less a minute, or is skipped
recipe_tokens = 0          # new tokens per sampling-speed run (0 = 256 on CUDA, 16 on the dry run)
# -----------------------------------------------------------------------------
GROUPS = ('agree', 'train', 'sample', 'attention', 'recipe')
WFC = dict(pos_emb='rope', n_future=2, attn='pinned', dist_power=1.0, past_loss=1.0, n_prelude=1, n_coda=1,
           inject='contract', bound='rms', train_depth=8, loop_law='uniform', bptt=2, supervise=2,
           max_loop=8)  # config/train_shakespeare_char_wfc.py's model
TINY = dict(block_size=16, vocab_size=9, n_layer=3, n_head=2, n_embd=32, bias=False, dropout=0.0)
DRY_RECIPE = ['--n_layer=3', '--n_head=2', '--n_embd=64', '--block_size=32', '--batch_size=8', '--compile=False']


def result(name, ok, detail, **numbers):
    """One row of the report; ok: True (pass), False (fail) or None (skip)."""
    status = {True: 'pass', False: 'fail', None: 'skip'}[ok]
    return dict(name=name, status=status, detail=detail, **numbers)


def guarded(name, check, *args):
    """Run one check; an exception is that check's failure (one line), not the end of the run."""
    try:
        return check(*args)
    except Exception as e:  # unattended: every other check still runs and reports
        return [result(name, False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")]


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn, dev, repeats=5):
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Plan:
    """Where the checks run and what they compare with."""

    def __init__(self, dev):
        self.dev, self.cuda, self.t0 = dev, dev.startswith('cuda'), time.time()
        self.ref_dev, self.ref_dtype = 'cpu', torch.float32 if self.cuda else torch.float64
        self.reference = 'CPU fp32' if self.cuda else 'CPU float64 (dry run: no CUDA here to compare with the CPU)'
        self.backend = compile_backend if compile_backend != 'auto' else 'inductor' if self.cuda else 'aot_eager'
        # the dry run traces 2 rounds per compiled call (still state handed from round to round inside
        # a graph) in half the time of the samplers' own, which CUDA checks
        self.rounds_per_call = runtime.ROUNDS_PER_CALL if self.cuda else 2


# ---- tiny models and their data ----

def tiny_model(kind, dev='cpu', dtype=torch.float32):
    torch.manual_seed(0)
    return checkpoint.build(**TINY, **(WFC if kind == 'wfc' else {})).to(dev, dtype)


def pattern_batch(step, dev, B=8, T=TINY['block_size']):
    """The repeating pattern 0 1 .. 6 with 5% noise tokens 7, 8 (learnable in a few dozen steps)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 7, (B, 1), generator=g)
    seq = (start + torch.arange(T + 1)) % 7
    seq = torch.where(torch.rand(B, T + 1, generator=g) < 0.05, torch.randint(7, 9, (B, T + 1), generator=g), seq)
    return seq[:, :-1].to(dev), seq[:, 1:].to(dev)


def wfc_forward(model, x, y, train):
    """The WFC loss with everything random fixed: phase 0, depth 4 (train: truncated unroll; else iterate)."""
    phase = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
    model.train(train)
    with torch.set_grad_enabled(train):
        return model(x, y, depth=4, phase=phase)


# ---- agree: the device's fp32 forward against the reference ----

def agree(plan):
    rows = []
    for kind in ('gpt', 'wfc'):
        device_model = tiny_model(kind, plan.dev)
        ref_model = tiny_model(kind, plan.ref_dev, plan.ref_dtype)
        x, y = pattern_batch(0, plan.dev)
        worst_logit = worst_loss = 0.0
        for train in ((True, False) if kind == 'wfc' else (True,)):
            outs = [wfc_forward(m, x.to(d), y.to(d), train) if kind == 'wfc' else m(x.to(d), y.to(d))
                    for m, d in ((device_model, plan.dev), (ref_model, plan.ref_dev))]
            worst_logit = max(worst_logit, (outs[0][0].detach().double().cpu() - outs[1][0].detach().double()).abs().max().item())
            worst_loss = max(worst_loss, abs(outs[0][1].item() - outs[1][1].item()))
        ok = max(worst_logit, worst_loss) <= tolerance
        rows.append(result(f'fp32_{kind}', ok, f"max |logit diff| {worst_logit:.2e}, |loss diff| {worst_loss:.2e} "
                           f"vs {plan.reference.split(' (')[0]} (tolerance {tolerance:g})",
                           logit_diff=worst_logit, loss_diff=worst_loss))
    return rows


# ---- train: bf16 autocast + compile ----

TRAINED = {}  # kind -> the tiny model the train group trained (the sample group samples it)


def compiled(model, kind, plan):
    """What train.py runs with --compile=True: one pass compiled for WFC, the whole forward for GPT."""
    if kind == 'wfc':
        model.update = torch.compile(model.update, backend=plan.backend)  # = runtime.compile_passes(model), with the backend
        return model
    return torch.compile(model, backend=plan.backend)


def first_loss(model, kind, plan):
    """The fp32 loss of one batch with the same draws every time (eager and compiled are compared on it)."""
    x, y = pattern_batch(0, plan.dev)
    torch.manual_seed(1)
    return (wfc_forward(model, x, y, True) if kind == 'wfc' else model(x, y))[1].item()


def train_tiny(kind, plan):
    model = tiny_model(kind, plan.dev)
    eager = first_loss(model, kind, plan)
    step_model = compiled(model, kind, plan)
    diff = abs(first_loss(step_model, kind, plan) - eager)
    optimizer = model.configure_optimizer(0.1, 3e-3, (0.9, 0.99), plan.dev.split(':')[0])
    losses, bad, t0 = [], 0, time.time()
    model.train()
    for step in range(train_steps):
        x, y = pattern_batch(100 + step, plan.dev)
        torch.manual_seed(step)
        with runtime.autocast(plan.dev, 'bfloat16'):
            _, loss = step_model(x, y, depth=draw_depth(model.config, model.recipe, x.size(0))) if kind == 'wfc' else step_model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bad += not (torch.isfinite(loss) and torch.isfinite(norm))
    if kind == 'wfc':
        del model.update  # the samplers run the eager model
    TRAINED[kind] = model.eval()
    ok = bad == 0 and losses[-1] < losses[0] and diff <= tolerance
    return [result(f'train_{kind}_bf16_compiled', ok, f"{train_steps} steps ({plan.backend}, bf16 autocast): loss "
                   f"{losses[0]:.3f} -> {losses[-1]:.3f}, {bad} non-finite; compiled vs eager fp32 loss {diff:.2e} "
                   f"(tolerance {tolerance:g}); {time.time() - t0:.0f}s with compilation",
                   first_loss=losses[0], last_loss=losses[-1], non_finite=bad, compile_diff=diff)]


def train(plan):
    return [row for kind in ('gpt', 'wfc') for row in guarded(f'train_{kind}_bf16_compiled', train_tiny, kind, plan)]


# ---- sample: greedy text of every sampler on the device against the reference ----

SAMPLERS = (  # name, model, Settings fields, goal (offset, ids)
    ('causal_gpt', 'gpt', {}, None),
    ('causal_wfc_past', 'wfc', dict(sampler='causal'), None),
    ('speculative', 'wfc', dict(sampler='speculative'), None),
    ('collapse_first', 'wfc', dict(sampler='collapse'), None),
    ('collapse_threshold', 'wfc', dict(sampler='collapse', policy='threshold', tau=2.0), None),
    ('collapse_entropy', 'wfc', dict(sampler='collapse', policy='entropy'), None),
    ('goal', 'wfc', dict(sampler='collapse'), (12, [3, 4, 5])),
)


def greedy(model, dev, name, fields, goal):
    """Token ids (rows of lists) a sampler writes greedily after the prompt 0 1 2 (two rows; SMC: its particles)."""
    s = Settings(temperature=0.0, **fields)
    idx = torch.tensor([[0, 1, 2]] * 2, device=dev)
    if name == 'smc':
        out = steering.smc(model, [0, 1, 2], sample_tokens, None, lambda ids: ' '.join(map(str, ids)), particles=4, s=s)
        return out.tokens.tolist()
    return generate(model, idx, sample_tokens, s, torch.Generator(device=dev).manual_seed(0), goal=goal)[0].tolist()


def sampler_check(plan, name, kind, fields, goal):
    if kind not in TRAINED and 'train' not in groups.split(','):
        train(plan)  # the sample group alone: train the tiny models first
    if kind not in TRAINED:
        return [result(f'sample_{name}', None, f"no trained tiny {kind} model: train_{kind}_bf16_compiled failed")]
    model = TRAINED[kind]
    ref = tiny_model(kind, plan.ref_dev, plan.ref_dtype)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    t0 = time.perf_counter()
    mine = greedy(model, plan.dev, name, fields, goal)
    seconds = time.perf_counter() - t0
    theirs = greedy(ref, plan.ref_dev, name, fields, goal)
    same = sum(a == b for row, ref_row in zip(mine, theirs) for a, b in zip(row, ref_row))
    total = sum(len(row) for row in theirs)
    ok = mine == theirs
    return [result(f'sample_{name}', ok, f"greedy {total} tokens: {same} equal to the {plan.reference.split(' (')[0]} text"
                   f"{'' if ok else ' (first row: ' + str(mine[0][:12]) + ' vs ' + str(theirs[0][:12]) + ')'}; "
                   f"{seconds:.2f}s", equal=same, tokens=total)]


def compiled_check(plan, name, kind, fields):
    """runtime.compile_samplers (sample.py --compile=True) on the device: after sampling.warm_up, the
    compiled steps on the ring cache write the eager sampler's greedy text, at what speed."""
    if kind not in TRAINED:
        return [result(f'sample_{name}_compiled', None, f"no trained tiny {kind} model: train_{kind}_bf16_compiled failed")]
    model, s = TRAINED[kind], Settings(temperature=0.0, **fields)
    idx = torch.tensor([[0, 1, 2]] * 2, device=plan.dev)
    t0 = time.perf_counter()
    eager = generate(model, idx, sample_tokens, s)[0]
    sync(plan.dev)
    eager_s = time.perf_counter() - t0
    try:
        runtime.compile_samplers(model, backend=plan.backend, rounds_per_call=plan.rounds_per_call)
        t0 = time.perf_counter()
        warm_up(model, idx, s)
        t1 = time.perf_counter()
        mine = generate(model, idx, sample_tokens, s)[0]
        sync(plan.dev)
        t2 = time.perf_counter()
    finally:
        runtime.uncompile_samplers(model)
    ok = torch.equal(mine, eager)
    return [result(f'sample_{name}_compiled', ok, f"greedy {eager.numel()} tokens {'equal to' if ok else 'NOT equal to'} "
                   f"eager ({plan.backend}, {plan.rounds_per_call} rounds per call); {t2 - t1:.2f}s against eager "
                   f"{eager_s:.2f}s, after a {t1 - t0:.0f}s warm-up",
                   seconds=t2 - t1, eager_seconds=eager_s, warm_up_seconds=t1 - t0,
                   rounds_per_call=plan.rounds_per_call)]


def sample(plan):
    rows = []
    for name, kind, fields, goal in SAMPLERS + (('smc', 'wfc', {}, None),):
        rows += guarded(f'sample_{name}', sampler_check, plan, name, kind, fields, goal)
    for name, kind, fields in (('causal_gpt', 'gpt', {}), ('speculative', 'wfc', dict(sampler='speculative'))):
        rows += guarded(f'sample_{name}_compiled', compiled_check, plan, name, kind, fields)
    return rows


# ---- attention: SDPA's backends and a FlexAttention block mask for the WFC rule ----

def attention_inputs(plan, dtype):
    """(q, k, v) and the masks of the three attention patterns at the recipe's shape (dry run: tiny).
    causal: T queries on T keys; wfc_train: the pinned layout's T future slots on T past + T future
    keys (layout.visibility, phase per row); wfc_window: a sampler step, F slots on T past + F keys."""
    B, H, T, hs, F_ = (16, 6, 256, 64, 2) if plan.cuda else (4, 2, 32, 16, 2)
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, H, 2 * T, hs, generator=g).to(plan.dev, dtype) for _ in range(3)]
    phase = torch.randint(0, F_, (B,), generator=g).to(plan.dev)
    start, j = block_starts(phase, T, F_), torch.arange(T, device=plan.dev).expand(B, T)
    train_mask = visibility(start, start, j, torch.arange(T, device=plan.dev), start, j)[:, None]  # (B, 1, T, 2T)
    f = torch.arange(F_, device=plan.dev)
    window_mask = visibility(torch.full((F_,), T - 1, device=plan.dev), f * 0, f,
                             torch.arange(T, device=plan.dev), f * 0, f)[None, None]  # (1, 1, F, T + F)
    q, k, v = qkv
    return dict(causal=(q[:, :, :T], k[:, :, :T], v[:, :, :T], None),
                wfc_train=(q[:, :, :T], k, v, train_mask),
                wfc_window=(q[:, :, :F_], k[:, :, :T + F_], v[:, :, :T + F_], window_mask))


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def picked_backend(q, k, v, mask):
    """The backend SDPA dispatches to (torch._fused_sdp_choice, a private API: None where it is missing)."""
    from torch.nn.attention import SDPBackend
    choose = getattr(torch, '_fused_sdp_choice', None)
    if choose is None:
        return None
    return SDPBackend(choose(q, k, v, mask, 0.0, mask is None)).name.lower()


def backend_times(plan, q, k, v, mask):
    """{backend: ms or the reason it does not run} for each SDPA backend alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    times = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                times[backend.name.lower()] = round(timed(lambda: sdpa(q, k, v, mask), plan.dev) * 1000, 4)
        except Exception as e:  # RuntimeError 'No available kernel' on most builds; any refusal means no
            times[backend.name.lower()] = 'no: ' + ' '.join(str(e).split())[:80]
    return times


def flex(plan, q, k, v, mask):
    """FlexAttention with a block mask whose mask_mod reads the visibility tensor (the rule stays
    layout.visibility's): its time, its block sparsity and its largest difference from SDPA in fp32."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, T, S = q.size(0), q.size(2), k.size(2)
    dense = mask.expand(B, 1, T, S)[:, 0]
    block = create_block_mask(lambda b, h, qi, ki: dense[b, qi, ki], B, None, T, S, device=plan.dev,
                              BLOCK_SIZE=128 if plan.cuda else 16)
    attend = torch.compile(flex_attention) if plan.cuda else flex_attention  # the dry run: eager (unfused, slow)
    ms = timed(lambda: attend(q, k, v, block_mask=block), plan.dev) * 1000
    q32, k32, v32 = (t.float() for t in (q, k, v))
    diff = (attend(q32, k32, v32, block_mask=block) - sdpa(q32, k32, v32, mask)).abs().max().item()
    return dict(ms=round(ms, 4), max_diff=diff, sparsity_pct=round(float(block.sparsity()), 1),
                mode='compiled' if plan.cuda else 'eager')


def attention(plan):
    dtype = torch.bfloat16 if plan.cuda else torch.float32
    ATTENTION.clear()
    rows = []
    for case, (q, k, v, mask) in attention_inputs(plan, dtype).items():
        entry = dict(case=case, shape=f"q {tuple(q.shape)}, keys {k.size(2)}", dtype=str(dtype).split('.')[-1],
                     picked=picked_backend(q, k, v, mask), **backend_times(plan, q, k, v, mask))
        if mask is not None:
            try:
                entry['flex'] = flex(plan, q, k, v, mask)
            except Exception as e:  # FlexAttention is young: its absence is reported, not a failure
                entry['flex'] = dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        ATTENTION.append(entry)
        runs = [b for b in ('flash_attention', 'efficient_attention', 'cudnn_attention', 'math') if not str(entry[b]).startswith('no')]
        fx = entry.get('flex', {})
        ok = bool(runs) and ('max_diff' not in fx or fx['max_diff'] <= tolerance)
        flex_note = '' if mask is None else (f"; flex {fx['ms']} ms, max diff {fx['max_diff']:.1e}" if 'ms' in fx
                                             else f"; flex: {fx.get('error', '')[:80]}")
        rows.append(result(f'attention_{case}', ok, f"SDPA picks {entry['picked']}; runs alone: {', '.join(runs)}{flex_note}"))
    return rows


ATTENTION = []  # the attention table (one entry per case), filled by attention()


# ---- recipe: train.py at nanoGPT's GPU recipe shape, then sampling speed ----

def run_train(plan, kind, folder, iters, max_time):
    """train.py with the GPU config (dry run: tiny and eager); returns its stdout (raises with its error).
    The shards are prepared first where they are missing (offline: the text is in the repo)."""
    if not os.path.exists(os.path.join(REPO, 'data/shakespeare_char/train.bin')):
        subprocess.run([sys.executable, os.path.join(REPO, 'data/shakespeare_char/prepare.py')], check=True, capture_output=True)
    args = [sys.executable, os.path.join(REPO, 'train.py'), os.path.join(REPO, f'config/train_shakespeare_char_{kind}_gpu.py'),
            f'--out_dir={folder}', '--overwrite=True', f'--max_iters={iters}', f'--eval_interval={iters}',
            f'--eval_iters={20 if plan.cuda else 2}', '--log_interval=1', f'--device={plan.dev}', f'--max_time={max_time:.0f}']
    args += [] if plan.cuda else DRY_RECIPE
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=max_time + 240)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
        raise RuntimeError(f"train.py exited {done.returncode}: {tail}")
    return done.stdout


def sampling_speed(model, plan, batch, sampler, tokens):
    """Tokens/s of one timed sampling run (after a short warm-up) at this batch, temperature 0.8."""
    s = Settings(temperature=0.8, sampler=sampler)
    idx = torch.zeros(batch, 1, dtype=torch.long, device=plan.dev)
    dtype = runtime.best_dtype(plan.dev)
    with runtime.autocast(plan.dev, dtype):
        generate(model, idx, 8, s, torch.Generator(device=plan.dev).manual_seed(0))
        sync(plan.dev)
        t0 = time.perf_counter()
        out, _ = generate(model, idx, tokens, s, torch.Generator(device=plan.dev).manual_seed(1))
        sync(plan.dev)
    return batch * out.size(1) / (time.perf_counter() - t0)


def recipe_run(plan, kind):
    iters = recipe_iters or (500 if plan.cuda else 6)
    folder = os.path.join(out_dir, f'recipe-{kind}')
    max_time = min(recipe_max_time, budget - (time.time() - plan.t0) - 60)
    if max_time < 10:
        return [result(f'recipe_{kind}', None, f"skipped: {budget:g}s budget spent")]
    log = run_train(plan, kind, folder, iters, max_time)
    lines = ITER_LINE.findall(log)
    ms = [float(t) for _, t in lines][min(10, len(lines) // 2):]  # after warm-up (compilation, allocator)
    mfu = re.findall(r'mfu ([-\d.]+)%', log)
    val = float(EVAL_LINE.findall(log)[-1][2])
    model, _ = checkpoint.load_model(folder, plan.dev)
    tokens = recipe_tokens or (256 if plan.cuda else 16)
    speeds = {f'batch{b}': (sampler, round(sampling_speed(model, plan, b, sampler, tokens), 1))
              for b, sampler in ((1, 'auto'), (64, 'auto' if kind == 'gpt' else 'collapse'))}
    entry = dict(kind=kind, iters=len(lines), ms_per_iter=round(statistics.median(ms), 2),
                 mfu_pct=float(mfu[-1]) if mfu else None, val_loss=val, params_m=round(model.get_num_params() / 1e6, 2),
                 sample_tokens_per_s=speeds, compile=plan.cuda, dtype=re.search(r'\| \S+ (\w+) x1 \|', log).group(1))
    RECIPE.append(entry)
    ok = val == val and len(lines) > 0
    return [result(f'recipe_{kind}', ok, f"{len(lines)} iters, {entry['ms_per_iter']} ms/iter, MFU {entry['mfu_pct']}%, "
                   f"val loss {val:.3f}; sampling {speeds['batch1'][1]} tok/s at batch 1, {speeds['batch64'][1]} at 64")]


def recipe(plan):
    RECIPE.clear()
    return [row for kind in ('gpt', 'wfc') for row in guarded(f'recipe_{kind}', recipe_run, plan, kind)]


RECIPE = []  # the recipe table (one entry per run), filled by recipe()


# ---- the report ----

def flex_cell(fx):
    return f"{fx['ms']} ({fx['mode']})" if 'ms' in fx else 'error' if 'error' in fx else '-'


def markdown(report):
    lines = [f"# gpu_check: {report['device_name']}, {report['date']}", '',
             f"torch {report['torch']}, reference: {report['reference']}, compile backend {report['compile_backend']}", '',
             '| check | status | detail |', '|---|---|---|']
    lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in report['checks']]
    if report['attention']:
        lines += ['', '| attention | shape | dtype | SDPA picks | flash ms | efficient ms | cudnn ms | math ms | flex ms | flex max diff |',
                  '|---|---|---|---|---|---|---|---|---|---|']  # flex ms: compiled on CUDA, eager (unfused) on the dry run
        for a in report['attention']:
            fx, cell = a.get('flex', {}), lambda v: v if not str(v).startswith('no') else 'no'
            lines.append(f"| {a['case']} | {a['shape']} | {a['dtype']} | {a['picked']} | {cell(a['flash_attention'])} | "
                         f"{cell(a['efficient_attention'])} | {cell(a['cudnn_attention'])} | {cell(a['math'])} | "
                         f"{flex_cell(fx)} | {format(fx['max_diff'], '.1e') if 'max_diff' in fx else '-'} |")
    if report['recipe']:
        lines += ['', '| recipe | params (M) | dtype | compile | iters | ms/iter | MFU % | val loss | tok/s batch 1 | tok/s batch 64 |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in report['recipe']:
            one, many = r['sample_tokens_per_s']['batch1'], r['sample_tokens_per_s']['batch64']
            lines.append(f"| {r['kind']} | {r['params_m']} | {r['dtype']} | {r['compile']} | {r['iters']} | {r['ms_per_iter']} | "
                         f"{r['mfu_pct']} | {r['val_loss']:.3f} | {one[1]} ({one[0]}) | {many[1]} ({many[0]}) |")
    return '\n'.join(lines) + '\n'


def write_report(plan, checks, seconds):
    report = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), device=plan.dev,
                  device_name=torch.cuda.get_device_name(plan.dev) if plan.cuda else f'CPU dry run ({platform.processor() or platform.machine()})',
                  torch=torch.__version__, python=platform.python_version(), reference=plan.reference,
                  compile_backend=plan.backend, tolerance=tolerance, seconds=round(seconds, 1),
                  checks=checks, attention=ATTENTION, recipe=RECIPE)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(out_dir, 'report.md'), 'w') as f:
        f.write(text)
    print(text + f"\nwrote {out_dir}/report.json and report.md ({seconds:.0f}s)", flush=True)


def main():
    configure(globals())
    chosen = [g for g in groups.split(',') if g]
    require(chosen and all(g in GROUPS for g in chosen), f"groups must be a comma-separated subset of {','.join(GROUPS)}, got {groups!r}")
    require(train_steps >= 2 and sample_tokens >= 1 and min(recipe_iters, recipe_tokens) >= 0 and min(recipe_max_time, budget) > 0,
            "need train_steps >= 2, sample_tokens >= 1, recipe_iters >= 0, recipe_tokens >= 0, recipe_max_time > 0 and budget > 0")
    try:
        dev = runtime.resolve(device, 'float32')[0]
    except (ValueError, RuntimeError) as e:
        raise UserError(e) from None
    require(dev.split(':')[0] in ('cpu', 'cuda'), f"device must be cpu or cuda here, got {dev!r}")
    plan = Plan(dev)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 comparisons mean fp32
    warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')  # the dry run's choice
    print(f"gpu_check on {dev}: {', '.join(chosen)}; reference {plan.reference}", flush=True)
    checks = []
    for name in chosen:
        rows = guarded(name, globals()[name], plan)
        print('\n'.join(f"  {c['status']:4s}  {c['name']}: {c['detail']}" for c in rows), flush=True)
        checks += rows
    write_report(plan, checks, time.time() - plan.t0)
    failed = [c for c in checks if c['status'] == 'fail']
    if failed:
        fail(f"{len(failed)} check(s) failed, first {failed[0]['name']}: {failed[0]['detail']}", code=1)


if __name__ == '__main__':
    cli(main)
