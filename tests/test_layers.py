"""The import graph runs one way, floor by floor:

    methods/  <  bench/ (the core: config, data, models, engine, server, client, transports)  <  evaluators/
              <  reports/  <  entry points (bench/app/, the bench/cli.py and bench/__main__.py shims, benchmarks/)

A module may import its own floor and the floors below it, never one above (every `import`, at the top of a file
or inside a function, is read from the source with ast). A package that loads modules by computed name may only
load its own submodules (the registries: methods/, evaluators/backends/, bench/transports/). No module imports
another module's private (`_name`) attributes.

Run it alone with `python -m pytest -q tests/test_layers.py`, or as `python tests/test_layers.py` (prints every
offending import).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("methods", "bench", "evaluators", "reports", "benchmarks")
ENTRY_POINTS = ("bench.app", "bench.cli", "bench.__main__", "benchmarks")
FLOORS = {"methods": 0, "bench": 1, "evaluators": 2, "reports": 3, "entry": 4}


def floor_of(module: str) -> int:
    if any(module == e or module.startswith(e + ".") for e in ENTRY_POINTS):
        return FLOORS["entry"]
    return FLOORS[module.split(".")[0]]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import statement in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.append((node.lineno, target, names))
            # `from bench import app` imports the module bench.app
            out += [(node.lineno, f"{target}.{n}", []) for n in names if f"{target}.{n}" in ALL]
    return out


def dynamic_loads(path: Path) -> list[tuple[int, str]]:
    """(line, source) of every __import__ / importlib.import_module call."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in ("__import__", "import_module"):
                out.append((node.lineno, ast.unparse(node)))
    return out


ALL = modules()


def upward_imports() -> list[str]:
    bad = []
    for module, path in ALL.items():
        here = floor_of(module)
        for line, target, _ in imports_of(module, path):
            if target.split(".")[0] in PACKAGES and floor_of(target) > here:
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} (floor {here}) imports {target} (floor {floor_of(target)})")
    return bad


def private_imports() -> list[str]:
    bad = []
    for module, path in ALL.items():
        for line, target, names in imports_of(module, path):
            if target.split(".")[0] not in PACKAGES or target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in ALL]
            if private:
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} imports {', '.join(private)} from {target}")
    return bad


def foreign_dynamic_loads() -> list[str]:
    """Computed-name loads outside a registry's own package (what a static reading of the imports cannot see)."""
    registries = ("methods", "evaluators.backends", "bench.transports")
    bad = []
    for module, path in ALL.items():
        for line, src in dynamic_loads(path):
            if module in registries and "{__name__}." in src:
                continue
            if module == "evaluators.sandbox":  # the sandbox pre-imports the standard library before dropping rights
                continue
            bad.append(f"{path.relative_to(REPO)}:{line}: {src}")
    return bad


def test_the_floors_cover_every_module():
    assert "bench.engine" in ALL and "bench.app.cli" in ALL and "evaluators.runner" in ALL
    assert {floor_of(m) for m in ALL} == set(FLOORS.values())
    assert floor_of("bench.app.cli") == floor_of("benchmarks.cli") > floor_of("reports.cli") > floor_of("evaluators.cli") \
        > floor_of("bench.engine") > floor_of("methods.base")


def test_no_module_imports_a_floor_above_its_own():
    assert upward_imports() == []


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def test_modules_are_loaded_by_computed_name_only_inside_a_registry():
    assert foreign_dynamic_loads() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The reader finds a function-local, relative import of the app layer from a core module."""
    core = tmp_path / "bench" / "engine.py"
    core.parent.mkdir()
    core.write_text("def f():\n    from .app.evaluator import evaluator_for\n    from evaluators import runner\n")
    found = [(t, floor_of(t)) for _, t, _ in imports_of("bench.engine", core) if t.split(".")[0] in PACKAGES]
    assert ("bench.app.evaluator", FLOORS["entry"]) in found and ("evaluators", FLOORS["evaluators"]) in found
    assert all(f > floor_of("bench.engine") for _, f in found)


if __name__ == "__main__":
    problems = upward_imports() + private_imports() + foreign_dynamic_loads()
    print("\n".join(problems) or "the import graph runs one way")
    sys.exit(1 if problems else 0)
