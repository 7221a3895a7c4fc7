"""The import order of the pipeline, enforced:

    base (errors, version, files, allocator, paths, presets) < tokenizer < data < model < accel < infer
    < train < serve | export | eval < cli

A module imports only from its own package or from lower layers; packages on the same layer do not
import each other; no module imports a module that imports it back (no cycle); and outside cli/
(which defers imports so `acornlm --help` starts fast) and `acornlm.load`, no acornlm import hides
inside a function, where it could dodge one of these rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "acornlm"
BASE = {"errors", "version", "allocator", "paths", "presets", "files"}
LAYERS = [BASE, {"tokenizer"}, {"data"}, {"model"}, {"accel"}, {"infer"}, {"train"},
          {"serve", "export", "eval"}, {"cli"}, {"__main__"}]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported acornlm module, line, inside a function) of every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]  # a submodule, or a name in one
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "acornlm" or name.startswith("acornlm."):
                found.append((name, node.lineno, node.col_offset > 0))
    return found


def sources() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1].removesuffix(".py") if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in sources()} - {""}
    assert packages <= set(LAYER_OF), f"give these a layer in tests/test_layers.py: {packages - set(LAYER_OF)}"


def test_imports_go_down_the_pipeline():
    known = sources()
    problems = []
    for module, path in known.items():
        source = package_of(module)
        if source == "":  # acornlm/__init__.py: the public entry points, lazily
            continue
        for name, line, _ in imports(path):
            target = package_of(name)
            if target in ("", source):
                continue
            if LAYER_OF[target] > LAYER_OF[source] or (LAYER_OF[target] == LAYER_OF[source] and
                                                      LAYER_OF[source] != 0):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {name}")
    assert not problems, "imports against the pipeline order:\n" + "\n".join(problems)


def test_no_import_cycles():
    known = sources()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = set()
        for name, _, nested in imports(path):
            if nested:
                continue
            target = name if name in known else name.rpartition(".")[0]
            if target in known and target != module:
                targets.add(target)
        graph[module] = targets
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_acornlm_import_hides_in_a_function_outside_the_cli():
    hidden = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
              for module, path in sources().items() if package_of(module) not in ("cli", "__main__", "")
              for name, line, nested in imports(path) if nested]
    assert not hidden, "move these imports to the top of their module:\n" + "\n".join(hidden)
