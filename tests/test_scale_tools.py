"""The scale sweep's tools: the power-law fit and crossing of research/scale_fit.py on synthetic
points, and the byte-level code corpus (data/python_code/prepare.py), split by file."""

import json
import math
import os
import sys

import numpy as np

from conftest import REPO, run_inprocess

sys.path.insert(0, os.path.join(REPO, 'research'))
import scale_fit  # noqa: E402


def test_the_fit_recovers_two_power_laws_and_where_they_cross():
    rng = np.random.default_rng(0)
    flops = np.geomspace(1e12, 1e15, 6)
    gpt = [dict(flops=f, loss=4.0 * f ** -0.05 * math.exp(rng.normal(0, 1e-4))) for f in flops]
    wfc = [dict(flops=f, loss=5.0 * f ** -0.06 * math.exp(rng.normal(0, 1e-4))) for f in flops]
    g, w = scale_fit.fit(gpt), scale_fit.fit(wfc)
    assert abs(g[1] + 0.05) < 1e-3 and abs(w[1] + 0.06) < 1e-3
    # 4 f^-0.05 = 5 f^-0.06  <=>  f = (5/4)^(1/0.01)
    x, err = scale_fit.crossing(g, w)
    assert abs(x - math.log10(1.25) / 0.01) < 0.2 and 0 < err < 1


def test_the_table_reads_compare_results_per_size(tmp_path):
    for size, (gl, wl) in {'0.1': (2.4, 2.6), '0.8': (2.0, 2.1), '3.2': (1.8, 1.85), '7.4': (1.7, 1.72)}.items():
        folder = tmp_path / size
        folder.mkdir()
        report = {'flops_per_iter': {f'gpt_{size}': 1e9 * float(size), f'wfc_{size}': 2e9 * float(size)},
                  'tables': {'time': [dict(name=f'gpt_{size}', iters=1000, params=float(size) * 1e6, loss=gl),
                                      dict(name=f'wfc_{size}', iters=500, params=float(size) * 1e6, loss=wl)]}}
        (folder / 'results.json').write_text(json.dumps(report))
    data = scale_fit.rows(str(tmp_path))
    assert [r['size'] for r in data][::2] == ['0.1', '0.8', '3.2', '7.4']
    assert {r['arm'] for r in data} == {'gpt', 'wfc'} and data[1]['flops'] == 500 * 2e9 * 0.1
    table = scale_fit.markdown(data)
    assert '| 3.2M | wfc | time | 500 |' in table and 'extrapolation' in table


def test_the_code_corpus_splits_by_file(tmp_path):
    root = tmp_path / 'src'
    for k in range(20):
        (root / f'pkg{k % 3}').mkdir(parents=True, exist_ok=True)
        (root / f'pkg{k % 3}' / f'm{k}.py').write_text(f"def f{k}():\n    return {k}\n" * (k + 1))
    (root / 'tests').mkdir()
    (root / 'tests' / 'test_skip.py').write_text('skipped = True\n')
    out = tmp_path / 'data'
    code, _, err = run_inprocess('data/python_code/prepare.py', f'--root={root}', f'--out_dir={out}', '--val_fraction=0.2')
    assert code in (0, None), err
    read = lambda split: np.concatenate([np.fromfile(path, dtype=np.uint16) for path in sorted(out.glob(f'{split}*.bin'))])
    train, val = read('train'), read('val')
    manifest = json.load(open(out / 'manifest.json'))
    assert {k: v['documents'] for k, v in manifest['splits'].items()} == {'train': 16, 'val': 4}
    as_bytes = lambda ids: bytes(ids.astype(np.uint8))
    for k in range(20):  # every file is in exactly one split
        body = f"def f{k}():\n    return {k}\n".encode()
        assert (body in as_bytes(val)) != (body in as_bytes(train)), k
    assert b'skipped' not in as_bytes(train) + as_bytes(val)  # test folders are left out
