"""
Can an exit rule make a WFC model's compute follow difficulty? Three answers on one checkpoint, all
read from the same recorded trajectories (every future slot refined `passes` times, its state,
decoded entropy and loss kept after each pass):

- the oracle: the first pass after which a slot's loss is within `delta` nats of where it ends
  (what a perfect exit would do; its mean passes is the floor of any exit that loses <= delta);
- the KL exit the solver runs today (a slot stops when KL(pass k || pass k - 1) < tol);
- a learned exit gate (Ouro / LoopLM, arXiv 2510.25741, its second stage: fit the gate to the
  measured per-pass improvement): a logistic probe on [state, entropy, KL to the last pass] fitted on
  train windows to say "the oracle would have stopped by now", exiting at the first pass whose
  gate probability passes tau.
For each: mean passes, next-token loss at exit (distance-1 slots, so it compares with eval.py's),
loss over every scored slot, and Spearman's rho of passes against the slot's loss and entropy at the
end (compute follows difficulty when passes rise with both). A slot's exit here is read off a full
trajectory: in the solver a slot that exits freezes and its block mates see the frozen state, which
this offline reading ignores (the exits are per slot, as the solver's slot_exit).

    python research/exit_gate.py --out_dir=runs/refinement/steps/sw_contract_u8
"""

import json
import os
import sys

import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import cli, configure, output_file, require  # noqa: E402
from eval import layouts, spearman, windows  # noqa: E402
from modeling.recipe import cross_entropy  # noqa: E402
from plumbing import checkpoint  # noqa: E402
from plumbing.dataloader import TokenShards, data_dir  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare-char-wfc'  # the WFC run folder (or checkpoint) to study
passes = 8               # passes recorded per slot (the trajectory every exit reads)
delta = 0.01             # the oracle: the first pass within delta nats of the slot's last-pass loss
tol = 1e-3               # the KL exit's tolerance (nats), the solver's default
taus = '0.3,0.5,0.7,0.9' # gate probabilities to exit at
n_train = 256            # train windows the gate is fitted on
n_val = 64               # val windows every exit is measured on (eval.py's seed: the same windows)
batch_size = 32          # windows per forward
seed = 1234              # picks the val windows (eval.py's default); the train windows use seed + 1
out = ''                 # also write the results as JSON here
# -----------------------------------------------------------------------------


@torch.no_grad()
def trajectories(model, x, y):
    """Per scored slot: features (N, K, C + 2) after each pass ([state, entropy, KL to the pass
    before]), losses (N, K) and entropies (N, K) after each pass, and whether it counts in the next-token loss (N,)."""
    feats, losses, entropies, first = [], [], [], []
    seen = torch.zeros(x.shape, dtype=torch.bool)  # targets already scored at distance 1 (eval.py counts each once)
    record = tuple(range(1, passes + 1))
    for lo in range(0, len(x), batch_size):
        xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
        for name, r in layouts(model):
            out = model.wfc_forward(xb, yb, depth=passes, record=record, **{name: torch.full((len(xb),), r)})
            logp = [F.log_softmax(out.logits_at[k].float(), -1) for k in record]
            kls = [torch.full(logp[0].shape[:-1], 50.0)] + [(b.exp() * (b - a)).sum(-1) for a, b in zip(logp, logp[1:])]
            entropy = torch.stack([-(lp.exp() * lp).sum(-1) for lp in logp], -1)  # (B, S, K)
            states = torch.stack([out.trace.states[k].float() for k in record], 2)  # (B, S, K, C)
            feats.append(torch.cat((states, entropy[..., None], torch.stack(kls, -1).clamp(max=50)[..., None]), -1)[out.scored])
            losses.append(torch.stack([cross_entropy(out.logits_at[k], out.targets) for k in record], -1)[out.scored])
            entropies.append(entropy[out.scored])
            first.append(next_token_slots(model, out, seen[lo:lo + batch_size])[out.scored])
    return torch.cat(feats), torch.cat(losses), torch.cat(entropies), torch.cat(first)


def next_token_slots(model, out, seen):
    """(B, S) the distance-1 slots whose target (row, position) no earlier layout scored: each target
    once, as eval.py's next-token loss counts it. Marks them in seen (B, T)."""
    rows, slots = (out.scored & (out.dist.expand_as(out.scored) == 1)).nonzero(as_tuple=True)
    targets = slots if model.config.attn == 'pinned' else slots - 1  # bidirectional slot i predicts y[:, i - 1]
    fresh = ~seen[rows, targets]
    mask = torch.zeros_like(out.scored)
    mask[rows[fresh], slots[fresh]] = True
    seen[rows[fresh], targets[fresh]] = True
    return mask


def oracle_exit(losses):
    """(N,) the first pass (1-based) whose loss is within delta of the slot's loss after the last pass."""
    close = losses - losses[:, -1:] <= delta
    return close.float().argmax(1) + 1


def first_pass_where(flags):
    """(N,) the first pass (1-based) where flags (N, K) holds; the last pass when it never does."""
    hit = flags.clone()
    hit[:, -1] = True
    return hit.float().argmax(1) + 1


def fit_gate(feats, losses):
    """A logistic probe on the features: 'the oracle would have stopped by now' (pass k >= its exit).
    Standardised inputs, balanced classes, full-batch Adam."""
    target = (torch.arange(1, passes + 1)[None] >= oracle_exit(losses)[:, None]).float()
    X, t = feats.flatten(0, 1), target.flatten()
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    gate = torch.nn.Linear(X.size(1), 1)
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    pos_weight = ((1 - t).sum() / t.sum().clamp(min=1)).reshape(1)
    for _ in range(400):
        loss = F.binary_cross_entropy_with_logits(gate((X - mean) / std)[:, 0], t, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda f: torch.sigmoid(gate((f - mean) / std)[..., 0]).detach()


def row(name, exit_pass, losses, entropies, first):
    """The numbers of one exit rule: where each slot exits, read off the trajectories."""
    at = losses.gather(1, exit_pass[:, None] - 1)[:, 0]
    final_entropy = entropies[:, -1]
    return dict(rule=name, passes=exit_pass.float().mean().item(), next_token_loss=at[first].mean().item(),
                loss=at.mean().item(), rho_loss=spearman(exit_pass.float(), losses[:, -1]),
                rho_entropy=spearman(exit_pass.float(), final_entropy))


def main():
    configure(globals())
    require(passes >= 2 and delta >= 0 and n_train >= 1 and n_val >= 1, "need passes >= 2, delta >= 0, n_train, n_val >= 1")
    if out:
        output_file(out)
    torch.manual_seed(0)
    model, info = checkpoint.load_model(out_dir, 'cpu')
    require(model.config.n_future > 0, f"{out_dir} is a GPT: exits are a WFC question")
    folder = data_dir(info['config']['dataset'])
    T = model.config.block_size
    train = trajectories(model, *windows(TokenShards(folder, 'train', T, model.config.vocab_size), n_train, seed + 1, 'cpu'))
    val_feats, val_losses, val_entropies, val_first = trajectories(
        model, *windows(TokenShards(folder, 'val', T, model.config.vocab_size), n_val, seed, 'cpu'))
    gate = fit_gate(train[0], train[1])
    rows = [row(f'fixed {k}', torch.full((len(val_losses),), k), val_losses, val_entropies, val_first) for k in (1, 2, 4, passes)]
    rows.append(row(f'oracle (delta {delta})', oracle_exit(val_losses), val_losses, val_entropies, val_first))
    rows.append(row(f'KL < {tol}', first_pass_where(val_feats[..., -1] < tol), val_losses, val_entropies, val_first))
    probs = gate(val_feats)
    rows += [row(f'gate > {t}', first_pass_where(probs > float(t)), val_losses, val_entropies, val_first) for t in taus.split(',')]
    print(f"{out_dir}: {len(val_losses)} val slots ({int(val_first.sum())} at distance 1), {passes} passes recorded")
    print('| exit | mean passes | next-token loss | loss, all slots | rho(passes, loss) | rho(passes, entropy) |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['rule']} | {r['passes']:.2f} | {r['next_token_loss']:.4f} | {r['loss']:.4f} | {r['rho_loss']:.3f} | "
              f"{r['rho_entropy']:.3f} |")
    if out:
        with open(out, 'w') as f:
            json.dump(dict(out_dir=out_dir, passes=passes, delta=delta, tol=tol, rows=rows), f, indent=1)


if __name__ == '__main__':
    cli(main)
