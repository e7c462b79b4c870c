"""
Evaluate any checkpoint (GPT, looped GPT, WFC) the same way, on the same tokens.

    python eval.py --out_dir=out-shakespeare-char-wfc
    python eval.py --out_dir=out-shakespeare-char-wfc --depths=1,2,4,8,16,32,64 --max_loop=64
    python eval.py --out_dir=out-shakespeare-char-wfc --judge=out-shakespeare-char-judge --samples=16

- next-token loss, nats and bits per token (bits per character on char data): an exact
  autoregressive factorisation. WFC: future slot 1 given the true past, refined from e_max until it
  converges (tol) or max_loop; every block phase (pinned) or split (bidirectional) runs, so each
  position is scored at d = 1 once, with exactly the context a GPT sees on the same windows.
- WFC: loss by distance d = 1..F, the histogram of the passes each slot took, the past stream's
  own loss (pinned), and the sequential losses the sampler experiences: collapse the true tokens
  one by one and refine from the carried state (warm) or from e_max every step (cold).
- WFC with --depths: the next-token loss after exactly K passes for each K (one run, read on the way),
  the state norm after those passes, and with --convergence=True: whether two different start
  states reach the same distributions (mean KL), and how the passes a slot takes follow its
  entropy (Spearman's rho; compute follows difficulty).
- with --judge: samples from prompts in the split, scored by the judge GPT (mean NLL per token),
  with their unigram entropy and distinct-n (degenerate repetition shows up there).
The windows are a fixed seeded subset of the split: two checkpoints see the same tokens.
"""

import json
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F

from configurator import UserError, cli, configure, output_file, require
from generation import engine
from generation.decoding import Settings, live_slots
from generation.sampling import generate
from modeling.recipe import cross_entropy
from modeling.solver import entropy_of_logits
from plumbing import checkpoint
from plumbing import runtime
from plumbing.dataloader import TokenShards, data_dir, read_meta

# -----------------------------------------------------------------------------
out_dir = 'out'          # run folder (holding ckpt.pt) or a checkpoint file
ckpt = ''                # the earlier name of out_dir, still accepted
dataset = ''             # data folder to read (default: the checkpoint's own dataset)
split = 'val'            # the split to score: 'val' or 'train'
n_windows = 256          # windows of block_size tokens (a fixed, seeded subset of the split)
batch_size = 32          # windows per forward
seed = 1234              # picks the windows: the same seed, the same tokens for every checkpoint
warm_positions = 128     # WFC: positions of the sequential (sampler) losses per row (0 = skip)
warm_rows = 8            # WFC: rows of the sequential losses
depths = ''              # WFC: e.g. '1,2,4,8,16,32,64': the next-token loss after exactly K passes, for each K
convergence = False      # WFC: also path independence and passes vs entropy (see the docstring)
judge = ''               # judge checkpoint for sample quality ('' = skip)
samples = 0              # samples to generate and score (0 = skip)
prompt_tokens = 32       # prompt length of each sample, cut from the split
sample_tokens = 96       # generated tokens per sample
max_loop = 0             # WFC: override the model's refinement cap (0 = keep)
tol = -1.0               # WFC: override the model's convergence tolerance (< 0 = keep)
slot_exit = 'model'      # WFC: per-slot exit in the converged runs: 'model' (its own setting), 'on' or 'off'
exit_rule = ''           # WFC: override the model's exit rule ('kl', 'delta', 'entropy', 'accel'; '' = keep; tol is in its units)
device = 'auto'          # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'mps'
dtype = 'float32'        # evaluation in full precision by default
out = ''                 # also write the results as JSON here
# the sampler of the judged samples: every sampling.Settings field
globals().update({k: v for k, v in vars(Settings(temperature=1.0, top_k=0)).items() if k not in ('max_loop', 'tol')})
# -----------------------------------------------------------------------------


def windows(data, n, seed, device):
    """The same n windows (x, y) of the split for every checkpoint: seeded, in fixed batches."""
    x, y = data.batch(n, seed)
    return x.to(device), y.to(device)


def layouts(model):
    """Every block phase (pinned) or split (bidirectional) of a window: keyword options of wfc_forward."""
    c = model.config
    return [('phase', r) for r in range(c.n_future)] if c.attn == 'pinned' else [('split', r) for r in range(c.block_size)]


def by_distance(model, out, ce, by):
    """Write the per-slot losses ce (B, S) of one layout run (a WFCOutput) into by (D, N, T), each
    (distance, target) pair once."""
    pinned = model.config.attn == 'pinned'
    dist = out.dist.expand_as(ce)
    for d in range(1, model.config.n_future + 1):
        rows, slots = (out.scored & (dist == d)).nonzero(as_tuple=True)
        targets = slots if pinned else slots - 1  # bidirectional slot i predicts y[:, i - 1]
        fresh = by[d - 1, rows, targets].isnan()
        by[d - 1, rows[fresh], targets[fresh]] = ce[rows[fresh], slots[fresh]].float()


@torch.no_grad()
def token_losses(model, x, y, record=(), init=None):
    """(D, N, T) cross-entropy of target y[:, j] at distance d = 1..D given the true past (D = 1 for
    a GPT; row 0 is the next-token loss), and per scored slot its passes and entropy (nats). With
    record: {K: (D, N, T)} after exactly K passes instead (no early exit)."""
    c = model.config
    if c.n_future == 0:
        logits, _ = model(x, y)
        return F.cross_entropy(logits.float().transpose(1, 2), y, reduction='none')[None], {}, []
    by = torch.full((c.n_future,) + tuple(x.shape), float('nan'), device=x.device)
    at = {k: by.clone() for k in record}
    passes, entropy, slot_loss, norms = [], [], [], Counter()
    for name, r in layouts(model):
        kw = {name: torch.full((x.size(0),), r, device=x.device), 'init': init}
        out = model.wfc_forward(x, y, **(dict(depth=max(record), record=record) if record else dict(converge=True)), **kw)
        by_distance(model, out, out.ce, by)
        for k, logits in out.logits_at.items():
            by_distance(model, out, cross_entropy(logits, out.targets), at[k])
        passes.append(out.trace.passes[out.scored])
        entropy.append(entropy_of_logits(out.logits)[out.scored])
        slot_loss.append(out.ce[out.scored])
        for k, v in out.trace.norms:
            norms[k] += v / len(layouts(model))
    extra = dict(passes=torch.cat(passes), entropy=torch.cat(entropy), slot_loss=torch.cat(slot_loss), norms=dict(norms),
                 logits=out.logits)
    return (at if record else by), extra, out


@torch.no_grad()
def past_stream_loss(model, x, y, batch):
    """Next-token loss of a pinned WFC's past stream read out directly (decode of its final states):
    the causal GPT inside the model. Beside slot 1, it shows what reading the past through future
    slots costs or gains."""
    losses = []
    for lo in range(0, len(x), batch):
        pos = torch.arange(x.size(1), device=x.device)
        states, _ = model.causal_stream(model.token_states(x[lo:lo + batch], pos), pos)
        losses.append(F.cross_entropy(model.logits(states).float().transpose(1, 2), y[lo:lo + batch], reduction='none'))
    return torch.cat(losses).mean().item()


@torch.no_grad()
def sequential_loss(model, x, positions, warm=True, s=None):
    """The sampler's own next-token loss: starting from x[:, :1], refine (from the carried state when
    warm, else from e_max), score future slot 1 against the true next token, collapse it to that
    token, shift; for `positions` steps. With s.future == 'auto' the window keeps the live slots
    sampling.live_slots allows. Returns (mean loss, mean passes per step, mean live future slots)."""
    w, auto = engine.start(model, x[:, :1]), s is not None and s.future == 'auto'
    losses, passes, live = [], [], []
    for t in range(1, min(positions + 1, x.size(1))):
        w, used = engine.refine(model, w if warm else engine.forget(model, w))
        losses.append(F.cross_entropy(w.stats['logits'][:, 0].float(), x[:, t]).item())
        passes.append(used)
        live.append(w.future.size(1))
        slots = torch.zeros_like(w.decided, dtype=torch.bool)
        slots[:, 0] = True
        length = live_slots(w.stats['entropy'] / math.log(2), s.tau) if auto else None
        w, _ = engine.shift(model, engine.collapse(model, w, slots, x[:, t:t + 1].expand_as(w.decided).contiguous()),
                            length=length)
    return sum(losses) / len(losses), sum(passes) / len(passes), sum(live) / len(live)


@torch.no_grad()
def sequence_nll(model, seq, start):
    """Mean NLL per token of seq[:, start:] under a GPT, each token scored with up to block_size
    tokens of context (windows that overlap by half beyond block_size)."""
    bs, total, count, end, scored_to = model.config.block_size, 0.0, 0, seq.size(1), start
    while scored_to < end:
        lo = max(0, min(scored_to - bs // 2, end - 1 - bs)) if scored_to > bs else 0
        chunk = seq[:, lo:lo + bs + 1]
        logits, _ = model(chunk[:, :-1], chunk[:, 1:])
        ce = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction='none')
        new = slice(scored_to - lo - 1, chunk.size(1) - 1)
        total, count = total + ce[:, new].sum().item(), count + ce[:, new].numel()
        scored_to = lo + chunk.size(1)
    return total / count


def distinct_n(rows, n):
    grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def unigram_entropy_bits(rows):
    counts = Counter(t for r in rows for t in r)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def spearman(a, b):
    """Spearman's rank correlation of two 1-D tensors, ties given their average rank."""
    def ranks(v):
        values, inverse, counts = torch.unique(v.double(), return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts  # rank (0-based) of each distinct value's first member
        return (first + (counts - 1) / 2)[inverse]
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


@torch.no_grad()
def sample_quality(model, judge_model, prompts, n_tokens, settings, seed):
    """Generate from each prompt and score the continuation with the judge."""
    generated, stats = generate(model, prompts, n_tokens, settings, torch.Generator(device=prompts.device).manual_seed(seed))
    rows, summary = generated.tolist(), stats.summary()
    return dict(judge_nll=sequence_nll(judge_model, torch.cat((prompts, generated), 1), prompts.size(1)),
                unigram_bits=unigram_entropy_bits(rows), distinct_2=distinct_n(rows, 2), distinct_3=distinct_n(rows, 3),
                distinct_4=distinct_n(rows, 4), tokens_per_step=summary['tokens_per_step'],
                passes_per_token=summary['passes_per_token'])


def batched(model, x, y, batch, **kw):
    """token_losses over x in batches: (losses, per-slot {passes, entropy, slot_loss} or {}, norms, seconds)."""
    parts, per_slot, norms, started = [], {}, Counter(), time.perf_counter()
    for lo in range(0, len(x), batch):
        by, extra, _ = token_losses(model, x[lo:lo + batch], y[lo:lo + batch], **kw)
        parts.append(by)
        for name in ('passes', 'entropy', 'slot_loss') if extra else ():
            per_slot.setdefault(name, []).append(extra[name])
        for k, v in extra.get('norms', {}).items():
            norms[k] += v * len(x[lo:lo + batch]) / len(x)
    seconds = time.perf_counter() - started
    losses = {k: torch.cat([p[k] for p in parts], 1) for k in parts[0]} if isinstance(parts[0], dict) else torch.cat(parts, 1)
    return losses, {k: torch.cat(v) for k, v in per_slot.items()}, dict(norms), seconds


def evaluate(model, data, n, batch, seed, device, warm_positions=0, warm_rows=8, depths=(), convergence=False, s=None):
    """Every likelihood number for one model on one split. Returns a dict."""
    x, y = windows(data, n, seed, device)
    by, per_slot, _, seconds = batched(model, x, y, batch)
    loss = by[0].mean().item()
    passes = per_slot.get('passes')
    result = dict(loss=loss, bits=loss / math.log(2), tokens=by[0].numel(), seconds=seconds,
                  passes=dict(Counter(passes.tolist())) if passes is not None else {model.config.n_loop: 1})
    if not model.config.n_future:
        return result
    result.update(by_dist=[v.nanmean().item() for v in by], mean_passes=passes.float().mean().item())
    if model.config.attn == 'pinned':  # the GPT inside: the past stream's own next-token head
        result['past_stream_loss'] = past_stream_loss(model, x, y, batch)
    if warm_positions and engine.unsupported(model):
        print(f"sequential losses skipped: {engine.unsupported(model)}")
    elif warm_positions:
        for name, warm in (('warm', True), ('cold', False)):
            value, steps, live = sequential_loss(model, x[:warm_rows], warm_positions, warm, s)
            result.update({f'{name}_sequential': value, f'{name}_passes': steps, 'live_slots': live})
    if depths:
        at, _, norms, _ = batched(model, x, y, batch, record=tuple(depths))
        result.update(depth_loss={k: v[0].mean().item() for k, v in at.items()}, norm_by_pass=norms)
        result.update(matched_depth(model, x, y, batch, result))
    if convergence:
        result['passes_entropy_spearman'] = spearman(passes.float(), per_slot['entropy'])
        result['passes_loss_spearman'] = spearman(passes.float(), per_slot['slot_loss'])
        result['path_kl'] = path_independence(model, x[:batch], y[:batch], seed)
    return result


def matched_depth(model, x, y, batch, result):
    """The shallowest fixed depth K (of those measured) whose loss is within 0.01 of the exit's, and
    the seconds an evaluation at exactly K passes takes: what the early exit is compared with."""
    close = [k for k, v in sorted(result['depth_loss'].items()) if v <= result['loss'] + 0.01]
    if not close:
        return {}
    _, _, _, seconds = batched(model, x, y, batch, record=(close[0],))
    return dict(matched_depth=close[0], matched_seconds=seconds)


@torch.no_grad()
def path_independence(model, x, y, seed):
    """Mean KL(from e_max || from a random start) of the converged next-token distributions over the
    windows x: ~0 when the fixed point does not depend on where the refinement started."""
    _, _, cold = token_losses(model, x, y)
    torch.manual_seed(seed)
    _, _, other = token_losses(model, x, y, init='random')
    p, q = (F.log_softmax(o.logits.float(), -1) for o in (cold, other))
    return ((p.exp() * (p - q)).sum(-1)[cold.scored]).mean().item()


def report(result, name, split, unit):
    print(f"{name}: {split} next-token loss {result['loss']:.4f} nats = {result['bits']:.4f} {unit} ({result['tokens']} tokens)")
    if 'by_dist' in result:
        print(f"loss by distance d=1..{len(result['by_dist'])}: {' '.join(f'{v:.3f}' for v in result['by_dist'])}")
        print(f"passes histogram (slots): {dict(sorted(result['passes'].items()))}, mean {result['mean_passes']:.2f}"
              f" ({result['seconds']:.2f} s)")
    if 'past_stream_loss' in result:
        print(f"past stream read out directly (the GPT inside): next-token loss {result['past_stream_loss']:.4f} nats")
    for start in ('warm', 'cold') if 'warm_sequential' in result else ():
        print(f"{start}-start sequential loss {result[f'{start}_sequential']:.4f} nats ({result[f'{start}_passes']:.2f} "
              f"passes/token)" + (f", {result['live_slots']:.2f} live future slots" if start == 'cold' else ''))
    if 'depth_loss' in result:
        print("loss by depth (passes: next-token loss): " + '  '.join(f"{k}: {v:.4f}" for k, v in result['depth_loss'].items()))
        print("state norm by pass (watched slots): " + '  '.join(f"{k}: {v:.3f}" for k, v in result['norm_by_pass'].items()))
    if 'matched_depth' in result:
        print(f"early exit: {result['mean_passes']:.2f} passes, {result['seconds']:.2f} s; the shallowest fixed depth within 0.01 "
              f"of its loss: {result['matched_depth']} passes, {result['matched_seconds']:.2f} s")
    if 'path_kl' in result:
        print(f"path independence: mean KL(from e_max || from a random start) {result['path_kl']:.5f} nats")
        print(f"passes vs entropy: Spearman rho {result['passes_entropy_spearman']:.3f}")
        print(f"passes vs loss: Spearman rho {result['passes_loss_spearman']:.3f}")
    if 'judge_nll' in result:
        print(f"samples: judge NLL {result['judge_nll']:.4f} nats/token, unigram entropy {result['unigram_bits']:.3f} bits, "
              f"distinct-2/3/4 {result['distinct_2']:.3f} {result['distinct_3']:.3f} {result['distinct_4']:.3f}")


def main():
    configure(globals(), sources=(Settings,))
    run = ckpt or out_dir
    require(not (ckpt and out_dir not in ('out', ckpt)), f"--ckpt={ckpt} and --out_dir={out_dir} name two runs; give one")
    require(n_windows > 0 and batch_size > 0 and min(warm_positions, warm_rows, samples) >= 0,
            "need n_windows > 0, batch_size > 0, warm_positions, warm_rows and samples >= 0")
    require(not samples or (judge and prompt_tokens > 0 and sample_tokens > 0),
            "--samples needs --judge=<GPT checkpoint> and prompt_tokens, sample_tokens > 0")
    try:
        steps = [int(v) for v in depths.split(',') if v.strip()]
    except ValueError:
        raise UserError(f"depths must be comma-separated pass counts like '1,2,4,8', got {depths!r}") from None
    require(all(k >= 1 for k in steps), f"depths must be >= 1, got {depths!r}")
    require(split in ('train', 'val'), f"split must be 'train' or 'val', got {split!r}")
    if out:
        output_file(out)
    settings = Settings(**{k: globals()[k] for k in vars(Settings()) if k not in ('max_loop', 'tol')})
    try:
        settings.check()
        dev, dt = runtime.resolve(device, dtype)
    except (ValueError, RuntimeError) as e:
        raise UserError(e) from None
    require(slot_exit in ('model', 'on', 'off'), f"slot_exit must be 'model', 'on' or 'off', got {slot_exit!r}")
    overrides = {k: v for k, v in (('max_loop', max_loop), ('tol', tol)) if (v > 0 if k == 'max_loop' else v >= 0)}
    overrides.update({} if slot_exit == 'model' else {'slot_exit': slot_exit == 'on'})
    overrides.update({'exit_rule': exit_rule} if exit_rule else {})
    model, info = checkpoint.load_model(run, dev, **overrides)
    require(model.config.n_future or not (steps or convergence or overrides),
            "depths, convergence, max_loop, tol, slot_exit and exit_rule are WFC settings; this checkpoint is a GPT (n_future = 0)")
    V = model.config.vocab_size
    judge_model = checkpoint.load_judge(judge, dev, info.get('meta'), V) if judge else None
    folder = dataset or data_dir(info.get('config', {}).get('dataset', ''))
    data_meta = read_meta(folder)
    if data_meta:  # before the shards: a mismatch is the pairing's fault, not the data's
        checkpoint.check_same_vocabulary(f"the model {run}", info.get('meta'), V, f"the dataset {folder}", data_meta,
                                         data_meta.get('vocab_size', V))
    data = TokenShards(folder, split, model.config.block_size, V)
    meta = info.get('meta') or data_meta
    with runtime.autocast(dev, dt):
        result = evaluate(model, data, n_windows, batch_size, seed, dev, warm_positions, warm_rows, steps, convergence, settings)
        if judge_model is not None and samples:
            prompts = data.batch(samples, seed + 1)[0][:, :prompt_tokens].to(dev)
            result.update(sample_quality(model, judge_model, prompts, sample_tokens, settings, seed))
    report(result, run, split, 'bits/char' if meta and 'stoi' in meta else 'bits/token')
    if out:
        with open(out, 'w') as f:
            json.dump(dict(ckpt=run, split=split, n_windows=n_windows, seed=seed, **result), f, indent=1)
    return result


if __name__ == '__main__':
    cli(main)
