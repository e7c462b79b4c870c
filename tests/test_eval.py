"""eval.py measures what it claims: a GPT checkpoint gets the loss train.py's own eval gave on
the same tokens; WFC's exhaustive next-token table agrees with the training eval slot for slot
and its warm-start sequential loss is near zero on a predictable sequence; the judge's NLL of its
own temperature-1 samples is close to its val loss (a sanity check of the estimator)."""

import json
import os

import pytest
import torch

from plumbing import checkpoint
import eval as evaluation
from conftest import run_script, train_pattern_model
from generation.decoding import Settings
from plumbing.dataloader import TokenShards, step_seed

SEED = 1337  # train.py's default seed: its evaluation batches derive from it


def train_tiny(data, out, *extra):
    run_script('train.py', 'config/train_debug.py', f'--dataset={data}', f'--out_dir={out}', '--max_iters=40',
               '--lr_decay_iters=40', '--eval_interval=40', '--eval_iters=3', '--learning_rate=3e-3', *extra)
    with open(os.path.join(out, 'eval_log.jsonl')) as f:
        last = [json.loads(line) for line in f][-1]
    model, info = checkpoint.load_model(out)
    return model, info, last


def training_eval_batches(data, info):
    bs = info['config']['batch_size']
    return [data.batch(bs, step_seed(SEED, -2, k)) for k in range(info['config']['eval_iters'])]


@pytest.mark.slow  # train.py runs in subprocesses
def test_gpt_loss_matches_the_training_eval_on_the_same_tokens(pattern_data, tmp_path):
    model, info, last = train_tiny(pattern_data, tmp_path / 'gpt')
    data = TokenShards(pattern_data, 'val', model.config.block_size)
    losses = [evaluation.token_losses(model, x, y)[0][0] for x, y in training_eval_batches(data, info)]
    assert abs(torch.cat(losses).mean().item() - last['val']) < 1e-5


@pytest.mark.slow  # train.py runs in subprocesses
def test_wfc_table_agrees_with_the_training_eval_slot_for_slot(pattern_data, tmp_path):
    model, info, last = train_tiny(pattern_data, tmp_path / 'wfc', '--n_future=4', '--pos_emb=rope')
    data = TokenShards(pattern_data, 'val', model.config.block_size)
    for k, (x, y) in enumerate(training_eval_batches(data, info)):
        torch.manual_seed(step_seed(SEED, -1, k))  # the training eval's layout draws
        trained = model.wfc_forward(x, y, converge=True)
        table, _, _ = evaluation.token_losses(model, x, y)
        # a row's first block is cut short by its phase (fewer speculative slots than sampling ever
        # has); the exhaustive table runs full blocks, so compare every slot after that first block
        dist = trained.dist
        starts = (dist == 1) & (torch.arange(dist.size(1)) > 0)
        phase = starts.float().argmax(1) % 4
        full_block = torch.arange(dist.size(1))[None] >= phase[:, None]
        for d in range(1, 5):
            at_d = trained.scored & (dist == d) & full_block
            assert at_d.sum() > 0
            assert torch.allclose(trained.ce[at_d], table[d - 1][at_d], atol=1e-5), d


def test_warm_sequential_loss_is_near_zero_on_a_predictable_sequence():
    model = train_pattern_model(n_future=4, pos_emb='rope', n_loop=3, loop_law='uniform', warm_prob=0.5, supervise=2,
                                max_loop=8, tol=1e-3)
    x = (torch.arange(40)[None] + torch.arange(4)[:, None]) % 7
    warm_loss, passes, _ = evaluation.sequential_loss(model, x, 30)
    assert warm_loss < 0.1 and 1 <= passes <= 8


@pytest.mark.slow  # train.py runs in subprocesses
def test_judge_scores_its_own_samples_near_its_val_loss(pattern_data, tmp_path):
    judge, info, last = train_tiny(pattern_data, tmp_path / 'judge', '--max_iters=150', '--lr_decay_iters=150',
                                   '--eval_interval=150', '--eval_iters=8')
    data = TokenShards(pattern_data, 'val', judge.config.block_size)
    prompts = data.batch(32, 5)[0][:, :8]
    quality = evaluation.sample_quality(judge, judge, prompts, 40, Settings(temperature=1.0, top_k=0), 0)
    assert abs(quality['judge_nll'] - last['val']) < 0.25 * last['val'], (quality, last['val'])
    assert 0 < quality['distinct_2'] <= 1 and quality['unigram_bits'] > 0
