"""
Check that a checkpoint written by nanoGPT's train.py gives the same logits in this repo's GPT mode
as in nanoGPT's own model. nanoGPT is not part of this repo: point --nanogpt at a checkout of it.

    python tools/check_nanogpt_parity.py --nanogpt=../nanoGPT --ckpt=../nanoGPT/out-shakespeare-char/ckpt.pt
"""

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ArgumentParser  # noqa: E402
from plumbing import checkpoint  # noqa: E402


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--nanogpt', required=True, help='a nanoGPT checkout (its model.py is imported from there)')
    parser.add_argument('--ckpt', required=True, help="a ckpt.pt written by nanoGPT's train.py")
    parser.add_argument('--rows', type=int, default=8)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location('nanogpt_model', os.path.join(args.nanogpt, 'model.py'))
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    ckpt = torch.load(args.ckpt, map_location='cpu', weights_only=False)
    theirs = nano.GPT(nano.GPTConfig(**ckpt['model_args']))
    theirs.load_state_dict(checkpoint.clean_state_dict(ckpt['model']) | {
        k: v for k, v in theirs.state_dict().items() if k.endswith('.attn.bias')})
    ours, _ = checkpoint.load_model(args.ckpt)
    theirs.eval()
    torch.manual_seed(0)
    bs, vocab = ckpt['model_args']['block_size'], ckpt['model_args']['vocab_size']
    idx = torch.randint(0, vocab, (args.rows, bs))
    with torch.no_grad():
        a, _ = theirs(idx, idx)  # with targets: logits at every position
        b, _ = ours(idx, idx)
    diff = (a - b).abs().max().item()
    print(f"{args.ckpt}: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters, "
          f"{args.rows} x {bs} tokens, max |logit difference| = {diff:.3g} (fp32)")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == '__main__':
    main()
