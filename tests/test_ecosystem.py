"""The ecosystem around the model, offline: the Hugging Face prepare scripts turn local JSONL /
text files into shards whose decoded text round-trips, with a manifest that matches them; the
trainer rejects a corrupted, truncated or stray shard with an error naming it; GPT-2 BPE loads from
a local ranks file (the real one when present, else one built here) through the same code path;
wandb in offline mode receives the logged keys; the pictures render; the GPU configs build, train a
few CPU steps with tiny overrides, spend matched compute and shard their batches under DDP."""

import base64
import collections
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import struct

import numpy as np
import pytest
import torch

from configurator import _includer
from conftest import REPO, run_script
from plumbing import checkpoint
from plumbing import runtime
from plumbing.dataloader import DataError, TokenShards, step_seed
from plumbing.tokenizer import codec_for, gpt2_encoding

pytestmark = pytest.mark.slow  # prepare scripts and training runs in subprocesses

REAL_RANKS = os.environ.get('WFC_GPT2_TIKTOKEN', '')  # GPT-2's ranks file, where the machine has one
DOCS = ["First document.\nIt has two lines.", "Zweites Dokument: Grüße aus Köln! 日本語も。",
        "<|endoftext|> is plain text inside a document", "the theme of the thin thread", "x"]
OFFLINE = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # tiny models: threads only fight over the cores


@pytest.fixture(scope='module')
def ranks_file(tmp_path_factory):
    """GPT-2's ranks file when WFC_GPT2_TIKTOKEN names one; else a tiny one in the same format (every
    byte plus a few merges), so the tiktoken path runs on a fresh machine without a network."""
    if REAL_RANKS and os.path.exists(REAL_RANKS):
        return os.path.abspath(REAL_RANKS)
    tokens = [bytes([b]) for b in range(256)] + [b'th', b'he', b'the', b' t', b' the', b'in', b'er']
    path = tmp_path_factory.mktemp('ranks') / 'tiny.tiktoken'
    path.write_bytes(b''.join(base64.b64encode(t) + b' %d\n' % rank for rank, t in enumerate(tokens)))
    return str(path)


def read_split(folder, split, manifest):
    return np.concatenate([np.fromfile(os.path.join(folder, s['file']), dtype=np.uint16)
                           for s in manifest['splits'][split]['shards']])


def check_manifest(folder):
    """The manifest describes the files exactly. Returns it."""
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    listed = {s['file'] for info in manifest['splits'].values() for s in info['shards']}
    assert listed == {os.path.basename(p) for p in glob.glob(os.path.join(folder, '*.bin'))}
    for info in manifest['splits'].values():
        assert info['tokens'] == sum(s['tokens'] for s in info['shards'])
        for shard in info['shards']:
            data = open(os.path.join(folder, shard['file']), 'rb').read()
            assert len(data) == 2 * shard['tokens'] and hashlib.sha256(data).hexdigest() == shard['sha256']
    top = max(int(read_split(folder, split, manifest).max()) for split in manifest['splits'])
    assert manifest['max_token'] == top < manifest['vocab_size'] <= manifest['model_vocab_size']
    meta = pickle.load(open(os.path.join(folder, 'meta.pkl'), 'rb'))
    assert meta['tokenizer'] == manifest['tokenizer'] and meta['vocab_size'] == manifest['model_vocab_size']
    assert meta['vocab_size'] % 64 == 0 or manifest['tokenizer'] == 'char'
    return manifest


@pytest.mark.parametrize('script,kind,tokenizer', [('openwebtext', 'jsonl', 'gpt2'), ('fineweb_edu', 'txt', 'bytes')])
def test_corpus_prepare_from_local_files_round_trips(script, kind, tokenizer, ranks_file, tmp_path):
    docs = [f'{i}: {d}' for i, d in enumerate(DOCS * 6)]
    if kind == 'jsonl':
        inputs = [tmp_path / 'docs.jsonl']
        inputs[0].write_text(''.join(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs)))
    else:  # one document per file
        inputs = [tmp_path / f'doc{i:02d}.txt' for i in range(len(docs))]
        for path, doc in zip(inputs, docs):
            path.write_text(doc, encoding='utf-8')
    out = tmp_path / 'prepared'
    run_script(f'data/{script}/prepare.py', '--input', *inputs, f'--tokenizer={tokenizer}', f'--tiktoken={ranks_file}',
               f'--out_dir={out}', '--val_fraction=0.2', '--shard_tokens=200', f'--num_proc={1 + (kind == "jsonl")}',
               f'--cache_dir={tmp_path / "hf"}', env={**OFFLINE, 'HF_HOME': str(tmp_path / 'hf')})
    manifest = check_manifest(out)
    meta = pickle.load(open(out / 'meta.pkl', 'rb'))
    codec = codec_for(meta, ranks_file)
    assert manifest['tokenizer'] == tokenizer and manifest['eot'] == codec.eos is not None
    decoded = []
    for split in ('train', 'val'):
        shards = manifest['splits'][split]['shards']
        assert all(s['tokens'] == 200 for s in shards[:-1]) and 0 < shards[-1]['tokens'] <= 200  # fixed size
        assert (len(shards) == 1) == (shards[0]['file'] == f'{split}.bin')
        ids = read_split(out, split, manifest).tolist()
        assert ids[-1] == codec.eos  # every document ends with the end-of-text token
        ends = [0] + [i + 1 for i, token in enumerate(ids) if token == codec.eos]
        decoded += [codec.decode(ids[a:b - 1]) for a, b in zip(ends, ends[1:])]
        assert len(ends) - 1 == manifest['splits'][split]['documents']
    assert collections.Counter(decoded) == collections.Counter(docs)  # every document, intact, once
    assert 0 < manifest['splits']['val']['documents'] < len(docs) / 2
    data = TokenShards(str(out), 'train', block_size=16, vocab_size=meta['vocab_size'])  # verifies the manifest
    x, y = data.batch(4, seed=0)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_text_prepare_round_trips_and_matches_the_char_script(ranks_file, tmp_path):
    text = ''.join(f"{d}\n\n" for d in DOCS) * 20
    source = tmp_path / 'input.txt'
    source.write_text(text, encoding='utf-8')
    for tokenizer in ('gpt2', 'bytes'):
        out = tmp_path / tokenizer
        run_script('data/shakespeare/prepare.py', f'--input={source}', f'--tokenizer={tokenizer}',
                   f'--tiktoken={ranks_file}', f'--out_dir={out}')
        manifest = check_manifest(out)
        codec = codec_for(pickle.load(open(out / 'meta.pkl', 'rb')), ranks_file)
        cut = int(len(text) * 0.9)  # the first 90% of the characters train
        assert codec.decode(read_split(out, 'train', manifest).tolist()) == text[:cut]
        assert codec.decode(read_split(out, 'val', manifest).tolist()) == text[cut:]
    run_script('data/shakespeare_char/prepare.py', f'--input={source}', '--tokenizer=bytes', f'--out_dir={tmp_path / "cb"}')
    for name in ('train.bin', 'val.bin'):  # byte level is byte level, whichever script made it
        assert (tmp_path / 'cb' / name).read_bytes() == (tmp_path / 'bytes' / name).read_bytes()


def test_gpt2_encoding_loads_offline_from_a_file_or_the_environment(ranks_file, monkeypatch):
    direct = gpt2_encoding(ranks_file)
    monkeypatch.setenv('WFC_GPT2_TIKTOKEN', ranks_file)
    from_env = codec_for({'tokenizer': 'gpt2'})
    text = 'the theme <|endoftext|> thin'
    assert from_env.encode_ordinary(text) == direct.encode_ordinary(text) and from_env.decode(direct.encode_ordinary(text)) == text
    assert from_env.eos == direct.eot_token == direct.n_vocab - 1
    assert from_env.encode('a<|endoftext|>')[-1] == from_env.eos  # prompts may end a document...
    assert from_env.eos not in from_env.encode_ordinary('a<|endoftext|>')  # ...training text may not
    if REAL_RANKS and ranks_file == os.path.abspath(REAL_RANKS):
        assert direct.encode('Hello world') == [15496, 995] and direct.n_vocab == 50257
    monkeypatch.setenv('WFC_GPT2_TIKTOKEN', ranks_file + '.missing')
    with pytest.raises(RuntimeError, match='no GPT-2 ranks file'):
        gpt2_encoding()


@pytest.fixture(scope='module')
def byte_data(tmp_path_factory):
    """A byte-level dataset prepared by the real script (synthetic text, two train shards)."""
    rng = np.random.default_rng(0)
    words = ['wave', 'function', 'collapse', 'state', 'future', 'past', 'entropy']
    folder = tmp_path_factory.mktemp('byte_data')
    (folder / 'text.txt').write_text(' '.join(rng.choice(words, 3000)))
    run_script('data/shakespeare/prepare.py', f'--input={folder / "text.txt"}', '--tokenizer=bytes',
               f'--out_dir={folder / "bytes"}', '--shard_tokens=12000')
    return folder / 'bytes'


def test_trainer_rejects_corrupt_truncated_or_stray_shards(byte_data, tmp_path):
    byte_data = shutil.copytree(byte_data, tmp_path / 'copy')
    TokenShards(str(byte_data), 'train', 32)
    shard = byte_data / 'train_000.bin'
    original = shard.read_bytes()
    shard.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # one flipped bit
    with pytest.raises(DataError, match=re.escape(str(shard)) + '.*fails its checksum'):
        TokenShards(str(byte_data), 'train', 32)
    TokenShards(str(byte_data), 'train', 32, verify=False)  # sizes still match: only the checksum sees it
    result = run_script('train.py', 'config/train_debug.py', f'--dataset={byte_data}', f'--out_dir={tmp_path / "run"}',
                        check=False, env=ONE_THREAD)
    assert result.returncode == 2 and 'train_000.bin fails its checksum' in result.stderr
    shard.write_bytes(original[:-2])
    with pytest.raises(DataError, match='train_000.bin holds .* tokens but manifest.json records'):
        TokenShards(str(byte_data), 'train', 32, verify=False)
    shard.write_bytes(original)
    (byte_data / 'train_007.bin').write_bytes(original)
    with pytest.raises(DataError, match='train_007.bin is not listed in manifest.json'):
        TokenShards(str(byte_data), 'train', 32)


def wandb_history(wandb_dir):
    """The history rows of the offline run under wandb_dir, read from its .wandb file (a
    LevelDB-style log of protobuf records: 32 KiB blocks of [crc32 u32, length u16, type u8] chunks)."""
    from wandb.proto import wandb_internal_pb2
    path, = glob.glob(os.path.join(wandb_dir, 'wandb', 'offline-run-*', 'run-*.wandb'))
    data, pos, chunk, rows = open(path, 'rb').read(), 7, b'', []
    assert data[:4] == b':W&B'
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += room
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b''
            if record.WhichOneof('record_type') == 'history':
                rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_receives_the_logged_keys(pattern_data, tmp_path):
    pytest.importorskip('wandb')
    out = tmp_path / 'run'
    env = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true', **ONE_THREAD}
    run_script('train.py', 'config/train_debug.py', f'--dataset={pattern_data}', f'--out_dir={out}', '--wandb_log=True',
               '--max_iters=4', '--eval_interval=2', '--log_interval=1', '--n_future=3', '--pos_emb=rope',
               '--n_loop=2', '--loop_law=uniform', env=env)
    rows = wandb_history(tmp_path)
    keys = set().union(*rows)
    for key in ('train/loss', 'val/loss', 'lr', 'mfu', 'val/passes', 'train/step_loss', 'train/passes',
                'val/loss_d1', 'val/loss_d3', 'val/loss_by_distance_table'):
        assert key in keys or any(k.startswith(key + '/') for k in keys), (key, sorted(keys))
    evals = [json.loads(line) for line in open(out / 'eval_log.jsonl')]
    logged = {row['_step']: row['val/loss'] for row in rows if 'val/loss' in row}
    assert logged == {r['iter']: pytest.approx(r['val']) for r in evals}
    assert all(1 <= row['train/passes'] <= 2 for row in rows if 'train/passes' in row)
    tables = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'files' / 'media' / 'table' / 'val' / '*.table.json'))
    assert len(tables) == len(evals)
    last = json.load(open(sorted(tables, key=lambda p: int(re.search(r'_table_(\d+)_', p).group(1)))[-1]))
    assert last['columns'] == ['distance', 'val loss']
    assert [row[1] for row in last['data']] == pytest.approx(evals[-1]['val_by_dist'])


def test_pictures_render(tmp_path):
    image = pytest.importorskip('matplotlib.image')
    import viz
    out = tmp_path / 'toy.png'
    viz.main(['toy', f'--out={out}', '--steps=40', '--size=64'])  # what `python viz.py toy` runs
    pixels = image.imread(out)[..., :3].reshape(-1, 3)
    assert len(np.unique(np.round(pixels * 255), axis=0)) > 20  # a picture, not one colour
    runs = []
    for name, by_dist in (('gpt', []), ('wfc', [2.0, 2.5, 2.8])):
        runs.append(tmp_path / name)
        runs[-1].mkdir()
        records = [dict(iter=i, train_time=1.5 * i, val=3 - i / 10, val_by_dist=by_dist) for i in range(5)]
        (runs[-1] / 'eval_log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    viz.draw_curves([str(r) for r in runs], str(tmp_path / 'curves.png'))
    assert len(np.unique(image.imread(tmp_path / 'curves.png').reshape(-1, 4), axis=0)) > 20


def load_config(name):
    path = os.path.join(REPO, 'config', name)
    scope = {'include': _includer(path)}
    exec(compile(open(path).read(), path, 'exec'), scope)
    return scope


@pytest.mark.parametrize('name', ['train_gpt2.py', 'train_gpt2_wfc.py'])
def test_gpu_config_trains_a_few_cpu_steps_with_tiny_overrides(name, byte_data, tmp_path):
    out = tmp_path / 'run'
    run_script('train.py', f'config/{name}', f'--dataset={byte_data}', f'--out_dir={out}', '--device=cpu',
               '--dtype=float32', '--compile=False', '--wandb_log=False', '--n_layer=1', '--n_head=2', '--n_embd=32',
               '--block_size=32', '--batch_size=2', '--gradient_accumulation_steps=2', '--max_iters=2',
               '--eval_interval=2', '--eval_iters=2', '--warmup_iters=1', env=ONE_THREAD)
    config = json.load(open(out / 'config.json'))['config']
    assert config['n_future'] == load_config(name).get('n_future', 0) and config['vocab_size'] == 256
    log = [json.loads(line) for line in open(out / 'eval_log.jsonl')]
    assert [r['iter'] for r in log] == [0, 2] and all(np.isfinite(r['val']) for r in log)


def test_gpu_configs_spend_matched_compute_and_shard_under_ddp():
    gpt, wfc = load_config('train_gpt2.py'), load_config('train_gpt2_wfc.py')
    fields = checkpoint.default_settings()
    flops = {}
    for name, cfg in (('gpt', gpt), ('wfc', wfc)):
        with torch.device('meta'):  # full size, no memory
            model = checkpoint.build(**{k: v for k, v in cfg.items() if k in fields})
        assert 123e6 < model.get_num_params() < 125e6  # GPT-2 small
        per_iter = runtime.training_flops(model, cfg['batch_size'], cfg['block_size']) * cfg['gradient_accumulation_steps']
        flops[name] = per_iter * cfg['max_iters']
        assert cfg['gradient_accumulation_steps'] % 8 == 0 and cfg['lr_decay_iters'] == cfg['max_iters']
    assert wfc['batch_size'] * wfc['gradient_accumulation_steps'] == gpt['batch_size'] * gpt['gradient_accumulation_steps']
    assert flops['wfc'] / flops['gpt'] == pytest.approx(1.0, abs=0.01)  # the header's cost claim
    # DDP: train.py seeds rank r's micro-step m from (seed, iter, r * accum + m), so 8 ranks draw
    # different batches whose union is the single process's batch set
    assert 'step_seed(seed, iter_num, rank * accum + micro)' in open(os.path.join(REPO, 'train.py')).read()
    G = wfc['gradient_accumulation_steps']
    single = {step_seed(1337, 5, m) for m in range(G)}
    per_rank = [{step_seed(1337, 5, r * (G // 8) + m) for m in range(G // 8)} for r in range(8)]
    assert set().union(*per_rank) == single and sum(map(len, per_rank)) == len(single) == G
