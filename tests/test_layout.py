"""The import graph, as README's file table draws it: the stage scripts on top, then the shared
modules, then model.py (and sampling.py under it) and bpe.py. A module imports only modules below it (so there is no circle),
and never hides an import of ours inside a function: what a file needs is at its top."""

import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bottom first: each module may import only those before it
ORDER = ["configurator", "data.tasks.tasks", "sampling", "model", "bpe", "conversations", "autotune", "losses", "convert",
         "quantize", "common", "posttrain", "webchat"]
SCRIPTS = ["train.py", "sft.py", "reward.py", "grpo.py", "ppo.py", "dpo.py", "sample.py", "bench.py", "report.py",
           "data/tasks/prepare.py", "data/preferences/prepare.py", "data/text/prepare.py",
           "data/tiny_shakespeare/prepare.py"]


def imports_of(path):
    """-> (the modules of ours the file imports at its top, those it imports anywhere else)."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            ours = {n for n in names if n in ORDER}
            (top if node in tree.body else inner).update(ours)
    return top, inner


def test_every_file_is_placed():
    files = {p for p in glob.glob("*.py", root_dir=ROOT)} | {p for p in glob.glob("data/*/*.py", root_dir=ROOT)}
    placed = {m.replace(".", "/") + ".py" for m in ORDER} | set(SCRIPTS)
    assert files == placed, (sorted(files - placed), sorted(placed - files))


@pytest.mark.parametrize("module", ORDER)
def test_a_module_imports_only_what_is_below_it(module):
    top, inner = imports_of(module.replace(".", "/") + ".py")
    below = set(ORDER[: ORDER.index(module)])
    assert top <= below, sorted(top - below)
    assert not inner, sorted(inner)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_hides_an_import_of_ours(script):
    _, inner = imports_of(script)
    assert not inner, sorted(inner)
