"""
Pictures. matplotlib is an optional dependency, imported only here.

    python viz.py toy --out=assets/toy.png                           # the seed's illustration, for real
    python viz.py curves --runs out-a out-b --out=assets/curves.png  # val loss vs time, loss by distance
    python viz.py convergence --runs out-a out-b --out=assets/convergence.png  # loss and norm vs passes

toy: a WFC model (model.py's GPT) with a vocabulary of 3 trains for a few seconds on a tiny Markov
pattern (0 -> 1; 1 -> 0 or 2, even odds; 2 -> 0), then generates. The picture is its state plane:
each pixel is a state, coloured by its decoded distribution (red, green, blue = p(0), p(1), p(2),
scaled so the likeliest token is at full strength: a certain slot is a pure primary, a uniform one
white). On it: the path of every future slot across refinement passes (from e_max, or from where
the last step left it), and the collapse arrows (a slot's converged state -> its token's row).

Why n_embd = 4 and not 2: decode(x) = softmax(lm_head(LayerNorm(x))), and LayerNorm discards a
state's mean and scale. Of a 2-D state that leaves one bit (which coordinate is larger): decode
would paint two half-planes. Of a 4-D state it leaves a direction in a 3-D space: a point on a
sphere, a 2-D surface, which the picture maps to the page like a world map (azimuthal
equidistant: distance from the centre = angle from the states' mean direction). Every state on a
ray decodes alike, so the colour under each drawn state is exactly its decoded distribution. The
state's length, which keeps growing pass after pass along the residual stream, and its mean are
what the picture leaves out. (At 3 wide the direction lives on a circle, one angle; the toy did
not learn the pattern at that width either.)

curves: each run's eval_log.jsonl (train.py writes it): next-token val loss vs training time, and
the val loss by distance d = 1..F of the last evaluation (the "hockey stick").

convergence: WFC runs evaluated on the same val windows: the loss and state norm after exactly K
passes, and the passes each slot takes to exit against its entropy (does compute follow difficulty?).
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from configurator import ArgumentParser, UserError, fail, output_file
from generation import engine
from plumbing import checkpoint


def plt_module():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        fail("the pictures need matplotlib (pip install matplotlib)")
    return plt


# -----------------------------------------------------------------------------
# toy


def toy_tokens(n, rng):
    """The toy pattern: 0 -> 1; 1 -> 0 or 2 with even odds; 2 -> 0."""
    out = [0]
    while len(out) < n:
        last = out[-1]
        out.append(1 if last == 0 else 0 if last == 2 else int(rng.integers(2)) * 2)
    return torch.tensor(out)


def train_toy(steps=400, seed=0):
    """A 2-layer WFC model, 4 wide (2 heads), vocabulary 3, 3 future slots, trained with 1-3
    passes per step (all supervised) and warm starts, so refinement and warm starting have
    something to show. Converged val loss by distance about 0.39 0.62 0.95 nats after 400 steps;
    the pattern's own entropy is 0.28 0.55 0.83."""
    torch.manual_seed(seed)
    model = checkpoint.build(vocab_size=3, n_embd=4, n_head=2, n_layer=2, block_size=16, n_future=3, pos_emb='rope',
                             n_loop=3, loop_law='uniform', supervise=3, warm_prob=0.3, bias=True, max_loop=3)
    config = model.config
    data = toy_tokens(20000, np.random.default_rng(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    T = config.block_size
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (32,))
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


@torch.no_grad()
def generate_paths(model, prompt, steps=2):
    """The sampler's loop, greedy, recording every pass: refine max_loop passes
    (warm: from where the last step left the slots), collapse slot 1 to its likeliest token,
    shift. Returns per step the future states per pass (passes + 1, F, C), slot 1's state after
    the collapse and its token."""
    w = engine.start(model, torch.tensor([prompt]))
    record = []
    for _ in range(steps):
        path = [w.future[0].clone()]
        for _ in range(model.solver.max_loop):
            w, _ = engine.refine(model, w, max_loop=1, min_loop=1)
            path.append(w.future[0].clone())
        token = int(model.decode(w.future[0, 0]).argmax())
        slots = torch.zeros(1, w.future.size(1), dtype=torch.bool)
        slots[0, 0] = True
        w = engine.collapse(model, w, slots, torch.full((1, w.future.size(1)), token))
        record.append(dict(path=torch.stack(path), after=w.future[0, 0].clone(), token=token))
        w, _ = engine.shift(model, w)
    return record


class DirectionMap:
    """Where LayerNorm lets decode look: the direction of a state's mean-free part, a point on
    the sphere of a 3-D space. Mapped to the page around the centre direction c0 (the mean
    direction of the states drawn) like a world map, azimuthal equidistant: distance from the
    centre = angle from c0, in degrees."""

    def __init__(self, states):
        C = states.size(-1)
        ones_first = torch.cat((torch.ones(C, 1), torch.eye(C)[:, :C - 1]), 1)
        self.Q = torch.linalg.qr(ones_first)[0][:, 1:].T  # (C - 1, C): orthonormal, orthogonal to (1, ..., 1)
        y = self.unit(states.reshape(-1, C))
        self.c0 = self.unit(y.mean(0))
        frame = torch.linalg.qr(torch.stack((self.c0, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])), 1))[0]
        self.a, self.b = frame[:, 1], frame[:, 2]

    def unit(self, x):
        """States (..., C) or mean-free coordinates (..., C - 1) -> unit directions (..., C - 1)."""
        y = x @ self.Q.T if x.size(-1) == self.Q.size(1) else x
        return y / y.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def coords(self, x):
        """States (..., C) -> map coordinates (..., 2), degrees."""
        d = self.unit(x)
        angle = torch.rad2deg(torch.arccos((d @ self.c0).clamp(-1, 1)))
        side = torch.stack((d @ self.a, d @ self.b), -1)
        return side / side.norm(dim=-1, keepdim=True).clamp(min=1e-12) * angle[..., None]

    def states(self, s, t):
        """Map coordinates (degrees) -> states (..., C) of unit length in those directions."""
        r = torch.deg2rad(torch.sqrt(s ** 2 + t ** 2)).clamp(min=1e-9)
        toward = (s[..., None] * self.a + t[..., None] * self.b) / torch.sqrt(s ** 2 + t ** 2).clamp(min=1e-9)[..., None]
        return (torch.cos(r)[..., None] * self.c0 + torch.sin(r)[..., None] * toward) @ self.Q


def colour(p):
    """(..., 3) distributions -> RGB, scaled so the likeliest token is at full strength."""
    return (p / p.max(-1, keepdim=True).values).clamp(0, 1)


def draw_toy(out, steps=400, seed=0, size=360):
    plt = plt_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    t0 = time.time()
    try:
        model, loss = train_toy(steps, seed)
    finally:
        torch.set_num_threads(threads)
    train_s = time.time() - t0
    prompt = [0, 1, 2, 0, 1, 0, 1, 2, 0]
    record = generate_paths(model, prompt)
    rows = model.transformer.wte.weight.detach()
    states = torch.cat([r['path'].reshape(-1, 4) for r in record] + [rows])
    plane = DirectionMap(states)
    half = min(180.0, float(plane.coords(states).norm(dim=-1).max()) * 1.15 + 5)
    grid = torch.linspace(-half, half, size)
    s, t = torch.meshgrid(grid, grid, indexing='xy')
    with torch.no_grad():
        image = colour(model.decode(plane.states(s, t))).numpy()
    fig, ax = plt.subplots(figsize=(6.4, 6.4))
    extent = (float(s.min()), float(s.max()), float(t.min()), float(t.max()))
    ax.imshow(image, origin='lower', extent=extent, interpolation='bilinear')
    ink = ['black', 'white', 'grey']  # one per generation step
    for k, step in enumerate(record):
        path = plane.coords(step['path']).numpy()  # (passes + 1, F, 2)
        how = 'from e_max' if k == 0 else 'warm: carried slots, a fresh one at e_max'
        for d in range(path.shape[1]):
            ax.plot(path[:, d, 0], path[:, d, 1], '-', color=ink[k % 3], lw=1.5, marker='o', ms=4, mec='black',
                    mew=0.6, label=f'step {k + 1}: future slots over {len(path) - 1} passes ({how})' if d == 0 else None)
            ax.annotate(f'{d + 1}', path[-1, d], textcoords='offset points', xytext=(5, 3), fontsize=8,
                        color='white' if k % 3 == 0 else 'black',
                        bbox=dict(boxstyle='round,pad=0.15', fc=ink[k % 3], ec='black', lw=0.5, alpha=0.85))
        start, end = path[-1, 0], plane.coords(step['after']).numpy()
        for width, tone in ((3.2, 'black'), (1.6, 'yellow')):
            ax.annotate('', end, start, arrowprops=dict(arrowstyle='-|>', color=tone, lw=width, shrinkA=0, shrinkB=2))
    for token, row in enumerate(plane.coords(rows).numpy()):
        ax.plot(*row, marker='X', ms=11, color='white', mec='black', mew=1.2)
        ax.annotate(f'row of token {token}', row, textcoords='offset points', xytext=(7, -12), fontsize=9)
    e_max = model.e_max().detach()
    where = plane.coords(e_max).numpy()
    ax.plot(*where, marker='*', ms=16, color='white', mec='black')
    p_max = ' '.join(f'{v:.2f}' for v in model.decode(e_max).tolist())
    ax.annotate(f'e_max (decodes to {p_max})', where, textcoords='offset points', xytext=(8, 6), fontsize=9)
    ax.plot([], [], color='yellow', lw=2, label='collapse: slot 1 -> its token row')
    ax.legend(loc='lower left', fontsize=8, framealpha=0.9)
    ax.set(xlim=extent[:2], ylim=extent[2:], xticks=[], yticks=[],
           title=f'toy WFC model: decoded distribution over the directions of a 4-D state\n'
                 f'red/green/blue = p(token 0/1/2); prompt {"".join(map(str, prompt))}; {steps} training steps')
    fig.savefig(out, dpi=100, bbox_inches='tight')
    plt.close(fig)
    print(f"wrote {out} (trained {steps} steps in {train_s:.1f}s, passes per step "
          f"{[len(r['path']) - 1 for r in record]}, collapsed {[r['token'] for r in record]})")


# -----------------------------------------------------------------------------
# curves


def read_eval_log(run):
    path = os.path.join(run, 'eval_log.jsonl')
    if not os.path.exists(path):
        fail(f"no {path}: point --runs at train.py out_dir folders")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = {}  # a resumed run repeats iterations: keep the latest record of each
    for record in records:
        last[record['iter']] = record
    return [last[k] for k in sorted(last)]


def draw_curves(runs, out, labels=None):
    plt = plt_module()
    fig, (ax_time, ax_dist) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, run in enumerate(runs):
        log = read_eval_log(run)
        label = labels[k] if labels else os.path.basename(os.path.normpath(run))
        line, = ax_time.plot([r['train_time'] for r in log], [r['val'] for r in log], marker='.', label=label)
        by_dist = log[-1].get('val_by_dist') or []
        if by_dist:
            ax_dist.plot(range(1, len(by_dist) + 1), by_dist, marker='o', color=line.get_color(), label=label)
        else:  # a GPT predicts distance 1 only
            ax_dist.plot([1], [log[-1]['val']], marker='D', ls='none', color=line.get_color(), label=f'{label}: next token only')
    ax_time.set(xlabel='training time (s, evaluation excluded)', ylabel='next-token val loss (nats)',
                title='val loss vs time')
    ax_dist.set(xlabel='distance d (future slot)', ylabel='val loss at distance d (nats)',
                title='loss by distance, last evaluation (the hockey stick)')
    ax_dist.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_time, ax_dist):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


def draw_convergence(runs, out, labels=None, windows=16, depths=(1, 2, 4, 8, 16, 32, 64), slot_exit=True):
    """Per WFC run, on the same val windows: the next-token loss and the open slots' state norm after
    exactly K passes (K = depths), and each slot's passes to exit (its KL below the model's tol, at
    most max(depths) passes; slot_exit: each slot on its own) against its entropy, with Spearman's rho."""
    from plumbing import checkpoint
    import eval as evaluation
    from plumbing.dataloader import TokenShards, data_dir
    plt = plt_module()
    fig, (ax_loss, ax_norm, ax_pass) = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, run in enumerate(runs):
        model, info = checkpoint.load_model(run, max_loop=max(depths), slot_exit=slot_exit)
        if not model.config.n_future:
            fail(f"{run} is a GPT: the convergence picture needs WFC runs")
        data = TokenShards(data_dir(info['config']['dataset']), 'val', model.config.block_size, model.config.vocab_size)
        x, y = evaluation.windows(data, windows, 1234, 'cpu')
        at, _, norms, _ = evaluation.batched(model, x, y, 32, record=tuple(depths))
        per_slot = evaluation.batched(model, x, y, 32)[1]
        passes, entropy = per_slot['passes'], per_slot['entropy']
        label, colour = labels[k] if labels else os.path.basename(os.path.normpath(run)), f'C{k % 10}'
        ax_loss.plot(depths, [at[d][0].mean().item() for d in depths], marker='o', color=colour, label=label)
        ax_norm.plot(sorted(norms), [norms[d] for d in sorted(norms)], marker='o', color=colour, label=label)
        jitter = (torch.rand(len(passes)) - 0.5) * 0.4  # integer passes: spread the dots a little
        rho = evaluation.spearman(passes.float(), entropy)
        ax_pass.scatter((entropy / np.log(2)).tolist(), (passes + jitter).tolist(), s=2, alpha=0.25, color=colour,
                        label=f'{label} (rho {rho:.2f})')
    ax_loss.set(xscale='log', xlabel='passes K', ylabel='val next-token loss (nats)', title='loss after exactly K passes')
    ax_norm.set(xscale='log', yscale='log', xlabel='passes K', ylabel='mean state norm of the open slots', title='state norm')
    ax_pass.set(xlabel='entropy of the slot after convergence (bits)', ylabel='passes to exit', title='compute follows difficulty?')
    ax_loss.legend(fontsize='small'), ax_norm.legend(fontsize='small'), ax_pass.legend(fontsize='small', markerscale=4)
    fig.savefig(out, dpi=110, bbox_inches='tight')
    print(f"wrote {out}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='picture', required=True)
    toy = sub.add_parser('toy', help="the toy model's state plane, paths and collapse arrows")
    toy.add_argument('--out', default='toy.png')
    toy.add_argument('--steps', type=int, default=400, help='training steps (about 10 ms each)')
    toy.add_argument('--seed', type=int, default=0)
    toy.add_argument('--size', type=int, default=360, help='pixels per side of the state plane')
    curves = sub.add_parser('curves', help='val loss vs time and loss by distance of train.py runs')
    curves.add_argument('--runs', nargs='+', required=True, help='out_dir folders of train.py runs')
    curves.add_argument('--labels', nargs='+', help='one legend label per run (default: folder names)')
    curves.add_argument('--out', default='curves.png')
    conv = sub.add_parser('convergence', help='WFC runs: loss and state norm against passes, passes against entropy')
    conv.add_argument('--runs', nargs='+', required=True, help='out_dir folders of WFC train.py runs')
    conv.add_argument('--labels', nargs='+', help='one legend label per run (default: folder names)')
    conv.add_argument('--windows', type=int, default=16, help='val windows to run (the same for every run)')
    conv.add_argument('--out', default='convergence.png')
    args = parser.parse_args(argv)
    if getattr(args, 'labels', None) and len(args.labels) != len(args.runs):
        fail("give one --labels entry per --runs folder")
    try:
        output_file(args.out)
    except UserError as e:
        fail(e)
    if args.picture == 'toy':
        draw_toy(args.out, args.steps, args.seed, args.size)
    elif args.picture == 'curves':
        draw_curves(args.runs, args.out, args.labels)
    else:
        draw_convergence(args.runs, args.out, args.labels, args.windows)


if __name__ == '__main__':
    main()
