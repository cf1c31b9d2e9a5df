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


def test_prepare_defaults_with_umap_at_10k_cells(tmp_path):
    prepared = _prepare_cli(tmp_path, 10_000, 150)
    umap = prepared.obsm["X_umap"]
    assert umap.shape == (prepared.n_obs, 2) and prepared.n_obs > 8192
    assert np.isfinite(umap).all() and umap.std(axis=0).min() > 0
    assert sp.issparse(prepared.X)


@pytest.mark.slow
def test_prepare_cli_defaults_at_20k_cells_2k_genes(tmp_path):
    prepared = _prepare_cli(tmp_path, 20_000, 2_000, subprocess_run=True)
    assert prepared.n_obs > 19_000 and prepared.obsm["X_umap"].shape == (prepared.n_obs, 2)
    assert np.isfinite(prepared.obsm["X_umap"]).all()
    assert int(prepared.var["highly_variable"].sum()) == 2000 or prepared.n_vars <= 2000
