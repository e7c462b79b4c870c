"""The model's settings are three objects with one job each (architecture, training recipe, inference
solver); train.py lists every one of them; checkpoints store them apart and older ones still load;
model.py stays a file a researcher reads in one sitting."""

import ast
import dataclasses
import os
import re

import pytest
import torch

from conftest import REPO, tiny
from model import GPTConfig
from modeling.recipe import Recipe
from modeling.solver import Solver
from plumbing import checkpoint

FIELDS = {cls: [f.name for f in dataclasses.fields(cls)] for cls in (GPTConfig, Recipe, Solver)}


def test_the_three_settings_objects_share_no_name_and_the_architecture_stays_small():
    names = [n for fields in FIELDS.values() for n in fields]
    assert len(names) == len(set(names))
    assert len(FIELDS[GPTConfig]) <= 20


def test_flat_settings_split_into_the_three_and_unknown_or_bad_ones_are_refused():
    model = checkpoint.build(n_layer=2, n_head=2, n_embd=16, vocab_size=7, block_size=8, n_future=2, bptt=2, max_loop=5)
    assert (model.config.n_layer, model.recipe.bptt, model.solver.max_loop) == (2, 2, 5)
    with pytest.raises(TypeError, match='unknown model settings'):
        checkpoint.build(step_size=0.5)
    with pytest.raises(ValueError, match='supervise'):
        checkpoint.build(supervise=0)
    with pytest.raises(ValueError, match='exit_rule'):
        checkpoint.build(exit_rule='loss')


def test_train_py_lists_every_setting_with_the_objects_defaults():
    """Every field is a setting train.py defines where a reader sees it, at the same default (bias:
    nanoGPT trains without biases, a deliberate difference)."""
    text = open(os.path.join(REPO, 'train.py')).read()
    listed = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                listed[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    defaults = checkpoint.default_settings()
    assert set(defaults) <= set(listed)
    assert {k for k in defaults if listed[k] != defaults[k]} == {'bias'}


def old_format(model):
    """The checkpoint train.py wrote before the split (format 1): every setting in model_args."""
    flat = {**dataclasses.asdict(model.config), **dataclasses.asdict(model.recipe), **dataclasses.asdict(model.solver)}
    return dict(model=model.state_dict(), model_args={**flat, 'step_size': 1.0}, format_version=1)


def test_an_older_checkpoint_loads_into_the_same_model_as_a_new_one():
    model = tiny(n_future=2, pos_emb='rope', loop_law='uniform', train_depth=3, past_loss=1.0, max_loop=4, tol=0.01).eval()
    new = dict(model=model.state_dict(), **checkpoint.stored_settings(model), format_version=checkpoint.FORMAT_VERSION)
    for ckpt in (new, old_format(model)):
        loaded = checkpoint.build_model(ckpt).eval()
        assert (loaded.config, loaded.recipe, loaded.solver, loaded.capabilities) == \
            (model.config, model.recipe, model.solver, model.capabilities)
        idx = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loaded(idx, idx, converge=True, phase=torch.zeros(2, dtype=torch.long))[0],
                                   model(idx, idx, converge=True, phase=torch.zeros(2, dtype=torch.long))[0])


def test_a_checkpoint_of_a_removed_option_and_a_non_solver_override_are_refused():
    model = tiny()
    ckpt = old_format(model)
    ckpt['model_args']['step_size'] = 0.5
    with pytest.raises(checkpoint.CheckpointError, match='step_size=0.5'):
        checkpoint.build_model(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="only solver settings"):
        checkpoint.build_model(old_format(model), n_layer=3)
    assert checkpoint.build_model(old_format(model), max_loop=9).solver.max_loop == 9


def test_a_recipe_given_to_the_forward_is_the_one_it_trains_with():
    model = tiny(n_future=2, pos_emb='rope', past_loss=0.0).train()
    idx = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(0))
    phase = torch.zeros(2, dtype=torch.long)
    plain = model(idx, idx, depth=2, phase=phase)[1]
    with_past = model(idx, idx, depth=2, phase=phase, recipe=dataclasses.replace(model.recipe, past_loss=1.0))[1]
    assert with_past > plain  # the past stream's loss is added


def long_functions(path, limit=40):
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > limit]


def reads_a_setting(node, fields):
    """node reads a setting: c.x, config.x, r.x, recipe.x, self.x or self.config.x (solver.x, ...)."""
    owner = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, 'attr', None)
    return node.attr in fields and owner in ('c', 'config', 'r', 'recipe', 'solver', 'self')


def test_model_py_stays_readable():
    """model.py <= 400 lines with the GPT class <= 250, no function over 40 lines in the model and
    the samplers; model.py branches on a setting in <= 20 places besides GPTConfig's own checks."""
    text = open(os.path.join(REPO, 'model.py')).read()
    tree = ast.parse(text)
    gpt = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'GPT')
    assert len(text.splitlines()) <= 400 and gpt.end_lineno - gpt.lineno + 1 <= 250
    for path in ('model.py', 'generation/engine.py', 'generation/speculative.py', 'generation/sampling.py'):
        assert not long_functions(path), (path, long_functions(path))
    fields = set(FIELDS[GPTConfig]) | set(FIELDS[Recipe]) | set(FIELDS[Solver])
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'GPTConfig')
    checks = {id(n) for n in ast.walk(config)}
    branches = [node.lineno for node in ast.walk(tree) if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert))
                and id(node) not in checks and any(isinstance(a, ast.Attribute) and reads_a_setting(a, fields)
                                                   for a in ast.walk(node.test))]
    assert len(branches) <= 20, branches
    assert not re.search(r'\bc\.(%s)\b' % '|'.join(FIELDS[Recipe] + FIELDS[Solver]), text), "recipe/solver read as config"
