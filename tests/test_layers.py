"""The import rule of docs/architecture.md, read from the source: imports go down the layers
only, and no module imports another module's private names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dvsa"

# Each top-level part of dvsa/ and its layer; a part may import its own modules and the parts
# of lower layers, never a part of its own layer or above.
LAYERS = {
    "config": 0, "errors": 0, "boxes": 0, "text": 0, "files": 0, "jsonfile": 0, "runtime": 0,
    "tracking": 0, "viz": 0,
    "data": 1, "models": 1,
    "ingest": 2,
    "inference": 3, "features": 3,
    "evaluation": 4,
    "train": 5,
    "experiments": 6, "tuning": 6,
    "commands": 7, "cli": 7, "demo": 7,
}
BASE = 0   # bottom-level modules may use each other (one job each, no package of their own)
TOP = 7    # entry points (the command line, its commands, the demo) may import anything


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` for every dvsa import, top-level or not."""
    out = []
    me = _module_name(path)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "dvsa" or target.startswith("dvsa."):
                names = [a.name for a in node.names]
                if target == "dvsa":   # `from dvsa import tracking`: each name is a module
                    out += [(node.lineno, f"dvsa.{n}", []) for n in names]
                else:
                    out.append((node.lineno, target, names))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("dvsa.")]
    return out


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {_part(_module_name(p)) for p in _sources()} - {"__init__"}
    assert sorted(parts - set(LAYERS)) == [], "new part of dvsa/: give it a layer here and in docs/architecture.md"


def test_imports_go_down_the_layers():
    wrong = []
    for path in _sources():
        me = _module_name(path)
        src = _part(me)
        if src == "__init__":
            continue
        for line, target, _ in _imports(path):
            dst = _part(target)
            if dst in ("__init__", src):
                continue
            if LAYERS[dst] < LAYERS[src] or LAYERS[src] in (BASE, TOP) and LAYERS[dst] == LAYERS[src]:
                continue
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} (layer {LAYERS[src]}) imports "
                         f"{target} (layer {LAYERS[dst]})")
    assert wrong == []


def test_no_private_names_imported_across_modules():
    wrong = []
    for path in _sources():
        me = _module_name(path)
        for line, target, names in _imports(path):
            package = PACKAGE.parent.joinpath(*target.split("."))
            private = [n for n in names if n.startswith("_") and not n.startswith("__")
                       # a package's private submodule, used inside that package
                       and not ((package / f"{n}.py").is_file() and _part(target) == _part(me))]
            if private and target != me:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {', '.join(private)} from {target}")
    assert wrong == []


@pytest.mark.parametrize("source, check, finding", [
    ("from dvsa.train.loop import run_worker\n", test_imports_go_down_the_layers,
     "models (layer 1) imports dvsa.train.loop (layer 5)"),
    ("from dvsa import evaluation\n", test_imports_go_down_the_layers, "imports dvsa.evaluation"),
    ("from dvsa.data.shards import _private\n", test_no_private_names_imported_across_modules,
     "_private from dvsa.data.shards"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, check, finding):
    """An upward import and a private name taken from another module are reported."""
    fake = tmp_path / "dvsa"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError) as e:
        check()
    assert finding in str(e.value)
