"""
Sample from a trained model. A GPT decodes token by token with its cache; a WFC checkpoint samples
speculatively by default (its future slots draft, its causal stream verifies: exact and faster), or
with --sampler=collapse runs converge -> collapse -> shift with policies, collapse modes and goals.
Ctrl-C prints what was generated so far and exits 130.

    python sample.py --out_dir=out-shakespeare-char-wfc
    python sample.py --out_dir=out-shakespeare-char-wfc --start="ROMEO:" --stats=True
    python sample.py --out_dir=out-shakespeare-char-wfc --sampler=collapse --policy=threshold --tau=0.5
    python sample.py --out_dir=out-shakespeare-char-wfc --goal="24:the king" --mode=nearest
    python sample.py --init_from=path/to/nanogpt/ckpt.pt --start=FILE:prompt.txt
    python sample.py --out_dir=out-shakespeare-char-wfc --steer=smc --potential=forbid:the,and --particles=8
    python sample.py --out_dir=out-shakespeare-char-wfc --calibrate=True
"""

import math
import os
import sys
import time

import torch

from configurator import UserError, cli, configure, require
from generation import steering
from generation.decoding import Settings
from generation.sampling import generate, inapplicable, parse_goal, pick_sampler, warm_up
from plumbing import checkpoint
from plumbing import runtime
from plumbing.dataloader import data_dir, read_meta
from plumbing.tokenizer import codec_for

# -----------------------------------------------------------------------------
init_from = 'resume'     # 'resume' (out_dir/ckpt.pt) or a checkpoint file (ours or nanoGPT's)
out_dir = 'out'          # the run folder to sample (with init_from='resume')
start = '\n'             # the prompt, or FILE:path to read it from a file
num_samples = 3          # samples (up to 64 generated together as one batch and printed when done; every sampler runs the batch together)
max_new_tokens = 500     # tokens per sample
stop = ''                # stop a sample at the first occurrence of this text ('' = never; EOS always stops)
seed = 1337              # seeds the draws (the same seed gives the same text)
device = 'auto'          # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'           # 'auto' (bf16 where native), 'float32', 'bfloat16', 'float16'
compile = False          # torch.compile the samplers (runtime.compile_samplers), after an untimed warm-up generation
stats = False            # per-step table on stderr: tokens, passes, entropy of what collapsed, the window's entropy curve
entropy_png = ''         # collapse sampler: write the window's entropy by step and slot to this PNG (needs matplotlib)
goal = ''                # WFC: 'offset:text' puts text at generated offset (1 = the first new token), pinned as it comes into the window
pin = ''                 # the earlier name of goal (the same idea: a pin is a goal inside the first window)
schedule = ''            # temperature by progress: 'linear:T0[:T1]', 'cosine:..', 'exp:..' (T1 defaults to temperature)
# steering (steering.py): num_samples independent runs, one text each, and a summary line
steer = ''               # '' = plain batch above; 'plain' | 'smc' | 'rejection' | 'best_of_n' | 'tree'
particles = 8            # SMC particles / best-of-N candidates / rejection batch / tree width x branch
potential = ''           # 'forbid:w1,w2' | 'regex:PATTERN' (forbidden) | 'match:REGEX' (required format) | 'contain:word:within[:lookahead]' | 'judge[:weight]'
ess = 0.5                # SMC: resample when the effective sample size < ess x particles
segment = 16             # tree: tokens per round
judge = ''               # GPT checkpoint scoring each run's text (NLL); also best_of_n / tree's default score
scorer = ''              # checkpoint that best_of_n, tree and the judge potential score with ('' = the judge)
nll_ref = 0.0            # with a judge: count runs with judge NLL <= this as 'judged coherent' (0 = off)
calibrate = False        # WFC: print entropy / varentropy percentiles on the validation split, then exit
# sampler and WFC settings: every field of sampling.Settings
globals().update(vars(Settings()))
# -----------------------------------------------------------------------------
STEERING_KEYS = dict(particles=8, potential='', ess=0.5, segment=16, scorer='', nll_ref=0.0)


def sparkline(bits, top):
    marks = '▁▂▃▄▅▆▇█'
    return ''.join(marks[min(7, int(b / max(top, 1e-9) * 8))] for b in bits)


def write_entropy_png(steps, path, top):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("entropy_png needs matplotlib (pip install matplotlib)") from None
    grid = [s['window_bits'] for s in steps if s['window_bits']]
    width = max(len(g) for g in grid)
    grid = [g + [float('nan')] * (width - len(g)) for g in grid]  # future='auto': windows of several lengths
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(torch.tensor(grid).T, aspect='auto', origin='lower', vmin=0, vmax=top, cmap='viridis')
    ax.set(xlabel='step', ylabel='future slot (distance - 1)', title='entropy of the future window (bits)')
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f"wrote {path}", file=sys.stderr)


def check_settings():
    """Every setting's range and what it needs, before any work."""
    require(max_new_tokens > 0 and num_samples > 0, f"need max_new_tokens > 0 and num_samples > 0, got {max_new_tokens} and {num_samples}")
    require(not (goal and pin), "--pin is the earlier name of --goal: give one")
    require(0 < ess <= 1 and particles >= 1 and segment >= 1, "need 0 < ess <= 1, particles >= 1 and segment >= 1")
    require(steer in ('', 'plain', 'smc', 'rejection', 'best_of_n', 'tree'),
            f"steer must be '', 'plain', 'smc', 'rejection', 'best_of_n' or 'tree', got {steer!r}")
    if not steer:
        changed = [k for k, v in STEERING_KEYS.items() if globals()[k] != v] + (['judge'] if judge else [])
        require(not changed, f"--{changed[0] if changed else ''} is a steering option: it needs --steer=... "
                             f"(smc, rejection, best_of_n, tree or plain)")
    if entropy_png:
        require(os.path.isdir(os.path.dirname(os.path.abspath(entropy_png))), f"entropy_png: no folder for {entropy_png}")


def load(dev):
    """The model, its checkpoint's other contents, and the codec."""
    if init_from.startswith('gpt2') and not os.path.exists(init_from):  # nanoGPT's names of OpenAI's weights
        raise UserError(f"--init_from={init_from} means OpenAI's GPT-2 weights in nanoGPT; this repo does not download "
                        f"them (no network, no transformers): give the path of a checkpoint file (ours, or a "
                        f"nanoGPT ckpt.pt) or --out_dir of a run")
    model, ckpt = checkpoint.load_model(out_dir if init_from == 'resume' else init_from, dev)
    meta = ckpt.get('meta')  # ours carry their vocabulary; nanoGPT's point at data/<dataset>/meta.pkl
    if meta is None and 'dataset' in ckpt.get('config', {}):
        meta = read_meta(data_dir(ckpt['config']['dataset']))
    try:
        codec = codec_for(meta)
    except (ValueError, RuntimeError) as e:
        raise UserError(e) from None
    checkpoint.check_vocabulary(model, codec, meta)
    return model, ckpt, codec


def prompt_ids(codec, vocab):
    text = start
    if text.startswith('FILE:'):
        try:
            with open(text[5:], encoding='utf-8') as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {text[5:]}: {e}") from None
    try:
        ids = codec.encode(text)
        wanted = parse_goal(goal or pin, codec.encode)
    except ValueError as e:
        raise UserError(e) from None
    require(ids, "the prompt is empty; give at least one token with --start")
    require(max(ids + (wanted[1] if wanted else [])) < vocab,
            f"the prompt or goal has token ids >= the model's vocabulary size {vocab}: this checkpoint was trained "
            f"with another tokenizer than its meta describes")
    return text, ids, wanted


def print_stats(record, top, sampler):
    if stats:
        print("step  tokens  passes  live  collapsed(bits)   window entropy (bits)", file=sys.stderr)
        for k, step in enumerate(record.steps):
            collapsed = ' '.join(f'{b:.2f}' for b in step['collapsed_bits'])
            live = step['live'] if step['live'] is not None else '-'
            print(f"{k:4d}  {step['emitted']:6g}  {step['passes']:6d}  {live:>4}  {collapsed:16s}  "
                  f"{sparkline(step['window_bits'], top)}", file=sys.stderr)
    summary = record.summary()
    extra = ''
    if 'acceptance' in summary:
        extra = ", acceptance by distance " + ' '.join(f'{a:.2f}' for a in summary['acceptance'])
    print(f"[{sampler}: {summary['tokens']:g} tokens in {summary['seconds']:.2f}s: {summary['tokens_per_s']:.1f} tokens/s, "
          f"{summary['passes_per_token']:.2f} passes/token, {summary['tokens_per_step']:.2f} tokens/step, "
          f"{summary['tokens_per_call']:.2f} tokens/stack call{extra}]", file=sys.stderr)


SAMPLE_BATCH = 64  # samples generated together; more are generated (and printed) batch after batch


class Rows:
    """The text of a batch of samples as it is generated: generate() calls add() with each row's new
    tokens; with stream (one sample) the text is printed as it comes."""

    def __init__(self, codec, n, stream):
        self.codec, self.texts, self.stream = codec, [''] * n, stream

    def add(self, row, tokens):
        """Decode a row's new tokens; True when the row has ended (EOS or the stop text)."""
        eos = self.codec.eos
        done = eos is not None and eos in tokens
        piece, text = self.codec.decode(tokens[:tokens.index(eos)] if done else tokens), self.texts[row]
        if stop and stop in text + piece:
            piece, done = (text + piece)[:(text + piece).index(stop)][len(text):], True
        self.texts[row] += piece
        if self.stream:
            print(piece, end='', flush=True)
        return done

    def show(self, prompt):
        for piece in self.texts:
            print('' if self.stream else prompt + piece)  # a streamed sample is on the screen already: end its line
            print('---------------', flush=True)


def main():
    configure(globals(), sources=(Settings,))
    check_settings()
    settings = Settings(**{k: globals()[k] for k in vars(Settings())})
    try:
        settings.check()
        dev, dt = runtime.resolve(device, dtype)
        heat = steering.schedule(schedule, settings.temperature)
    except (ValueError, RuntimeError) as e:
        raise UserError(e) from None
    torch.manual_seed(seed)
    model, ckpt, codec = load(dev)
    text, ids, wanted = prompt_ids(codec, model.config.vocab_size)
    if compile:  # steering and calibration run the same blocks
        warm_up_compiled(runtime.compile_samplers(model), ids, settings, dev, dt)
    if calibrate or steer:
        return steer_or_calibrate(model, ckpt, codec, ids, settings, dev, dt)
    try:
        sampler = pick_sampler(model, settings, wanted)
    except ValueError as e:
        raise UserError(e) from None
    unused = inapplicable(model, settings, sampler) + ([] if not entropy_png or sampler == 'collapse' else
                                                       ["--entropy_png draws the collapse sampler's window (--sampler=collapse)"])
    require(not unused, unused[0] if unused else '')
    stream = num_samples == 1
    if stream:
        print(text, end='', flush=True)
    g = torch.Generator(device=dev).manual_seed(seed)
    for first in range(0, num_samples, SAMPLE_BATCH):  # each batch printed when it is done: a long job shows its progress
        rows = Rows(codec, min(SAMPLE_BATCH, num_samples - first), stream)
        idx = torch.tensor([ids] * len(rows.texts), dtype=torch.long, device=dev)
        try:
            with runtime.autocast(dev, dt):
                _, record = generate(model, idx, max_new_tokens, settings, g, wanted, rows.add, heat,
                                     detail=stats or bool(entropy_png))
        except ValueError as e:
            raise UserError(e) from None
        except KeyboardInterrupt:  # Ctrl-C: what was generated is kept, then main's caller exits 130
            rows.show(text)
            raise
        rows.show(text)
    top = math.log2(model.config.vocab_size)  # the most entropy a slot can have, bits
    print_stats(record, top, sampler)
    if entropy_png:
        write_entropy_png(record.steps, entropy_png, top)


def warm_up_compiled(model, ids, settings, dev, dt):
    """sampling.warm_up, untimed, so that the compiled graphs meet every shape the samples will
    (compiling takes seconds per variant; the speed printed after the samples is then the compiled speed)."""
    t0 = time.perf_counter()
    idx = torch.tensor([ids] * min(SAMPLE_BATCH, num_samples), dtype=torch.long, device=dev)
    print("compiling the samplers (a warm-up generation: minutes on a small CPU the first time, far less once "
          "inductor's on-disk cache holds the graphs)...", file=sys.stderr, flush=True)
    try:
        with runtime.autocast(dev, dt):
            n = warm_up(model, idx, settings)
    except ValueError as e:
        raise UserError(e) from None
    print(f"compiled the samplers: a warm-up of {n} tokens took {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def steer_or_calibrate(model, ckpt, codec, ids, settings, dev, dt):
    try:
        if calibrate:
            dataset = ckpt.get('config', {}).get('dataset')
            require(dataset, "calibrate reads the validation split of the checkpoint's dataset; this checkpoint names none")
            return steering.calibrate_command(model, data_dir(dataset), settings, seed=seed)
        meta, V = ckpt.get('meta'), model.config.vocab_size
        judge_model = checkpoint.load_judge(judge, dev, meta, V) if judge else None
        scorer_model = checkpoint.load_judge(scorer, dev, meta, V, 'scorer') if scorer else judge_model
        options = {k: globals()[k] for k in ('max_new_tokens', 'particles', 'potential', 'schedule', 'goal', 'steer',
                                             'num_samples', 'seed', 'ess', 'segment', 'nll_ref')}
        options['goal'] = goal or pin
        with runtime.autocast(dev, dt):
            return steering.command(model, codec, ids, settings, options, judge_model, scorer_model)
    except ValueError as e:
        raise UserError(e) from None


if __name__ == '__main__':
    try:
        cli(main)
    except KeyboardInterrupt:  # the text so far is printed above; 130 is the shell's code for Ctrl-C
        print("interrupted (Ctrl-C): the samples above are what was generated so far", file=sys.stderr, flush=True)
        sys.exit(130)
