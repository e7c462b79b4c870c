"""
Configuration in nanoGPT's style, with its gaps fixed:

    python train.py config/train_shakespeare_char_wfc.py --batch_size=32 --compile=False

A script declares its settings as module globals, then calls `configure(globals())`. Config
files (plain assignments; `include('base.py')` runs another config file first) run in order,
then `--key=value` overrides. A key that the
script does not declare is an error naming it (with the closest known key), and so is a value
of the wrong type; keys whose default is None accept any value. Returns the resolved config.
"""

import ast
import difflib
import os
import sys
import types


class ConfigError(ValueError):
    pass


def _check(key, value, defaults, origin):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{origin}: unknown config key '{key}'{hint}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{origin}: config key '{key}' must be {type(default).__name__} "
                          f"(default {default!r}), got {type(value).__name__} {value!r}")
    return value


def _parse_value(text):
    """Python literals ('3', '1e-3', 'True', "'rope'", 'None'); bare words stay strings."""
    lowered = {'true': 'True', 'false': 'False', 'none': 'None'}.get(text.lower(), text)
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text


def _includer(path):
    """include('other.py') inside a config file runs that file first (path relative to the includer)."""
    def include(name):
        source_path = os.path.join(os.path.dirname(path), name)
        exec(compile(open(source_path).read(), source_path, 'exec'), sys._getframe(1).f_globals)
    return include


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to the
    settings in `namespace` (a script's globals()). Returns {key: value} of every setting."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: v for k, v in namespace.items()
                if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))}
    for arg in argv:
        if not arg.startswith('--'):
            try:
                source = open(arg).read()
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg!r} ({e.strerror}); "
                                  f"config files are paths like config/train_shakespeare_char_wfc.py") from None
            scope = {'include': _includer(arg)}
            exec(compile(source, arg, 'exec'), scope)
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
                    continue
                namespace[key] = _check(key, value, defaults, arg)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"override {arg!r} must look like --key=value")
            value = _parse_value(text)
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # a string setting keeps its text: --out_dir=2024 is '2024'
            namespace[key] = _check(key, value, defaults, arg)
    return {k: namespace[k] for k in defaults}
