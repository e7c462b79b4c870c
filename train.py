"""
Train a GPT, a looped GPT or a WFC model (model.py) on token shards in data/<dataset>/.

    python train.py config/train_shakespeare_char_wfc.py                 # one CPU or GPU
    python train.py config/train_shakespeare_char_gpt.py --max_iters=500  # override any setting
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py   # DDP, one node

Every setting below can be changed by config files and --key=value (configurator.py). Ctrl-C or
SIGTERM writes a checkpoint at the next step boundary and exits with code 75; rerun with
--init_from=resume to continue exactly where it stopped. Exit codes: 0 done, 2 bad config, data
or checkpoint, 3 non-finite loss or gradient (the last good checkpoint is left untouched).
"""

import json
import math
import os
import platform
import signal
import sys
import textwrap
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import runtime
from configurator import ConfigError, configure
from dataloader import DataError, TokenShards, read_meta, step_seed
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings
# I/O
out_dir = 'out'
eval_interval = 2000            # iterations between evaluations (each one may write a checkpoint)
log_interval = 1                # iterations between log lines
eval_iters = 200                # batches per split per evaluation (the same batches every time)
eval_only = False               # evaluate the initial/resumed model once and exit
always_save_checkpoint = True   # False: write ckpt.pt only when the val loss improves
init_from = 'scratch'           # 'scratch' or 'resume' (from out_dir/ckpt.pt)
max_time = 0.0                  # stop after this many seconds of training time (0 = no limit); the lr schedule stays in iterations
# wandb (optional; WANDB_MODE=offline works without a network)
wandb_log = False
wandb_project = 'wfc-gpt'
wandb_run_name = 'run'
# data
dataset = 'openwebtext'         # a folder under data/, or a path to one
gradient_accumulation_steps = 40  # micro-steps per iteration, summed over all DDP ranks
batch_size = 12                 # rows per micro-step
future_warmup_iters = 0         # WFC curriculum: the training future grows from 1 slot to n_future over these iterations
# model: every GPTConfig field (model.py documents each) is a setting
globals().update(asdict(GPTConfig()))
bias = False                    # nanoGPT's training default: a little better and faster than GPT-2's biases
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip the global gradient norm at this value (0 = off)
# learning rate: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# system
device = 'auto'                 # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                  # 'auto' (bf16 where native, fp16 on older GPUs, else fp32), 'float32', 'bfloat16', 'float16'
compile = False                 # torch.compile the model (pays off on GPUs in long runs)
backend = 'nccl'                # DDP backend on CUDA (CPU ranks use gloo)
ddp_timeout = 300               # seconds a DDP collective may wait before the job fails instead of hanging
seed = 1337
# -----------------------------------------------------------------------------


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


try:
    config = configure(globals())
except ConfigError as e:
    fail(e)
model_keys = list(GPTConfig.__dataclass_fields__)

# -----------------------------------------------------------------------------
# setup: processes, device, precision
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
if ddp and device == 'auto' and torch.cuda.is_available():
    device = f'cuda:{local_rank}'
device, dtype = runtime.resolve(device, dtype)
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
repo = os.path.dirname(os.path.abspath(__file__))
data_dir = dataset if os.sep in dataset else os.path.join(repo, 'data', dataset)
meta = read_meta(data_dir)  # the tokenizer; stored in checkpoints so they sample without the data folder
if meta is not None and 'vocab_size' in meta:
    vocab_size = config['vocab_size'] = meta['vocab_size']
meta = meta or {'tokenizer': 'gpt2'}
try:
    train_data = TokenShards(data_dir, 'train', block_size, vocab_size)
    val_data = TokenShards(data_dir, 'val', block_size, vocab_size)
except DataError as e:
    fail(e)

# -----------------------------------------------------------------------------
# model and optimizer
model_args = {k: config[k] for k in model_keys}
iter_num, best_val_loss, train_time, resumed = 0, float('inf'), 0.0, None
if init_from == 'resume':
    try:
        resumed = checkpoint.load(os.path.join(out_dir, 'ckpt.pt'))
    except checkpoint.CheckpointError as e:
        fail(e)
    shape, other = checkpoint.compare_args(resumed['model_args'], model_args)
    if shape:
        fail(f"cannot resume {out_dir}/ckpt.pt: its architecture differs in {shape} "
             f"(checkpoint: {[resumed['model_args'].get(k) for k in shape]}, now: {[model_args[k] for k in shape]})")
    changed = other + [k for k in ('batch_size', 'gradient_accumulation_steps', 'learning_rate', 'max_iters',
                                   'lr_decay_iters', 'warmup_iters', 'min_lr', 'weight_decay', 'dataset')
                       if resumed.get('config', {}).get(k, config[k]) != config[k]]
    if changed and master:
        print(f"warning: resuming with changed settings: {changed}")
    iter_num, best_val_loss = resumed['iter_num'], resumed['best_val_loss']
    train_time = resumed.get('train_time', 0.0)
elif init_from != 'scratch':
    fail(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
torch.manual_seed(seed)  # the initial weights: the same run after run, and on every DDP rank
try:
    model = GPT(GPTConfig(**model_args))
except ValueError as e:
    fail(e)
if resumed is not None:
    model.load_state_dict(checkpoint.clean_state_dict(resumed['model']))
model.to(device)


def configure_optimizer(model):
    """AdamW; weight decay on matrices only (not on biases, norms or... the tied embedding is a
    matrix and decays, as in nanoGPT). Fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')


optimizer = configure_optimizer(model)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if resumed is not None:
    optimizer.load_state_dict(resumed['optimizer'])
    if 'scaler' in resumed:
        scaler.load_state_dict(resumed['scaler'])
resumed = None  # free the loaded tensors
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
peak = runtime.peak_flops(device, dtype) if master else float('nan')
if master:
    os.makedirs(out_dir, exist_ok=True)
    versions = dict(python=platform.python_version(), torch=torch.__version__, device=device, dtype=dtype, world=world)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(dict(config=config, versions=versions), f, indent=1)
    print(textwrap.fill(', '.join(f'{k}={v!r}' for k, v in config.items()), 120))
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {device} {dtype} x{world} | "
          f"{tokens_per_iter:,} tokens per iteration | train {train_data.n_tokens:,} tokens, val {val_data.n_tokens:,}")

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate():
    """Loss on the same eval_iters batches of each split every time. GPT: the next-token loss.
    WFC: the next-token loss (future slot 1 given the true past, converged from e_max: the
    number that compares with GPT), the loss by distance d = 1..F and the mean passes."""
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
                raw_model(x, y, converge=True)
            last = raw_model.last
            scored = last['scored']
            sums.index_add_(0, last['dist'].expand_as(scored)[scored].cpu(), last['ce'][scored].double().cpu())
            counts.index_add_(0, last['dist'].expand_as(scored)[scored].cpu(), torch.ones(int(scored.sum()), dtype=torch.float64))
            passes += last['passes']
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
    checkpoint.save(dict(
        model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        model_args=model_args, config=config, iter_num=iter_num, best_val_loss=best_val_loss,
        train_time=train_time, meta=meta, format_version=checkpoint.FORMAT_VERSION), path)


stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum  # acted on at the next step boundary, on every rank at once


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)
if master and wandb_log:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# -----------------------------------------------------------------------------
# training loop
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
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
        if master:
            extra = (f", by distance {' '.join(f'{v:.3f}' for v in results['val']['by_dist'])}, "
                     f"passes {results['val']['passes']:.2f}") if n_future else ''
            print(f"step {iter_num}: train loss {results['train']['loss']:.4f}, val loss {val:.4f}{extra}")
            record = dict(iter=iter_num, train_time=round(train_time, 3), train=results['train']['loss'], val=val,
                          val_by_dist=results['val']['by_dist'], passes=results['val']['passes'], lr=lr)
            with open(os.path.join(out_dir, 'eval_log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
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
            improved = val < best_val_loss
            best_val_loss = min(best_val_loss, val)
            if iter_num > 0 and (improved or always_save_checkpoint):
                save_checkpoint(ckpt_path)
                print(f"saved {ckpt_path} (val {val:.4f}, best {best_val_loss:.4f})")
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
        with ctx:
            _, loss = model(x, y) if n_future == 0 else model(x, y, n_future=F_now)
            loss = loss / accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
        passes_sum += raw_model.last.get('passes', n_loop)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    # agree across ranks on the loss, on non-finite values and on a stop request
    bad = ~torch.isfinite(loss_sum) | (~torch.isfinite(grad_norm) & (not scaler.is_enabled()))
    status = torch.stack((loss_sum.float(), bad.float(), torch.tensor(float(stop_signal is not None), device=device)))
    if ddp:
        dist.all_reduce(status)
    if status[1] > 0:
        fail(f"non-finite loss or gradient at iteration {iter_num} (loss {loss_sum.item():.4g}, grad norm "
             f"{grad_norm.item():.4g}); stopped before the update, {ckpt_path} is the last good checkpoint. "
             f"Try a lower learning_rate, grad_clip > 0 or dtype=float32", code=3)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.synchronize()
    now = time.time()
    dt, t_last = now - t_last, now
    train_time += dt
    iter_num += 1
    train_loss = status[0].item() / world
    if master and iter_num % log_interval == 0:
        passes = passes_sum / accum
        flops = raw_model.flops_per_iter(batch_size, block_size, passes) * gradient_accumulation_steps
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
        if ddp:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(75)

if master and iter_num > 0 and not eval_only and always_save_checkpoint:
    pass  # the final evaluation above already wrote the last checkpoint
if master and wandb_log:
    wandb.finish()
if ddp:
    dist.destroy_process_group()
