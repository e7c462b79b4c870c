"""
Where a sampler's time goes: one generation from a checkpoint under torch's profiler, after an
untimed warm-up, as a table of the ops that took the most time (self CPU time, share, calls), and
the weight bytes a batch-1 step must read against the time it takes (a decode step of a small batch
reads every weight once per token, so memory bandwidth, not arithmetic, bounds it); for a WFC
checkpoint, the matrix products of a speculative round's stack call against a causal step's.

    python tools/sample_profile.py --out_dir=runs/vs256/gpt_rope_0 --tokens=500
    python tools/sample_profile.py --out_dir=out-shakespeare-char-wfc --sampler=speculative
    python tools/sample_profile.py --out_dir=out-shakespeare-char-wfc --compile=True   # the compiled graphs' ops
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ArgumentParser  # noqa: E402
from generation.decoding import Settings  # noqa: E402
from generation.sampling import generate, pick_sampler, warm_up  # noqa: E402
from plumbing import checkpoint, runtime  # noqa: E402


def read_bandwidth(megabytes=400, repeats=5):
    """Bytes per second this machine streams from memory: the best of `repeats` sums of a float32
    tensor far larger than any cache (the floor of a step that must read every weight once)."""
    x = torch.ones(megabytes * 250_000)
    x.sum()
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def products_floor(model, rows, repeats=300):
    """Seconds the matrix products of one stack call over `rows` positions take at batch 1: every
    Linear of the model (the blocks' and the head; a sandwich's pass uses each block once) applied
    to `rows` rows, torch's own kernels, the median of `repeats` timed runs of all of them. The
    floor of a sampler step of that many positions, whatever its overhead."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, w.size(1), dtype=w.dtype) for w in weights]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x, w in zip(inputs, weights):
            torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out_dir', required=True, help='a run folder (or checkpoint file) to sample from')
    parser.add_argument('--tokens', type=int, default=500, help='new tokens per generation')
    parser.add_argument('--num_samples', type=int, default=1, help='rows sampled together')
    parser.add_argument('--sampler', default='auto', help="as sample.py's --sampler")
    parser.add_argument('--rows', type=int, default=15, help='ops in the table')
    parser.add_argument('--threads', type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument('--compile', default='False', choices=['True', 'False'],
                        help='profile the compiled samplers (runtime.compile_samplers, after sampling.warm_up)')
    args = parser.parse_args()
    if min(args.tokens, args.num_samples, args.rows) < 1 or args.threads < 0:
        parser.error("--tokens, --num_samples and --rows must be >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, _ = checkpoint.load_model(args.out_dir)
        settings = Settings(temperature=0.8, top_k=200, sampler=args.sampler)
        pick_sampler(model, settings)
    except (checkpoint.CheckpointError, ValueError) as e:
        parser.error(str(e))
    idx = torch.zeros((args.num_samples, 1), dtype=torch.long)  # token 0: any prompt of one token will do
    if args.compile == 'True':
        warm_up(runtime.compile_samplers(model), idx, settings)

    def run():
        return generate(model, idx, args.tokens, settings, torch.Generator().manual_seed(1337))

    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        run()  # warm-up: allocator, first-call and block-edge costs out of the timed run
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    tokens = args.tokens * args.num_samples
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = read_bandwidth()
    print(f"{args.out_dir}: {tokens / seconds:.1f} tokens/s unprofiled ({args.num_samples} row(s) x {args.tokens} "
          f"tokens, {torch.get_num_threads()} threads)")
    print(f"weights {weight_bytes / 1e6:.1f} MB, read once per step: {weight_bytes * args.tokens / seconds / 1e9:.1f} GB/s "
          f"if every token is one step, against {bandwidth / 1e9:.1f} GB/s that this machine reads (a 400 MB sum): "
          f"the weight reads alone allow {bandwidth / weight_bytes:.0f} steps/s")
    if model.config.n_future:  # a speculative round: F tokens (pending and F - 1 drafts), F future slots behind each
        F = model.config.n_future
        one, round_ = products_floor(model, 1), products_floor(model, F * (1 + F))
        print(f"matrix products of one stack call at batch 1: {one * 1e6:.0f} us over 1 position (a causal step), "
              f"{round_ * 1e6:.0f} us over {F * (1 + F)} (a speculative round of F = {F}): {round_ / one:.2f}x")
    print("| op | self CPU ms | share | calls |")
    print("|---|---|---|---|")
    for e in events[:args.rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")


if __name__ == '__main__':
    main()
