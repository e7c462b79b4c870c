"""
How long should a WFC draft be, and should it be refined before it is drafted? The speculative
sampler drafts from future slots 2..n_future of each round and keeps the drafts its own next-token
distributions accept, so a round commits 1 .. n_future tokens for one stack call. Longer drafts
(larger F) can commit more per call, but a slot further out is a worse guess and every call runs
F future slots per fed token; extra refinement passes (max_loop 2, 3: the future's passes 2..
against the past just written) make a draft better at the cost of a core pass each.

For each checkpoint (trained with a different n_future) and each max_loop, the speculative sampler
draws `tokens` new tokens after `start` (a newline) at batch 1 and batch `batch` (T `temperature`,
top-k `top_k`). Runs are interleaved (every case once per repeat, in turn) so that machine load
hits all alike; the table gives medians of tokens/s, tokens per round (one verify call), tokens per core
pass (a round of max_loop k runs k) and the acceptance by distance. The sampler is exact whatever F
and max_loop are (its text follows the model's next-token distributions), so within a checkpoint
only the speed changes; across checkpoints the model itself differs (its next-token loss is printed
from eval_log.jsonl's last val estimate).

    python research/draft_length.py --ckpts=runs/draft/f2,runs/draft/f4,runs/draft/f8 --max_loops=1,2,3
"""

import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import cli, configure, output_file, require  # noqa: E402
from generation.decoding import Settings  # noqa: E402
from generation.sampling import generate, pick_sampler  # noqa: E402
from plumbing import checkpoint  # noqa: E402
from plumbing.tokenizer import codec_for  # noqa: E402

# -----------------------------------------------------------------------------
ckpts = 'runs/draft/f2,runs/draft/f4,runs/draft/f8'  # WFC run folders (or checkpoints), one per draft length
max_loops = '1,2,3'      # future passes before drafting (1 = draft from the round's first pass)
tokens = 1000            # new tokens per run
start = '\n'             # the prompt every run continues
batch = 8                # the batched column's rows (0 = batch 1 only)
repeats = 3              # interleaved runs per case (median)
temperature = 0.8
top_k = 200
threads = 0              # torch threads (0 = torch's default)
seed = 1337
out = ''                 # also write every number as JSON here
# -----------------------------------------------------------------------------


def last_val(path):
    """The run's last val estimate (eval_log.jsonl beside the checkpoint), or None."""
    log = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), 'eval_log.jsonl')
    if not os.path.exists(log):
        return None
    with open(log) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1]['val'] if lines else None


def one_run(model, rows, max_loop, prompt):
    """(tokens/s over every row, Stats summary) of one sampling run."""
    s = Settings(temperature=temperature, top_k=top_k, sampler='speculative', max_loop=max_loop)
    idx = torch.tensor(prompt, dtype=torch.long).expand(rows, -1)
    t0 = time.perf_counter()
    new, stats = generate(model, idx, tokens, s, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    return new.numel() / seconds, stats.summary()


def main():
    configure(globals())
    if threads:
        torch.set_num_threads(threads)
    paths = [p for p in ckpts.split(',') if p]
    loops = [int(k) for k in max_loops.split(',') if k]
    require(paths and loops and min(loops) >= 1, "--ckpts needs at least one run folder and --max_loops values >= 1")
    out_path = output_file(out) if out else ''
    models = {}
    for path in paths:
        model, ckpt = checkpoint.load_model(path)
        try:
            pick_sampler(model, Settings(sampler='speculative'))
        except ValueError as e:
            require(False, f"{path}: {e}")
        try:
            prompt = codec_for(ckpt.get('meta')).encode(start)
        except ValueError as e:
            require(False, f"--start={start!r} for {path}: {e}")
        require(prompt, "--start is empty: the sampler needs a prompt of at least one token")
        models[path] = (model, prompt)
    batches = [1] + ([batch] if batch > 1 else [])
    cases = [(p, k, b) for p in paths for k in loops for b in batches]
    runs = {case: [] for case in cases}
    with torch.no_grad():
        for case in cases:  # warm-up: allocator and first-call costs out of the timed runs
            one_run(models[case[0]][0], case[2], case[1], models[case[0]][1])
        for r in range(repeats):
            for case in cases:
                runs[case].append(one_run(models[case[0]][0], case[2], case[1], models[case[0]][1]))
    results = []
    for path, k, b in cases:
        speeds = [speed for speed, _ in runs[(path, k, b)]]
        summary = runs[(path, k, b)][0][1]  # the same seed every repeat: the same text, the same counts
        results.append(dict(ckpt=path, n_future=models[path][0].config.n_future, max_loop=k, batch=b,
                            tokens_per_s=statistics.median(speeds), runs=speeds, val=last_val(path),
                            tokens_per_round=summary['tokens_per_step'],
                            tokens_per_call=summary['tokens_per_call'], acceptance=summary.get('acceptance', [])))
    print(f"speculative sampler, {tokens} tokens after {start!r}, T {temperature}, top-k {top_k}, "
          f"medians of {repeats} interleaved runs, {torch.get_num_threads()} threads")
    print("| F | last val | max_loop | batch | tokens/s | tokens per round | tokens per pass | acceptance by distance |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        val = f"{r['val']:.4f}" if r['val'] is not None else '-'
        acc = ' '.join(f'{a:.2f}' for a in r['acceptance'])
        print(f"| {r['n_future']} | {val} | {r['max_loop']} | {r['batch']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_round']:.2f} | {r['tokens_per_call']:.2f} | {acc} |")
    if out_path:
        with open(out_path, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    cli(main)
