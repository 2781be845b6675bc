"""Imports run one way (design.md §6): cli/generation → model → ops/processing → weights/config/device.

A module's top-level imports may only reach its own layer or the layers below it; the one call back up is the
model's `generate`, a lazy delegate inside the method."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mindone_idefics3"
# module (or sub-package) → the package modules its top-level imports must not reach
FORBIDDEN = {
    "model": {"generation", "cli", "convert", "serve", "finetune", "batch", "eval"},
    "ops": {"generation", "cli", "convert", "model", "processing", "serve", "finetune", "batch", "eval"},
    "processing": {"generation", "cli", "convert", "model", "ops", "serve", "finetune", "batch", "eval"},
    "generation": {"cli", "serve", "finetune", "batch", "eval"},
    "finetune": {"cli", "convert", "serve", "batch", "eval"},
    "serve": {"cli", "convert", "model", "ops", "finetune", "batch", "eval"},  # generation.py and processing/ only
}


def top_level_targets(path: Path):
    """The mindone_idefics3 modules imported at the top level of `path` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names = [module + [a.name] for a in node.names] if not node.module else [module]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in names:
            if parts and parts[0] == "mindone_idefics3" and len(parts) > 1:
                yield parts[1]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_top_level_imports_point_down(layer):
    files = sorted((PACKAGE / layer).rglob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]
    assert files
    wrong = {(f.name, target) for f in files for target in top_level_targets(f) if target in FORBIDDEN[layer]}
    assert not wrong, wrong
