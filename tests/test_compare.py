"""compare.py end to end on synthetic data with tiny models: a steps table and calibrated time and
FLOPs tables, each row evaluated on the same windows; --train_runs=False re-evaluates finished runs
to the same numbers and skips a run that did not finish. Slow (a train.py process per run)."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, run_script, write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp('compare')
    rng = np.random.default_rng(0)
    corpus = lambda n: np.where(rng.random(n) < 0.05, rng.integers(0, 9, n), np.tile(np.arange(7), n // 7 + 1)[:n])
    data = write_dataset(folder / 'data', corpus(8000), corpus(2000), vocab_size=9)
    debug = [os.path.join(REPO, 'config', 'train_debug.py'), f'--dataset={data}']
    path = folder / 'plan.py'
    path.write_text(f"VARIANTS = {{'tiny_gpt': {debug!r}, 'tiny_wfc': {debug + ['--n_future=2', '--pos_emb=rope']!r}}}\n")
    return str(path), folder


def compare(plan_path, out_dir, *args):
    run_script('compare.py', f'--plan={plan_path}', f'--out_dir={out_dir}', '--variants=tiny_gpt,tiny_wfc',
               '--eval_windows=8', '--evals_per_run=2', *args)
    with open(os.path.join(out_dir, 'results.json')) as f:
        return json.load(f)


def test_steps_table_and_evaluation_of_finished_runs(plan):
    plan_path, folder = plan
    out = folder / 'steps'
    first = compare(plan_path, out, '--tables=steps', '--steps=20', '--calibration_rounds=0')
    rows = {r['name']: r for r in first['tables']['steps']}
    assert set(rows) == {'tiny_gpt', 'tiny_wfc'} and all(r['iters'] == 20 for r in rows.values())
    assert all(np.isfinite(r['loss']) for r in rows.values())
    assert 'by_dist' not in rows['tiny_gpt'] and len(rows['tiny_wfc']['by_dist']) == 2
    assert (out / 'results.md').exists()
    again = compare(plan_path, out, '--tables=steps', '--steps=20', '--calibration_rounds=0', '--train_runs=False')
    assert [r['loss'] for r in again['tables']['steps']] == [r['loss'] for r in first['tables']['steps']]
    unfinished = compare(plan_path, out, '--tables=steps', '--steps=30', '--calibration_rounds=0', '--train_runs=False')
    assert unfinished['tables']['steps'] == []  # runs of 20 iterations are not the 30 asked for


def test_time_and_flops_tables_follow_the_calibration(plan):
    plan_path, folder = plan
    report = compare(plan_path, folder / 'budget', '--tables=time,flops', '--budget=3', '--calibration_rounds=1',
                     '--calibration_iters=12')
    speed, flops = report['speed'], report['flops_per_iter']
    assert set(speed) == set(flops) == {'tiny_gpt', 'tiny_wfc'} and flops['tiny_wfc'] > flops['tiny_gpt']
    time_rows = {r['name']: r['iters'] for r in report['tables']['time']}
    assert time_rows == {n: max(20, int(3 / speed[n])) for n in speed}
    flops_rows = {r['name']: r['iters'] for r in report['tables']['flops']}
    gpt = time_rows['tiny_gpt']
    assert flops_rows == {n: max(20, int(gpt * flops['tiny_gpt'] / flops[n])) for n in flops}
