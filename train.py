"""
Train a GPT, a looped GPT or a WFC model (model.py) on token shards in data/<dataset>/.

    python train.py config/train_shakespeare_char_wfc.py                 # one CPU or GPU
    python train.py config/train_shakespeare_char_gpt.py --max_iters=500  # override any setting
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py   # DDP, one node

Every setting below can be changed by config files and --key=value (configurator.py). Ctrl-C or
SIGTERM writes a checkpoint at the next step boundary and exits with code 75 (a second one exits at
once); rerun with --init_from=resume to continue exactly where it stopped (`python train.py
--out_dir=RUN --init_from=resume` is enough: the run's saved settings come back, and config files or
--key=value given with it override them). out_dir gets ckpt.pt (the resume point), best.pt (the best
val loss so far) and keep_last rolling ckpt-<iter>.pt (checkpoint.py). One run per out_dir: the
training process holds out_dir/train.lock, and a second start into the folder is refused (exit 2).
Exit codes: 0 done, 2 bad config, data or checkpoint, 3 non-finite loss, gradient or val loss,
4 a loss spike with spike_action='stop' (3 and 4 stop before the update and leave the last good
checkpoint untouched), 75 stopped by a signal (checkpoint written).
"""

import json
import math
import os
import platform
import signal
import sys
import textwrap
import time
from dataclasses import fields
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, UserError, configure, fail, require
from model import GPTConfig
from modeling.recipe import Recipe, draw_depth
from modeling.solver import Solver
from plumbing import checkpoint
from plumbing import runtime
from plumbing.dataloader import TokenShards, data_dir, read_meta, step_seed

# -----------------------------------------------------------------------------
# settings
# I/O
out_dir = 'out'                 # the run folder: checkpoints, logs, config.json
eval_interval = 2000            # iterations between evaluations (each one may write a checkpoint)
log_interval = 1                # iterations between log lines
eval_iters = 200                # batches per split per evaluation (the same batches every time)
eval_only = False               # evaluate the initial/resumed model once and exit
always_save_checkpoint = True   # False: write ckpt.pt only when the val loss improves
keep_last = 0                   # also keep the newest keep_last evaluations' checkpoints as ckpt-<iter>.pt (0 = none)
init_from = 'scratch'           # 'scratch' or 'resume' (from out_dir/ckpt.pt, with the settings saved there)
overwrite = False               # scratch into an out_dir that holds a run: replace it (else that is refused)
dry_run = False                 # check the settings, data and model, print the plan, write nothing and exit
max_time = 0.0                  # stop after this many seconds of training time (0 = no limit); the lr schedule stays in iterations
# wandb (optional; WANDB_MODE=offline works without a network)
wandb_log = False               # log to Weights & Biases
wandb_project = 'wfc-gpt'       # its project (with wandb_log)
wandb_run_name = 'run'          # its run name (with wandb_log)
# data
dataset = 'openwebtext'         # a folder under data/, or a path to one
gradient_accumulation_steps = 40  # micro-steps per iteration, summed over all DDP ranks
batch_size = 12                 # rows per micro-step
future_warmup_iters = 0         # WFC curriculum: the training future grows from 1 slot to n_future over these iterations
# model architecture (model.GPTConfig; its comments say more)
block_size = 256                # training context length, tokens
vocab_size = 50304              # tokens (a dataset's meta.pkl sets it)
n_layer = 12                    # blocks: n_prelude + looped core + n_coda
n_prelude = 0                   # sandwich blocks run once before the looped core
n_coda = 0                      # sandwich blocks run once after it, to decode
n_head = 12                     # attention heads
n_embd = 768                    # state width
dropout = 0.0                   # dropout probability
bias = False                    # biases in Linear and LayerNorm (nanoGPT trains without: a little better and faster)
pos_emb = 'learned'             # 'learned' or 'rope'
rope_base = 10000.0             # rotary frequency base
attn_fn = 'softmax'             # 'softmax', 'entmax' or 'adaptive' attention weights
entmax_alpha = 1.5              # alpha of attn_fn='entmax'
n_future = 0                    # WFC future slots (0 = a GPT)
attn = 'pinned'                 # WFC: 'pinned' or 'bidirectional'
spec_window = -1                # WFC: future slots a slot sees ahead (-1 = all)
n_loop = 1                      # passes of the causal stream's core (> 1 without a future: a looped GPT)
inject = 'none'                 # input re-injection per pass: 'none', 'add', 'adapter' or 'contract'
decay = 0.0                     # learned state decay per pass (0 = off)
bound = 'none'                  # state bound after a pass: 'none', 'rms' or 'norm'
# WFC training recipe (recipe.Recipe)
future_frac = 1.0               # fraction of the future blocks a step runs
train_depth = 0                 # future passes per step (0 = n_loop); the max or mean under loop_law
loop_law = 'fixed'              # 'fixed', 'uniform' or 'poisson' depth
depth_per = 'step'              # a depth per 'step' or per 'row'
bptt = 0                        # passes with gradient (0 = all)
supervise = 1                   # last passes with a loss
consistency = 0.0               # weight of the pull of earlier passes toward the last
agree = 0.0                     # weight of the pull of the future toward the causal stream's next-token head
dist_power = 0.0                # future loss weight d ** -dist_power
past_loss = 0.0                 # weight of the past stream's own loss (> 0 lets it verify drafts)
past_target = 'next'            # the past stream predicts the 'next' token or its own ('self')
pin_prob = 0.0                  # probability a future slot starts pinned to its token
warm_prob = 0.0                 # probability a row starts warm (one sampler step earlier)
# WFC inference solver, stored in the checkpoint (solver.Solver)
max_loop = 1                    # cap on refinement passes
min_loop = 1                    # floor on refinement passes
tol = 1e-3                      # exit when the exit_rule measure falls below it (< 0: never)
exit_rule = 'kl'                # 'kl', 'entropy', 'delta' or 'accel'
slot_exit = False               # converged slots stop while others go on
# AdamW
learning_rate = 6e-4            # peak learning rate
max_iters = 600000              # total training iterations
weight_decay = 1e-1             # AdamW weight decay of the matrices (not of biases and norms)
beta1 = 0.9                     # AdamW first-moment decay
beta2 = 0.95                    # AdamW second-moment decay
grad_clip = 1.0                 # clip the global gradient norm at this value (0 = off)
spike_factor = 0.0              # a train loss above spike_factor x its running mean is a spike (0 = off; e.g. 3.0)
spike_action = 'warn'           # on a spike: 'warn' (log it, go on) or 'stop' (exit 4 before the update)
# learning rate: linear warmup, then cosine decay to min_lr
decay_lr = True                 # False: a constant learning_rate
warmup_iters = 2000             # iterations of linear warmup
lr_decay_iters = 600000         # the cosine reaches min_lr here (nanoGPT: = max_iters)
min_lr = 6e-5                   # the learning rate after the decay (nanoGPT: learning_rate / 10)
# system
device = 'auto'                 # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                  # 'auto' (bf16 where native, fp16 on older GPUs, else fp32), 'float32', 'bfloat16', 'float16'
compile = False                 # torch.compile the model (pays off on GPUs in long runs)
backend = 'nccl'                # DDP backend on CUDA (CPU ranks use gloo)
ddp_timeout = 300               # seconds a DDP collective may wait before the job fails instead of hanging
seed = 1337                     # seeds the initial weights and every batch and layout draw
# -----------------------------------------------------------------------------


DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
RECIPE_KEYS, SOLVER_KEYS = ([f.name for f in fields(cls)] for cls in (Recipe, Solver))
WFC_KEYS = ('attn', 'spec_window', *RECIPE_KEYS, *SOLVER_KEYS, 'future_warmup_iters')
model_keys = [f.name for f in fields(GPTConfig)] + RECIPE_KEYS + SOLVER_KEYS  # every setting the model is built from


def check_settings(c, ddp):
    """Every setting's range, and every setting that would have no effect, before anything runs."""
    bad = [k for k, v in c.items() if isinstance(v, float) and not math.isfinite(v)]
    require(not bad, f"{bad[0] if bad else ''} must be a finite number")
    require(min(c['batch_size'], c['gradient_accumulation_steps'], c['eval_interval'], c['log_interval'], c['eval_iters']) >= 1,
            "batch_size, gradient_accumulation_steps, eval_interval, log_interval and eval_iters must be >= 1 "
            "(eval_iters = 0 would leave nothing to choose best.pt by)")
    require(min(c['max_iters'], c['warmup_iters'], c['keep_last'], c['max_time'], c['future_warmup_iters']) >= 0,
            "max_iters, warmup_iters, keep_last, max_time and future_warmup_iters must be >= 0")
    require(c['learning_rate'] > 0 and 0 <= c['min_lr'] <= c['learning_rate'], "need learning_rate > 0 and 0 <= min_lr <= learning_rate")
    require(not c['decay_lr'] or c['lr_decay_iters'] > c['warmup_iters'], "lr_decay_iters must exceed warmup_iters (or --decay_lr=False)")
    require(0 <= c['beta1'] < 1 and 0 <= c['beta2'] < 1 and c['weight_decay'] >= 0 and c['grad_clip'] >= 0,
            "need 0 <= beta1, beta2 < 1, weight_decay >= 0 and grad_clip >= 0")
    require(c['spike_factor'] == 0 or c['spike_factor'] > 1, "spike_factor must be 0 (off) or > 1")
    require(c['spike_action'] in ('warn', 'stop'), f"spike_action must be 'warn' or 'stop', got {c['spike_action']!r}")
    require(c['init_from'] in ('scratch', 'resume'), f"init_from must be 'scratch' or 'resume', got {c['init_from']!r}")
    require(not (c['overwrite'] and c['init_from'] == 'resume'), "--overwrite replaces a run when training from scratch; "
            "--init_from=resume continues the run instead")
    try:
        checkpoint.build(**{k: c[k] for k in model_keys})
    except ValueError as e:
        raise ConfigError(e) from None
    if c['n_future'] == 0:
        unused = [k for k in WFC_KEYS if c[k] != DEFAULTS[k]]
        require(not unused, f"--{unused[0] if unused else ''} is a WFC setting: it has no effect on a GPT (n_future = 0)")
    unused = [k for k in ('backend', 'ddp_timeout') if c[k] != DEFAULTS[k] and not ddp]
    require(not unused, f"--{unused[0] if unused else ''} applies to DDP runs started by torchrun")
    given = [a[2:].partition('=')[0] for a in sys.argv[1:] if a.startswith('--')]  # config files may name wandb runs they do not log
    unused = [k for k in ('wandb_project', 'wandb_run_name') if k in given and not c['wandb_log']]
    require(not unused, f"--{unused[0] if unused else ''} needs --wandb_log=True")


RUN_FILES = ('ckpt.pt', 'best.pt', 'eval_log.jsonl', 'train_log.jsonl', 'config.json')


def held_run(out_dir):
    """The files of a run in out_dir (empty when there is none)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))] + checkpoint.copies(out_dir)


def check_out_dir(out_dir, init_from, overwrite):
    """Never lose a run: training from scratch into a folder that holds one is refused (before
    anything is written) unless overwrite; resuming needs the run. A folder that cannot be written
    is refused here too, not at the first checkpoint after minutes of training."""
    require(out_dir.strip(), "out_dir is empty: name the run folder, e.g. --out_dir=out-mine")
    require(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"--out_dir={out_dir} is a file, not a folder")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):  # the folder is created later: its nearest existing parent must be writable
        existing = os.path.dirname(existing)
    require(os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK),
            f"cannot write to {out_dir}: {existing} is {'not writable' if os.path.isdir(existing) else 'a file'}")
    held = held_run(out_dir)
    if init_from == 'scratch' and any(f.endswith('.pt') for f in held) and not overwrite:
        raise ConfigError(f"{out_dir} holds a run ({', '.join(held)}): continue it with --init_from=resume, train into "
                          f"another --out_dir, or replace it with --overwrite=True")


def trim_logs(out_dir, iter_num):
    """On resume, drop log lines past the checkpoint (steps the interrupted run did after its last save,
    and the evaluation at iter_num that the resumed run repeats): a log holds each step once."""
    for name, last in (('train_log.jsonl', iter_num), ('eval_log.jsonl', iter_num - 1)):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)['iter'] <= last]
            checkpoint.save_text(''.join(kept), path)


# settings of the machine and of this invocation: a resumed run takes every other setting from its checkpoint
NOT_RESUMED = ('out_dir', 'init_from', 'overwrite', 'dry_run', 'eval_only', 'device', 'compile', 'backend', 'ddp_timeout')
try:
    config = configure(globals())
    check_out_dir(out_dir, init_from, overwrite)
    if init_from == 'resume':  # the run's own settings (dataset, architecture, recipe), then config files and --key=value
        _ckpt = checkpoint.load(os.path.join(out_dir, 'ckpt.pt'))
        _mtime = os.stat(os.path.join(out_dir, 'ckpt.pt')).st_mtime_ns
        globals().update(DEFAULTS)
        globals().update({k: v for k, v in _ckpt.get('config', {}).items() if k in DEFAULTS and k not in NOT_RESUMED})
        config = configure(globals())
    # assigned after configure, which takes every lower-case global of a plain type for a setting
    resumed, resumed_mtime = (_ckpt, _mtime) if init_from == 'resume' else (None, None)  # claim_out_dir checks the mtime
    ddp_ranks = runtime.ddp_env()  # (rank, local_rank, world) when started by torchrun
    ddp = ddp_ranks is not None
    check_settings(config, ddp)
    device, dtype = runtime.resolve(device, dtype)
except (UserError, ValueError, RuntimeError) as e:
    fail(e)
# fault injection, read here only and used only by the tests (test_reliability.py, test_ddp.py):
# WFC_FAULT='nan_loss@7' makes the loss of the step logged as 'iter 7' NaN, 'nan_grad@7' a gradient,
# 'spike@7' the loss 100x; 'nan_loss@7:1' does it on DDP rank 1 only
fault_kind, _, fault_at = os.environ.get('WFC_FAULT', '').partition('@')
fault_iter, _, fault_rank = fault_at.partition(':')

# -----------------------------------------------------------------------------
# setup: processes, device, precision
rank, local_rank, world = ddp_ranks or (0, 0, 1)
if ddp and device == 'cuda' and torch.cuda.is_available():  # 'auto' resolved to cuda: one GPU per rank
    device = f'cuda:{local_rank}'
device_type = device.split(':')[0]
if ddp:
    if device_type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend if device_type == 'cuda' else 'gloo', timeout=timedelta(seconds=ddp_timeout))
master = rank == 0
if gradient_accumulation_steps % world:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {world} DDP ranks")
accum = gradient_accumulation_steps // world  # micro-steps per rank
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = runtime.autocast(device, dtype)

# -----------------------------------------------------------------------------
# data
folder = data_dir(dataset)
try:
    meta = read_meta(folder)  # the tokenizer; stored in checkpoints so they sample without the data folder
    if meta is not None and 'vocab_size' in meta:
        vocab_size = config['vocab_size'] = meta['vocab_size']
    meta = meta or {'tokenizer': 'gpt2'}
    train_data = TokenShards(folder, 'train', block_size, vocab_size)
    val_data = TokenShards(folder, 'val', block_size, vocab_size)
except UserError as e:
    fail(e)

# -----------------------------------------------------------------------------
# model and optimizer
model_settings = {k: config[k] for k in model_keys}
iter_num, best_val_loss, train_time = 0, float('inf'), 0.0
loss_ema, resumed_rng = None, None  # the spike detector's running mean of the train loss; RNG states to restore
ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
if resumed is not None:
    if resumed.get('meta') not in (None, meta):
        fail(f"cannot resume {out_dir}/ckpt.pt on {folder}: the checkpoint was trained with another vocabulary "
             f"({checkpoint.vocabulary(resumed['meta'], resumed['model_args'].get('vocab_size'))}) than {folder}/meta.pkl "
             f"({checkpoint.vocabulary(meta, vocab_size)}); point --dataset at the data it was trained on")
    saved_args = checkpoint.settings_of(resumed)
    shape, other = checkpoint.compare_args(saved_args, model_settings)
    if shape:
        fail(f"cannot resume {out_dir}/ckpt.pt: its architecture differs in {shape} "
             f"(checkpoint: {[saved_args.get(k) for k in shape]}, now: {[model_settings[k] for k in shape]})")
    changed = other + [k for k in ('batch_size', 'gradient_accumulation_steps', 'learning_rate', 'max_iters',
                                   'lr_decay_iters', 'warmup_iters', 'min_lr', 'weight_decay', 'dataset', 'seed')
                       if resumed.get('config', {}).get(k, config[k]) != config[k]]
    if changed and master:
        print(f"warning: resuming with changed settings: {changed}")
    iter_num, best_val_loss = resumed['iter_num'], resumed['best_val_loss']
    train_time, loss_ema, resumed_rng = resumed.get('train_time', 0.0), resumed.get('loss_ema'), resumed.get('rng')
torch.manual_seed(seed)  # the initial weights: the same run after run, and on every DDP rank
try:
    model = checkpoint.build(**model_settings)
except ValueError as e:
    fail(e)
if resumed is not None:
    model.load_state_dict(checkpoint.clean_state_dict(resumed['model']))
model.to(device)


optimizer = model.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if resumed is not None:
    optimizer.load_state_dict(resumed['optimizer'])
    if 'scaler' in resumed:
        scaler.load_state_dict(resumed['scaler'])
resumed = None  # free the loaded tensors
raw_model = model
if compile:  # a WFC step's depth is drawn per step: compile one pass, not the whole forward
    model = runtime.compile_passes(raw_model) if n_future else torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
if master:
    print(textwrap.fill(', '.join(f'{k}={v!r}' for k, v in config.items()), 120))
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {device} {dtype} x{world} | "
          f"{tokens_per_iter:,} tokens per iteration | train {train_data.n_tokens:,} tokens, val {val_data.n_tokens:,}")
if dry_run:  # everything checked, nothing written
    print(f"dry run: the settings, the data in {folder} and the model are fine; nothing was written to {out_dir}")
    sys.exit(0)
peak = runtime.peak_flops(device, dtype) if master else float('nan')


def claim_out_dir():
    """Lock out_dir for this run (checkpoint.lock_run) before its first write, check it again under
    the lock (a run may have finished or saved while this one started), then clear or trim what the
    run replaces and write config.json. Returns the lock, to hold until the process exits."""
    lock = checkpoint.lock_run(out_dir)
    check_out_dir(out_dir, init_from, overwrite)
    if init_from == 'resume' and os.stat(ckpt_path).st_mtime_ns != resumed_mtime:
        raise ConfigError(f"{ckpt_path} changed while this run started (another run saved it); start again to resume from it")
    if init_from == 'scratch':  # --overwrite (check_out_dir refused a run otherwise): logs are never appended across runs
        for name in held_run(out_dir):
            os.remove(os.path.join(out_dir, name))
    else:
        trim_logs(out_dir, iter_num)
    checkpoint.remove_stale_temps(out_dir)  # half files of a save that was killed; nothing reads them
    versions = dict(python=platform.python_version(), torch=torch.__version__, device=device, dtype=dtype, world=world)
    checkpoint.save_text(json.dumps(dict(config=config, versions=versions), indent=1), os.path.join(out_dir, 'config.json'))
    return lock


if master:
    try:
        run_lock = claim_out_dir()
    except (UserError, OSError) as e:
        fail(e if isinstance(e, UserError) else f"cannot write to {out_dir}: {e.strerror or e}")

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate():
    """Loss on the same eval_iters batches of each split every time. GPT: the next-token loss.
    WFC: the next-token loss (future slot 1 given the true past, converged from e_max: the
    number that compares with GPT), the loss by distance d = 1..F and the mean passes per slot."""
    raw_model.eval()
    results = {}
    F_ = n_future
    for split, data in (('train', train_data), ('val', val_data)):
        sums = torch.zeros(F_ + 1, dtype=torch.float64)
        counts = torch.zeros(F_ + 1, dtype=torch.float64)
        passes = torch.zeros(1, dtype=torch.float64)
        for k in range(rank, eval_iters, world):
            torch.manual_seed(step_seed(seed, -1, k))  # the same WFC layout draws every evaluation
            x, y = data.batch(batch_size, step_seed(seed, -2 if split == 'val' else -3, k), device)
            with ctx:
                if F_ == 0:
                    _, loss = raw_model(x, y)
                    sums[0] += loss.item() * y.numel()
                    counts[0] += y.numel()
                    continue
                out = raw_model.wfc_forward(x, y, converge=True)
            at = out.dist.expand_as(out.scored)[out.scored].cpu()  # the distance of every scored slot
            sums.index_add_(0, at, out.ce[out.scored].double().cpu())
            counts.index_add_(0, at, torch.ones(len(at), dtype=torch.float64))
            passes += out.trace.passes[out.scored].double().mean().cpu()
        stats = torch.cat((sums, counts, passes)).to(device)
        if ddp:
            dist.all_reduce(stats)
        sums, counts, passes = stats[:F_ + 1].cpu(), stats[F_ + 1:2 * F_ + 2].cpu(), stats[-1].item()
        by_dist = (sums / counts.clamp(min=1)).tolist()
        results[split] = dict(loss=by_dist[0] if F_ == 0 else by_dist[1], by_dist=by_dist[1:],
                              passes=passes / eval_iters if F_ else n_loop)
    raw_model.train()
    return results


def get_lr(it):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_checkpoint(path):
    """The resume point. The data loader's position is the iteration: every batch is a function of
    (seed, iteration, micro-step), so data={'iter', 'seed'} is all the loader state there is. The
    RNG states are rank 0's; training reseeds every micro-step, so they matter only to new code."""
    write_or_fail(checkpoint.save, dict(
        model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        **checkpoint.stored_settings(raw_model), config=config, iter_num=iter_num, best_val_loss=best_val_loss,
        train_time=train_time, meta=meta, format_version=checkpoint.FORMAT_VERSION, loss_ema=loss_ema,
        rng=checkpoint.rng_state(), data=dict(iter=iter_num, seed=seed)), path)


def save_best(path, val):
    """best.pt: what sampling needs (weights, settings, meta), no optimizer."""
    write_or_fail(checkpoint.save, dict(model=raw_model.state_dict(), **checkpoint.stored_settings(raw_model), config=config,
                                        iter_num=iter_num, val_loss=val, meta=meta,
                                        format_version=checkpoint.FORMAT_VERSION), path)


def append_log(name, record):
    """One JSON line appended to out_dir/name (eval_log.jsonl, train_log.jsonl)."""
    def append(line, path):
        with open(path, 'a') as f:
            f.write(line)
    write_or_fail(append, json.dumps(record) + '\n', os.path.join(out_dir, name))


def write_or_fail(write, what, path):
    """write(what, path); a disk that refuses it (full, read-only, removed) stops the run with one line
    and exit 2, and the files written before are left as they were (saves are atomic)."""
    try:
        write(what, path)
    except (UserError, OSError) as e:
        fail(e if isinstance(e, UserError) else f"cannot write {path}: {e.strerror or e}; the run is stopped, "
                                                 f"{ckpt_path} is the last checkpoint written")


def check_ranks_agree():
    """DDP keeps every rank's weights identical; a silent divergence would make every later number
    wrong, so compare a fingerprint (float64 sum and abs-sum of each parameter) across ranks."""
    fingerprint = torch.stack([s for p in raw_model.parameters() for s in (p.double().sum(), p.double().abs().sum())])
    gathered = [torch.empty_like(fingerprint) for _ in range(world)]
    dist.all_gather(gathered, fingerprint)
    differ = [r for r in range(world) if not torch.equal(gathered[r], gathered[0])]
    if differ:
        fail(f"DDP ranks {differ} hold different weights from rank 0 at step {iter_num}; the run is "
             f"stopped, {ckpt_path} is the last good checkpoint", code=3)


def fault(kind):
    """True when WFC_FAULT (see the settings) asks for this fault at this iteration on this rank."""
    return fault_kind == kind and fault_iter == str(iter_num + 1) and fault_rank in ('', str(rank))


def leave(code):
    """End a DDP rank after its orderly shutdown. Gloo's worker threads can abort the interpreter's
    own teardown ('terminate called without an active exception', SIGABRT) now and then, which turns a
    finished run into a failed job; everything is saved and flushed by now, so skip that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    if stop_signal is not None:  # asked twice: stop now (a checkpoint being saved is abandoned whole)
        sys.exit(128 + signum)
    stop_signal = signum  # acted on at the next step boundary, on every rank at once


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)
if master and wandb_log:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# -----------------------------------------------------------------------------
# training loop
if resumed_rng is not None:
    checkpoint.set_rng_state(resumed_rng)
running_mfu, t_last, train_loss = -1.0, time.time(), float('nan')
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr
    out_of_time = max_time > 0 and train_time >= max_time
    if iter_num % eval_interval == 0 or iter_num >= max_iters or out_of_time or eval_only:
        t_eval = time.time()
        results = evaluate()
        val = results['val']['loss']
        if not math.isfinite(val):
            fail(f"non-finite val loss at step {iter_num}; {ckpt_path} (the last good checkpoint) is left "
                 f"as it was. Try a lower learning_rate, grad_clip > 0 or dtype=float32", code=3)
        if ddp:
            check_ranks_agree()
        if master:
            extra = (f", by distance {' '.join(f'{v:.3f}' for v in results['val']['by_dist'])}, "
                     f"passes {results['val']['passes']:.2f}") if n_future else ''
            extra += f", weights identical on {world} ranks" if ddp else ''
            print(f"step {iter_num}: train loss {results['train']['loss']:.4f}, val loss {val:.4f}{extra}")
            record = dict(iter=iter_num, train_time=round(train_time, 3), train=results['train']['loss'], val=val,
                          val_by_dist=results['val']['by_dist'], passes=results['val']['passes'], lr=lr)
            append_log('eval_log.jsonl', record)
            if wandb_log:
                logged = {'iter': iter_num, 'train/loss': record['train'], 'val/loss': val, 'lr': lr,
                          **({'mfu': running_mfu * 100} if running_mfu >= 0 else {}), 'val/passes': record['passes'],
                          **{f'val/loss_d{d + 1}': v for d, v in enumerate(record['val_by_dist'])}}
                if n_future:  # the hockey stick of this evaluation, as a line plot (the panel shows the latest)
                    table = wandb.Table(data=[[d + 1, v] for d, v in enumerate(record['val_by_dist'])],
                                        columns=['distance', 'val loss'])
                    logged['val/loss_by_distance'] = wandb.plot.line(table, 'distance', 'val loss',
                                                                     title=f'val loss by distance (iter {iter_num})')
                wandb.log(logged, step=iter_num)
            improved, worse = val < best_val_loss, val > best_val_loss
            best_val_loss = min(best_val_loss, val)
            if iter_num > 0 and (improved or always_save_checkpoint):
                save_checkpoint(ckpt_path)
                write_or_fail(lambda n, path: checkpoint.keep_copy(path, n, keep_last), iter_num, ckpt_path)
                print(f"saved {ckpt_path} (val {val:.4f}, best {best_val_loss:.4f})")
            if improved and not eval_only:
                save_best(best_path, val)
            if worse:
                print(f"val loss {val:.4f} is worse than the best {best_val_loss:.4f}: {best_path} keeps the best "
                      f"weights, {ckpt_path} holds the {'latest' if always_save_checkpoint else 'best'} state")
        t_last += time.time() - t_eval  # evaluation time is not training time
    if eval_only or iter_num >= max_iters or out_of_time:
        break

    # one iteration: accum micro-steps per rank; every micro-step's randomness (batch, dropout,
    # WFC layout) is seeded by (seed, iteration, global micro-step): resume and DDP stay exact
    F_now = n_future if not future_warmup_iters else max(1, min(n_future, 1 + n_future * iter_num // future_warmup_iters))
    loss_sum, passes_sum = torch.zeros((), device=device), 0
    for micro in range(accum):
        step = step_seed(seed, iter_num, rank * accum + micro)
        torch.manual_seed(step)
        x, y = train_data.batch(batch_size, step, device)
        if ddp:
            model.require_backward_grad_sync = micro == accum - 1
        depth = draw_depth(raw_model.config, raw_model.recipe, batch_size)  # future passes of this micro-step, seeded RNG
        with ctx:
            _, loss = model(x, y) if n_future == 0 else model(x, y, depth=depth, n_future=F_now)
            loss = loss / accum
        if fault('nan_loss') or fault('spike'):
            loss = loss * (float('nan') if fault('nan_loss') else 100.0)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        passes_sum += float(depth.float().mean()) if torch.is_tensor(depth) else depth
    if fault('nan_grad'):
        next(raw_model.parameters()).grad.fill_(float('nan'))
    if grad_clip > 0:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    # agree across ranks on the loss, on non-finite values and on a stop request
    bad = ~torch.isfinite(loss_sum) | (~torch.isfinite(grad_norm) & (not scaler.is_enabled()))
    status = torch.stack((loss_sum.float(), bad.float(), torch.tensor(float(stop_signal is not None), device=device)))
    if ddp:
        dist.all_reduce(status)
    if status[1] > 0:
        fail(f"non-finite loss or gradient at iter {iter_num + 1} (loss {loss_sum.item():.4g}, grad norm "
             f"{grad_norm.item():.4g}); stopped before the update, {ckpt_path} is the last good checkpoint. "
             f"Try a lower learning_rate, grad_clip > 0 or dtype=float32", code=3)
    train_loss = status[0].item() / world  # the mean over every micro-step of every rank
    if spike_factor > 0 and loss_ema is not None and train_loss > spike_factor * loss_ema:
        spike = f"loss spike at iter {iter_num + 1}: {train_loss:.4f} > {spike_factor:g} x its running mean {loss_ema:.4f}"
        if spike_action == 'stop':
            fail(f"{spike}; stopped before the update (spike_action='stop'), {ckpt_path} is the last good "
                 f"checkpoint. Try a lower learning_rate or resume with spike_action='warn'", code=4)
        if master:
            print(f"warning: {spike}", flush=True)
    else:  # a spike does not move the mean, so a run of spikes keeps being reported
        loss_ema = train_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * train_loss
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    now = time.time()
    dt, t_last = now - t_last, now
    train_time += dt
    iter_num += 1
    if master and iter_num % log_interval == 0:
        append_log('train_log.jsonl', dict(iter=iter_num, loss=train_loss, lr=lr))  # exact values, for plots and the tests
        passes = passes_sum / accum
        flops = runtime.training_flops(raw_model, batch_size, block_size, passes) * gradient_accumulation_steps
        mfu = flops / dt / peak
        running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        extra = f", passes {passes:.1f}, F {F_now}" if n_future else ''
        print(f"iter {iter_num}: loss {train_loss:.4f}, lr {lr:.2e}, time {dt * 1000:.1f}ms, "
              f"mfu {running_mfu * 100:.1f}%{extra}", flush=True)
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/step_loss': train_loss, 'lr': lr, 'mfu': running_mfu * 100,
                       'train/passes': passes, 'train/step_ms': dt * 1000,
                       **({'train/n_future': F_now} if n_future else {})}, step=iter_num)
    if status[2] > 0:
        if master:
            save_checkpoint(ckpt_path)
            print(f"stopped by a signal at iteration {iter_num}; saved {ckpt_path}. "
                  f"Continue with --init_from=resume", flush=True)
            if wandb_log:
                wandb.finish()  # else the run's last records are cut off
        if ddp:
            dist.barrier()
            dist.destroy_process_group()
            leave(75)
        sys.exit(75)

if master and wandb_log:
    wandb.finish()
if ddp:
    dist.barrier()  # an orderly shutdown: no rank tears the group down while rank 0 still writes
    dist.destroy_process_group()
    leave(0)
