"""The import rules of docs/architecture.md ("Layers"), checked on the source so a violation fails CI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train.run", "train.benchmark", "eval.run"}
# pipelines/ knows data only: no model, optimizer, runtime, tracking or evaluation code.
DATA_LAYER_FORBIDDEN = {"train", "eval", "accelerate", "wandb", "scripts"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (late imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str) -> list[tuple[str, Path]]:
    return [(f"{package}.{p.stem}", p) for p in sorted((REPO / package).glob("*.py")) if p.stem != "__init__"]


@pytest.mark.parametrize("module, path", _modules("pipelines"), ids=lambda v: str(v))
def test_data_layer_imports_no_upper_layer(module, path):
    bad = sorted(m for m in _imports(path) if m.split(".")[0] in DATA_LAYER_FORBIDDEN)
    assert not bad, f"{module} imports {bad}: pipelines/ may import only the data stack (see docs/architecture.md)"


@pytest.mark.parametrize("module, path", _modules("train") + _modules("eval"), ids=lambda v: str(v))
def test_library_modules_never_import_an_entry_point(module, path):
    if module in ENTRY_POINTS:
        return
    bad = sorted(m for m in _imports(path) if m in ENTRY_POINTS or m.split(".")[0] == "scripts")
    assert not bad, f"{module} imports entry point(s) {bad}; move the shared code into a library module"


def test_the_rules_can_fail(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from train.run import main\n    import wandb\n")
    assert {"train.run", "wandb"} <= _imports(planted)
