"""
Evaluate any checkpoint (GPT, looped GPT, WFC) the same way, on the same tokens.

    python eval.py --ckpt=out-shakespeare-char-wfc
    python eval.py --ckpt=out-shakespeare-char-wfc --judge=out-shakespeare-char-judge --samples=16

- next-token loss, nats and bits per token (bits per character on char data): an exact
  autoregressive factorisation. WFC: future slot 1 given the true past, converged from e_max;
  every block phase (pinned) or split (bidirectional) is run so each position gets d = 1 once,
  with exactly the contexts a GPT sees on the same windows.
- WFC: loss by distance d = 1..F, the histogram of passes used, and the warm-start sequential
  loss: the likelihood the sampler experiences, collapsing the true tokens one by one and
  refining from the carried state.
- with --judge: samples from prompts in the split, scored by the judge GPT (mean NLL per token),
  with their unigram entropy and distinct-n (degenerate repetition shows up there).
The windows are a fixed seeded subset of the split: two checkpoints see the same tokens.
"""

import json
import math
import os
import sys
from collections import Counter

import torch
import torch.nn.functional as F

import checkpoint
import runtime
from configurator import ConfigError, configure
from dataloader import TokenShards, read_meta
from sampling import Settings, generate
from tokenizer import codec_for

# -----------------------------------------------------------------------------
ckpt = ''                # run folder (holding ckpt.pt) or checkpoint file
dataset = ''             # data folder to read (default: the checkpoint's own dataset)
split = 'val'
n_windows = 256          # windows of block_size tokens (a fixed, seeded subset of the split)
batch_size = 32
seed = 1234
warm_positions = 128     # WFC: positions of the warm-start sequential loss per row (0 = skip)
warm_rows = 8            # WFC: rows of the warm-start sequential loss
judge = ''               # judge checkpoint for sample quality ('' = skip)
samples = 0              # samples to generate and score (0 = skip)
prompt_tokens = 32       # prompt length of each sample, cut from the split
sample_tokens = 96       # generated tokens per sample
max_loop = 0             # override the model's refinement cap (0 = keep)
tol = -1.0               # override the model's convergence tolerance (< 0 = keep)
device = 'auto'
dtype = 'float32'        # evaluation in full precision by default
out = ''                 # also write the results as JSON here
globals().update({k: v for k, v in vars(Settings(temperature=1.0, top_k=0)).items() if k not in ('max_loop', 'tol')})
# -----------------------------------------------------------------------------


def windows(data, n, seed, device):
    """The same n windows (x, y) of the split for every checkpoint: seeded, in fixed batches."""
    x, y = data.batch(n, seed)
    return x.to(device), y.to(device)


@torch.no_grad()
def token_losses(model, x, y):
    """(D, N, T) cross-entropy of target y[:, j] at distance d = 1..D given the true past (D = 1
    for a GPT; row 0 is the next-token loss), and a histogram {passes: forward calls}."""
    c = model.config
    if c.n_future == 0:
        logits, _ = model(x, y)
        return F.cross_entropy(logits.float().transpose(1, 2), y, reduction='none')[None], {c.n_loop: 1}
    N, T = x.shape
    F_ = c.n_future
    pinned = c.attn == 'pinned'
    by = torch.full((F_, N, T), float('nan'), device=x.device)  # loss of target j at distance d, each pair once
    passes = Counter()
    for r in range(F_ if pinned else T):  # every block phase / split point
        model(x, y, converge=True, **{'phase' if pinned else 'split': torch.full((N,), r, device=x.device)})
        last = model.last
        passes[last['passes']] += 1
        dist = last['dist'].expand_as(last['ce'])
        for d in range(1, F_ + 1):
            rows, slots = (last['scored'] & (dist == d)).nonzero(as_tuple=True)
            targets = slots if pinned else slots - 1  # bidirectional slot i predicts y[:, i - 1]
            fresh = by[d - 1, rows, targets].isnan()
            by[d - 1, rows[fresh], targets[fresh]] = last['ce'][rows[fresh], slots[fresh]].float()
    return by, dict(passes)


@torch.no_grad()
def past_stream_loss(model, x, y, batch):
    """Next-token loss of a pinned WFC's past stream read out directly (decode of its final
    states): the causal GPT inside the model. Compared with slot 1, it shows what reading the past
    through future slots costs or gains."""
    losses = [F.cross_entropy(model.logits(model.cache_past(x[lo:lo + batch])[1]).float().transpose(1, 2),
                              y[lo:lo + batch], reduction='none') for lo in range(0, len(x), batch)]
    return torch.cat(losses).mean().item()


@torch.no_grad()
def warm_sequential_loss(model, x, positions, warm=True):
    """The sampler's own next-token loss: starting from x[:, :1], refine (from the carried state
    when warm), score future slot 1 against the true next token, collapse it to that token, shift;
    for `positions` steps. Returns (mean loss, mean passes)."""
    w = model.start(x[:, :1])
    losses, passes = [], []
    for t in range(1, min(positions + 1, x.size(1))):
        w, used = model.refine(w if warm else model.forget(w))
        losses.append(F.cross_entropy(model.future_logits(w)[:, 0].float(), x[:, t]).item())
        passes.append(used)
        slots = torch.zeros_like(w.decided, dtype=torch.bool)
        slots[:, 0] = True
        tokens = torch.zeros_like(w.decided)
        tokens[:, 0] = x[:, t]
        w, _ = model.shift(model.collapse(w, slots, tokens))
    return sum(losses) / len(losses), sum(passes) / len(passes)


@torch.no_grad()
def sequence_nll(model, seq, start):
    """Mean NLL per token of seq[:, start:] under a GPT, each token scored with up to block_size
    tokens of context (windows that overlap by half beyond block_size)."""
    bs = model.config.block_size
    total, count = 0.0, 0
    end = seq.size(1)
    scored_to = start
    while scored_to < end:
        lo = max(0, min(scored_to - bs // 2, end - 1 - bs)) if scored_to > bs else 0
        chunk = seq[:, lo:lo + bs + 1]
        logits, _ = model(chunk[:, :-1], chunk[:, 1:])
        ce = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction='none')
        new = slice(scored_to - lo - 1, chunk.size(1) - 1)
        total += ce[:, new].sum().item()
        count += ce[:, new].numel()
        scored_to = lo + chunk.size(1)
    return total / count


def distinct_n(rows, n):
    grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def unigram_entropy_bits(rows):
    counts = Counter(t for r in rows for t in r)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


@torch.no_grad()
def sample_quality(model, judge_model, prompts, n_tokens, settings, seed):
    """Generate from each prompt and score the continuation with the judge."""
    generated, stats = generate(model, prompts, n_tokens, settings, torch.Generator(device=prompts.device).manual_seed(seed))
    seq = torch.cat((prompts, generated), 1)
    rows = generated.tolist()
    summary = stats.summary()
    return dict(judge_nll=sequence_nll(judge_model, seq, prompts.size(1)), unigram_bits=unigram_entropy_bits(rows),
                distinct_2=distinct_n(rows, 2), distinct_3=distinct_n(rows, 3), distinct_4=distinct_n(rows, 4),
                tokens_per_step=summary['tokens_per_step'], passes_per_token=summary['passes_per_token'])


def evaluate(model, data, n, batch, seed, device, warm_positions=0, warm_rows=8):
    """Every likelihood number for one model on one split. Returns a dict."""
    x, y = windows(data, n, seed, device)
    parts, passes = [], Counter()
    for lo in range(0, n, batch):
        by, part_passes = token_losses(model, x[lo:lo + batch], y[lo:lo + batch])
        parts.append(by)
        passes.update(part_passes)
    by = torch.cat(parts, 1)
    loss = by[0].mean().item()
    result = dict(loss=loss, bits=loss / math.log(2), tokens=by[0].numel(), passes=dict(passes))
    if model.config.n_future:
        result['by_dist'] = [v.nanmean().item() for v in by]
        if model.config.attn == 'pinned':  # the GPT inside: the past stream's own next-token head
            result['past_stream_loss'] = past_stream_loss(model, x, y, batch)
        if warm_positions:
            warm_loss, warm_passes = warm_sequential_loss(model, x[:warm_rows], warm_positions)
            result.update(warm_sequential=warm_loss, warm_passes=warm_passes)
    return result


def main():
    try:
        configure(globals())
        settings = Settings(**{k: globals()[k] for k in vars(Settings()) if k not in ('max_loop', 'tol')}).check()
        dev, dt = runtime.resolve(device, dtype)
    except (ConfigError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    overrides = {k: v for k, v in (('max_loop', max_loop), ('tol', tol)) if (v > 0 if k == 'max_loop' else v >= 0)}
    try:
        model, info = checkpoint.load_model(ckpt or 'out', dev, **overrides)
        judge_model = checkpoint.load_model(judge, dev)[0] if judge else None
    except checkpoint.CheckpointError as e:
        sys.exit(f"error: {e}")
    data_dir = dataset or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', info['config']['dataset'])
    data = TokenShards(data_dir, split, model.config.block_size, model.config.vocab_size)
    meta = info.get('meta') or read_meta(data_dir)
    with runtime.autocast(dev, dt):
        result = evaluate(model, data, n_windows, batch_size, seed, dev, warm_positions, warm_rows)
        if judge_model is not None and samples:
            prompts = data.batch(samples, seed + 1)[0][:, :prompt_tokens].to(dev)
            result.update(sample_quality(model, judge_model, prompts, sample_tokens, settings, seed))
    unit = 'bits/char' if meta and 'stoi' in meta else 'bits/token'
    print(f"{ckpt}: {split} next-token loss {result['loss']:.4f} nats = {result['bits']:.4f} {unit} "
          f"({result['tokens']} tokens)")
    if 'by_dist' in result:
        print(f"loss by distance d=1..{len(result['by_dist'])}: {' '.join(f'{v:.3f}' for v in result['by_dist'])}")
        print(f"passes histogram (forward calls): {result['passes']}")
    if 'past_stream_loss' in result:
        print(f"past stream read out directly (the GPT inside): next-token loss {result['past_stream_loss']:.4f} nats")
    if 'warm_sequential' in result:
        print(f"warm-start sequential loss {result['warm_sequential']:.4f} nats ({result['warm_passes']:.2f} passes/token)")
    if 'judge_nll' in result:
        print(f"samples: judge NLL {result['judge_nll']:.4f} nats/token, unigram entropy {result['unigram_bits']:.3f} bits, "
              f"distinct-2/3/4 {result['distinct_2']:.3f} {result['distinct_3']:.3f} {result['distinct_4']:.3f}")
    if out:
        with open(out, 'w') as f:
            json.dump(dict(ckpt=ckpt, split=split, n_windows=n_windows, seed=seed, **result), f, indent=1)
    return result


if __name__ == '__main__':
    main()
