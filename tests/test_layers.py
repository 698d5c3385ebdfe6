"""The package's layers: every import (at module level or inside a function) points down or sideways within
one unit, and no two units import each other. Parsed with ``ast``, so nothing is imported to check it."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = "queryshift"
SRC = os.path.join(os.path.dirname(__file__), "..", "src", PACKAGE)

# unit (a subpackage, or a top-level module) -> layer; a unit may import only units of a lower layer
LAYERS: dict[str, int] = {
    "atomic": 0, "locks": 0, "metrics": 0, "runinfo": 0, "distributed": 0, "userfiles": 0,
    "plainstate": 1,
    "data": 10,
    "modalities": 15,  # what an item of each modality is and how it is batched; reads data's caption cleaning
    "shifts": 20,
    "models": 30,
    "methods": 40,
    "engine": 50,
    "configs": 60,
    "__init__": 65,  # the top-level package: its lazy public API names the engine, methods and models
    "bench": 70, "serve": 70,
    "demo": 80, "commands": 80,
    "cli": 90,
    "__main__": 100,
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
    return PACKAGE if rel == "__init__" else f"{PACKAGE}.{rel.removesuffix('.__init__')}"


def _is_package(module: str) -> bool:
    return os.path.isfile(os.path.join(SRC, *module.split(".")[1:], "__init__.py"))


def _exists(module: str) -> bool:
    parts = module.split(".")[1:]
    return _is_package(module) or os.path.isfile(os.path.join(SRC, *parts) + ".py")


def imports_of(path: str) -> list[tuple[str, int]]:
    """(absolute queryshift module imported, line) for every import statement in the file."""
    module = _module_name(path)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    here = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # ``from .. import methods`` imports the module queryshift.methods, not the package root
            subs = [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")]
            found += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def edges() -> list[tuple[str, str, str, int]]:
    """(importing unit, imported unit, file, line) across units."""
    out = []
    for root, _, files in os.walk(SRC):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                src_unit = unit(_module_name(path))
                for target, line in imports_of(path):
                    dst_unit = unit(target)
                    if dst_unit != src_unit:
                        out.append((src_unit, dst_unit, os.path.relpath(path, SRC), line))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_every_unit_has_a_layer():
    units = {unit(_module_name(os.path.join(r, f))) for r, _, fs in os.walk(SRC) for f in fs if f.endswith(".py")}
    assert sorted(units - set(LAYERS)) == [], "give each new subpackage or top-level module a layer in LAYERS"


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in edges():
        graph.setdefault(a, set()).add(b)
    assert find_cycle(graph) is None, f"import cycle between units: {' -> '.join(find_cycle(graph) or [])}"


def test_no_lower_layer_imports_a_higher_one():
    upward = [f"{path}:{line}: {a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
              for a, b, path, line in edges() if a in LAYERS and b in LAYERS and LAYERS[b] >= LAYERS[a]]
    assert upward == []


def test_the_checks_see_cycles_and_relative_imports(tmp_path):
    assert find_cycle({"data": {"shifts"}, "shifts": {"data"}}) in (["data", "shifts", "data"],
                                                                      ["shifts", "data", "shifts"])
    assert find_cycle({"engine": {"models"}, "models": set()}) is None
    found = dict(imports_of(os.path.join(SRC, "engine", "runner.py")))
    assert "queryshift.methods" in found and "queryshift.engine.config" in found


@pytest.mark.parametrize("module", ["shifts/domain.py", "models/composed.py", "demo.py", "engine/runner.py"])
def test_modules_of_the_issue_import_only_downward(module):
    path = os.path.join(SRC, module)
    me = unit(_module_name(path))
    bad = [t for t, _ in imports_of(path) if unit(t) != me and LAYERS[unit(t)] >= LAYERS[me]]
    assert bad == []


@pytest.mark.parametrize("argv", [["--help"], ["list"], []])
def test_help_and_list_do_not_import_torch(argv):
    """``queryshift --help`` and ``list`` must answer in a fraction of torch's import time
    (benchmarks/cli_startup.py measures it)."""
    import subprocess
    import sys

    code = ("import sys; from queryshift.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in ('torch', 'open_clip', 'transformers', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy, code)")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(os.path.join(SRC, os.pardir))}
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY []"), last
    assert "bench" in done.stdout or argv == ["list"]  # the command list is still shown


def test_the_cli_lists_each_command_with_its_own_help():
    """The top-level help names each command with the help its module gives (the CLI does not import the
    modules to show it, so the two are checked here)."""
    import argparse
    import importlib

    from queryshift import cli

    for name, (module, helptext) in cli.COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"queryshift.commands.{module}").add_parser(sub)
        assert list(sub.choices) == [name]
        assert sub._choices_actions[0].help == helptext, name
