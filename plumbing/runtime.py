"""Where and how to run: device and dtype choice, and the autocast context, shared by every script."""

import contextlib
import os

import torch

TORCHRUN_VARS = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def best_device():
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def cpu_has_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls run natively (elsewhere they are emulated and slower)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return ' avx512_bf16' in flags or ' amx_bf16' in flags


def best_dtype(device):
    """The fastest autocast dtype the device runs: bf16 on CUDA (fp16 before Ampere) and on CPUs
    with native bf16 (measured here: 2.7x the fp32 matmul rate), else fp32."""
    kind = device.split(':')[0]
    if kind == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if kind == 'cpu' and cpu_has_bf16():
        return 'bfloat16'
    return 'float32'


def ddp_env():
    """(rank, local_rank, world) of a process started by torchrun, or None for a plain process.
    Some of torchrun's variables without the others (set by hand, left over in a shell) would fail
    deep inside init_process_group, so they are named here."""
    given = [k for k in TORCHRUN_VARS if k in os.environ]
    if not given:
        return None
    missing = [k for k in TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise ValueError(f"a partial torchrun environment: {', '.join(given)} set but not {', '.join(missing)}; "
                         f"start DDP with torchrun, or unset {', '.join(given)} for a single process")
    try:
        return tuple(int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    except ValueError:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers, got "
                         f"{[os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')]}") from None


def resolve(device, dtype):
    """'auto' settings -> concrete ones; checks the rest. Returns (device, dtype)."""
    device = best_device() if device == 'auto' else device
    kind = device.split(':')[0]
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available here; use --device=cpu or --device=auto")
    if kind == 'mps' and not (getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()):
        raise RuntimeError(f"device={device!r} but MPS (Apple silicon) is not available in this torch build or "
                           f"machine; use --device=cpu or --device=auto")
    dtype = best_dtype(device) if dtype == 'auto' else dtype
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return device, dtype


def autocast(device, dtype):
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    kind = device.split(':')[0]
    if dtype == 'float32' or kind == 'mps':
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, dtype=getattr(torch, dtype))


# dense bf16/fp16 tensor-core peaks from the datasheets, in FLOP/s (fp32 is far lower: see peak_flops)
GPU_PEAKS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, '4090': 165e12, '3090': 71e12}


def measure_matmul_flops(dtype, n=1024, repeats=5):
    """This machine's achieved matmul rate (FLOP/s), median of several n x n products."""
    import time
    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def peak_flops(device, dtype):
    """The denominator of MFU: the GPU's datasheet peak, or on CPU the measured matmul peak of the
    dtype in use (a CPU has no datasheet number that it reaches)."""
    kind = device.split(':')[0]
    if kind == 'cuda':
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), 312e12)
        return peak if dtype != 'float32' else peak / 16  # tf32-less fp32 is a small fraction
    if kind == 'cpu':  # 1024-sized products: ~20 ms at start-up; bench.py measures larger ones
        return measure_matmul_flops(dtype if dtype != 'float16' else 'float32', n=1024, repeats=5)
    return float('nan')  # mps: no reliable number


def training_flops(model, B, T, passes=None, recipe=None):
    """Matmul FLOPs of one training forward + backward on B rows of T tokens (PaLM appendix B, as
    nanoGPT counts them), counting what WFC really computes: every pass, both streams of the pinned
    layout, dense attention over all keys, decodes of supervised passes (through the coda of a
    sandwich, whose passes run only its core), warm-start passes (expected). Passes without
    gradient count forward only. passes: the future's depth (default: its mean under loop_law);
    recipe: default the model's."""
    c, r, n_params = model.config, recipe or model.recipe, model.get_num_params()
    V, C, L = c.vocab_size, c.n_embd, c.n_layer
    stack = 2 * (n_params - V * C)        # forward FLOPs per token per pass (dense part)
    attn = lambda keys: 4 * L * C * keys  # QK^T and AV, forward, per query token
    decode = 2 * V * C
    n_core = L - c.n_prelude - c.n_coda
    # the causal stream per token: the prelude and coda once, the core n_loop times
    causal = (L + (c.n_loop - 1) * n_core) * (stack + attn(T)) / L
    if c.n_future == 0:
        return 3 * B * T * (causal + decode)
    depth = r.depth(c)
    passes = passes or (depth if r.loop_law != 'uniform' else (depth + 1) / 2)
    bptt = passes if r.bptt <= 0 else min(r.bptt, passes)
    S, keys = (T * r.future_frac, T * (1 + r.future_frac)) if c.attn == 'pinned' else (T + c.n_future, T + c.n_future)
    block = (stack + attn(keys)) / L      # one block, forward, per future slot
    core = n_core * block                  # a pass loops only the core; the prelude runs once per slot
    readout = c.n_coda * block + decode    # and the coda decodes every state that gets a loss
    decoded = bptt if r.consistency > 0 else min(r.supervise, bptt)
    future = 3 * bptt * core + (passes - bptt) * core + 3 * c.n_prelude * block + 3 * decoded * readout
    future += r.warm_prob * (depth + 1) / 2 * core
    total = S * future
    if c.attn == 'pinned':
        total += 3 * T * (causal + (decode if r.past_loss > 0 else 0))
    return B * total


SAMPLER_ATTRIBUTES = ('compiled_decode', 'compiled_decided_steps', 'compiled_round', 'compiled_decided_rounds',
                      'rounds_per_call')  # the model attributes compile_samplers sets
ROUNDS_PER_CALL = 4  # sampler steps (causal) or rounds (speculative) per compiled call: see compile_samplers


def compile_samplers(model, backend='inductor', rounds_per_call=ROUNDS_PER_CALL):
    """torch.compile what the samplers run, after which a warm-up generation past the block edge
    compiles every graph they meet (sample.py and bench.py run one, untimed). Two kinds:
    - Whole steps on a ring cache of fixed shape (engine.RingCache), cache writes and masks included:
      the causal sampler's one-token step of a rolling (rotary) model (engine.run_ring, as
      model.compiled_decode) and the speculative sampler's stack call of a round
      (speculative.round_call, as model.compiled_round); without a constraint the draws and the
      acceptance rule too, rounds_per_call steps or rounds in one graph (engine.decided_steps as
      model.compiled_decided_steps, speculative.decided_rounds as model.compiled_decided_rounds;
      model.rounds_per_call says how many). A call's fixed cost (dynamo's guard check, the runtime
      wrappers, the Python around it: large beside a batch-1 round's kernels on a CPU) is then paid
      once per rounds_per_call; a longer graph takes longer to build (sample.py's warm-up at 4
      against 1: about 2x on the CPU with an empty inductor cache; tracing time grows with it too,
      which is why the tests trace 2), and a generation runs up to rounds_per_call - 1 of them past
      its end. Eagerly a call runs one: on the CPU the same text from a seed either way (the noise
      of several is drawn as one tensor, which the CPU generator fills in the order of separate
      draws). Their shapes stay the same from call to call (positions are tensors): a graph per
      token count and batch size (for a speculative batch that shrinks: its first size, one
      dynamic graph for the sizes between, and 1), compiled once.
    - Every other stack call (the collapse sampler's refinement, a learned-position window rebuilt at
      the edge): each block on its own with dynamic shapes. The samplers' own Python (windows, masks,
      draws) stays eager; a block sees a handful of variants (cached keys or not, a mask or none, one
      query row or many), each compiled once. Whole-stack compiles of these recompiled at every new
      shape.
    The rotary tables are sized for 2^17 positions up front: a table that grows is a new shape.
    Returns model."""
    import torch._dynamo
    from generation import engine, speculative  # the steps live with the samplers
    if rounds_per_call < 1:
        raise ValueError(f"rounds_per_call must be at least 1, got {rounds_per_call}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if model.rotary is not None:
        model.rotary.ensure(1 << 17)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = torch.compile(block, dynamic=True, backend=backend)
    model.compiled_decode = torch.compile(engine.run_ring, backend=backend, fullgraph=True)
    model.compiled_decided_steps = torch.compile(engine.decided_steps, backend=backend, fullgraph=True)
    model.compiled_round = torch.compile(speculative.round_call, backend=backend, fullgraph=True)
    model.compiled_decided_rounds = torch.compile(speculative.decided_rounds, backend=backend, fullgraph=True)
    model.rounds_per_call = rounds_per_call
    return model


def uncompile_samplers(model):
    """Undo compile_samplers: the eager blocks and steps again."""
    model.transformer.h = torch.nn.ModuleList([getattr(b, '_orig_mod', b) for b in model.transformer.h])
    for name in SAMPLER_ATTRIBUTES:
        model.__dict__.pop(name, None)
    return model


def compile_passes(model):
    """torch.compile one pass of the recurrence (model.update) for training, instead of the whole
    forward: a WFC step draws its depth at random and switches gradients off for the passes before
    the truncation, which a whole-forward graph would re-trace for every depth (dynamo refused it).
    One pass is the same few graphs at every depth. Returns model."""
    model.update = torch.compile(model.update)
    return model
