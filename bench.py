"""
Speed on this machine, training and sampling, GPT and WFC side by side in one process: one table.

    python bench.py                                       # nanoGPT's CPU recipe (4 x 128, block 64, batch 12), fp32 and bf16
    python bench.py --n_embd=256 --variants=gpt           # one variant, wider
    python bench.py config/train_shakespeare_char_wfc.py  # a training config's model and batch
    python bench.py --wfc_ckpt=out-shakespeare-char-wfc --gpt_ckpt=out-shakespeare-char-gpt  # sample trained models
    python bench.py --scaling=True                        # cost as block_size doubles 64 -> 512 and F doubles 4 -> 32
    python bench.py --slides=0,8,16,32 --gpt_ckpt=out-shakespeare-char-gpt --wfc_ckpt=out-shakespeare-char-wfc

Variants: 'gpt' is the settings with n_future = 0 and learned positions (nanoGPT's model); 'wfc' is
them with n_future future slots (2 when 0) and rotary positions; 'config' is the settings as given.
Rows: each variant x each dtype of `dtypes` ('auto' = bf16 where the hardware has it).

- train: one step as train.py takes it (a batch from the shards, forward under autocast, backward,
  gradient clipping, AdamW, the loss read back), median of `steps` timed steps after `warmup`.
  tokens/s = batch_size x block_size / step time. MFU = runtime.training_flops (every pass, both
  streams of the pinned layout, attention, decodes) / step time / peak, where the peak is the
  measured matmul rate of the dtype in use on CPU (2048 x 2048 products, printed above the table)
  and the datasheet peak on CUDA (runtime.peak_flops).
- sample: sampling.generate from a one-token prompt, sample_tokens new tokens, at batch 1 and at
  batch num_samples (tokens/s counts every row's tokens), median of `repeats` runs. GPT uses its KV
  cache; WFC the pinned past's cache, the `policy` (threshold: several tokens per step) and warm
  starts as the model was trained. passes/token and tokens/step come from the batch-1 run.
  Untrained weights are near-uniform, so a WFC model commits one token per step: give a trained
  checkpoint (--wfc_ckpt) for meaningful tokens/step.
- slides: sampling speed for each Settings.slide (once the window is full, slide 0 rebuilds the
  cache every token, as nanoGPT recomputes its window; slide s rebuilds every s + 1 tokens and
  keeps block_size - s .. block_size tokens of context), beside the GPT's val loss averaged over
  exactly those context lengths (from the loss by position of val windows): what a slide costs.
- memory: the peak over the case of the process's resident set (Linux: VmHWM, reset between
  cases) minus the resident set at its start: model, optimizer state, activations, caches. CUDA:
  torch.cuda.max_memory_allocated.
Run it on a quiet machine: other processes' load shows up in every column.
"""

import ctypes
import json
import statistics
import sys
import time

import torch

from configurator import UserError, cli, configure, output_file, require
from generation.decoding import Settings
from generation.sampling import generate, warm_up
from model import GPTConfig
from modeling.recipe import Recipe, draw_depth
from modeling.solver import Solver
from plumbing import checkpoint
from plumbing import runtime
from plumbing.dataloader import DataError, TokenShards, data_dir, read_meta

# -----------------------------------------------------------------------------
# the model and batch: nanoGPT's CPU recipe for tiny-shakespeare characters by default
globals().update(checkpoint.default_settings())  # every model setting (model.py, recipe.py, solver.py) is one here
slot_exit = False               # read by this script (sampling a checkpoint): the solver's default
block_size, vocab_size, n_layer, n_head, n_embd, bias = 64, 65, 4, 4, 128, False
n_future = 2                   # future slots of the 'wfc' variant (the research default)
past_loss, dist_power = 1.0, 1.0  # the WFC research default (config/train_shakespeare_char_wfc.py)
batch_size = 12                # rows per training step
dataset = 'shakespeare_char'    # batches from data/<dataset> (or a path); random tokens when it is missing
variants = 'gpt,wfc'            # comma-separated: 'gpt', 'wfc', 'config' (see above)
dtypes = 'float32,auto'         # comma-separated autocast dtypes; 'auto' = bf16 where native, else skipped as a duplicate
device = 'auto'                # 'auto', 'cpu', 'cuda', 'mps'
compile = False                 # torch.compile the training model, and time compiled sampling too (runtime.compile_samplers)
threads = 0                     # torch threads (0 = torch's default: one per core)
# timing
steps = 30                      # timed training steps per row
warmup = 5                      # untimed training steps first (allocator, caches, compilation)
sample_tokens = 500             # new tokens per sampling run
num_samples = 8                 # the batch of the batched sampling column (0 = skip it)
repeats = 3                     # sampling runs per measurement (median)
gpt_ckpt = ''                   # sample this checkpoint in the 'gpt' rows instead of untrained weights
wfc_ckpt = ''                   # sample this checkpoint in the 'wfc' rows instead of untrained weights
scaling = False                 # also print the scaling tables (block_size 64 -> 512, F 4 -> 32), first dtype only
slides = ''                     # e.g. '0,8,16,32': also print the slide table (speed vs context), first dtype only
out = ''                        # also write every number as JSON here
# sampler (sampling.Settings)
sampler = 'auto'               # 'auto' (WFC: speculative where it can), 'speculative', 'collapse', 'causal'
policy = 'first'               # collapse sampler policy ('threshold' commits several sure tokens per step)
tau = 1.0                      # collapse sampler, threshold policy: entropy limit (bits)
temperature = 0.8              # sampling temperature
top_k = 200                    # sampling top-k
slide = 0                      # learned positions: extra tokens dropped at the block edge
sample_max_loop = 0             # WFC refinement cap per step (0 = the model's max_loop); slot_exit (a model
                                # setting above) turns on per-slot early exit
out_dir = ''                    # a run folder (or checkpoint): measure its model and sample its weights (variant 'run')
# accepted from train.py config files (python bench.py config/x.py), not used here: refused on the command line
max_iters = 0                  # a train.py setting (config files only)
lr_decay_iters = 0             # a train.py setting (config files only)
warmup_iters = 0               # a train.py setting (config files only)
min_lr = 0.0                   # a train.py setting (config files only)
eval_interval = 0              # a train.py setting (config files only)
eval_iters = 0                 # a train.py setting (config files only)
log_interval = 0               # a train.py setting (config files only)
always_save_checkpoint = True  # a train.py setting (config files only)
gradient_accumulation_steps = 1 # a train.py setting (config files only)
learning_rate = 0.001          # a train.py setting (config files only)
beta2 = 0.99                   # a train.py setting (config files only)
weight_decay = 0.1             # a train.py setting (config files only)
wandb_log = False              # a train.py setting (config files only)
wandb_project = ''             # a train.py setting (config files only)
wandb_run_name = ''            # a train.py setting (config files only)
# -----------------------------------------------------------------------------

MODEL_KEYS = list(checkpoint.default_settings())
TRAIN_ONLY = ('max_iters', 'lr_decay_iters', 'warmup_iters', 'min_lr', 'eval_interval', 'eval_iters', 'log_interval',
              'always_save_checkpoint', 'gradient_accumulation_steps', 'wandb_log', 'wandb_project', 'wandb_run_name')


class PeakMemory:
    """Peak memory used inside a `with` block, in bytes (see the module docstring)."""

    def __init__(self, dev):
        self.cuda = dev.startswith('cuda')

    @staticmethod
    def _status(field):
        try:
            with open('/proc/self/status') as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
        except (OSError, StopIteration):
            return None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:  # hand freed heap pages back (glibc), then '5' resets the peak resident set (Linux >= 4.0)
                ctypes.CDLL('libc.so.6').malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
            except OSError:
                pass
            self.start = self._status('VmRSS:')
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            top = self._status('VmHWM:')
            self.peak = None if top is None or self.start is None else max(0, top - self.start)


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def variant_args(name, settings):
    args = {k: settings[k] for k in MODEL_KEYS}
    if name == 'run':
        return checkpoint.settings_of(checkpoint.load(out_dir))
    if name == 'gpt':
        args.update(n_future=0, pos_emb='learned')
    elif name == 'wfc':
        args.update(n_future=args['n_future'] or 2, pos_emb='rope')
    elif name != 'config':
        raise ValueError(f"unknown variant {name!r}: use 'gpt', 'wfc', 'config' or --out_dir=RUN")
    return args


def batches(args, dev):
    """batch(i) -> (x, y): the shards of `dataset` when they exist and fit the vocabulary, else random tokens."""
    folder = data_dir(dataset)
    try:
        meta = read_meta(folder) or {}
        if meta.get('vocab_size', args['vocab_size']) <= args['vocab_size']:
            shards = TokenShards(folder, 'train', args['block_size'], args['vocab_size'], verify=False)
            return lambda i: shards.batch(batch_size, 1000 + i, dev), folder
    except DataError:
        pass
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args['vocab_size'], (64, batch_size, args['block_size'] + 1), generator=g)
    return lambda i: (tokens[i % 64, :, :-1].to(dev), tokens[i % 64, :, 1:].to(dev)), 'random tokens'


def train_speed(args, dev, dtype, peak):
    """Median step time of training; returns a dict of the row's training numbers."""
    torch.manual_seed(0)
    with PeakMemory(dev) as memory:
        model = checkpoint.build(**args).to(dev)
        optimizer = model.configure_optimizer(weight_decay, learning_rate, (0.9, beta2), dev.split(':')[0])
        step_model = torch.compile(model) if compile else model
        batch, source = batches(args, dev)
        ctx = runtime.autocast(dev, dtype)
        times, passes = [], []
        for i in range(warmup + steps):
            sync(dev)
            t0 = time.perf_counter()
            x, y = batch(i)
            depth = draw_depth(model.config, model.recipe, x.size(0))
            with ctx:
                _, loss = step_model(x, y) if not args['n_future'] else step_model(x, y, depth=depth)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                passes.append(depth)
    dt = statistics.median(times)
    flops = runtime.training_flops(model, batch_size, args['block_size'], statistics.mean(passes))
    return dict(train_tokens_per_s=batch_size * args['block_size'] / dt, step_ms=dt * 1000, mfu=flops / dt / peak,
                train_peak_mb=None if memory.peak is None else memory.peak / 2 ** 20, data=source,
                params_m=model.get_num_params() / 1e6)


def sampler_model(name, args, dev, trained=True):
    """The model a row samples: the variant's checkpoint when given (and trained), else untrained weights."""
    path = {'gpt': gpt_ckpt, 'wfc': wfc_ckpt, 'run': out_dir}.get(name, '') if trained else ''
    if path:
        model, _ = checkpoint.load_model(path, dev, slot_exit=slot_exit)
        return model, path
    torch.manual_seed(0)
    return checkpoint.build(**args).to(dev).eval(), 'untrained'


def stack_share(model, dev, run):
    """The share of run()'s time spent inside model.stack, the blocks' own work: the floor a sampler
    cannot go below with these kernels (the rest is Python, dispatch, masks, filters and draws).
    Every call is timed (with a device sync on CUDA), so this is a run of its own, not a timed one."""
    inside, own, stack = [0.0], 'stack' in vars(model), model.stack

    def timed(*args, **kwargs):
        sync(dev)
        t0 = time.perf_counter()
        result = stack(*args, **kwargs)
        sync(dev)
        inside[0] += time.perf_counter() - t0
        return result
    model.stack = timed
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        if own:
            model.stack = stack
        else:
            del model.stack  # back to the class's method
    return inside[0] / total


def use_compiled(model, compiled):
    """Swap in a sampler set: (blocks, steps), the compiled blocks and steps of runtime.compile_samplers
    or the eager blocks and no steps."""
    blocks, steps = compiled
    for i, block in enumerate(blocks):
        model.transformer.h[i] = block
    for name in runtime.SAMPLER_ATTRIBUTES:
        model.__dict__.pop(name, None)
    model.__dict__.update(steps)


def sample_speed(model, dev, dtype, batch, slide=slide, compiled=None):
    """Median over `repeats` runs of sampling sample_tokens tokens at this batch, and the share of a
    run spent inside the block stack (stack_share). compiled: the model's compiled samplers
    (runtime.compile_samplers, as compiled_samplers returns them), timed in runs interleaved with the
    eager ones (compiled_tokens_per_s), after a warm-up past the block edge that compiles every variant."""
    s = Settings(temperature=temperature, top_k=top_k, sampler=sampler, policy=policy, tau=tau, slide=slide,
                 max_loop=sample_max_loop).check()
    idx = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # one token: '\n' in the char vocabulary
    eager = (list(model.transformer.h), {})
    kinds = {'eager': eager, **({'compiled': compiled} if compiled else {})}
    runs = {kind: [] for kind in kinds}
    with runtime.autocast(dev, dtype), PeakMemory(dev) as memory:
        for kind, samplers in kinds.items():  # warm-up
            use_compiled(model, samplers)
            if kind == 'compiled':
                warm_up(model, idx, s)
            else:
                generate(model, idx, 8, s, torch.Generator(device=dev).manual_seed(0))
        for r in range(repeats):
            for kind, samplers in kinds.items():
                use_compiled(model, samplers)
                sync(dev)
                t0 = time.perf_counter()
                tokens, record = generate(model, idx, sample_tokens, s, torch.Generator(device=dev).manual_seed(r))
                sync(dev)
                runs[kind].append((time.perf_counter() - t0, record.summary()))
        use_compiled(model, eager)
        share = stack_share(model, dev, lambda: generate(model, idx, sample_tokens, s, torch.Generator(device=dev).manual_seed(0)))
    speed = {kind: batch * tokens.size(1) / statistics.median(t for t, _ in times) for kind, times in runs.items()}
    summary = runs['eager'][0][1]
    return dict(tokens_per_s=speed['eager'], compiled_tokens_per_s=speed.get('compiled'),
                passes_per_token=summary['passes_per_token'], tokens_per_step=summary['tokens_per_step'],
                tokens_per_call=summary.get('tokens_per_call'), acceptance=summary.get('acceptance'), stack_share=share,
                peak_mb=None if memory.peak is None else memory.peak / 2 ** 20)


def compiled_samplers(model):
    """The model's compiled samplers (runtime.compile_samplers) as (blocks, steps), the eager ones left in place."""
    eager = list(model.transformer.h)
    runtime.compile_samplers(model)
    compiled = (list(model.transformer.h), {name: getattr(model, name) for name in runtime.SAMPLER_ATTRIBUTES})
    use_compiled(model, (eager, {}))
    return compiled


def measure_row(name, args, dev, dtype, peak, trained=True):
    row = dict(variant=name, dtype=dtype, n_future=args['n_future'], block_size=args['block_size'],
               n_embd=args['n_embd'], **train_speed(args, dev, dtype, peak))
    model, source = sampler_model(name, args, dev, trained)
    compiled = compiled_samplers(model) if compile else None
    one = sample_speed(model, dev, dtype, 1, compiled=compiled)
    row.update(sample_from=source, sample_tokens_per_s=one['tokens_per_s'], compiled_tokens_per_s=one['compiled_tokens_per_s'],
               passes_per_token=one['passes_per_token'],
               tokens_per_step=one['tokens_per_step'], tokens_per_call=one['tokens_per_call'], acceptance=one['acceptance'],
               stack_share=one['stack_share'],
               sample_peak_mb=one['peak_mb'])
    if num_samples > 1:
        many = sample_speed(model, dev, dtype, num_samples, compiled=compiled)
        row.update(batch_tokens_per_s=many['tokens_per_s'], batch_compiled_tokens_per_s=many['compiled_tokens_per_s'],
                   batch_stack_share=many['stack_share'])
    return row


@torch.no_grad()
def loss_by_context(model, dev, dtype, lengths, n=512, rows=64):
    """{L: the GPT's mean val loss (nats) on the same n target tokens, each predicted from its L
    preceding tokens}: paired, so that differences between context lengths are not sampling noise."""
    bs, V = model.config.block_size, model.config.vocab_size
    x, y = TokenShards(data_dir(dataset), 'val', bs, V, verify=False).batch(n, 1234, dev)
    targets = y[:, -1]  # each window's last token, after bs tokens
    losses = {}
    with runtime.autocast(dev, dtype):
        for L in lengths:
            total = 0.0
            for lo in range(0, n, rows):
                logits, _ = model(x[lo:lo + rows, bs - L:])  # the last position's logits
                total += torch.nn.functional.cross_entropy(logits[:, -1].float(), targets[lo:lo + rows], reduction='sum').item()
            losses[L] = total / n
    return losses


def slide_table(names, base, dev, dtype):
    """Rows of the slide table (see the module docstring)."""
    models = {name: sampler_model(name, base[name], dev)[0] for name in ('gpt', 'wfc') if name in names}
    sizes = [int(v) for v in slides.split(',') if v]
    try:
        bs = base['gpt']['block_size'] if 'gpt' in models else 0
        lengths = range(max(1, bs - max(sizes)), bs + 1)
        by_context = loss_by_context(models['gpt'], dev, dtype, lengths) if 'gpt' in models else None
    except DataError:
        by_context = None
    rows = []
    for s in sizes:
        row = dict(slide=s)
        for name, model in models.items():
            row[f'{name}_tokens_per_s'] = sample_speed(model, dev, dtype, 1, slide=s)['tokens_per_s']
        if by_context is not None:  # after a rebuild the window holds max(1, bs - s) tokens, then grows to bs
            row['gpt_context_loss'] = statistics.mean(by_context[L] for L in range(max(1, bs - s), bs + 1))
        rows.append(row)
    print(f"\nslide (batch 1, {sample_tokens} tokens, {dtype}): tokens/s, and the GPT's val loss averaged over the "
          f"context lengths each slide leaves it (nats, the same 512 val targets for every slide; slide 0 = full context)")
    print(f"{'slide':>5s} {'gpt tok/s':>10s} {'wfc tok/s':>10s} {'gpt ctx loss':>12s}")
    for r in rows:
        print(f"{r['slide']:5d} {fmt(r.get('gpt_tokens_per_s'), '10,.0f')} {fmt(r.get('wfc_tokens_per_s'), '10,.0f')} "
              f"{fmt(r.get('gpt_context_loss'), '12.4f')}", flush=True)
    return rows


def fmt(value, spec):
    return '-' if value is None else format(value, spec)


def print_table(rows, title):
    head = (f"{'variant':8s} {'dtype':8s} {'F':>3s} {'block':>5s} {'C':>4s} | {'train tok/s':>11s} {'ms/step':>8s} "
            f"{'MFU':>6s} {'mem MB':>7s} | {'sample tok/s':>12s} {'compiled':>8s} {f'x{num_samples} tok/s':>11s} "
            f"{'compiled':>8s} {'passes/tok':>10s} {'tok/step':>8s} {'tok/call':>8s} {'accepted':>10s} {'in stack':>8s} "
            f"{f'x{num_samples}':>5s} {'mem MB':>7s}")
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for r in rows:
        print(f"{r['variant']:8s} {r['dtype']:8s} {r['n_future']:3d} {r['block_size']:5d} {r['n_embd']:4d} | "
              f"{r['train_tokens_per_s']:11,.0f} {r['step_ms']:8.1f} {r['mfu'] * 100:5.1f}% {fmt(r['train_peak_mb'], '7.1f')} | "
              f"{r['sample_tokens_per_s']:12,.0f} {fmt(r.get('compiled_tokens_per_s'), '8,.0f')} "
              f"{fmt(r.get('batch_tokens_per_s'), '11,.0f')} {fmt(r.get('batch_compiled_tokens_per_s'), '8,.0f')} "
              f"{r['passes_per_token']:10.2f} {r['tokens_per_step']:8.2f} {fmt(r.get('tokens_per_call'), '8.2f')} "
              f"{' '.join(f'{a:.2f}' for a in (r.get('acceptance') or [])[:2]) or '-':>10s} "
              f"{r['stack_share']:8.0%} {fmt(r.get('batch_stack_share'), '5.0%')} "
              f"{fmt(r['sample_peak_mb'], '7.1f')}", flush=True)


def main():
    settings = configure(globals(), sources=(GPTConfig, Recipe, Solver))
    given = [a[2:].partition('=')[0] for a in sys.argv[1:] if a.startswith('--')]
    unused = [k for k in given if k in TRAIN_ONLY]
    require(not unused, f"--{unused[0] if unused else ''} is a training setting: bench.py times fixed steps and ignores it")
    require(min(steps, batch_size, sample_tokens, repeats) >= 1 and warmup >= 0 and num_samples >= 0,
            "need steps, batch_size, sample_tokens and repeats >= 1, warmup and num_samples >= 0")
    if out:
        output_file(out)
    for name, path in (('gpt', gpt_ckpt), ('wfc', wfc_ckpt)):  # before any timing: a row's label says what it runs
        n_future = checkpoint.load(path)['model_args'].get('n_future', 0) if path else 0
        require(not path or (n_future > 0) == (name == 'wfc'), f"--{name}_ckpt={path} is a "
                f"{'WFC' if n_future else 'GPT'} checkpoint (n_future = {n_future}); its row would be labelled {name!r}")
    try:
        dev = runtime.resolve(device, 'float32')[0]
        names = ['run'] if out_dir else [v for v in variants.split(',') if v]
        kinds = []
        for d in dtypes.split(','):
            d = runtime.resolve(dev, d)[1]
            if d not in kinds:
                kinds.append(d)
        rows_args = [(n, variant_args(n, settings)) for n in names]
        for _, a in rows_args:
            checkpoint.build(**a)
    except (ValueError, RuntimeError) as e:
        raise UserError(e) from None
    if threads:
        torch.set_num_threads(threads)
    peaks = {}
    if dev == 'cpu':
        native = runtime.cpu_has_bf16()
        for d in {'float32', *kinds} - {'float16'}:  # fp16 autocast on CPU is measured against the fp32 peak
            # emulated bf16 matmuls are so slow here that a 2048-sized product takes minutes: measure a small one
            peaks[d] = runtime.measure_matmul_flops(d, n=2048 if d == 'float32' or native else 256, repeats=5)
        peaks['float16'] = peaks['float32']
        bf16 = f", bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s ({'native' if native else 'emulated: no AVX512-BF16/AMX'})" \
            if 'bfloat16' in peaks else ''
        print(f"cpu, {torch.get_num_threads()} threads: matmul peak (2048 x 2048) fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s"
              f"{bf16}; MFU is against the peak of the row's dtype")
    else:
        peaks = {d: runtime.peak_flops(dev, d) for d in ('float32', 'bfloat16', 'float16')}
        print(f"{dev}: {torch.cuda.get_device_name() if dev.startswith('cuda') else dev}, peak (datasheet) "
              f"bf16 {peaks['bfloat16'] / 1e12:.0f} TFLOP/s, fp32 {peaks['float32'] / 1e12:.0f} TFLOP/s")
    print(f"torch {torch.__version__}, batch {batch_size}, {steps} timed steps after {warmup}, sampling {sample_tokens} "
          f"tokens ({policy} policy, tau {tau}, slide {slide}), medians of {repeats}, compile={compile}")
    rows = []
    for name, args in rows_args:
        for d in kinds:
            rows.append(measure_row(name, args, dev, d, peaks[d]))
    print_table(rows, f"{n_layer} layers x {n_embd} wide, {n_head} heads, vocabulary {vocab_size}; "
                      f"train data: {rows[0]['data']}; sampled: {', '.join(sorted({r['sample_from'] for r in rows}))}")
    result = dict(settings=settings, peaks=peaks, rows=rows, machine=dict(device=dev, threads=torch.get_num_threads(),
                                                                          torch=torch.__version__))
    if scaling:
        d, base = kinds[0], dict(rows_args)
        table = []
        if 'gpt' in base or 'wfc' in base:
            for name in [n for n in ('gpt', 'wfc') if n in base]:
                for bs in (64, 128, 256, 512):
                    table.append(measure_row(name, {**base[name], 'block_size': bs}, dev, d, peaks[d], trained=False))
        print_table(table, f"scaling with block_size ({d}; sampling untrained weights: one token per WFC step)")
        f_table = []
        if 'wfc' in base:
            for F_ in (4, 8, 16, 32):
                f_table.append(measure_row('wfc', {**base['wfc'], 'n_future': F_}, dev, d, peaks[d], trained=False))
            print_table(f_table, f"scaling with F (WFC pinned, block {base['wfc']['block_size']}, {d})")
        result.update(scaling_block=table, scaling_future=f_table)
    if slides:
        result['slides'] = slide_table(names, dict(rows_args), dev, kinds[0])
    if out:
        with open(out, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    cli(main)
