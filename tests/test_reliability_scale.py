"""The default ``prepare`` (UMAP included) on data of realistic size.

scanpy 1.11 leaves its exact kNN for pynndescent at 8,192 cells, and pynndescent 0.7 hands back a
scipy ``csr_array`` that scanpy reads with ``getnnz`` (gone from scipy's sparse arrays): the stored
UMAP crashed ``prepare`` on any dataset above ~8k cells.
"""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from statecore.cli import main
from statecore.data.synthetic import make_perturbation_adata


def _prepare_cli(tmp_path, n_cells: int, n_genes: int, *, subprocess_run: bool = False):
    raw = make_perturbation_adata(
        n_cells=n_cells, n_genes=n_genes, n_perturbations=20, contexts=("c0", "c1"), seed=0
    )
    src, out = tmp_path / "raw.h5ad", tmp_path / "prepared.h5ad"
    raw.write_h5ad(src)
    if subprocess_run:
        proc = subprocess.run(
            [sys.executable, "-m", "statecore", "prepare", str(src), "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=3000,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    else:
        assert main(["prepare", str(src), "-o", str(out)]) == 0
    return ad.read_h5ad(out)


def test_knn_transformer_is_scanpys_default_below_8192_cells():
    from statecore.data.preprocess import _knn_transformer

    assert _knn_transformer(8191, 15) is None  # small data: scanpy's exact kNN, results unchanged
    assert _knn_transformer(10_000, 15) == "sklearn"  # the same exact kNN, asked for explicitly
    big = _knn_transformer(300_000, 15)
    assert big.get_params()["n_neighbors"] == 15
    assert big.get_params()["n_trees"] == min(64, 5 + round(300_000**0.5 / 20.0))


def _cli(*args: str, timeout: int = 3000) -> str:
    """One real ``python -m statecore`` process; returns its stdout (fails on a non-zero exit)."""
    proc = subprocess.run(
        [sys.executable, "-m", "statecore", *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (args[0], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    return proc.stdout


def _every_entry_point(prepared_path, tmp_path, *, steps: int, embed: bool) -> None:
    """train -> predict (streamed) -> predict --split test -> evaluate --run-dir -> screen [-> embed fit and
    transform], each as a real process on the prepared file at hand."""
    run = tmp_path / "run"
    _cli("train", "--data", str(prepared_path), "--run-dir", str(run), "--context", "c1", "--task",
         "underrepresented", "--steps", str(steps), "--set-size", "32", "--batch-size", "4", "--quiet")  # fmt: skip
    pred = tmp_path / "pred.h5ad"
    _cli(
        "predict",
        "--run-dir",
        str(run),
        "--context",
        "c1",
        "--perturbation",
        "P000,P001+P002",
        "-o",
        str(pred),
    )
    p = ad.read_h5ad(pred, backed="r")
    assert p.n_vars > 0 and int(p.obs["predicted"].sum()) > 0 and np.isfinite(p.X[:50]).all()
    _cli("predict", "--run-dir", str(run), "--split", "test", "-o", str(tmp_path / "split.h5ad"))
    out = _cli("evaluate", "--run-dir", str(run), "--no-scale")
    assert "pearson" in out.lower()
    _cli("screen", "--run-dir", str(run), "--context", "c1", "--n-cells", "32", "-o", str(tmp_path / "s.csv"))
    assert (tmp_path / "s.csv").read_text().count("\n") >= 20  # every perturbation ranked
    if embed:
        se = tmp_path / "se"
        _cli(
            "embed",
            "fit",
            "--data",
            str(prepared_path),
            "--run-dir",
            str(se),
            "--steps",
            "5",
            "--batch-size",
            "16",
        )
        emb = tmp_path / "emb.h5ad"
        _cli("embed", "transform", "--run-dir", str(se), "--data", str(prepared_path), "-o", str(emb))
        e = ad.read_h5ad(emb, backed="r")
        assert e.obsm["X_state"].shape[0] == e.n_obs and np.isfinite(e.obsm["X_state"][:100]).all()


def test_every_entry_point_at_10k_cells(tmp_path):
    """The default suite's realistic size: 10,000 cells through prepare (defaults, UMAP) and every
    later CLI step."""
    prepared = _prepare_cli(tmp_path, 10_000, 150)
    umap = prepared.obsm["X_umap"]
    assert umap.shape == (prepared.n_obs, 2) and prepared.n_obs > 8192
    assert np.isfinite(umap).all() and umap.std(axis=0).min() > 0
    assert sp.issparse(prepared.X)
    _every_entry_point(tmp_path / "prepared.h5ad", tmp_path, steps=5, embed=False)


@pytest.mark.slow
def test_every_entry_point_at_20k_cells_2k_genes(tmp_path):
    """≥ 20,000 cells x ≥ 2,000 genes through prepare (defaults, UMAP), train, predict, evaluate, screen
    and the State Embedding fit + transform, each a real process (the app's pages run the same code:
    tests/test_app_pages.py)."""
    prepared = _prepare_cli(tmp_path, 20_000, 2_000, subprocess_run=True)
    assert prepared.n_obs > 19_000 and np.isfinite(prepared.obsm["X_umap"]).all()
    assert int(prepared.var["highly_variable"].sum()) == min(2000, prepared.n_vars)
    _every_entry_point(tmp_path / "prepared.h5ad", tmp_path, steps=20, embed=True)
