"""configurator.py: overrides and config files apply, and every mistake is an error that names
the key (unknown, misspelt, wrong type); None defaults take any value; include() composes files."""

import pytest

from configurator import ConfigError, configure


def settings():
    return dict(batch_size=12, learning_rate=1e-3, compile=True, out_dir='out', init_from='scratch',
                wandb_run_name=None, n_future=0)


def test_overrides_parse_to_the_declared_types():
    ns = settings()
    config = configure(ns, ['--batch_size=32', '--learning_rate=1', '--compile=False', '--out_dir=2024', '--n_future=4'])
    assert config == dict(ns)
    assert ns['batch_size'] == 32 and ns['learning_rate'] == 1.0 and isinstance(ns['learning_rate'], float)
    assert ns['compile'] is False and ns['out_dir'] == '2024' and ns['n_future'] == 4


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("import math\nbatch_size = 4\nlearning_rate = math.sqrt(1e-6)\nout_dir = 'x'\n")
    ns = settings()
    configure(ns, [str(path), '--batch_size=8'])
    assert (ns['batch_size'], ns['learning_rate'], ns['out_dir']) == (8, 1e-3, 'x')


def test_include_runs_a_base_file_relative_to_the_includer(tmp_path):
    (tmp_path / 'base.py').write_text("batch_size = 5\nout_dir = 'base'\n")
    (tmp_path / 'child.py').write_text("include('base.py')\nout_dir = 'child'\n")
    ns = settings()
    configure(ns, [str(tmp_path / 'child.py')])
    assert (ns['batch_size'], ns['out_dir']) == (5, 'child')


def test_unknown_override_names_the_key_and_suggests_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'.*did you mean 'batch_size'"):
        configure(settings(), ['--batchsize=3'])


def test_misspelt_key_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("learning_rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"c.py: unknown config key 'learning_rat'.*'learning_rate'"):
        configure(settings(), [str(path)])


@pytest.mark.parametrize('arg,expected', [('--batch_size=1.5', 'int'), ('--compile=1', 'bool'),
                                          ('--learning_rate=fast', 'float'), ('--n_future=True', 'int')])
def test_wrong_type_names_the_key_and_the_type(arg, expected):
    key = arg[2:].split('=')[0]
    with pytest.raises(ConfigError, match=rf"'{key}' must be {expected}"):
        configure(settings(), [arg])


def test_none_default_can_be_overridden_with_any_value():
    ns = settings()
    configure(ns, ['--wandb_run_name=wfc-1'])
    assert ns['wandb_run_name'] == 'wfc-1'


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match='--key=value'):
        configure(settings(), ['--batch_size'])
    with pytest.raises(ConfigError, match='cannot read config file'):
        configure(settings(), ['config/no_such_file.py'])
