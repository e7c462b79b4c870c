"""
Sampling ablations: one WFC checkpoint sampled with each collapse mode (token / nearest / partial)
under the first and lowest policies, and with the threshold policy at two taus, beside a GPT
checkpoint at the same temperature. (A collapsed slot's state only matters while it stays in the
future: with `first` it moves into the past as a token at once, so the modes can differ only under
`lowest`, with pins, or in a bidirectional model that warm-starts.)
Every row continues the same val prompts with the same seed and is scored by the judge (mean NLL
per generated token, nats: lower is better), with distinct-4 and unigram entropy to catch
repetition, and tokens committed per refinement step (threshold's speed-up).

    python research/sampling_ablations.py --wfc_ckpt=out-shakespeare-char-wfc \\
        --gpt_ckpt=out-shakespeare-char-gpt --judge=out-shakespeare-char-judge
"""

import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import cli, configure  # noqa: E402
from eval import sample_quality  # noqa: E402
from generation.decoding import Settings  # noqa: E402
from plumbing import checkpoint  # noqa: E402
from plumbing.dataloader import TokenShards, data_dir  # noqa: E402

# -----------------------------------------------------------------------------
wfc_ckpt = 'out-shakespeare-char-wfc'   # the WFC run folder (or checkpoint) to sample
gpt_ckpt = 'out-shakespeare-char-gpt'   # the GPT row's run
judge = 'out-shakespeare-char-judge'    # the GPT that scores every row's text
samples = 32             # prompts (one batch)
prompt_tokens = 32       # prompt length, from val windows
new_tokens = 128         # tokens per sample
temperature = 0.8        # sampling temperature of every row
taus = '1.0,2.0'         # entropy limits (bits) of the threshold policy rows
out = ''                 # write the rows as JSON here ('' = print only)
seed = 1234              # prompts and draws
# -----------------------------------------------------------------------------


def main():
    configure(globals())
    wfc, info = checkpoint.load_model(wfc_ckpt, 'cpu')
    gpt = checkpoint.load_model(gpt_ckpt, 'cpu')[0]
    judge_model = checkpoint.load_model(judge, 'cpu')[0]
    data = TokenShards(data_dir(info['config']['dataset']), 'val', prompt_tokens)
    prompts = data.batch(samples, seed)[0]
    rows = [('gpt', gpt, Settings(temperature=temperature))]
    rows += [('wfc speculative', wfc, Settings(temperature=temperature))]
    rows += [(f'wfc {policy} {mode}', wfc, Settings(temperature=temperature, policy=policy, mode=mode, sampler='collapse'))
             for policy in ('first', 'lowest') for mode in ('token', 'nearest', 'partial')]
    rows += [(f'wfc threshold tau={t}', wfc, Settings(temperature=temperature, policy='threshold', tau=float(t), sampler='collapse'))
             for t in taus.split(',')]
    results = []
    print('| sampler | judge NLL | distinct-4 | unigram bits | tokens/step | passes/token |')
    print('|---|---|---|---|---|---|')
    for name, model, settings in rows:
        torch.manual_seed(seed)
        r = dict(name=name, **sample_quality(model, judge_model, prompts, new_tokens, settings, seed))
        results.append(r)
        print(f"| {name} | {r['judge_nll']:.3f} | {r['distinct_4']:.3f} | {r['unigram_bits']:.2f} | "
              f"{r['tokens_per_step']:.2f} | {r['passes_per_token']:.2f} |", flush=True)
    if out:
        with open(out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    cli(main)
