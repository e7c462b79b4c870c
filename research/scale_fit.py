"""
The scale sweep's table, fit and plot, from compare.py's results.json files (research/plan_scale.py
runs them, one folder per size under --runs).

    python research/scale_fit.py --runs=runs/scale --out=assets/scale.png

For each arm (GPT, WFC) and each table (same wall-clock, same training FLOPs) it fits a straight
line log(loss) = a + b log(FLOPs) through the sizes' final val losses, with the slope's standard
error, and solves for the compute at which the two arms' lines cross, with a delta-method standard
error (in log10 FLOPs). The crossing is an extrapolation of four points: the printout says so.
"""

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ArgumentParser, fail  # noqa: E402

H100_BF16 = 989e12  # dense bf16 peak, FLOP/s (the datasheet), for the extrapolation's GPU hours


def rows(runs):
    """[(arm, size in M, table, params, FLOPs, loss, iterations)] of every size folder under runs."""
    out = []
    for size in sorted(os.listdir(runs), key=lambda s: float(s) if s.replace('.', '', 1).isdigit() else 1e9):
        path = os.path.join(runs, size, 'results.json')
        if not os.path.exists(path):
            continue
        report = json.load(open(path))
        for kind, table in report['tables'].items():
            for r in table:
                arm = r['name'].split('_')[0]
                flops = r['iters'] * report['flops_per_iter'][r['name']]
                out.append(dict(arm=arm, size=size, table=kind, params=r['params'], flops=flops, loss=r['loss'],
                                iters=r['iters'], name=r['name']))
    return out


def fit(points):
    """(a, b, covariance) of log(loss) = a + b log(flops) by least squares."""
    x, y = np.log([p['flops'] for p in points]), np.log([p['loss'] for p in points])
    (b, a), cov = np.polyfit(x, y, 1, cov=len(points) > 3)
    return a, b, (cov if len(points) > 3 else np.full((2, 2), np.nan))


def crossing(g, w):
    """log10 FLOPs where the two lines meet, and its delta-method standard error (the two fits independent)."""
    (ag, bg, cg), (aw, bw, cw) = g, w
    if bg == bw:
        return float('nan'), float('nan')
    x = (aw - ag) / (bg - bw)  # natural log of FLOPs
    # d x / d (bg, ag) and d x / d (bw, aw); polyfit's covariance is ordered (b, a)
    grad_g = np.array([x / (bg - bw), -1 / (bg - bw)])
    grad_w = np.array([-x / (bg - bw), 1 / (bg - bw)])
    var = grad_g @ cg @ grad_g + grad_w @ cw @ grad_w
    return x / math.log(10), math.sqrt(var) / math.log(10) if var == var else float('nan')


def markdown(data):
    lines = ['| size | arm | table | iterations | training FLOPs | val next-token loss (nats) |', '|---|---|---|---|---|---|']
    for r in data:
        lines.append(f"| {r['params'] / 1e6:.1f}M | {r['arm']} | {r['table']} | {r['iters']} | {r['flops']:.2e} | {r['loss']:.4f} |")
    lines += ['', '| table | arm | slope b (log loss per log FLOPs) | lines cross at (log10 FLOPs) | = GPU hours at 40% of an H100 |',
              '|---|---|---|---|---|']
    for kind in sorted({r['table'] for r in data}):
        fits = {arm: fit([r for r in data if r['table'] == kind and r['arm'] == arm]) for arm in ('gpt', 'wfc')}
        x, err = crossing(fits['gpt'], fits['wfc'])
        hours = 10 ** x / (0.4 * H100_BF16) / 3600
        for arm, (a, b, cov) in fits.items():
            se = math.sqrt(cov[0, 0]) if cov[0, 0] == cov[0, 0] else float('nan')
            where = f"{x:.1f} +- {err:.1f} (extrapolation)" if arm == 'wfc' else ''
            gpu = f"{hours:.3g}" if arm == 'wfc' and math.isfinite(hours) else ''
            lines.append(f"| {kind} | {arm} | {b:.4f} +- {se:.4f} | {where} | {gpu} |")
    return '\n'.join(lines)


def plot(data, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind in zip(axes, ('time', 'flops')):
        for arm, colour in (('gpt', 'C0'), ('wfc', 'C3')):
            pts = sorted((r for r in data if r['table'] == kind and r['arm'] == arm), key=lambda r: r['flops'])
            if not pts:
                continue
            ax.loglog([p['flops'] for p in pts], [p['loss'] for p in pts], 'o', color=colour, label=arm.upper())
            for p in pts:
                ax.annotate(f"{p['params'] / 1e6:.1f}M", (p['flops'], p['loss']), textcoords='offset points', xytext=(4, 4),
                            fontsize=7, color=colour)
            a, b, _ = fit(pts)
            xs = np.geomspace(pts[0]['flops'] / 2, pts[-1]['flops'] * 4, 20)
            ax.loglog(xs, np.exp(a + b * np.log(xs)), '--', color=colour, linewidth=1)
        ax.set(title={'time': 'same wall-clock per size', 'flops': 'same training FLOPs per size'}[kind],
               xlabel='training FLOPs')
        ax.legend()
    axes[0].set_ylabel('val next-token loss (nats)')
    fig.savefig(path, dpi=110, bbox_inches='tight')
    print(f"wrote {path}")


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument('--runs', default='runs/scale', help='the folder of per-size compare.py out_dirs')
    parser.add_argument('--out', default='', help='write the plot here (PNG; needs matplotlib)')
    args = parser.parse_args()
    data = rows(args.runs) if os.path.isdir(args.runs) else fail(f"--runs {args.runs}: no such folder")
    if not data:
        fail(f"no results.json under {args.runs}: run the sweep first (research/plan_scale.py)")
    print(markdown(data))
    if args.out:
        plot(data, args.out)


if __name__ == '__main__':
    main()
