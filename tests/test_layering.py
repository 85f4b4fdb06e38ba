"""Imports only point down (DESIGN.md "Layering"): every ``import`` of every module of the
package, including imports inside functions, is parsed with ``ast`` and checked against

    params < io < config < data < ops < moe < comm < models < storage < engine < elastic < bench

with ``inference`` beside ``engine``: it may import everything below ``engine`` but neither
``engine`` nor ``elastic``. ``bench`` serves ``tools/`` only, so nothing in the package imports
it. ``params`` (the parameter tags) sits under ``io`` because checkpoints read them. A module
may always import its own package. A failure lists every offending ``module:line``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "paddle_semoe"

#: Level of each top-level package (or module) of paddle_semoe; an import must go to a lower
#: level (or stay inside its own package).
LEVELS = {
    unit: level
    for level, units in enumerate(
        [("params",), ("io",), ("config",), ("data",), ("ops",), ("moe",), ("comm",), ("models",), ("storage",),
         ("engine", "inference"), ("elastic",), ("bench",)]
    )
    for unit in units
}


def _unit(module: str) -> str | None:
    """The top-level package of a dotted ``paddle_semoe...`` name (None: the root itself)."""
    parts = module.split(".")
    if parts[0] != "paddle_semoe":
        raise ValueError(module)
    return parts[1] if len(parts) > 1 else None


def _module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported(path: Path, package: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every paddle_semoe import in ``path`` (any scope)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path, package)
    is_pkg = path.name == "__init__.py"
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "paddle_semoe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "paddle_semoe":
                continue
            if target == "paddle_semoe":  # from paddle_semoe import ops, config ...
                out += [(node.lineno, f"paddle_semoe.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def _violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package.parent)
        source = _unit(_module_name(path, package))
        if source is None:
            continue  # paddle_semoe/__init__.py sits above everything
        if source not in LEVELS:
            bad.append(f"{where}: package {source!r} has no level in tests/test_layering.py")
            continue
        for line, target in _imported(path, package):
            dest = _unit(target)
            if dest is None or dest == source:
                continue
            if dest not in LEVELS:
                bad.append(f"{where}:{line}: imports {target} (no level)")
            elif LEVELS[dest] >= LEVELS[source]:
                bad.append(
                    f"{where}:{line}: {source} (level {LEVELS[source]}) imports "
                    f"{target} ({dest}, level {LEVELS[dest]}): imports must point down"
                )
    return bad


def test_imports_point_down() -> None:
    bad = _violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_checker_sees_function_level_and_relative_imports(tmp_path) -> None:
    """The checker itself: an upward import hidden inside a function, and a relative one."""
    pkg = tmp_path / "paddle_semoe"
    (pkg / "storage").mkdir(parents=True)
    (pkg / "config").mkdir()
    (pkg / "storage" / "x.py").write_text("def f():\n    from paddle_semoe.engine.config import TrainConfig\n")
    (pkg / "config" / "y.py").write_text("from ..moe import layer\nfrom .schema import to_dict\n")
    bad = _violations(pkg)
    assert bad == [
        "paddle_semoe/config/y.py:1: config (level 2) imports paddle_semoe.moe (moe, level 5): imports must point down",
        "paddle_semoe/storage/x.py:2: storage (level 8) imports paddle_semoe.engine.config (engine, level 9): "
        "imports must point down",
    ]


@pytest.mark.parametrize("unit", sorted(LEVELS))
def test_every_level_names_a_real_package(unit: str) -> None:
    assert (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file(), unit
