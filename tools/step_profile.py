"""
Where a GPT training step's time goes, ours beside nanoGPT's, on nanoGPT's CPU recipe (4 x 128,
block 64, batch 12, learned positions, no bias, fp32): both models in one process, the same batch,
steps interleaved, each split into forward, backward and update (gradient clipping + AdamW + zero_grad),
medians after a warm-up. Then one profile of our step: the share of time in matrix products and the
rate they reach, against this machine's measured matmul peak (runtime.measure_matmul_flops at the
step's largest product size). When the products run near that peak and take most of the step, no
change outside the model's math can make the step much faster than nanoGPT's: the two programs run
the same products.

    python tools/step_profile.py --nanogpt=../nanoGPT          # ours beside nanoGPT, then our profile
    python tools/step_profile.py                               # our profile only
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ArgumentParser  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plumbing import runtime  # noqa: E402

RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=False)
BATCH = 12


def nanogpt_model(folder):
    spec = importlib.util.spec_from_file_location('nanogpt_model', os.path.join(folder, 'model.py'))
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    model = nano.GPT(nano.GPTConfig(**RECIPE))
    return model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')


def timed_step(model, optimizer, x, y):
    """(forward, backward, update) seconds of one training step as train.py takes it."""
    t0 = time.perf_counter()
    _, loss = model(x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def matmul_share(model, optimizer, x, y, steps):
    """(share of the step's profiled time in aten::mm / addmm / bmm, their FLOP/s)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            timed_step(model, optimizer, x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = [e for e in events if e.key in ('aten::mm', 'aten::addmm', 'aten::bmm')]
    product_time = sum(e.self_cpu_time_total for e in products)  # microseconds
    return product_time / total, sum(e.flops for e in products) / (product_time / 1e6)


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--nanogpt', default='', help="a nanoGPT checkout: time its model's step beside ours")
    parser.add_argument('--steps', type=int, default=60, help='timed steps per model (after 5 untimed)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: the product rate per core)')
    args = parser.parse_args()
    if args.nanogpt and not os.path.isfile(os.path.join(args.nanogpt, 'model.py')):
        parser.error(f"--nanogpt={args.nanogpt} holds no model.py: point it at a nanoGPT checkout")
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**RECIPE, n_future=0, pos_emb='learned'))
    cases = {'ours': (ours, ours.configure_optimizer(0.1, 1e-3, (0.9, 0.99), 'cpu'))}
    if args.nanogpt:
        cases['nanoGPT'] = nanogpt_model(args.nanogpt)
    x, y = torch.randint(65, (BATCH, 64)), torch.randint(65, (BATCH, 64))
    times = {name: [] for name in cases}
    for i in range(args.steps + 5):
        for name, (model, optimizer) in cases.items():
            t = timed_step(model, optimizer, x, y)
            if i >= 5:
                times[name].append(t)
    print(f"training step, nanoGPT's CPU recipe, batch {BATCH} x 64, fp32, {args.threads} thread(s), "
          f"medians of {args.steps} interleaved steps (ms)")
    print("| model | forward | backward | update | step |")
    print("|---|---|---|---|---|")
    for name, rows in times.items():
        parts = [statistics.median(column) * 1e3 for column in zip(*rows)]
        step = statistics.median(sum(r) for r in rows) * 1e3
        print(f"| {name} | {parts[0]:.1f} | {parts[1]:.1f} | {parts[2]:.1f} | {step:.1f} |")
    share, rate = matmul_share(ours, cases['ours'][1], x, y, steps=min(20, args.steps))
    peak = runtime.measure_matmul_flops('float32', n=RECIPE['n_embd'] * 4, repeats=50)
    print(f"our step: {share:.0%} of its time in matrix products, at {rate / 1e9:.1f} GFLOP/s against this "
          f"machine's measured {peak / 1e9:.1f} GFLOP/s ({rate / peak:.0%} of it)")


if __name__ == '__main__':
    main()
