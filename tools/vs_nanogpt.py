"""
This repo beside nanoGPT itself: the same data, the same settings, the same machine, one run.
nanoGPT is not part of this repo: point --nanogpt at a checkout of it with data/shakespeare_char
prepared (python data/shakespeare_char/prepare.py there). Its train.py and sample.py run unchanged.

    python tools/vs_nanogpt.py --nanogpt=../nanoGPT                          # 2000 iterations, 3 repeats
    python tools/vs_nanogpt.py --nanogpt=../nanoGPT --iters=300 --repeats=5  # speed only (val loss after 300)
    python tools/vs_nanogpt.py --nanogpt=../nanoGPT --jobs=nano,gpt,gpt_bf16 --sample=False
    python tools/vs_nanogpt.py --nanogpt=../nanoGPT --work=runs/vs --train=False --tau=2.0 --slide=16  # resample

Training, nanoGPT's CPU recipe (its README: 4 layers x 128, 4 heads, block 64, batch 12, dropout 0,
lr 1e-3 -> 1e-4, 100 warmup iterations, beta2 0.99, eval_iters 20) on nanoGPT's own prepared
shards, for both programs. Jobs: nano (nanoGPT's train.py; fp32, its only CPU precision), gpt,
gpt_bf16 (ours, GPT mode: the same model), gpt_rope (ours, rotary positions), wfc, wfc_bf16 (ours,
the default WFC config: pinned F=2, the same blocks, the converging recipe), wfc_onepass (the
one-pass WFC config), gpt_compile (ours with torch.compile). Every repeat runs every job once, in turn
(interleaved, so a change in machine load hits all of them alike). Per run: the median iteration
time after the first 10 (as each program prints it), the val loss each program prints at the end
(nanoGPT: eval_iters random batches; ours: eval_iters fixed ones) and the peak resident memory of
the process (wait4's ru_maxrss). Reported: medians over repeats and the ratios to nanoGPT (tokens/s
ratio = nanoGPT's ms per iteration / ours), and the first repeat's final checkpoints evaluated by
eval.py on the same 512 val windows ('same windows': the loss comparison without evaluation noise).

Sampling (--sample=True), from the checkpoints of the first repeat: nanoGPT's sample.py and ours,
batch 1 and batch --batch, --tokens new tokens after '\n'; each program's generation call is timed
by a wrapper (model loading and printing are not counted). nanoGPT's sample.py draws num_samples
one after another; ours draws them as one batch. The text of every sampler is scored by the judge
GPT (eval.sequence_nll: mean NLL per token, nats), so speed is never bought with garbage.
--compiled=True adds our samplers compiled (sample.py --compile=True), timed after its warm-up.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import ArgumentParser, fail  # noqa: E402

RECIPE = dict(block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128, dropout=0.0, learning_rate=1e-3,
              min_lr=1e-4, beta2=0.99, warmup_iters=100, eval_iters=20, log_interval=1, gradient_accumulation_steps=1)
JOBS = {  # name: (program, extra arguments)
    'nano': ('nano', ['config/train_shakespeare_char.py', '--dtype=float32', '--compile=False']),
    'gpt': ('ours', ['config/train_shakespeare_char_gpt.py', '--dtype=float32']),
    'gpt_bf16': ('ours', ['config/train_shakespeare_char_gpt.py', '--dtype=bfloat16']),
    'gpt_compile': ('ours', ['config/train_shakespeare_char_gpt.py', '--dtype=float32', '--compile=True']),
    'gpt_rope': ('ours', ['config/train_shakespeare_char_gpt.py', '--dtype=float32', '--pos_emb=rope']),
    'wfc': ('ours', ['config/train_shakespeare_char_wfc.py', '--dtype=float32']),
    'wfc_bf16': ('ours', ['config/train_shakespeare_char_wfc.py', '--dtype=bfloat16']),
    'wfc_onepass': ('ours', ['config/train_shakespeare_char_wfc_onepass.py', '--dtype=float32']),
}
ITER_LINE = re.compile(r'^iter (\d+): .*?time ([\d.]+)ms', re.M)     # both programs print this per iteration
EVAL_LINE = re.compile(r'^step (\d+): train loss ([\d.]+), val loss ([\d.]+)', re.M)
# wraps a program's generation function in a timer; argv: program folder, module, 'method' (GPT.generate,
# returns prompt + new ids) or 'function' (generate(model, idx, ...) -> (new ids, stats)), script, its args
TIMER = r'''
import importlib, json, runpy, sys, time
folder, module, kind, script = sys.argv[1:5]
sys.argv = [script] + sys.argv[5:]
sys.path.insert(0, folder)
mod = importlib.import_module(module)
owner = mod.GPT if kind == 'method' else mod
original = owner.generate
def timed(*args, **kwargs):
    t0 = time.perf_counter()
    out = original(*args, **kwargs)
    seconds = time.perf_counter() - t0
    ids = out[:, args[1].size(1):] if kind == 'method' else out[0]
    stats = {} if kind == 'method' else {k: v for k, v in out[1].summary().items() if k in ('tokens_per_call', 'acceptance')}
    print('@@generate ' + json.dumps(dict(seconds=seconds, ids=ids.tolist(), **stats)), file=sys.stderr, flush=True)
    return out
owner.generate = timed
runpy.run_path(script, run_name='__main__')
'''


def run(cmd, cwd, env=None):
    """Run a command; returns (stdout, stderr, peak resident memory in MB)."""
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return stdout, stderr, usage.ru_maxrss / 1024  # Linux reports kilobytes


def iteration_ms(log, skip=10):
    """The iteration times a training log prints, in ms, without the first `skip` (warm-up)."""
    times = [float(t) for _, t in ITER_LINE.findall(log)]
    return times[skip:] if len(times) > skip else times


def final_val_loss(log):
    evals = EVAL_LINE.findall(log)
    return float(evals[-1][2]) if evals else float('nan')


def generations(stderr):
    """[(seconds, ids rows)] of each timed generation call in a sampler's stderr."""
    return [(c['seconds'], c['ids']) for c in generation_records(stderr)]


def generation_records(stderr):
    """Every timed generation call's record (seconds, ids, and ours: tokens_per_call, acceptance);
    with compiled samplers, those after sample.py's untimed warm-up only."""
    lines = stderr.splitlines()
    warmed = [i for i, line in enumerate(lines) if line.startswith('compiled the samplers')]
    return [json.loads(line[len('@@generate '):]) for line in lines[warmed[-1] + 1 if warmed else 0:]
            if line.startswith('@@generate ')]


def recipe(args):
    """nanoGPT's CPU recipe, with --shape's layers, width, block and heads where given."""
    if not args.shape:
        return RECIPE
    layers, width, block, *heads = (int(v) for v in args.shape.split('x'))
    return {**RECIPE, 'n_layer': layers, 'n_embd': width, 'block_size': block, 'n_head': heads[0] if heads else RECIPE['n_head']}


def train_command(job, args, out_dir, data_dir):
    program, extra = JOBS[job]
    settings = {**recipe(args), 'max_iters': args.iters, 'lr_decay_iters': args.iters, 'eval_interval': args.iters,
                'device': 'cpu', 'out_dir': out_dir, 'always_save_checkpoint': True}
    # a short speed-only run: warm up over a tenth of it (ours refuses a warmup longer than the decay)
    settings['warmup_iters'] = min(settings['warmup_iters'], max(1, args.iters // 10))
    if program == 'nano':
        cwd, script = args.nanogpt, 'train.py'
        settings['dataset'] = 'shakespeare_char'
    else:
        cwd, script = REPO, 'train.py'
        settings['dataset'] = data_dir  # nanoGPT's shards: the very same bytes
    flags = [f'--{k}={v}' for k, v in settings.items()]
    return [sys.executable, script, *extra, *flags], cwd


def sample_command(job, ckpt_dir, args, batch):
    """A sampler run wrapped by TIMER: nanoGPT's sample.py (GPT.generate) or ours (generation.sampling.generate;
    a job named ..._compiled: sample.py --compile=True, timed after its warm-up)."""
    compiled, job = job.endswith('_compiled'), job.removesuffix('_compiled')
    common = [f'--num_samples={batch}', f'--max_new_tokens={args.tokens}', '--device=cpu', '--seed=1337',
              f'--compile={compiled}', f'--out_dir={ckpt_dir}']
    if job == 'nano':
        return [sys.executable, '-c', TIMER, args.nanogpt, 'model', 'method', 'sample.py', *common,
                '--temperature=0.8', '--top_k=200'], args.nanogpt
    dtype = 'bfloat16' if job.endswith('bf16') else 'float32'
    rolls = job.startswith('wfc') or job == 'gpt_rope'  # rotary models: the cache rolls, slide does not apply
    extra = ([f'--slide={args.slide}'] if args.slide and not rolls else []) + \
        ([f'--sampler={args.sampler}'] if job.startswith('wfc') and args.sampler != 'auto' else [])
    return [sys.executable, '-c', TIMER, REPO, 'generation.sampling', 'function', 'sample.py', *common,
            f'--dtype={dtype}', '--temperature=0.8', '--top_k=200', *extra], REPO


def same_windows_loss(path, data_dir, windows=512):
    """eval.py's next-token val loss (nats) of a checkpoint (ours or nanoGPT's) on the same windows."""
    sys.path.insert(0, REPO)
    from plumbing import checkpoint
    import eval as evaluation
    from plumbing.dataloader import TokenShards
    model, _ = checkpoint.load_model(path)
    data = TokenShards(data_dir, 'val', model.config.block_size, model.config.vocab_size)
    return evaluation.evaluate(model, data, windows, 64, 1234, 'cpu')['loss']


def judge_nll(judge, rows):
    """Mean judge NLL per token (nats) of generated rows after the '\n' prompt (token 0)."""
    import torch
    import eval as evaluation
    seq = torch.tensor([[0] + r for r in rows], dtype=torch.long)
    return evaluation.sequence_nll(judge, seq, 1)


def load_judge(args, work, jobs):
    """The judge GPT: --judge, else our first GPT job's checkpoint of the first repeat; fails (before
    any sampling) when there is none."""
    from plumbing import checkpoint
    for path in [args.judge] + [os.path.join(work, f'{j}_0') for j in jobs if JOBS[j][0] == 'ours' and j.startswith('gpt')]:
        try:
            return path, checkpoint.load_model(path)[0]
        except checkpoint.CheckpointError:
            continue
    fail(f"no judge GPT at {args.judge} and no GPT job in --jobs to fall back on: train one "
         f"(python train.py config/train_shakespeare_char_judge.py) or add gpt or gpt_rope to --jobs")


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float('nan')


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--nanogpt', required=True, help='a nanoGPT checkout with data/shakespeare_char prepared')
    parser.add_argument('--iters', type=int, default=2000, help='training iterations per run (the recipe: 2000)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--jobs', default='nano,gpt,gpt_bf16,wfc,wfc_bf16', help=f'comma-separated, of {list(JOBS)}')
    parser.add_argument('--train', default='True', help="train (False: sample the first repeat's checkpoints in --work)")
    parser.add_argument('--sample', default='True', help='also compare the samplers (True/False)')
    parser.add_argument('--tokens', type=int, default=500, help='new tokens per sample')
    parser.add_argument('--batch', type=int, default=8, help='samples of the batched sampling runs')
    parser.add_argument('--compiled', default='False', help='also time our samplers compiled (sample.py --compile=True)')
    parser.add_argument('--sampler', default='auto', help="our WFC jobs' sampler ('auto': speculative; 'collapse')")
    parser.add_argument('--slide', type=int, default=0, help="learned positions: our samplers' slide (0 = nanoGPT's exact sliding window)")
    parser.add_argument('--shape', default='', help="LAYERSxWIDTHxBLOCK[xHEADS] instead of the CPU recipe's 4x128x64x4, e.g. 6x384x256x6")
    parser.add_argument('--judge', default=os.path.join(REPO, 'out-shakespeare-char-judge'),
                        help="judge GPT for sample quality (missing: our first GPT job's checkpoint of the first repeat)")
    parser.add_argument('--threads', type=int, default=0,
                        help='OMP_NUM_THREADS for every run (0 = unset: torch uses every core; 1 on a shared machine)')
    parser.add_argument('--work', default='', help='folder for the runs (default: a temporary one)')
    parser.add_argument('--out', default='', help='also write every number as JSON here')
    args = parser.parse_args()
    args.nanogpt = os.path.abspath(args.nanogpt)
    data_dir = os.path.join(args.nanogpt, 'data', 'shakespeare_char')
    if not os.path.exists(os.path.join(data_dir, 'train.bin')):
        fail(f"{data_dir}/train.bin is missing: run python data/shakespeare_char/prepare.py in {args.nanogpt}")
    jobs = [j for j in args.jobs.split(',') if j]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown or 'nano' not in jobs:
        fail(f"--jobs must include 'nano' and only name {list(JOBS)}; got {jobs}")
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix='vs_nanogpt_')  # nanoGPT runs in its own folder
    env = {'OMP_NUM_THREADS': str(args.threads), 'MKL_NUM_THREADS': str(args.threads)} if args.threads else {}
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | {os.cpu_count()} CPUs | threads {args.threads or 'default'} | "
          f"load average {os.getloadavg()[0]:.2f} | runs in {work}", flush=True)

    # ---- training: every job once per repeat, in turn ----
    train = {j: dict(ms=[], val=[], mb=[]) for j in jobs}
    result = dict(args=vars(args))
    for r in range(args.repeats if args.train.lower() == 'true' else 0):
        for j in jobs:
            cmd, cwd = train_command(j, args, os.path.join(work, f'{j}_{r}'), data_dir)
            stdout, _, mb = run(cmd, cwd, env)
            ms = iteration_ms(stdout)
            train[j]['ms'].append(median(ms))
            train[j]['val'].append(final_val_loss(stdout))
            train[j]['mb'].append(mb)
            print(f"repeat {r + 1}/{args.repeats} {j:12s} {median(ms):7.2f} ms/iter  val {train[j]['val'][-1]:.4f}  "
                  f"peak {mb:6.0f} MB  load {os.getloadavg()[0]:.2f}", flush=True)
    nano = {k: median(v) for k, v in train['nano'].items()}
    tokens_per_iter = recipe(args)['batch_size'] * recipe(args)['block_size']
    rows = []
    for j in jobs if train['nano']['ms'] else []:
        m = {k: median(v) for k, v in train[j].items()}
        same = same_windows_loss(os.path.join(work, f'{j}_0'), data_dir)
        rows.append(dict(job=j, ms=m['ms'], tokens_per_s=tokens_per_iter / m['ms'] * 1000, val=m['val'], mb=m['mb'], same_val=same,
                         speed_ratio=nano['ms'] / m['ms'], memory_ratio=m['mb'] / nano['mb'], runs_ms=train[j]['ms'],
                         runs_val=train[j]['val']))
    if rows:
        print(f"\ntraining, {args.iters} iterations, medians of {args.repeats} interleaved repeats "
              f"(tokens/s ratio = nanoGPT ms/iter / ours)")
        print("| job | ms/iter | tokens/s | x nanoGPT | val loss (own eval) | val loss (same windows) | peak MB | "
              "mem x nanoGPT |\n|---|---|---|---|---|---|---|---|")
        for x in rows:
            print(f"| {x['job']} | {x['ms']:.2f} | {x['tokens_per_s']:,.0f} | {x['speed_ratio']:.2f} | {x['val']:.4f} | "
                  f"{x['same_val']:.4f} | {x['mb']:.0f} | {x['memory_ratio']:.2f} |")
        result['train'] = rows

    # ---- sampling, from the first repeat's checkpoints ----
    if args.sample.lower() == 'true':
        samplers = ['nano'] + [s for s in jobs if s not in ('nano', 'gpt_compile')]  # compile changes training, not sampling
        if args.compiled.lower() == 'true':  # our samplers again, compiled (runtime.compile_samplers)
            samplers += [f'{s}_compiled' for s in samplers if s != 'nano']
        sizes = [1] + ([args.batch] if args.batch > 1 else [])
        judge_path, judge = load_judge(args, work, jobs)
        speed = {(s, b): [] for s in samplers for b in sizes}
        calls_of = {}
        texts = {}
        for r in range(args.repeats):
            for s in samplers:
                for b in sizes:
                    trained = s.removesuffix('_compiled').removesuffix('_bf16')  # bf16, compiled: the fp32 job's checkpoint
                    ckpt_dir = os.path.join(work, f"{trained}_0")
                    cmd, cwd = sample_command(s, ckpt_dir, args, b)
                    _, stderr, _ = run(cmd, cwd, env)
                    calls = generations(stderr)
                    calls_of.setdefault(s, []).extend(generation_records(stderr))
                    seconds = sum(t for t, _ in calls)
                    rows_ids = [row for _, ids in calls for row in ids]
                    speed[s, b].append(sum(len(x) for x in rows_ids) / seconds)
                    texts.setdefault(s, []).extend(rows_ids)
                    print(f"repeat {r + 1}/{args.repeats} sample {s:9s} batch {b}: {speed[s, b][-1]:8.1f} tokens/s",
                          flush=True)
        import torch
        base = {b: median(speed['nano', b]) for b in sizes}
        srows = []
        with torch.no_grad():
            for s in samplers:
                one, many = median(speed[s, 1]), median(speed[s, sizes[-1]])
                ones = [c for c in calls_of[s] if len(c['ids']) == 1 and 'tokens_per_call' in c]
                srows.append(dict(sampler=s, tokens_per_s=one, ratio=one / base[1], batch_tokens_per_s=many,
                                  batch_ratio=many / base[sizes[-1]], judge_nll=judge_nll(judge, texts[s]),
                                  tokens_per_call=median([c['tokens_per_call'] for c in ones]) if ones else 1.0,
                                  acceptance=ones[0].get('acceptance') if ones else None,
                                  runs=speed[s, 1], batch_runs=speed[s, sizes[-1]]))
        print(f"\nsampling, {args.tokens} new tokens, medians of {args.repeats} (judge: {judge_path}; "
              f"ours: slide {args.slide}, WFC sampler {args.sampler})")
        batched = len(sizes) > 1  # --batch=1: no second column pair repeating the first
        print(f"| sampler | tokens/s batch 1 | x nanoGPT | tokens per stack call | acceptance by distance | "
              + (f"tokens/s batch {sizes[-1]} | x nanoGPT | " if batched else '') + "judge NLL |\n|"
              + "---|" * (8 if batched else 6))
        for x in srows:
            accept = ' '.join(f'{a:.2f}' for a in x['acceptance']) if x['acceptance'] else '-'
            print(f"| {x['sampler']} | {x['tokens_per_s']:.0f} | {x['ratio']:.2f} | {x['tokens_per_call']:.2f} | {accept} | "
                  + (f"{x['batch_tokens_per_s']:.0f} | {x['batch_ratio']:.2f} | " if batched else '')
                  + f"{x['judge_nll']:.3f} |")
        result['sample'] = srows
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
