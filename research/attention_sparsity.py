"""
How sparse the entmax attentions are, and whether the sparsity follows the entropy: for a checkpoint
trained with attn_fn='entmax' or 'adaptive', the share of exact zeros among the visible keys per
layer, and per attention row its share of zeros against the entropy of the softmax of the same
scores (divided by its maximum, the log of the visible keys). Writes a table and, with --out, a plot.

    python research/attention_sparsity.py --out_dir=runs/attn/steps/adaptive --out=assets/sparsity.png
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import checkpoint  # noqa: E402
import model as model_module  # noqa: E402
from configurator import ArgumentParser, fail  # noqa: E402
from plumbing.dataloader import TokenShards, data_dir  # noqa: E402


def record(model, x, y):
    """Per layer: (zeros share among visible keys, [(row entropy share, row zeros share)]) of one forward."""
    rows, original = {}, model_module.attention_weights
    layer = {'i': 0}

    def recording(scores, attn_fn, alpha, gain=None, bias=None, visible=None):
        weights = original(scores, attn_fn, alpha, gain, bias, visible)
        vis = scores > torch.finfo(scores.dtype).min  # masked keys carry the dtype's minimum
        p = torch.softmax(scores, -1)
        h = -(p * torch.log(p.clamp(min=1e-30))).sum(-1) / torch.log(vis.sum(-1).clamp(min=2).float())
        zeros = ((weights == 0) & vis).sum(-1).float() / vis.sum(-1).clamp(min=1)
        rows.setdefault(layer['i'] % model.config.n_layer, []).append((h.flatten(), zeros.flatten()))
        layer['i'] += 1
        return weights
    model_module.attention_weights = recording
    try:
        with torch.no_grad():
            model(x, y)
    finally:
        model_module.attention_weights = original
    return {k: (torch.cat([h for h, _ in v]), torch.cat([z for _, z in v])) for k, v in rows.items()}


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument('--out_dir', required=True, help='a run folder (or checkpoint) trained with a sparse attn_fn')
    parser.add_argument('--windows', type=int, default=32, help='val windows')
    parser.add_argument('--out', default='', help='write the sparsity-vs-entropy plot here (PNG)')
    args = parser.parse_args()
    model, info = checkpoint.load_model(args.out_dir)
    if model.config.attn_fn == 'softmax':
        fail(f"{args.out_dir} uses softmax attention: it has no exact zeros to count")
    data = TokenShards(data_dir(info['config']['dataset']), 'val', model.config.block_size, model.config.vocab_size)
    x, y = data.batch(args.windows, 1234)
    by_layer = record(model, x, y)
    print(f"{args.out_dir} ({model.config.attn_fn}): exact zeros among the visible keys, by layer")
    print('| layer | zeros | rows | Spearman(row entropy, row zeros) |\n|---|---|---|---|')
    import eval as evaluation
    for k, (h, z) in sorted(by_layer.items()):
        print(f"| {k} | {z.mean().item():.3f} | {len(z)} | {evaluation.spearman(h, z):.3f} |")
    if args.out:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for k, (h, z) in sorted(by_layer.items()):
            pick = torch.randperm(len(h))[:3000]
            ax.scatter(h[pick].tolist(), z[pick].tolist(), s=2, alpha=0.3, label=f'layer {k}')
        ax.set(xlabel='entropy of the softmax row / its maximum', ylabel='share of visible keys with zero weight',
               title=f'{model.config.attn_fn} attention: sparsity against entropy')
        ax.legend(markerscale=4, fontsize='small')
        fig.savefig(args.out, dpi=110, bbox_inches='tight')
        print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
