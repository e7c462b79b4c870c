"""tools/gpu_check.py, the one command a GPU machine runs: its CPU dry run passes every check
(fp32 agreement with a float64 reference, bf16 + compiled training, every sampler's greedy text,
the SDPA / FlexAttention probe, train.py at the recipe shape) and writes them all to report.json;
a failing check ends the run with exit code 1 and one line naming it; bad settings exit 2."""

import json
import os

import pytest
import torch

from conftest import run_script

CHECKS = ['fp32_gpt', 'fp32_wfc', 'train_gpt_bf16_compiled', 'train_wfc_bf16_compiled', 'sample_causal_gpt',
          'sample_causal_wfc_past', 'sample_speculative', 'sample_collapse_first', 'sample_collapse_threshold',
          'sample_collapse_entropy', 'sample_goal', 'sample_smc', 'sample_causal_gpt_compiled', 'sample_speculative_compiled',
          'attention_causal', 'attention_wfc_train',
          'attention_wfc_window', 'recipe_gpt', 'recipe_wfc']


@pytest.mark.slow
def test_dry_run_passes_every_check(tmp_path):
    done = run_script('tools/gpu_check.py', '--device=cpu', f'--out_dir={tmp_path}', timeout=900)
    report = json.load(open(tmp_path / 'report.json'))
    assert [c['name'] for c in report['checks']] == CHECKS
    assert all(c['status'] == 'pass' for c in report['checks']), [c for c in report['checks'] if c['status'] != 'pass']
    assert 'float64' in report['reference'] and report['compile_backend'] == 'aot_eager'  # says what the dry run compared
    assert [a['case'] for a in report['attention']] == ['causal', 'wfc_train', 'wfc_window']
    assert all(a['flex']['max_diff'] <= report['tolerance'] for a in report['attention'] if 'flex' in a)
    assert [r['kind'] for r in report['recipe']] == ['gpt', 'wfc']
    assert all(r['ms_per_iter'] > 0 and r['val_loss'] > 0 for r in report['recipe'])
    assert os.path.exists(tmp_path / 'report.md') and '| recipe_wfc | pass |' in done.stdout


def test_a_failing_check_exits_nonzero_with_one_line(tmp_path):
    done = run_script('tools/gpu_check.py', '--device=cpu', '--groups=agree', '--tolerance=-1', f'--out_dir={tmp_path}',
                      check=False)
    assert done.returncode == 1
    assert done.stderr.count('\n') == 1 and done.stderr.startswith('error: 2 check(s) failed, first fp32_gpt:')
    report = json.load(open(tmp_path / 'report.json'))
    assert [c['status'] for c in report['checks']] == ['fail', 'fail']


def test_bad_settings_and_help(tmp_path):
    done = run_script('tools/gpu_check.py', '--groups=agree,gpu', check=False)
    assert done.returncode == 2 and done.stderr.count('\n') == 1 and 'groups' in done.stderr
    if not torch.cuda.is_available():
        done = run_script('tools/gpu_check.py', '--device=cuda', '--groups=agree', check=False)
        assert done.returncode == 2 and done.stderr.count('\n') == 1 and 'CUDA is not available' in done.stderr
    done = run_script('tools/gpu_check.py', '--help')
    assert '--tolerance=0.0001' in done.stdout and 'fp32 agreement' in done.stdout
