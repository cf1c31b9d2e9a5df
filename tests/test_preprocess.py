import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from statecore.config import DataSpec, QCConfig
from statecore.data.preprocess import choose_hvg_flavor, effective_min_genes, prepare, qc_metrics
from statecore.errors import DataError

SPEC = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
QC = QCConfig(min_genes=0, min_cells=0, n_hvg=50, umap=False)


def test_prepare_counts_contract(synthetic_counts):
    raw = synthetic_counts.X.copy()
    p = prepare(synthetic_counts, spec=SPEC, qc=QC, source="x.h5ad")
    assert (
        synthetic_counts.X != raw
    ).nnz == 0 and "counts" not in synthetic_counts.layers  # caller untouched
    assert sp.isspmatrix_csr(p.X) and p.X.dtype == np.float32
    np.testing.assert_array_equal(p.layers["counts"].toarray(), raw.toarray())
    expected = np.log1p(raw.toarray() / raw.toarray().sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(p.X.toarray(), expected, rtol=1e-4, atol=1e-5)
    assert p.var["highly_variable"].dtype == bool and p.var["highly_variable"].sum() == 50
    assert list(p.obs["perturbation"].cat.categories)[0] == "ctrl"
    meta = p.uns["statecore"]
    assert (
        meta["control"] == "ctrl" and meta["columns"]["context"] == "context" and meta["source"] == "x.h5ad"
    )
    assert meta["qc_report"]["hvg_flavor"] == "seurat_v3" and meta["qc_report"]["input"] == "counts"


def test_qc_filters_report(synthetic_counts):
    m = qc_metrics(synthetic_counts)
    thr = int(np.median(m["n_genes"]))
    kept = synthetic_counts.X[(m["n_genes"] >= thr).to_numpy()]
    per_gene = np.asarray((kept > 0).sum(axis=0)).ravel()
    min_cells = int(np.median(per_gene))
    p = prepare(
        synthetic_counts, spec=SPEC, qc=QC.replace(min_genes=thr, min_cells=min_cells, scale_min_genes=False)
    )
    r = p.uns["statecore"]["qc_report"]
    assert r["cells_removed_min_genes"] == int((m["n_genes"] < thr).sum()) > 0
    assert r["genes_removed_min_cells"] == int((per_gene < min_cells).sum()) > 0
    assert r["genes_out"] == p.n_vars == 120 - r["genes_removed_min_cells"]
    assert r["cells_out"] == p.n_obs


def test_filters_removing_everything_raise(synthetic_counts):
    with pytest.raises(DataError, match="min_genes=1000 would remove all 400 cells"):
        prepare(synthetic_counts, spec=SPEC, qc=QC.replace(min_genes=1000, scale_min_genes=False))
    with pytest.raises(DataError, match="min_cells=5000 would remove all 120 genes"):
        prepare(synthetic_counts, spec=SPEC, qc=QC.replace(min_cells=5000))


def test_min_genes_scaled_on_panels():
    assert effective_min_genes(QCConfig(), 500) == 5
    assert effective_min_genes(QCConfig(), 30000) == 200
    assert effective_min_genes(QCConfig(scale_min_genes=False), 500) == 200


def test_already_log_data_uses_log_flavor(synthetic_counts):
    logged = prepare(synthetic_counts, spec=SPEC, qc=QC)
    logged.layers.clear()
    with pytest.warns(UserWarning, match="log-normalised"):
        p = prepare(logged, spec=SPEC, qc=QC)
    assert "counts" not in p.layers and p.uns["statecore"]["qc_report"]["hvg_flavor"] == "seurat"
    np.testing.assert_allclose(p.X.toarray(), logged.X.toarray())  # not normalised twice
    with pytest.raises(DataError, match="non-integer"):
        prepare(logged, spec=SPEC, qc=QC.replace(hvg_flavor="seurat_v3"))


def test_hvg_flavor_choice():
    assert choose_hvg_flavor("auto", has_counts=True) == "seurat_v3"
    assert choose_hvg_flavor("auto", has_counts=False) == "seurat"
    assert choose_hvg_flavor("cell_ranger", has_counts=True) == "cell_ranger"
    with pytest.raises(DataError, match="needs raw counts"):
        choose_hvg_flavor("seurat_v3", has_counts=False)
    with pytest.raises(DataError, match="unknown HVG flavor"):
        choose_hvg_flavor("best", has_counts=True)


def test_dense_input_missing_columns_and_duplicates(synthetic_counts):
    a = synthetic_counts
    a.X = a.X.toarray()
    a.var_names = ["g"] * 2 + list(a.var_names[2:])
    del a.obs["batch"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = prepare(a, spec=SPEC.replace(batch_col=None), qc=QC.replace(n_hvg=500))
    assert any("duplicate gene names" in str(w.message) for w in caught)
    assert isinstance(p.X, np.ndarray) and p.var_names.is_unique and p.var["highly_variable"].all()
    assert set(p.obs["batch"]) == {"all"}
    with pytest.raises(DataError, match="batch column 'batch' not found"):
        prepare(a, spec=SPEC, qc=QC)


def test_umap_stored(synthetic_counts):
    sub = synthetic_counts[:120].copy()
    p = prepare(sub, spec=SPEC, qc=QC.replace(umap=True))
    assert p.obsm["X_umap"].shape == (120, 2) and np.isfinite(p.obsm["X_umap"]).all()


def test_umap_on_a_subsample_above_the_cap(synthetic_counts):
    # a million cells are embedded through a seeded subsample; the rest carry no coordinates
    sub = synthetic_counts[:120].copy()
    p = prepare(sub, spec=SPEC, qc=QC.replace(umap=True, umap_max_cells=50))
    finite = np.isfinite(p.obsm["X_umap"]).all(axis=1)
    assert finite.sum() == 50 and p.uns["statecore"]["qc_report"]["umap_cells"] == 50
    again = prepare(sub, spec=SPEC, qc=QC.replace(umap=True, umap_max_cells=50))
    np.testing.assert_array_equal(np.isfinite(again.obsm["X_umap"]).all(axis=1), finite)


def _scanpy_seurat_v3(counts, n_top):
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=counts.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_top)
    return tmp.var


@pytest.mark.parametrize("dense", [False, True])
def test_hvg_seurat_v3_matches_scanpy(synthetic_counts, dense, monkeypatch):
    import statecore.data.preprocess as pp

    monkeypatch.setattr(pp, "_CHUNK_NNZ", 997)  # many row chunks, a partial last one
    counts = synthetic_counts.X.astype(np.float32)
    counts = counts.toarray() if dense else counts
    ours, ref = pp.hvg_seurat_v3(counts, 40), _scanpy_seurat_v3(counts, 40)
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
    for col in ("highly_variable_rank", "means", "variances", "variances_norm"):
        assert ours[col].dtype == ref[col].dtype, col
        np.testing.assert_allclose(ours[col].to_numpy(), ref[col].to_numpy(), rtol=1e-12, err_msg=col)


@pytest.mark.parametrize("target_sum", [1e4, None])
def test_log_normalize_equals_scanpy_exactly(synthetic_counts, target_sum, monkeypatch):
    import anndata as ad
    import scanpy as sc

    import statecore.data.preprocess as pp

    monkeypatch.setattr(pp, "_CHUNK_NNZ", 997)
    counts = sp.csr_matrix(synthetic_counts.X.astype(np.float32))
    counts.data[counts.indptr[3] : counts.indptr[4]] = 0  # a cell with zero total stays zero
    before = counts.copy()
    with pytest.warns(UserWarning, match="zero counts"):
        ours = pp._log_normalize(counts, target_sum, log1p=True)
    ref = ad.AnnData(X=counts.copy())
    with pytest.warns(UserWarning, match="zero counts"):
        sc.pp.normalize_total(ref, target_sum=target_sum)
    sc.pp.log1p(ref)
    assert ours.dtype == np.float32 and not np.shares_memory(ours.data, counts.data)
    np.testing.assert_array_equal(ours.toarray(), ref.X.toarray())  # bit for bit, not approximately
    assert (counts != before).nnz == 0


def test_prepare_holds_two_matrices_at_peak(monkeypatch):
    """Peak allocation of prepare on sparse counts: counts + X (2 x the input's size) plus a chunk.

    The former implementation (a full copy, astype copies, a counts copy, scanpy's batch copy) peaked
    at 5.2 x; this bound fails if any whole-matrix temporary comes back.
    """
    import tracemalloc

    import statecore.data.preprocess as pp
    from statecore.data.synthetic import make_perturbation_adata

    a = make_perturbation_adata(n_cells=500, n_genes=2000, n_perturbations=8, contexts=2, seed=0)
    qc = QCConfig(n_hvg=500, umap=False, min_cells=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(a, spec=SPEC, qc=qc)  # imports and numba/loess warm-up outside the measurement
        monkeypatch.setattr(pp, "_CHUNK_NNZ", 10_000)
        size = a.X.data.nbytes + a.X.indices.nbytes + a.X.indptr.nbytes
        tracemalloc.start()
        try:
            p = prepare(a, spec=SPEC, qc=qc)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert 2.0 * size < peak < 2.6 * size, peak / size
    shared = [
        np.shares_memory(x, y)
        for x in (p.X.data, p.X.indices, p.layers["counts"].data)
        for y in (a.X.data, a.X.indices, p.layers["counts"].indices)
    ]
    assert not any(shared)


@pytest.mark.parametrize("dense", [False, True])
def test_library_size_column_normalises_by_the_given_sizes(synthetic_counts, dense):
    adata = synthetic_counts
    if dense:
        adata.X = adata.X.toarray()
    raw = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X)
    sizes = raw.sum(1) * 3.0 + 7.0  # e.g. whole-transcriptome UMIs of a panel
    adata.obs["umis_all"] = sizes
    p = prepare(adata, spec=SPEC, qc=QC.replace(library_size_col="umis_all"))
    dense_of = lambda m: m.toarray() if sp.issparse(m) else np.asarray(m)  # noqa: E731
    assert sp.issparse(p.X) != dense
    np.testing.assert_allclose(dense_of(p.X), np.log1p(raw / sizes[:, None] * 1e4), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(dense_of(p.layers["counts"]), raw)  # counts untouched
    assert p.uns["statecore"]["qc"]["library_size_col"] == "umis_all"
    with pytest.raises(DataError, match="not in the cell metadata"):
        prepare(adata, spec=SPEC, qc=QC.replace(library_size_col="nope"))
    adata.obs.loc[adata.obs_names[3], "umis_all"] = 0.0
    with pytest.raises(DataError, match="1 cell"):
        prepare(adata, spec=SPEC, qc=QC.replace(library_size_col="umis_all"))
