"""
Train several models on the same data for the same wall-clock budget (or the same training FLOPs),
evaluate them all the same way (eval.py, same tokens), print one table and draw the curves.

    python compare.py                                  # GPT, looped GPT, WFC bidirectional, WFC pinned; 3 min each
    python compare.py --budget=600 --variants=gpt,wfc_pinned
    python compare.py --plan=research/plan_ablations.py --budget=300

Fair and reproducible budgets: the seconds per iteration of every variant are measured side by side
(short interleaved runs, medians), then each trains for budget / (s/iter) iterations with its
learning-rate schedule ending there. The losses then depend on iteration counts, not on what else
the machine did during the runs. The FLOPs table gives every variant the training FLOPs
(runtime.training_flops) of the GPT run instead. Results: <out_dir>/results.json and .md, plots.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from configurator import UserError, cli, configure, require
from plumbing import checkpoint
from plumbing import runtime
from plumbing.dataloader import TokenShards, data_dir

# -----------------------------------------------------------------------------
budget = 180.0           # seconds of training per variant (time table)
variants = 'gpt,looped,wfc_bidirectional,wfc_pinned'  # names from VARIANTS (or the plan)
plan = ''                # a Python file defining VARIANTS = {name: [config file, --overrides...]} to add
tables = 'time'          # comma-separated: 'time' (same wall-clock), 'flops' (same FLOPs), 'steps' (same iterations)
steps = 2000             # iterations per variant in the 'steps' table
calibration_iters = 30   # iterations per calibration run
calibration_rounds = 2   # interleaved rounds of calibration runs
evals_per_run = 8        # evaluations during each run (the loss-vs-time curve)
eval_windows = 256       # windows for the final evaluation (eval.py), the same for every variant
depths = ''              # WFC evaluation: also the next-token loss after exactly K passes for each K ('1,2,4,...')
convergence = False      # WFC evaluation: also path independence and passes vs entropy (eval.py --convergence)
eval_max_loop = 0        # WFC evaluation: the refinement cap (0 = each model's own max_loop)
eval_slot_exit = 'model' # WFC evaluation: per-slot exit ('model': each model's own setting, 'on', 'off')
judge = ''               # judge checkpoint: adds the judge NLL of samples ('' = skip)
samples = 16             # samples per variant for the judge
temperature = 0.8        # sampling temperature of the judged samples
jobs = 1                 # training runs at a time (their losses depend on iteration counts only;
                         # calibration always runs alone)
threads = 0              # threads per training run (0 = cores / jobs); 1 on a CPU shared with other jobs
out_dir = 'runs/compare' # where the runs, results.json / .md and the plots go
train_runs = True        # False: only evaluate the finished runs already in out_dir (a comparison whose
                         # evaluation was interrupted, or a table over runs of several sessions)
device = 'cpu'           # every run's device
dtype = 'auto'           # every run's dtype
seed = 1337              # every run's seed
# -----------------------------------------------------------------------------

VARIANTS = {
    'gpt': ['config/train_shakespeare_char_gpt.py'],
    'looped': ['config/train_shakespeare_char_looped.py'],
    'wfc_bidirectional': ['config/train_shakespeare_char_wfc_onepass.py', '--attn=bidirectional', '--past_loss=0.0'],
    'wfc_pinned': ['config/train_shakespeare_char_wfc_onepass.py'],  # the one-pass recipe
    'wfc': ['config/train_shakespeare_char_wfc.py'],                  # the default: the converging recipe
}
REPO = os.path.dirname(os.path.abspath(__file__))


def train_command(args, iters, run_dir, evals, extra=()):
    return [sys.executable, os.path.join(REPO, 'train.py'), *args, f'--out_dir={run_dir}', f'--max_iters={iters}',
            f'--lr_decay_iters={iters}', f'--eval_interval={max(1, iters // max(evals, 1))}', f'--device={device}',
            f'--dtype={dtype}', f'--seed={seed}', '--always_save_checkpoint=True', '--log_interval=1',
            f'--warmup_iters={min(100, iters // 10)}', *extra]


def finished(run_dir, iters):
    """Whether run_dir holds a run that reached `iters` (its last evaluation is there)."""
    path = os.path.join(run_dir, 'eval_log.jsonl')
    return os.path.exists(path) and read_curve(run_dir)[-1]['iter'] == iters


def train(name, args, iters, run_dir, evals, threads=None, fresh=False):
    """Run train.py for `iters` iterations with the schedule ending there; returns its stdout. A run
    that already finished is kept; one that was interrupted resumes; fresh (calibration) replaces."""
    if not fresh and finished(run_dir, iters):
        print(f"{name}: {run_dir} already finished ({iters} iterations): kept", flush=True)
        return ''
    extra = ['--overwrite=True'] if fresh else ['--init_from=resume'] if os.path.exists(os.path.join(run_dir, 'ckpt.pt')) else []
    env = {**os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {})}
    result = subprocess.run(train_command(args, iters, run_dir, evals, extra), cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"training {name} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def check_variants(names):
    """Every variant's settings and data, checked by train.py itself (--dry_run) before anything trains."""
    for n in names:
        result = subprocess.run(train_command(VARIANTS[n], steps, os.path.join(out_dir, 'check', n), 1, ['--dry_run=True']),
                                cwd=REPO, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        if result.returncode:
            raise UserError(f"variant {n} ({' '.join(VARIANTS[n])}) does not train: {result.stderr.strip().splitlines()[-1]}")


def seconds_per_iter(log):
    times = [float(t) for t in re.findall(r'^iter \d+: .* time ([\d.]+)ms', log, re.M)]
    return times[5:] or times  # the first iterations warm caches up


def threads_per_run():
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def calibrate(names):
    """Median seconds per iteration of each variant, measured in interleaved rounds with the threads
    a real run gets, and its training FLOPs per iteration (runtime.training_flops of the model the run built)."""
    samples, flops = {n: [] for n in names}, {}
    for _ in range(calibration_rounds):
        for n in names:
            run_dir = os.path.join(out_dir, 'calibration', n)
            log = train(n, VARIANTS[n] + ['--eval_iters=1'], calibration_iters, run_dir, 1, threads_per_run(), fresh=True)
            samples[n] += seconds_per_iter(log)
            model, info = checkpoint.load_model(run_dir)
            flops[n] = runtime.training_flops(model, info['config']['batch_size'] * info['config']['gradient_accumulation_steps'],
                                            model.config.block_size)
    return {n: statistics.median(v) / 1000 for n, v in samples.items()}, flops


def read_curve(run_dir):
    with open(os.path.join(run_dir, 'eval_log.jsonl')) as f:
        return [json.loads(line) for line in f]


def evaluate_run(run_dir):
    """eval.py's numbers for the run's final checkpoint, on the same windows for every run."""
    import eval as evaluation
    from generation.decoding import Settings
    overrides = ({'max_loop': eval_max_loop} if eval_max_loop else {}) | \
        ({} if eval_slot_exit == 'model' else {'slot_exit': eval_slot_exit == 'on'})
    model, info = checkpoint.load_model(run_dir, 'cpu', **overrides)
    data = TokenShards(data_dir(info['config']['dataset']), 'val', model.config.block_size)
    steps = [int(v) for v in depths.split(',') if v]
    result = evaluation.evaluate(model, data, eval_windows, 32, 1234, 'cpu', warm_positions=64,
                                 depths=steps if model.config.n_future else (), convergence=convergence and model.config.n_future > 0)
    if judge:
        judge_model = checkpoint.load_judge(judge, 'cpu', info.get('meta'), model.config.vocab_size)
        prompts = data.batch(samples, 1235)[0][:, :32]
        result.update(evaluation.sample_quality(model, judge_model, prompts, 96, Settings(temperature=temperature), 1234))
    result['params'] = model.get_num_params()
    return result


def markdown(rows, title):
    head = ('| variant | params | s/iter | iters | train s | val next-token loss | bits/char | loss by distance d=1.. '
            '| passes | warm-start seq. loss | judge NLL | distinct-4 |')
    lines = [f'**{title}**', '', head, '|' + '---|' * 12]
    for r in rows:
        dist = ' '.join(f'{v:.2f}' for v in r.get('by_dist', [])) or '-'
        opt = lambda k, f: format(r[k], f) if k in r else '-'
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['s_per_iter']:.3f} | {r['iters']} | "
                     f"{r['train_time']:.0f} | {r['loss']:.4f} | {r['bits']:.3f} | {dist} | {r['mean_passes']:.2f} | "
                     f"{opt('warm_sequential', '.3f')} | {opt('judge_nll', '.3f')} | {opt('distinct_4', '.3f')} |")
    if any('depth_loss' in r for r in rows):
        lines += ['', convergence_markdown(rows)]
    return '\n'.join(lines)


def convergence_markdown(rows):
    """The convergence table: loss by fixed depth, the exit loss and passes, the sequential losses
    (warm and cold start) with their passes, the past stream, path independence, passes vs entropy and
    vs the slot's own loss, and the exit's seconds against the matched fixed depth's."""
    depths = sorted({int(k) for r in rows for k in r.get('depth_loss', {})})
    head = ('| variant | ' + ' | '.join(f'K={k}' for k in depths) + ' | exit loss | exit passes | warm seq. (passes) '
            '| cold seq. (passes) | past stream | path KL | rho(passes, entropy) | rho(passes, loss) '
            '| exit s / matched K s | state norm K=1 -> max |')
    lines = [head, '|' + '---|' * (len(depths) + 11)]
    for r in rows:
        if 'depth_loss' not in r:
            continue
        by = {int(k): v for k, v in r['depth_loss'].items()}
        norms = {int(k): v for k, v in r.get('norm_by_pass', {}).items()}
        opt = lambda k, f: format(r[k], f) if k in r else '-'
        norm = f"{norms[min(norms)]:.1f} -> {norms[max(norms)]:.1f}" if norms else '-'
        timing = (f"{r['seconds']:.1f} / K={r['matched_depth']} {r['matched_seconds']:.1f}"
                  if 'matched_seconds' in r and 'seconds' in r else '-')
        lines.append(f"| {r['name']} | " + ' | '.join(f"{by[k]:.3f}" for k in depths) +
                     f" | {r['loss']:.3f} | {r['mean_passes']:.2f} | {opt('warm_sequential', '.3f')} ({opt('warm_passes', '.2f')}) "
                     f"| {opt('cold_sequential', '.3f')} ({opt('cold_passes', '.2f')}) | {opt('past_stream_loss', '.3f')} "
                     f"| {opt('path_kl', '.4f')} | {opt('passes_entropy_spearman', '.2f')} | {opt('passes_loss_spearman', '.2f')} "
                     f"| {timing} | {norm} |")
    return '\n'.join(lines)


def plot(rows, path, kind='time'):
    """Left: val loss against calibrated training time (against iterations for the 'steps' table,
    whose runs may have shared the CPU). Right: loss by distance of the WFC rows."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        style = dict(marker='.', color=f'C{i % 10}', linestyle=('-', '--', ':')[i // 10 % 3], label=r['name'])
        curve = [p for p in r['curve'] if p['iter'] > 0]
        x = [p['iter'] * (1 if kind == 'steps' else r['s_per_iter']) for p in curve]
        left.plot(x, [p['val'] for p in curve], **style)
        if r.get('by_dist'):
            right.plot(range(1, len(r['by_dist']) + 1), r['by_dist'], **style)
    xlabel = 'iterations' if kind == 'steps' else 'training time (s, calibrated)'
    left.set(xlabel=xlabel, ylabel='val next-token loss (nats, training eval)', title=f'loss vs {xlabel.split(" (")[0]}')
    right.set(xlabel='distance d', ylabel='val loss (nats)', title='WFC loss by distance ("hockey stick")')
    left.legend(fontsize='small'), right.legend(fontsize='small') if right.lines else None
    fig.savefig(path, dpi=110, bbox_inches='tight')
    print(f"wrote {path}")


def iterations(kind, names, speed, flops):
    if kind == 'steps':
        return {n: steps for n in names}
    iters = {n: max(20, int(budget / speed[n])) for n in names}
    if kind == 'flops':  # every variant gets the FLOPs the first variant (the GPT) spends in the time budget
        iters = {n: max(20, int(iters[names[0]] * flops[names[0]] / flops[n])) for n in names}
    return iters


def run_table(kind, names, speed, flops, report):
    """Train (jobs at a time) and evaluate each variant; every finished row goes into the report
    (and results.json / .md) as soon as it is evaluated, so a failure later loses nothing before it."""
    iters, failures = iterations(kind, names, speed, flops), []
    run_dirs = {n: os.path.join(out_dir, kind, n) for n in names}

    def train_one(n):
        try:
            train(n, VARIANTS[n], iters[n], run_dirs[n], evals_per_run, threads_per_run())
        except RuntimeError as e:
            failures.append(str(e))
    if train_runs:
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # each job is its own train.py process
            list(pool.map(train_one, names))
    rows = report['tables'].setdefault(kind, [])
    for n in names:
        if not finished(run_dirs[n], iters[n]):
            print(f"{kind} {n}: skipped, its run in {run_dirs[n]} has not reached iteration {iters[n]}", flush=True)
            continue
        t0, curve = time.time(), read_curve(run_dirs[n])
        result = evaluate_run(run_dirs[n])
        passes = result.pop('passes')
        mean_passes = result.pop('mean_passes', sum(k * v for k, v in passes.items()) / sum(passes.values()))
        train_time = curve[-1]['train_time']
        rows[:] = [r for r in rows if r['name'] != n] + [dict(
            name=n, iters=iters[n], s_per_iter=speed.get(n, train_time / iters[n]), train_time=train_time,
            eval_seconds=time.time() - t0, curve=curve, mean_passes=mean_passes, **result)]
        write_report(report)
        print(f"{kind} {n}: {iters[n]} iters, val next-token loss {result['loss']:.4f}", flush=True)
    if failures:
        raise RuntimeError('\n'.join(failures))
    return rows


TITLES = {'time': 'same wall-clock: {budget:.0f} s of training each', 'steps': 'same iterations: {steps} each',
          'flops': 'same training FLOPs as the {base} run'}


def write_report(report):
    texts = [markdown(rows, TITLES[kind].format(budget=budget, steps=steps, base=report['names'][0]))
             for kind, rows in report['tables'].items()]
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write('\n\n'.join(texts) + '\n')
    return texts


def check_settings():
    """The plan, the tables and every number, before anything trains."""
    if plan:
        try:
            scope = {}
            exec(open(plan).read(), scope)
        except OSError as e:
            raise UserError(f"cannot read the plan {plan} ({e.strerror})") from None
        require(isinstance(scope.get('VARIANTS'), dict), f"the plan {plan} must define VARIANTS = {{name: [config, --overrides]}}")
        VARIANTS.update(scope['VARIANTS'])
    names, kinds = variants.split(','), tables.split(',')
    unknown = [n for n in names if n not in VARIANTS]
    require(not unknown, f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    bad = [k for k in kinds if k not in TITLES]
    require(not bad, f"unknown tables {bad}: use 'time', 'flops' or 'steps'")
    require(budget > 0 and steps > 0 and jobs >= 1 and threads >= 0 and evals_per_run >= 1 and eval_windows > 0,
            "need budget > 0, steps > 0, jobs >= 1, threads >= 0, evals_per_run >= 1 and eval_windows > 0")
    require(calibration_rounds >= 1 or not train_runs or kinds == ['steps'],
            "the 'time' and 'flops' tables need calibration_rounds >= 1 (steps per second are measured first)")
    require(eval_slot_exit in ('model', 'on', 'off'), f"eval_slot_exit must be 'model', 'on' or 'off', got {eval_slot_exit!r}")
    require(calibration_iters >= 10, "calibration_iters must be >= 10 (the first iterations only warm caches up)")
    require(all(v.strip().isdigit() and int(v) > 0 for v in depths.split(',') if v), f"depths must look like '1,2,4,8', got {depths!r}")
    return names, kinds


def main():
    configure(globals())
    names, kinds = check_settings()
    if train_runs:
        check_variants(names)
    os.makedirs(out_dir, exist_ok=True)
    previous = os.path.join(out_dir, 'results.json')
    earlier = json.load(open(previous)) if os.path.exists(previous) else {}
    if not train_runs and earlier:  # the speeds the runs were trained with
        speed, flops = earlier['speed'], earlier['flops_per_iter']
    else:
        speed, flops = calibrate(names) if calibration_rounds > 0 and train_runs and kinds != ['steps'] else ({}, {})
    if speed:
        print('seconds per iteration:', {n: round(v, 4) for n, v in speed.items()}, flush=True)
    cpu = open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0].strip(' \t:') if os.path.exists('/proc/cpuinfo') else ''
    report = dict(budget=budget, speed=speed, flops_per_iter=flops, names=names, variants={n: VARIANTS[n] for n in names},
                  machine=os.uname().nodename, cpu=cpu, date=time.strftime('%Y-%m-%d'), torch=torch.__version__, tables={})
    for kind in kinds:
        rows = run_table(kind, names, speed, flops, report)
        plot(rows, os.path.join(out_dir, f'{kind}.png'), kind)
    print('\n\n'.join(write_report(report)))


if __name__ == '__main__':
    cli(main)
