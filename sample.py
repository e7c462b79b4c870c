"""
Sample from a trained model: a GPT decodes token by token; a WFC model runs converge -> collapse
-> shift (sampling.py has the policies and modes).

    python sample.py --out_dir=out-shakespeare-char-wfc
    python sample.py --out_dir=out-shakespeare-char-wfc --start="ROMEO:" --policy=threshold --tau=0.5 --stats=True
    python sample.py --out_dir=out-shakespeare-char-wfc --pin="6:king" --mode=nearest
    python sample.py --init_from=path/to/nanogpt/ckpt.pt --start=FILE:prompt.txt
    python sample.py --out_dir=out-shakespeare-char-wfc --steer=smc --potential=forbid:the,and --particles=8
    python sample.py --out_dir=out-shakespeare-char-wfc --steer=best_of_n --judge=out-shakespeare-char-gpt
    python sample.py --out_dir=out-shakespeare-char-wfc --calibrate=True
"""

import math
import os
import sys

import torch

import checkpoint
import runtime
import steering
from configurator import ConfigError, configure
from dataloader import read_meta
from sampling import Settings, generate
from tokenizer import codec_for

# -----------------------------------------------------------------------------
init_from = 'resume'     # 'resume' (out_dir/ckpt.pt) or a checkpoint file (ours or nanoGPT's)
out_dir = 'out'
start = '\n'             # the prompt, or FILE:path to read it from a file
num_samples = 3          # samples, generated together as one batch
max_new_tokens = 500     # tokens per sample
stop = ''                # stop a sample at the first occurrence of this text ('' = never; EOS always stops)
seed = 1337
device = 'auto'
dtype = 'auto'
compile = False          # torch.compile the block stack
stats = False            # per-step table on stderr: tokens, passes, entropy of what collapsed, the window's entropy curve
entropy_png = ''         # write the window's entropy by step and slot to this PNG (needs matplotlib)
pin = ''                 # WFC goal: 'offset:text' puts text at future slot offset (1 = the next token)
schedule = ''            # temperature by progress: 'linear:T0[:T1]', 'cosine:..', 'exp:..' (T1 defaults to temperature)
# steering (steering.py): num_samples independent runs, one text each, and a summary line
steer = ''               # '' = plain batch above; 'plain' | 'smc' | 'rejection' | 'best_of_n' | 'tree'
particles = 8            # SMC particles / best-of-N candidates / rejection batch / tree width x branch
potential = ''           # 'forbid:w1,w2' | 'regex:PATTERN' (forbidden) | 'contain:word:within[:lookahead]' | 'judge[:weight]'
goal = ''                # WFC: 'offset:text' at generated offset (1 = first token), pinned as it comes into the window
ess = 0.5                # SMC: resample when the effective sample size < ess x particles
segment = 16             # tree: tokens per round
judge = ''               # GPT checkpoint scoring each run's text (NLL); also best_of_n / tree's default score
scorer = ''              # checkpoint that best_of_n, tree and the judge potential score with ('' = the judge)
nll_ref = 0.0            # with a judge: count runs with judge NLL <= this as 'judged coherent' (0 = off)
calibrate = False        # WFC: print entropy / varentropy percentiles on the validation split, then exit
# sampler and WFC settings: every field of sampling.Settings
globals().update(vars(Settings()))
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sparkline(bits, top):
    marks = '▁▂▃▄▅▆▇█'
    return ''.join(marks[min(7, int(b / max(top, 1e-9) * 8))] for b in bits)


def write_entropy_png(steps, path, top):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("entropy_png: matplotlib is not installed (pip install matplotlib); skipped", file=sys.stderr)
        return
    grid = [s['window_bits'] for s in steps if s['window_bits']]
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(torch.tensor(grid).T, aspect='auto', origin='lower', vmin=0, vmax=top, cmap='viridis')
    ax.set(xlabel='step', ylabel='future slot (distance - 1)', title='entropy of the future window (bits)')
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f"wrote {path}", file=sys.stderr)


def main():
    try:
        configure(globals())
        settings = Settings(**{k: globals()[k] for k in vars(Settings())}).check()
        dev, dt = runtime.resolve(device, dtype)
        if max_new_tokens <= 0 or num_samples <= 0:
            raise ValueError(f"need max_new_tokens > 0 and num_samples > 0, got {max_new_tokens} and {num_samples}")
    except (ConfigError, ValueError, RuntimeError) as e:
        fail(e)
    torch.manual_seed(seed)
    try:
        model, ckpt = checkpoint.load_model(out_dir if init_from == 'resume' else init_from, dev)
    except checkpoint.CheckpointError as e:
        fail(e)
    if compile:
        model._stack = torch.compile(model._stack, dynamic=True)
    meta = ckpt.get('meta')  # ours carry their vocabulary; nanoGPT's point at data/<dataset>/meta.pkl
    prompt = start
    try:
        if meta is None and 'dataset' in ckpt.get('config', {}):
            meta = read_meta(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', ckpt['config']['dataset']))
        codec = codec_for(meta)
        if prompt.startswith('FILE:'):
            with open(prompt[5:], encoding='utf-8') as f:
                prompt = f.read()
    except (ValueError, RuntimeError, OSError) as e:  # unreadable meta or prompt file, tokenizer unavailable
        fail(e)
    try:
        ids = codec.encode(prompt)
        pins = []
        if pin:
            offset, sep, text = pin.partition(':')
            if not sep or not offset.strip().isdigit() or not text:
                raise ValueError(f"pin must look like 'offset:text' (e.g. '6:king'), got {pin!r}")
            pins = [(int(offset), codec.encode(text))]
        vocab = model.config.vocab_size
        if max(ids + [i for _, p in pins for i in p], default=0) >= vocab:  # a tokenizer larger than the model's vocabulary
            raise ValueError(f"the prompt or pin has token ids >= the model's vocabulary size {vocab}: this checkpoint "
                             f"was trained with another tokenizer than its meta describes")
    except ValueError as e:
        fail(e)
    if not ids:
        fail("the prompt is empty; give at least one token with --start")
    if calibrate or steer:
        try:
            if calibrate:
                dataset = ckpt.get('config', {}).get('dataset')
                if not dataset:
                    raise ValueError("calibrate reads the validation split of the checkpoint's dataset; this checkpoint names none")
                data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
                return steering.calibrate_command(model, data_dir, settings, seed=seed)
            judge_model = checkpoint.load_model(judge, dev)[0] if judge else None
            scorer_model = checkpoint.load_model(scorer, dev)[0] if scorer else judge_model
            with runtime.autocast(dev, dt):
                return steering.command(model, codec, ids, settings, globals(), judge_model, scorer_model)
        except (ValueError, checkpoint.CheckpointError) as e:
            fail(e)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    texts = [''] * num_samples
    done = [False] * num_samples
    stream = num_samples == 1

    def on_tokens(new):
        for row, tokens in enumerate(new.tolist()):
            if done[row]:
                continue
            if codec.eos is not None and codec.eos in tokens:
                tokens, done[row] = tokens[:tokens.index(codec.eos)], True
            piece = codec.decode(tokens)
            if stop and stop in texts[row] + piece:
                piece = (texts[row] + piece)[:(texts[row] + piece).index(stop)][len(texts[row]):]
                done[row] = True
            texts[row] += piece
            if stream:
                print(piece, end='', flush=True)
        return all(done)

    if stream:
        print(prompt, end='', flush=True)
    g = torch.Generator(device=dev).manual_seed(seed)
    with runtime.autocast(dev, dt):
        try:
            _, record = generate(model, idx, max_new_tokens, settings, generator=g, pins=pins, on_tokens=on_tokens,
                                 schedule=steering.schedule(schedule, settings.temperature))
        except ValueError as e:
            fail(e)
    for text in texts:
        print('' if stream else prompt + text)  # a streamed sample is on the screen already: end its line
        print('---------------')
    top = math.log2(model.config.vocab_size)  # the most entropy a slot can have, bits
    if stats:
        print("step  tokens  passes  collapsed(bits)   window entropy (bits)", file=sys.stderr)
        for k, step in enumerate(record.steps):
            collapsed = ' '.join(f'{b:.2f}' for b in step['collapsed_bits'])
            print(f"{k:4d}  {step['emitted']:6d}  {step['passes']:6d}  {collapsed:16s}  {sparkline(step['window_bits'], top)}",
                  file=sys.stderr)
    summary = record.summary()
    print(f"[{summary['tokens']} tokens in {summary['seconds']:.2f}s: {summary['tokens_per_s']:.1f} tokens/s, "
          f"{summary['passes_per_token']:.2f} passes/token, {summary['tokens_per_step']:.2f} tokens/step]", file=sys.stderr)
    if entropy_png:
        write_entropy_png(record.steps, entropy_png, top)


if __name__ == '__main__':
    main()
