"""
Configuration in nanoGPT's style, with its gaps fixed, and the command-line contract every script
shares.

    python train.py config/train_shakespeare_char_wfc.py --batch_size=32 --compile=False
    python train.py --help

A script declares its settings as module globals, then calls `configure(globals())`. Config
files (plain assignments; `include('base.py')` runs another config file first) run in order,
then `--key=value` overrides. A key the script does not declare is an error naming it (with the
closest known key), and so is a value of the wrong type; keys whose default is None accept any
value. `--help` prints every key with its default and the comment beside its declaration.

Errors: a mistake in what the user gave (a setting, a file, a checkpoint, a prompt) raises
UserError; `cli(main)` turns it into one line on stderr and exit code 2, without a traceback.
Anything else is a bug and keeps its traceback.
"""

import argparse
import ast
import difflib
import inspect
import os
import re
import sys
import types


class UserError(Exception):
    """Bad input: reported as one line and exit code 2."""


class ConfigError(UserError, ValueError):
    pass


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        fail(' '.join(str(e).split()))


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that use it (prepare scripts, viz.py): a bad option is one line, exit 2."""

    def error(self, message):
        fail(f"{message} (--help lists the options)")


def output_file(path, option='--out'):
    """Make an output file's folder (a missing one is created) before any work, so a long evaluation
    never ends in a traceback at its last line. Returns path."""
    require(path.strip() and not os.path.isdir(path), f"{option}={path} must name a file, not a folder")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option}={path}: cannot create the folder {folder} ({e.strerror})") from None
    require(os.access(folder, os.W_OK), f"{option}={path}: the folder {folder} is not writable")
    return path


def require(condition, message):
    """Raise ConfigError(message) unless condition: the validation helper of every script."""
    if not condition:
        raise ConfigError(message)


def _check(key, value, defaults, origin):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{origin}: unknown config key '{key}'{hint}; --help lists the keys")
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
        try:
            source = open(source_path).read()
        except OSError as e:
            raise ConfigError(f"{path}: include({name!r}): cannot read {source_path} ({e.strerror})") from None
        exec(compile(source, source_path, 'exec'), sys._getframe(1).f_globals)
    return include


def _run_config_file(path, defaults, namespace):
    try:
        source = open(path).read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r} ({e.strerror}); "
                          f"config files are paths like config/train_shakespeare_char_wfc.py") from None
    scope = {'include': _includer(path)}
    try:
        exec(compile(source, path, 'exec'), scope)
    except UserError:
        raise
    except Exception as e:  # a config file is the user's code: its mistakes are the user's
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    for key, value in scope.items():
        if key.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue
        namespace[key] = _check(key, value, defaults, path)


def comments(*sources):
    """{name: comment} of the declarations `name = value  # comment` (or `name: type = value  # ...`)
    in the given modules, classes or source texts; a comment's continuation lines (a lone '#'
    comment right below) join it."""
    found, last = {}, None
    for source in sources:
        text = source if isinstance(source, str) else inspect.getsource(source)
        for line in text.splitlines():
            m = re.match(r'\s*([A-Za-z_]\w*)\s*(?::\s*\w+\s*)?=[^#]*?#\s?(.*)$', line)
            if m and not line.lstrip().startswith('#'):
                last = m.group(1)
                found[last] = m.group(2).strip()
            elif last and re.match(r'\s{8,}#\s?', line):  # an indented continuation of the last comment
                found[last] += ' ' + line.strip().lstrip('#').strip()
            else:
                last = None
    return found


def help_text(namespace, defaults, sources=()):
    script = os.path.basename(namespace.get('__file__', 'script.py'))
    doc = (namespace.get('__doc__') or '').strip()
    notes = comments(open(namespace['__file__']).read() if '__file__' in namespace else '', *sources)
    lines = [f"usage: python {script} [config files ...] [--key=value ...]", '', doc, '', 'settings (default, meaning):']
    width = max(len(f'--{k}={v!r}') for k, v in defaults.items())
    for key, value in defaults.items():
        lines.append(f"  {f'--{key}={value!r}':{width}s}  {notes.get(key, '')}".rstrip())
    return '\n'.join(lines)


def configure(namespace, argv=None, sources=()):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to the
    settings in `namespace` (a script's globals()). Returns {key: value} of every setting.
    --help / -h prints the settings (with the comments of their declarations in the script and in
    `sources`, e.g. the GPTConfig class) and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: v for k, v in namespace.items()  # settings are lower-case globals; UPPER_CASE ones are constants
                if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str, type(None)))}
    if '--help' in argv or '-h' in argv:
        print(help_text(namespace, defaults, sources))
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--'):
            _run_config_file(arg, defaults, namespace)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:
            raise ConfigError(f"override {arg!r} must look like --key=value")
        value = _parse_value(text)
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = text  # a string setting keeps its text: --out_dir=2024 is '2024'
        namespace[key] = _check(key, value, defaults, arg)
    return {k: namespace[k] for k in defaults}
