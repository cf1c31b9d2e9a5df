"""The house rules that keep the package readable: checked, not hoped for (docs/CONTRACTS.md, "The house")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "statecore"
MAX_BODY_LINES = 80


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def _body_lines(node) -> int:
    """Lines of a function's body, without its signature and docstring."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if not body:
        return 0
    return node.end_lineno - body[0].lineno + 1


def test_no_package_function_is_longer_than_80_lines():
    long = [
        f"{p.relative_to(PACKAGE.parent)}:{n.lineno} {n.name} ({_body_lines(n)} lines)"
        for p, n in _functions()
        if _body_lines(n) > MAX_BODY_LINES
    ]
    assert not long, long


def test_one_training_loop():
    """Only the engine steps an optimizer over a model (Track B's decoder warm-up pre-fits the decoder alone)."""
    allowed = {"training/engine.py", "embedding/track.py"}
    steppers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"\.backward\(\)", p.read_text())
    )
    assert set(steppers) <= allowed, steppers


def test_stage_folders_show_the_flow():
    expected = {"data", "models", "training", "embedding", "inference", "evaluation", "runs", "cli", "ui"}
    assert expected <= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "config.py", "errors.py"], flat


def test_import_contracts_hold():
    """The layer order and the forbidden imports of pyproject.toml ([tool.importlinter])."""
    importlinter = pytest.importorskip("importlinter.cli")
    assert (
        importlinter.lint_imports(config_filename=str(PACKAGE.parent / "pyproject.toml"), no_cache=True) == 0
    )


def test_walkthrough_names_stay_importable():
    import statecore

    for name in (
        "StateTransitionModel",
        "compute_mmd",
        "StateEmbeddingModel",
        "build_sets",
        "split_underrepresented",
    ):
        assert callable(getattr(statecore, name)), name
    model = statecore.StateTransitionModel(
        num_genes=7,
        hidden_dim=16,
        transformer_heads=2,
        transformer_layers=1,
        mlp_hidden_dim=8,
        perturbation_dim=3,
    )
    import torch

    out = model(torch.rand(2, 5, 7), torch.rand(2, 5, 3))
    assert out.shape == (2, 5, 7)


def test_no_import_cycles():
    """No module reaches itself through imports, counting the ones inside functions."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("statecore")
    cycles = [
        (a, b)
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if a != b and graph.chain_exists(importer=b, imported=a)
    ]
    assert not cycles, cycles[:5]
