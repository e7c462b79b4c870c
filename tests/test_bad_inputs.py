"""Bad input never costs a run, a checkpoint or a result, and never prints a traceback. Every case
of the table below (a setting out of range, a knob that would have no effect, a missing or damaged
file, a checkpoint or meta.pkl from somewhere else) makes its script exit with code 2 and one line
on stderr that names the problem, before any work; the run folder it points at is byte for byte
what it was. The controls at the end show the same scripts and files working when nothing is wrong."""

import base64
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, run_inprocess, run_script

pytestmark = pytest.mark.slow  # its fixture prepares two datasets and trains two runs

CONFIG = os.path.join(REPO, 'config', 'train_debug.py')
TRAIN = [CONFIG, '--dataset={data}', '--out_dir={gpt}', '--init_from=resume']  # resume the finished GPT run: nothing to overwrite
SCRATCH = [CONFIG, '--dataset={data}', '--out_dir={fresh}']
WFC = ['--n_future=2', '--pos_emb=rope', '--past_loss=1.0']
SAMPLE = ['--out_dir={gpt}', '--device=cpu', '--max_new_tokens=4', '--num_samples=1', '--start=ab']
SAMPLE_WFC = ['--out_dir={wfc}', '--device=cpu', '--max_new_tokens=4', '--num_samples=1', '--start=ab']
EVAL = ['--out_dir={wfc}', '--device=cpu', '--n_windows=2', '--warm_positions=0']

CASES = {  # id: (script, arguments, a fragment the one-line message must hold)
    # train.py: settings
    'unknown_key': ('train.py', [*TRAIN, '--batchsize=4'], "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    'wrong_type': ('train.py', [*TRAIN, '--batch_size=1.5'], "'batch_size' must be int"),
    'malformed_override': ('train.py', [*TRAIN, '--batch_size'], "must look like --key=value"),
    'missing_config_file': ('train.py', ['config/nope.py'], "cannot read config file 'config/nope.py'"),
    'broken_config_file': ('train.py', ['{broken_config}'], "failed: SyntaxError"),
    'config_file_unknown_key': ('train.py', ['{misspelt_config}'], "unknown config key 'lerning_rate'"),
    'config_file_nan': ('train.py', ['{nan_config}', '--dataset={data}', '--out_dir={gpt}', '--init_from=resume'], "learning_rate must be a finite number"),
    'zero_batch': ('train.py', [*TRAIN, '--batch_size=0'], "must be >= 1"),
    'zero_eval_iters': ('train.py', [*TRAIN, '--eval_iters=0'], "eval_iters = 0 would leave nothing to choose best.pt by"),
    'negative_iters': ('train.py', [*TRAIN, '--max_iters=-5'], "max_iters, warmup_iters, keep_last"),
    'negative_keep_last': ('train.py', [*TRAIN, '--keep_last=-1'], "keep_last"),
    'negative_lr': ('train.py', [*TRAIN, '--learning_rate=-1.0'], "need learning_rate > 0"),
    'min_lr_above_lr': ('train.py', [*TRAIN, '--min_lr=1.0'], "0 <= min_lr <= learning_rate"),
    'decay_before_warmup': ('train.py', [*TRAIN, '--warmup_iters=50', '--lr_decay_iters=20'], "lr_decay_iters must exceed warmup_iters"),
    'beta_of_one': ('train.py', [*TRAIN, '--beta2=1.0'], "0 <= beta1, beta2 < 1"),
    'negative_clip': ('train.py', [*TRAIN, '--grad_clip=-1.0'], "grad_clip >= 0"),
    'dropout_of_one': ('train.py', [*TRAIN, '--dropout=1.0'], "0 <= dropout < 1"),
    'heads_do_not_divide': ('train.py', [*TRAIN, '--n_head=3'], "n_head=3 must divide n_embd=32"),
    'odd_rope_head': ('train.py', [*TRAIN, '--pos_emb=rope', '--n_head=32'], "rope needs an even head size"),
    'negative_future': ('train.py', [*TRAIN, '--n_future=-1'], "n_future, n_prelude and n_coda must be >= 0"),
    'unknown_attention': ('train.py', [*TRAIN, *WFC, '--attn=full'], "attn must be one of"),
    'unknown_loop_law': ('train.py', [*TRAIN, *WFC, '--loop_law=gauss'], "loop_law must be one of"),
    'unknown_bound': ('train.py', [*TRAIN, '--bound=clip'], "bound must be one of"),
    'unknown_inject': ('train.py', [*TRAIN, '--inject=yes'], "inject must be one of"),
    'unknown_attn_fn': ('train.py', [*TRAIN, '--attn_fn=relu'], "attn_fn must be one of"),
    'decay_of_one': ('train.py', [*TRAIN, '--decay=1.0'], "0 <= decay < 1"),
    'zero_supervise': ('train.py', [*TRAIN, '--supervise=0'], "supervise must be >= 1"),
    'zero_future_frac': ('train.py', [*TRAIN, *WFC, '--future_frac=0.0'], "need 0 < future_frac <= 1"),
    'entmax_alpha_out_of_range': ('train.py', [*TRAIN, '--attn_fn=entmax', '--entmax_alpha=3.0'], "1 <= entmax_alpha <= 2"),
    'leaking_past_target': ('train.py', [*TRAIN, '--n_future=2', '--attn=bidirectional', '--past_loss=1.0'], "leaks the answer"),
    'wfc_knob_on_a_gpt': ('train.py', [*TRAIN, '--past_loss=1.0'], "--past_loss is a WFC setting: it has no effect on a GPT"),
    'tol_on_a_gpt': ('train.py', [*TRAIN, '--tol=0.01'], "--tol is a WFC setting"),
    'ddp_knob_without_torchrun': ('train.py', [*TRAIN, '--ddp_timeout=10'], "--ddp_timeout applies to DDP runs started by torchrun"),
    'wandb_knob_without_wandb': ('train.py', [*TRAIN, '--wandb_project=x'], "--wandb_project needs --wandb_log=True"),
    'unknown_init': ('train.py', [*TRAIN, '--init_from=best'], "init_from must be 'scratch' or 'resume'"),
    'overwrite_with_resume': ('train.py', [*TRAIN, '--overwrite=True'], "--overwrite replaces a run when training from scratch"),
    'unknown_spike_action': ('train.py', [*TRAIN, '--spike_action=panic'], "spike_action must be 'warn' or 'stop'"),
    'small_spike_factor': ('train.py', [*TRAIN, '--spike_factor=0.5'], "spike_factor must be 0 (off) or > 1"),
    'unknown_dtype': ('train.py', [*TRAIN, '--dtype=float64'], "dtype must be 'auto'"),
    'cuda_without_cuda': ('train.py', [*TRAIN, '--device=cuda'], "CUDA is not available"),
    'mps_without_mps': ('train.py', [*TRAIN, '--device=mps'], "MPS (Apple silicon) is not available"),
    'unknown_device': ('train.py', [*TRAIN, '--device=tpu'], "device must be 'auto', 'cpu'"),
    'empty_out_dir': ('train.py', [CONFIG, '--dataset={data}', '--out_dir='], "out_dir is empty"),
    'out_dir_is_a_file': ('train.py', [CONFIG, '--dataset={data}', '--out_dir={csv}'], "is a file, not a folder"),
    # train.py: the run folder and the data
    'scratch_over_a_run': ('train.py', [CONFIG, '--dataset={data}', '--out_dir={gpt}'], "holds a run (ckpt.pt, best.pt"),
    'resume_without_a_run': ('train.py', [CONFIG, '--dataset={data}', '--out_dir={fresh}', '--init_from=resume'], "no checkpoint at"),
    'resume_another_architecture': ('train.py', [*TRAIN, '--n_embd=64', '--n_head=2'], "its architecture differs in ['n_embd']"),
    'resume_on_another_vocabulary': ('train.py', [CONFIG, '--dataset={other_data}', '--out_dir={gpt}', '--init_from=resume'],
                                     "trained with another vocabulary"),
    'missing_dataset': ('train.py', [*SCRATCH, '--dataset=/nonexistent/data'], "no 'train' shards in /nonexistent/data"),
    'foreign_meta': ('train.py', [*SCRATCH, '--dataset={foreign_meta_data}'], "does not belong to the shards"),
    'odd_shard': ('train.py', [*SCRATCH, '--dataset={odd_data}'], "an odd number: not a uint16 token shard"),
    'block_longer_than_data': ('train.py', [*SCRATCH, '--block_size=100000'], "fewer than block_size + 1"),
    # sample.py
    'sample_no_run': ('sample.py', ['--out_dir=/nonexistent/run', '--device=cpu'], "no checkpoint at /nonexistent/run"),
    'sample_garbage': ('sample.py', [*SAMPLE, '--init_from={garbage}'], "is not a readable checkpoint"),
    'sample_truncated': ('sample.py', [*SAMPLE, '--init_from={truncated}'], "is not a readable checkpoint"),
    'sample_empty_file': ('sample.py', [*SAMPLE, '--init_from={empty}'], "is not a readable checkpoint"),
    'sample_foreign_dict': ('sample.py', [*SAMPLE, '--init_from={foreign}'], "a different model type?"),
    'sample_pickled_module': ('sample.py', [*SAMPLE, '--init_from={pickled}'], "holds Python objects"),
    'sample_wrong_shapes': ('sample.py', [*SAMPLE, '--init_from={wrong_shapes}'], "do not fit the model"),
    'sample_meta_of_another_model': ('sample.py', [*SAMPLE, '--init_from={mismatched_meta}'], "does not fit the model's vocabulary"),
    'sample_out_of_vocabulary': ('sample.py', [*SAMPLE, '--start=ab!'], "outside the model's 10-character vocabulary: '!'"),
    'sample_missing_prompt_file': ('sample.py', [*SAMPLE, '--start=FILE:/nonexistent/prompt.txt'], "cannot read the prompt file"),
    'sample_empty_prompt': ('sample.py', [*SAMPLE, '--start='], "the prompt is empty"),
    'sample_zero_tokens': ('sample.py', [*SAMPLE, '--max_new_tokens=0'], "need max_new_tokens > 0"),
    'sample_zero_samples': ('sample.py', [*SAMPLE, '--num_samples=0'], "num_samples > 0"),
    'sample_negative_temperature': ('sample.py', [*SAMPLE, '--temperature=-1.0'], "need temperature >= 0"),
    'sample_zero_top_p': ('sample.py', [*SAMPLE, '--top_p=0.0'], "0 < top_p <= 1"),
    'sample_unknown_sampler': ('sample.py', [*SAMPLE, '--sampler=beam'], "sampler must be one of"),
    'sample_unknown_policy': ('sample.py', [*SAMPLE_WFC, '--policy=best'], "policy must be one of"),
    'sample_malformed_goal': ('sample.py', [*SAMPLE_WFC, '--goal=abc'], "goal must look like 'offset:text'"),
    'sample_gpt2_weights': ('sample.py', ['--init_from=gpt2', '--device=cpu'], "this repo does not download them"),
    'sample_judge_is_wfc': ('sample.py', [*SAMPLE, '--steer=best_of_n', '--judge={wfc}'], "the judge must be a GPT checkpoint"),
    'sample_goal_on_a_gpt': ('sample.py', [*SAMPLE, '--goal=1:ab'], "a goal needs a WFC model"),
    'sample_goal_and_pin': ('sample.py', [*SAMPLE_WFC, '--goal=1:ab', '--pin=1:ab'], "--pin is the earlier name of --goal"),
    'sample_speculative_gpt': ('sample.py', [*SAMPLE, '--sampler=speculative'], "needs a WFC model"),
    'sample_policy_on_a_gpt': ('sample.py', [*SAMPLE, '--policy=threshold'], "--policy='threshold' has no effect"),
    'sample_policy_with_speculation': ('sample.py', [*SAMPLE_WFC, '--sampler=speculative', '--policy=threshold'],
                                       "has no effect with the speculative sampler"),
    'sample_mode_with_speculation': ('sample.py', [*SAMPLE_WFC, '--mode=nearest'], "--mode='nearest' has no effect"),
    'sample_eps_without_nearest': ('sample.py', [*SAMPLE_WFC, '--sampler=collapse', '--eps=0.2'], "it is used by --mode=nearest"),
    'sample_slide_on_a_rolling_window': ('sample.py', [*SAMPLE_WFC, '--slide=3'], "--slide=3 has no effect"),
    'sample_steering_knob_alone': ('sample.py', [*SAMPLE_WFC, '--particles=4'], "--particles is a steering option"),
    'sample_judge_alone': ('sample.py', [*SAMPLE_WFC, '--judge={gpt}'], "--judge is a steering option"),
    'sample_unknown_steer': ('sample.py', [*SAMPLE_WFC, '--steer=magic'], "steer must be ''"),
    'sample_malformed_potential': ('sample.py', [*SAMPLE_WFC, '--steer=smc', '--potential=forbid'], "potential must be"),
    'sample_invalid_match': ('sample.py', [*SAMPLE_WFC, '--steer=smc', '--potential=match:([ab'], "match: invalid pattern"),
    'sample_unknown_schedule': ('sample.py', [*SAMPLE_WFC, '--schedule=warm:2'], "schedule: kind must be one of"),
    'sample_png_in_no_folder': ('sample.py', [*SAMPLE_WFC, '--sampler=collapse', '--entropy_png=/nonexistent/x.png'], "no folder"),
    # eval.py
    'eval_no_run': ('eval.py', ['--out_dir=/nonexistent/run'], "no checkpoint at /nonexistent/run"),
    'eval_two_runs': ('eval.py', [*EVAL, '--ckpt={gpt}'], "name two runs; give one"),
    'eval_zero_windows': ('eval.py', [*EVAL, '--n_windows=0'], "need n_windows > 0"),
    'eval_malformed_depths': ('eval.py', [*EVAL, '--depths=1,x'], "depths must be comma-separated"),
    'eval_zero_depth': ('eval.py', [*EVAL, '--depths=0,2'], "depths must be >= 1"),
    'eval_depths_on_a_gpt': ('eval.py', ['--out_dir={gpt}', '--depths=2'], "this checkpoint is a GPT"),
    'eval_samples_without_judge': ('eval.py', [*EVAL, '--samples=4'], "--samples needs --judge"),
    'eval_missing_dataset': ('eval.py', [*EVAL, '--dataset=/nonexistent/data'], "no 'val' shards"),
    'eval_unknown_split': ('eval.py', [*EVAL, '--split=test'], "split must be 'train' or 'val', got 'test'"),
    'eval_out_is_a_folder': ('eval.py', [*EVAL, '--out={data}'], "must name a file, not a folder"),
    'eval_judge_is_wfc': ('eval.py', [*EVAL, '--judge={wfc}', '--samples=2'], "the judge must be a GPT checkpoint"),
    'eval_judge_of_another_vocabulary': ('eval.py', [*EVAL, '--judge={mismatched_meta}', '--samples=2'],
                                         "have different vocabularies"),
    'eval_on_another_vocabulary': ('eval.py', [*EVAL, '--dataset={other_data}'], "(char, 10 tokens) and the dataset"),
    'eval_garbage_checkpoint': ('eval.py', ['--out_dir={garbage}'], "is not a readable checkpoint"),
    # bench.py
    'bench_training_key': ('bench.py', ['--max_iters=3'], "--max_iters is a training setting"),
    'bench_zero_steps': ('bench.py', ['--steps=0'], "need steps, batch_size"),
    'bench_unknown_variant': ('bench.py', ['--variants=xyz', '--dataset=none'], "unknown variant 'xyz'"),
    'bench_no_run': ('bench.py', ['--out_dir=/nonexistent/run'], "no checkpoint at /nonexistent/run"),
    'bench_wfc_labelled_gpt': ('bench.py', ['--gpt_ckpt={wfc}'], "is a WFC checkpoint (n_future = 2); its row would be labelled 'gpt'"),
    'bench_gpt_labelled_wfc': ('bench.py', ['--wfc_ckpt={gpt}'], "is a GPT checkpoint (n_future = 0)"),
    'bench_unknown_dtype': ('bench.py', ['--dtypes=float64'], "dtype must be 'auto'"),
    # compare.py: all before anything trains
    'compare_unknown_table': ('compare.py', ['--tables=nope', '--out_dir={compare}'], "unknown tables ['nope']"),
    'compare_unknown_variant': ('compare.py', ['--variants=nope', '--out_dir={compare}'], "unknown variants ['nope']"),
    'compare_missing_plan': ('compare.py', ['--plan=/nonexistent/plan.py'], "cannot read the plan"),
    'compare_plan_without_variants': ('compare.py', ['--plan={empty_plan}', '--out_dir={compare}'], "must define VARIANTS"),
    'compare_zero_budget': ('compare.py', ['--budget=0', '--out_dir={compare}'], "need budget > 0"),
    'compare_no_calibration': ('compare.py', ['--calibration_rounds=0', '--out_dir={compare}'], "need calibration_rounds >= 1"),
    'compare_malformed_depths': ('compare.py', ['--depths=a', '--out_dir={compare}'], "depths must look like"),
    'compare_variant_that_cannot_train': ('compare.py', ['--plan={bad_plan}', '--variants=broken', '--tables=steps',
                                                         '--out_dir={compare}'], "variant broken"),
    # prepare scripts
    'prepare_missing_input': ('data/shakespeare_char/prepare.py', ['--input', '/nonexistent/text.txt'], "no such file"),
    'prepare_bad_fraction': ('data/shakespeare_char/prepare.py', ['--val_fraction=1.5'], "must be between 0 and 1"),
    'prepare_unknown_tokenizer': ('data/shakespeare_char/prepare.py', ['--tokenizer=words'], "invalid choice: 'words'"),
    'prepare_unknown_option': ('data/shakespeare/prepare.py', ['--shards=3'], "unrecognized arguments: --shards=3"),
    'prepare_binary_file': ('data/shakespeare_char/prepare.py', ['--input', '{binary}', '--out_dir={fresh}'], "is not UTF-8 text"),
    'prepare_binary_txt_corpus': ('data/openwebtext/prepare.py', ['--input', '{binary_txt}', '--out_dir={fresh}', '--tiktoken={ranks}'],
                                  "is not UTF-8 text"),
    'prepare_a_folder': ('data/shakespeare/prepare.py', ['--input', '{data}', '--out_dir={fresh}'], "is a folder"),
    'prepare_zero_shard_tokens': ('data/shakespeare_char/prepare.py', ['--shard_tokens=0'], "must be a positive whole number"),
    'prepare_corrupt_ranks_file': ('data/shakespeare/prepare.py', ['--input', '{text}', '--tiktoken={csv}', '--out_dir={fresh}'],
                                   "is not a GPT-2 ranks file"),
    'viz_out_is_a_folder': ('viz.py', ['curves', '--runs', '{gpt}', '--out={data}'], "must name a file, not a folder"),
    'prepare_unsupported_input': ('data/openwebtext/prepare.py', ['--input', '{csv}', '--tokenizer=bytes'], "--input takes existing files"),
}


def md5s(folder):
    return {name: hashlib.md5(open(os.path.join(folder, name), 'rb').read()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
    """A prepared dataset (with its manifest), a finished GPT run and a WFC run, damaged checkpoints
    and the other files the cases name."""
    root = tmp_path_factory.mktemp('bad_inputs')
    text = root / 'letters.txt'
    rng = np.random.default_rng(0)
    text.write_text(''.join('abcdefgh i'[k] for k in np.where(rng.random(30000) < 0.1, rng.integers(0, 10, 30000),
                                                                  np.tile(np.arange(10), 3000))))
    p = {k: str(root / k) for k in ('data', 'other_data', 'foreign_meta_data', 'odd_data', 'gpt', 'wfc', 'compare')}
    for name, content in (('data', text), ('other_data', None)):
        if content is None:
            (root / 'other.txt').write_text('xyzw ' * 4000)
            content = root / 'other.txt'
        run_script('data/shakespeare_char/prepare.py', '--input', content, f'--out_dir={p[name]}')
    shutil.copytree(p['data'], p['foreign_meta_data'])
    shutil.copy(os.path.join(p['other_data'], 'meta.pkl'), os.path.join(p['foreign_meta_data'], 'meta.pkl'))
    shutil.copytree(p['data'], p['odd_data'])
    with open(os.path.join(p['odd_data'], 'train.bin'), 'ab') as f:
        f.write(b'\0')
    os.remove(os.path.join(p['odd_data'], 'manifest.json'))  # an odd shard without a manifest to catch it first
    for run, extra in (('gpt', []), ('wfc', WFC)):
        run_script('train.py', CONFIG, f'--dataset={p["data"]}', f'--out_dir={p[run]}', '--max_iters=10', *extra)
    good = os.path.join(p['gpt'], 'ckpt.pt')
    ckpt = torch.load(good, weights_only=True)
    files = dict(garbage=os.urandom(4096), truncated=open(good, 'rb').read()[:os.path.getsize(good) // 2], empty=b'')
    for name, data in files.items():
        (root / f'{name}.pt').write_bytes(data)
        p[name] = str(root / f'{name}.pt')
    for name, payload in (('foreign', {'state_dict': {'conv1.weight': torch.zeros(4, 3, 3, 3)}}),
                          ('pickled', torch.nn.Linear(2, 2)),
                          ('wrong_shapes', {**ckpt, 'model_args': {**ckpt['model_args'], 'n_embd': 64}}),
                          ('mismatched_meta', {**ckpt, 'meta': pickle.load(open(os.path.join(p['other_data'], 'meta.pkl'), 'rb'))
                                               | {'vocab_size': 40, 'stoi': {chr(48 + i): i for i in range(40)},
                                                  'itos': {i: chr(48 + i) for i in range(40)}}})):
        torch.save(payload, root / f'{name}.pt')
        p[name] = str(root / f'{name}.pt')
    for name, source in (('broken_config', 'batch_size = (\n'), ('misspelt_config', 'lerning_rate = 1e-3\n'),
                         ('nan_config', f"include({CONFIG!r})\nlearning_rate = float('nan')\n"),
                         ('empty_plan', 'PLANS = {}\n'),
                         ('bad_plan', f"VARIANTS = {{'broken': [{CONFIG!r}, '--dataset={p['data']}', '--batch_size=0']}}\n")):
        (root / f'{name}.py').write_text(source)
        p[name] = str(root / f'{name}.py')
    (root / 'table.csv').write_text('a,b\n1,2\n')
    p['csv'], p['text'] = str(root / 'table.csv'), str(text)
    for name in ('binary.dat', 'binary.txt'):  # not UTF-8: 0xff never occurs in it
        (root / name).write_bytes(bytes(range(256)) * 8)
    p['binary'], p['binary_txt'] = str(root / 'binary.dat'), str(root / 'binary.txt')
    (root / 'ranks.tiktoken').write_text(''.join(f"{base64.b64encode(bytes([k])).decode()} {k}\n" for k in range(256)))
    p['ranks'] = str(root / 'ranks.tiktoken')
    os.makedirs(p['compare'])
    (root / 'compare' / 'results.json').write_text(json.dumps({'tables': {'steps': [{'name': 'finished'}]}}))
    return p


@pytest.mark.parametrize('case', CASES)
def test_bad_input_is_one_line_and_exit_code_2(case, paths, tmp_path):
    script, args, fragment = CASES[case]
    names = dict(paths, fresh=str(tmp_path / 'fresh'))
    watched = [paths[k] for k in ('gpt', 'wfc', 'compare', 'data')]
    before = {folder: md5s(folder) for folder in watched}
    code, out, err = run_inprocess(script, *[a.format(**names) for a in args])
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}\nstdout: {out[-500:]}\nstderr: {err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    assert fragment in lines[0], lines[0]
    assert {folder: md5s(folder) for folder in watched} == before, "a failure changed a run folder or the data"
    assert not os.path.exists(names['fresh']) or not os.listdir(names['fresh']), "a failed start wrote into its out_dir"


def test_the_table_is_large_and_covers_every_script():
    scripts = {script for script, _, _ in CASES.values()}
    assert len(CASES) >= 60 and {'train.py', 'sample.py', 'eval.py', 'bench.py', 'compare.py'} <= scripts
    assert any(s.startswith('data/') for s in scripts)


def test_the_same_files_work_when_nothing_is_wrong(paths, tmp_path):
    """Controls: the run folders and data of the cases sample, evaluate and train."""
    code, out, err = run_inprocess('sample.py', *[a.format(**paths) for a in SAMPLE_WFC])
    assert code == 0 and out.startswith('ab'), err
    code, out, err = run_inprocess('eval.py', *[a.format(**paths) for a in EVAL])
    assert code == 0 and 'next-token loss' in out, err
    fresh = tmp_path / 'fresh'
    run_script('train.py', CONFIG, f'--dataset={paths["data"]}', f'--out_dir={fresh}', '--max_iters=4')
    first = md5s(fresh)
    run_script('train.py', CONFIG, f'--dataset={paths["data"]}', f'--out_dir={fresh}', '--max_iters=4', '--overwrite=True')
    logs = [json.loads(line) for line in open(fresh / 'eval_log.jsonl')]
    assert [r['iter'] for r in logs] == [0, 4], "an overwritten run starts new logs"
    assert set(md5s(fresh)) == set(first)


def test_two_runs_started_together_into_one_out_dir_one_is_refused(paths, tmp_path):
    """A real race: two train.py processes started at once into the same out_dir. Exactly one trains
    (exit 0); the other is refused with one line and exit 2, by the lock while the first runs (or, if
    it started only after the first had finished, because the folder then holds a run)."""
    import subprocess
    import sys
    from conftest import ONE_THREAD
    run = tmp_path / 'race'
    command = [sys.executable, os.path.join(REPO, 'train.py'), CONFIG, f'--dataset={paths["data"]}', f'--out_dir={run}',
               '--max_iters=100000', '--lr_decay_iters=100000', '--eval_interval=100000', '--max_time=4.0']
    jobs = [subprocess.Popen(command, cwd=REPO, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(job.wait(timeout=240), job.stdout.read(), job.stderr.read()) for job in jobs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    err = next(err for code, _, err in results if code == 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'is in use by another training run' in lines[0] or 'holds a run' in lines[0], lines[0]
    assert [r['iter'] for r in map(json.loads, open(run / 'eval_log.jsonl'))][0] == 0, "one run's log, written once"


def test_a_held_lock_refuses_and_a_dead_holders_lock_does_not(paths, tmp_path):
    """The lock itself: while a process holds out_dir/train.lock a start is refused (exit 2, one line
    naming the holder's pid); once the holder is killed (SIGKILL: no clean-up runs) the kernel has
    released the lock and a run starts."""
    import signal
    import subprocess
    import sys
    run = tmp_path / 'locked'
    holder = subprocess.Popen([sys.executable, '-c', f"import sys, time; sys.path.insert(0, {REPO!r}); from plumbing import checkpoint; "
                               f"lock = checkpoint.lock_run({str(run)!r}); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        args = [CONFIG, f'--dataset={paths["data"]}', f'--out_dir={run}', '--max_iters=2']
        code, out, err = run_inprocess('train.py', *args)
        assert code == 2 and err.count('\n') == 1 and f'in use by another training run (pid {holder.pid}' in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, out, err = run_inprocess('train.py', *args)
    assert code == 0, err


def test_a_partial_torchrun_environment_is_named(paths, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    code, out, err = run_inprocess('train.py', *[a.format(**paths) for a in TRAIN])
    assert code == 2 and err.count('\n') == 1, err
    assert 'partial torchrun environment: RANK, WORLD_SIZE set but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT' in err


def test_resume_takes_the_runs_own_settings(paths, tmp_path):
    """--init_from=resume --out_dir=RUN alone resumes with the dataset and architecture the run was
    trained with (the defaults would name data/openwebtext and another model); the command line still overrides."""
    run = tmp_path / 'run'
    shutil.copytree(paths['gpt'], run)
    code, out, err = run_inprocess('train.py', f'--out_dir={run}', '--init_from=resume', '--max_iters=12')
    assert code == 0, err
    saved = json.load(open(run / 'config.json'))['config']
    assert saved['dataset'] == paths['data'] and saved['n_embd'] == 32 and saved['max_iters'] == 12
    assert [r['iter'] for r in map(json.loads, open(run / 'eval_log.jsonl'))][-1] == 12


def test_ctrl_c_in_sample_keeps_the_text_and_exits_130(paths):
    import signal
    import subprocess
    import sys
    from conftest import ONE_THREAD
    # -X faulthandler: if the interrupted process ever hangs, SIGABRT below prints where it is stuck.
    # preexec_fn: Ctrl-C as at a terminal; a suite started in the background (`cmd &` in a script)
    # hands its children SIGINT ignored, and a Python that starts so keeps ignoring it, as it should
    job = subprocess.Popen([sys.executable, '-X', 'faulthandler', os.path.join(REPO, 'sample.py'), f'--out_dir={paths["gpt"]}',
                            '--device=cpu', '--max_new_tokens=1000000', '--num_samples=1', '--start=ab'], cwd=REPO,
                           env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = job.stdout.read(8)  # the prompt and six generated characters: generation has started
    job.send_signal(signal.SIGINT)
    try:  # the interrupted process only prints and exits: 600 s is a hang, even on a loaded machine
        rest, err = job.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        job.send_signal(signal.SIGABRT)
        rest, err = job.communicate()
        pytest.fail(f"sample.py did not exit within 600 s of Ctrl-C; where it was:\n{err[-3000:]}")
    assert job.returncode == 130 and 'Traceback' not in err and err.count('\n') == 1, err
    assert first.startswith('ab') and rest.endswith('---------------\n'), "the text so far is printed"


def test_bytes_read_any_file_and_outputs_go_into_new_folders(paths, tmp_path):
    """--tokenizer=bytes prepares a binary file byte for byte; eval.py --out creates its folder."""
    code, out, err = run_inprocess('data/shakespeare_char/prepare.py', '--input', paths['binary'], '--tokenizer=bytes',
                                   f'--out_dir={tmp_path / "bytes"}')
    assert code == 0, err
    tokens = np.concatenate([np.fromfile(tmp_path / 'bytes' / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')])
    assert bytes(tokens.astype(np.uint8)) == open(paths['binary'], 'rb').read()
    target = tmp_path / 'new' / 'folder' / 'eval.json'
    code, out, err = run_inprocess('eval.py', *[a.format(**paths) for a in EVAL], f'--out={target}')
    assert code == 0 and json.load(open(target))['loss'] > 0, err


def test_a_disk_that_refuses_writes_is_one_line_and_leaves_no_partial_file(paths, tmp_path, monkeypatch):
    """A full disk at the first checkpoint: exit 2, one line with the disk's reason, no half-written file."""
    def full_disk(payload, f):
        f.write(b'PK half a checkpoint')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    run = tmp_path / 'full'
    code, out, err = run_inprocess('train.py', CONFIG, f'--dataset={paths["data"]}', f'--out_dir={run}', '--max_iters=10')
    assert code == 2 and err.count('\n') == 1 and 'No space left on device' in err, err
    assert not any(name.endswith('.pt') for name in os.listdir(run)), os.listdir(run)


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_out_dir_is_refused_before_training(paths, tmp_path):
    run = tmp_path / 'read_only'
    run.mkdir()
    run.chmod(0o555)
    code, out, err = run_inprocess('train.py', CONFIG, f'--dataset={paths["data"]}', f'--out_dir={run}', '--max_iters=10')
    assert code == 2 and 'is not writable' in err and 'step 0' not in out, err


def test_many_samples_are_printed_batch_by_batch(paths):
    """More samples than one batch (64): every one is printed, each batch as soon as it is done."""
    code, out, err = run_inprocess('sample.py', *[a.format(**paths) for a in SAMPLE if 'num_samples' not in a], '--num_samples=70')
    assert code == 0 and out.count('---------------\n') == 70 and all(t.startswith('ab') for t in out.split('---------------\n')[:-1]), err
