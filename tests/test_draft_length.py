"""research/draft_length.py runs the speculative sampler of each checkpoint at each max_loop and
reports what a round commits: between 1 and n_future tokens, fewer per core pass as max_loop
grows; a GPT checkpoint (it has no drafts) and a prompt outside the vocabulary are refused."""

import json
import os

from conftest import REPO, run_inprocess

DEBUG = os.path.join(REPO, 'config', 'train_debug.py')


def test_rounds_commit_1_to_f_tokens_per_checkpoint_and_max_loop(pattern_data, tmp_path):
    runs = {}
    for f in (2, 3):
        runs[f] = tmp_path / f'f{f}'
        code, _, err = run_inprocess('train.py', DEBUG, f'--dataset={pattern_data}', f'--out_dir={runs[f]}',
                                     f'--n_future={f}', '--attn=pinned', '--pos_emb=rope', '--past_loss=1.0')
        assert code == 0, err
    out = tmp_path / 'draft.json'
    code, text, err = run_inprocess('research/draft_length.py', f'--ckpts={runs[2]},{runs[3]}', '--max_loops=1,2',
                                    '--tokens=24', '--batch=2', '--repeats=1', '--start=ab', f'--out={out}')
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [(r['n_future'], r['max_loop'], r['batch']) for r in rows] == [
        (f, k, b) for f in (2, 3) for k in (1, 2) for b in (1, 2)]
    for r in rows:
        assert 1 <= r['tokens_per_round'] <= r['n_future']
        assert abs(r['tokens_per_call'] * r['max_loop'] - r['tokens_per_round']) < 1e-6
        assert r['tokens_per_s'] > 0 and r['val'] is not None
    assert sum(line.startswith('|') for line in text.splitlines()) == 2 + len(rows)  # header, rule, a line per case

    code, _, err = run_inprocess('research/draft_length.py', f'--ckpts={runs[2]}', '--start=\n')
    assert code == 2 and "outside the model's 9-character vocabulary" in err

    gpt = tmp_path / 'gpt'
    assert run_inprocess('train.py', DEBUG, f'--dataset={pattern_data}', f'--out_dir={gpt}')[0] == 0
    code, _, err = run_inprocess('research/draft_length.py', f'--ckpts={gpt}', '--tokens=4', '--repeats=1')
    assert code == 2 and 'needs a WFC model' in err
