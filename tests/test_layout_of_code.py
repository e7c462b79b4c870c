"""The code's layout holds: the repo's modules import one another without a cycle (imports inside
functions count), and every script answers --help with exit code 0."""

import ast
import concurrent.futures
import glob
import os
import subprocess
import sys

import pytest

from conftest import ONE_THREAD, REPO

SCRIPTS = ['train.py', 'sample.py', 'eval.py', 'viz.py', 'compare.py', 'bench.py']


PACKAGES = ('modeling', 'generation', 'plumbing')  # the folders of modules the top-level scripts use


def import_graph(root):
    """{module: the repo modules it imports} for the *.py files in root and in its PACKAGES folders
    (named 'folder.module'), read with ast: every import statement counts, at module level or inside
    a function; `from folder import module` imports folder.module."""
    paths = glob.glob(os.path.join(root, '*.py')) + [p for d in PACKAGES for p in glob.glob(os.path.join(root, d, '*.py'))]
    modules = {os.path.relpath(p, root)[:-3].replace(os.sep, '.'): p for p in paths if not p.endswith('__init__.py')}
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported.update(f'{node.module}.{alias.name}' for alias in node.names)
        graph[name] = sorted(imported & modules.keys() - {name})
    return graph


def find_cycle(graph):
    """A list of modules [a, b, ..., a] that import one another in a circle, or None (depth-first search)."""
    state, path = {}, []  # state: 1 on the current path, 2 finished

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_no_false_one():
    assert find_cycle({'a': ['b'], 'b': ['c'], 'c': ['a'], 'd': ['a']}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'s': ['d', 'p'], 'p': ['d'], 'd': []}) is None  # a diamond is not a cycle
    assert find_cycle({'x': ['y'], 'y': ['x']}) == ['x', 'y', 'x']


def test_the_import_graph_counts_imports_inside_functions(tmp_path):
    (tmp_path / 'first.py').write_text('import second\n')
    (tmp_path / 'second.py').write_text('def late():\n    from first import x\n    import os\n    from plumbing import third\n')
    (tmp_path / 'plumbing').mkdir()
    (tmp_path / 'plumbing' / 'third.py').write_text('from plumbing.fourth import y\n')
    (tmp_path / 'plumbing' / 'fourth.py').write_text('')
    graph = import_graph(str(tmp_path))
    assert graph == {'first': ['second'], 'second': ['first', 'plumbing.third'], 'plumbing.third': ['plumbing.fourth'],
                     'plumbing.fourth': []}
    assert find_cycle(graph) == ['first', 'second', 'first']


def test_the_repo_modules_have_no_import_cycle():
    graph = import_graph(REPO)
    assert graph['generation.decoding'] == [], "decoding.py is the samplers' leaf: it imports no repo module"
    for part in ('modeling.attention', 'modeling.layout', 'modeling.recipe', 'modeling.solver'):
        assert 'model' not in graph[part], f"{part} is a part model.py is built from: it must not import model"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def scripts():
    """The scripts a user runs: the top-level ones, the data preparers, and the research/ and tools/
    files with a __main__ block (research/plan_*.py without one are plans compare.py reads)."""
    found = list(SCRIPTS) + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'data', '*', 'prepare.py')))
    for path in sorted(glob.glob(os.path.join(REPO, 'research', '*.py')) + glob.glob(os.path.join(REPO, 'tools', '*.py'))):
        with open(path) as f:
            if "__name__ == '__main__'" in f.read():
                found.append(os.path.relpath(path, REPO))
    return found


def answers_help(script):
    proc = subprocess.run([sys.executable, script, '--help'], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **ONE_THREAD})
    return script, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_every_script_answers_help():
    found = scripts()
    assert 'research/plan_scale.py' in found and 'tools/vs_nanogpt.py' in found and 'research/plan_walltime.py' not in found
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(answers_help, found))
    failed = [f"{script} (exit {rc}): {output.strip()[-300:]}" for script, rc, output in results if rc != 0]
    assert not failed, '\n'.join(failed)
    silent = [script for script, _, output in results if 'usage' not in output.lower()]
    assert not silent, f"--help printed no usage: {silent}"
