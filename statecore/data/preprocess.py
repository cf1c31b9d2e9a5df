"""QC, normalisation and HVG selection into the canonical prepared AnnData, memory-lean at 1M cells.

``prepare`` never touches the caller's object. Raw counts travel in ``layers["counts"]`` and HVGs are
chosen with seurat_v3 on those counts; data that arrive already log-normalised fall back to a
log-based flavor (scanpy) with a warning.

Memory: with sparse counts of Z stored values the result holds two float32 CSR matrices (counts and
X, 8 bytes per value each) beside the caller's input, and nothing larger than a row chunk
(``_CHUNK_NNZ`` values) on top: QC statistics, normalisation, log1p and the seurat_v3 statistics are
computed chunk by chunk on CSR arrays. scanpy's ``normalize_total`` (two temporary arrays of Z
values) and its seurat_v3 (which copies the whole matrix with ``data[batch == b]`` even without
batches) are mirrored here operation by operation, so the output is the one scanpy gives.
"""

from __future__ import annotations

import warnings
from copy import deepcopy

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.config import DataSpec, PerturbedCallConfig, QCConfig
from statecore.data.io import labelled_mask, looks_like_counts, looks_log_normalized, validate
from statecore.errors import DataError

HVG_FLAVORS = ("auto", "seurat_v3", "seurat", "cell_ranger")
FULL_TRANSCRIPTOME = 20_000  # genes: the scale that the min_genes default is meant for


def effective_min_genes(qc: QCConfig, n_genes: int) -> int:
    """min_genes applied to data with ``n_genes`` genes (scaled down on gene panels when asked)."""
    if not qc.scale_min_genes or n_genes >= FULL_TRANSCRIPTOME:
        return int(qc.min_genes)
    return int(np.ceil(qc.min_genes * n_genes / FULL_TRANSCRIPTOME))


def qc_metrics(adata) -> pd.DataFrame:
    """Per cell: genes detected and total counts (from ``layers["counts"]`` when present)."""
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    n_genes, total = _per_cell_stats(X)
    return pd.DataFrame({"n_genes": n_genes, "total_counts": total}, index=adata.obs_names.copy())


def choose_hvg_flavor(requested: str, has_counts: bool) -> str:
    """seurat_v3 needs raw counts; 'auto' takes it when counts exist, else the log-based 'seurat'."""
    if requested not in HVG_FLAVORS:
        raise DataError(f"unknown HVG flavor {requested!r}; use one of {', '.join(HVG_FLAVORS)}")
    if requested == "auto":
        return "seurat_v3" if has_counts else "seurat"
    if requested == "seurat_v3" and not has_counts:
        raise DataError(
            "HVG flavor seurat_v3 needs raw counts but this data is log-normalised; "
            "use --hvg-flavor seurat (or auto)"
        )
    return requested


def prepare(
    adata,
    *,
    spec: DataSpec,
    qc: QCConfig = QCConfig(),
    source: str = "",
    classifier: PerturbedCallConfig = PerturbedCallConfig(),
):
    """Canonical prepared AnnData (see docs/CONTRACTS.md) as a new object.

    ``qc.classify_perturbed``: also call every targeting cell perturbed or not (``classifier``'s settings,
    :mod:`statecore.data.mixscape`) into ``obs["perturbed_call"]`` / ``obs["perturbed_prob"]`` and
    ``uns["statecore"]["perturbed_call"]``; no cell is removed for it."""
    counts_src = _counts_source(adata)
    log_input = counts_src is None
    for msg in validate(adata, spec, require_counts=qc.hvg_flavor == "seurat_v3"):
        warnings.warn(msg, stacklevel=2)
    flavor = choose_hvg_flavor(qc.hvg_flavor, has_counts=not log_input)
    if log_input:
        warnings.warn(
            "X looks log-normalised and no raw counts were found: skipping normalize_total/log1p, "
            f"QC thresholds apply to detected genes, HVG flavor {flavor!r} on log data",
            stacklevel=2,
        )

    # Everything but the matrices is copied; the one matrix prepare needs (counts, or log X) is read
    # in place and copied once, after QC has decided which cells and genes stay.
    out = _skeleton(adata, spec)
    src = adata.layers[counts_src] if counts_src not in (None, "X") else adata.X
    report = {"cells_in": int(out.n_obs), "genes_in": int(out.n_vars)}
    keep_cells, keep_genes = _qc_masks(src, qc, report, labelled_mask(adata.obs, spec))
    if not keep_cells.all() or not keep_genes.all():
        out = out[keep_cells, keep_genes].copy()  # no matrix in it yet: obs, var, obsm... only
        for col in ("perturbation", "context", "batch"):  # e.g. the "nan" of dropped unlabeled cells
            out.obs[col] = out.obs[col].cat.remove_unused_categories()
    _check_controls_left(out, spec.control, report["min_genes_applied"])
    matrix = _owned_float32(src, keep_cells, keep_genes)
    if log_input:
        out.X = matrix
    else:
        out.layers["counts"] = matrix
        sizes = library_sizes(adata.obs, qc.library_size_col, keep_cells)
        out.X = _log_normalize(matrix, qc.target_sum, qc.log1p, totals=sizes)
        out.uns.pop("log1p", None)

    n_top = int(min(qc.n_hvg, out.n_vars))
    _select_hvg(out, flavor, n_top)
    report.update(
        hvg_flavor=flavor,
        n_hvg=int(out.var["highly_variable"].sum()),
        input="log" if log_input else "counts",
        cells_out=int(out.n_obs),
        genes_out=int(out.n_vars),
    )
    if qc.umap:
        report["umap_cells"] = _umap(out, qc.umap_max_cells)
    out.uns.pop("hvg", None)
    out.uns["statecore"] = {
        "control": spec.control,
        "columns": {"perturbation": spec.pert_col, "context": spec.context_col, "batch": spec.batch_col},
        "spec": spec.to_dict(),
        "qc": qc.to_dict(),
        "qc_report": report,
        "source": str(source or ""),
    }
    if qc.classify_perturbed:
        from statecore.data.mixscape import annotate, classify_perturbed

        annotate(out, classify_perturbed(out, control=spec.control, cfg=classifier))
    return out


def hvg_seurat_v3(counts, n_top: int, span: float = 0.3) -> pd.DataFrame:
    """scanpy's ``highly_variable_genes(flavor="seurat_v3")`` without batches, on raw counts, in row chunks.

    Same statistics in the same order of operations as scanpy 1.11 (means, unbiased variances, a
    loess fit of log10 variance on log10 mean, variances of values clipped at mean + sqrt(n) * fitted
    sd); returns its columns highly_variable, highly_variable_rank, means, variances, variances_norm.
    scanpy copies the whole matrix to select its single batch; this never holds more than a chunk.
    """
    from skmisc.loess import loess

    n, n_genes = counts.shape
    total, total_sq = _column_sums(counts)
    mean = total / n
    var = total_sq / n - (total / n) ** 2
    if n != 1:
        var *= n / (n - 1)  # the R convention (unbiased), as scanpy

    not_const = var > 0
    estimat_var = np.zeros(n_genes, dtype=np.float64)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    estimat_var[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10**estimat_var)
    clip_val = reg_std * np.sqrt(n) + mean  # clip large values as Seurat does
    clipped, clipped_sq = _column_sums(counts, clip=clip_val)
    norm_gene_vars = (
        (1 / ((n - 1) * np.square(reg_std))) * ((n * np.square(mean)) + clipped_sq - 2 * clipped * mean)
    ).reshape(1, -1)

    # From here on scanpy's code for the one-batch case, line for line (ranks, ties, NaN handling).
    ranked = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum((ranked < n_top).astype(int), axis=0)
    ranked[ranked >= n_top] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame(
        {
            "means": mean,
            "variances": var,
            "highly_variable_nbatches": nbatches,
            "highly_variable_rank": median_ranked,
            "variances_norm": np.mean(norm_gene_vars, axis=0),
        }
    )
    sort_cols = ["highly_variable_rank", "highly_variable_nbatches"]
    order = df[sort_cols].sort_values(sort_cols, ascending=[True, False], na_position="last").index
    df["highly_variable"] = False
    df.loc[order[: int(n_top)], "highly_variable"] = True
    return df[["highly_variable", "highly_variable_rank", "means", "variances", "variances_norm"]]


def _counts_source(adata) -> str | None:
    """Where raw counts live: a 'counts' layer, else X, else None (log-normalised input)."""
    if "counts" in adata.layers and looks_like_counts(adata.layers["counts"]):
        return "counts"
    if looks_like_counts(adata.X):
        return "X"
    if looks_log_normalized(adata.X):
        return None
    return "X"  # validate() explains what is wrong with these values


def _canonical_obs(obs: pd.DataFrame, spec: DataSpec) -> pd.DataFrame:
    new = obs.copy()
    canon = {
        "perturbation": obs[spec.pert_col].astype(str).to_numpy(),
        "context": obs[spec.context_col].astype(str).to_numpy()
        if spec.context_col
        else np.full(len(obs), "all"),
        "batch": obs[spec.batch_col].astype(str).to_numpy() if spec.batch_col else np.full(len(obs), "all"),
    }
    for name, values in canon.items():
        new[name] = pd.Categorical(values)
    # The control first: readers and plots list it before the perturbations.
    cats = [spec.control] + sorted(c for c in new["perturbation"].cat.categories if c != spec.control)
    new["perturbation"] = new["perturbation"].cat.reorder_categories(cats)
    return new


def _skeleton(adata, spec: DataSpec):
    """``adata.copy()`` without X and layers (what anndata's copy holds besides them), canonical obs."""
    import anndata as ad

    parts = {key: getattr(adata, key).copy() for key in ("var", "obsm", "varm", "obsp", "varp")}
    out = ad.AnnData(
        obs=_canonical_obs(adata.obs, spec),
        uns=deepcopy(dict(adata.uns)),
        **parts,
        raw=adata.raw.copy() if adata.raw is not None else None,
    )
    out.var_names_make_unique()
    out.obs_names_make_unique()  # check() warned about duplicate cell ids
    return out


def _qc_masks(X, qc: QCConfig, report: dict, labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labelled cells kept by min_genes and, among them, genes kept by min_cells (one subset of both, later)."""
    n_cells, n_vars = X.shape
    n_genes, _ = _per_cell_stats(X)
    min_genes = effective_min_genes(qc, n_vars)
    report["min_genes_applied"] = min_genes
    report["min_cells_applied"] = int(qc.min_cells)
    report["cells_removed_unlabeled"] = int((~labelled).sum())
    keep_cells = (n_genes >= min_genes) & labelled
    if not keep_cells.any():
        raise DataError(
            f"min_genes={min_genes} would remove all {n_cells} cells (median "
            f"{int(np.median(n_genes))} genes per cell, max {int(n_genes.max())}); lower --min-genes"
        )
    cells_per_gene = _cells_per_gene(X, keep_cells)
    if not (cells_per_gene >= qc.min_cells).any():
        raise DataError(
            f"min_cells={qc.min_cells} would remove all {n_vars} genes (a gene is detected in at "
            f"most {int(cells_per_gene.max())} of the {int(keep_cells.sum())} cells kept); "
            "lower --min-cells"
        )
    keep_genes = cells_per_gene >= qc.min_cells
    report["cells_removed_min_genes"] = int((labelled & (n_genes < min_genes)).sum())
    report["genes_removed_min_cells"] = int((~keep_genes).sum())
    return keep_cells, keep_genes


def _check_controls_left(out, control: str, min_genes: int) -> None:
    pert = out.obs["perturbation"].astype(str).to_numpy()
    ctx = out.obs["context"].astype(str).to_numpy()
    is_ctrl = pert == control
    if not is_ctrl.any():
        raise DataError(
            f"QC (min_genes={min_genes}) removed every control cell ({control!r}); lower --min-genes"
        )
    lost = sorted(set(ctx[~is_ctrl]) - set(ctx[is_ctrl]))
    if lost:
        warnings.warn(
            f"after QC, context(s) {lost} have no control cells left; they cannot be predicted "
            "(lower --min-genes to keep them)",
            stacklevel=3,
        )


def _select_hvg(out, flavor: str, n_top: int) -> None:
    import scanpy as sc

    for col in (
        "highly_variable",
        "highly_variable_rank",
        "means",
        "variances",
        "variances_norm",
        "dispersions",
        "dispersions_norm",
        "highly_variable_nbatches",
    ):
        if col in out.var:
            del out.var[col]
    if n_top >= out.n_vars:
        # Every gene is kept anyway; seurat_v3's loess fit is unstable on very few genes.
        out.var["highly_variable"] = True
        return
    if flavor == "seurat_v3":
        stats = hvg_seurat_v3(out.layers["counts"], n_top)
        for col in stats.columns:
            out.var[col] = stats[col].to_numpy()
    else:
        sc.pp.highly_variable_genes(out, flavor=flavor, n_top_genes=n_top)
    out.var["highly_variable"] = out.var["highly_variable"].astype(bool)


# --- chunked kernels over CSR (or dense) rows: temporaries never exceed one chunk -----------------

_CHUNK_NNZ = 4_000_000  # stored values per chunk (16-32 MB of temporaries)


def _row_chunks(X):
    """(r0, r1) row ranges holding about ``_CHUNK_NNZ`` stored values each (at least one row)."""
    n = X.shape[0]
    if not sp.issparse(X):
        step = max(1, _CHUNK_NNZ // max(1, X.shape[1]))
        yield from ((r, min(n, r + step)) for r in range(0, n, step))
        return
    indptr, r0 = X.indptr, 0
    while r0 < n:
        r1 = int(np.searchsorted(indptr, indptr[r0] + _CHUNK_NNZ, side="right")) - 1
        r1 = min(n, max(r1, r0 + 1))
        yield r0, r1
        r0 = r1


def _csr_chunk(X, r0: int, r1: int):
    """Views of the stored values and column indices of rows r0:r1, and each value's local row."""
    p0, p1 = X.indptr[r0], X.indptr[r1]
    rows = np.repeat(np.arange(r1 - r0), np.diff(X.indptr[r0 : r1 + 1]))
    return X.data[p0:p1], X.indices[p0:p1], rows


def _as_csr_or_dense(X):
    if sp.issparse(X):
        return X if X.format == "csr" else sp.csr_matrix(X)  # CSC: one converted copy, as scanpy makes
    return np.asarray(X)


def _per_cell_stats(X) -> tuple[np.ndarray, np.ndarray]:
    """Genes detected (value > 0) and total counts per cell (float64), chunk by chunk."""
    X = _as_csr_or_dense(X)
    n = X.shape[0]
    n_genes, total = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float64)
    for r0, r1 in _row_chunks(X):
        if sp.issparse(X):
            data, _, rows = _csr_chunk(X, r0, r1)
            n_genes[r0:r1] = np.bincount(rows[data > 0], minlength=r1 - r0)
            total[r0:r1] = np.bincount(rows, weights=data, minlength=r1 - r0)
        else:
            n_genes[r0:r1] = (X[r0:r1] > 0).sum(axis=1)
            total[r0:r1] = X[r0:r1].sum(axis=1, dtype=np.float64)
    return n_genes, total


def _cells_per_gene(X, keep_cells: np.ndarray) -> np.ndarray:
    """Per gene, the kept cells where it is detected (value > 0)."""
    X = _as_csr_or_dense(X)
    out = np.zeros(X.shape[1], dtype=np.int64)
    for r0, r1 in _row_chunks(X):
        if sp.issparse(X):
            data, indices, rows = _csr_chunk(X, r0, r1)
            out += np.bincount(indices[(data > 0) & keep_cells[r0:r1][rows]], minlength=X.shape[1])
        else:
            out += (X[r0:r1][keep_cells[r0:r1]] > 0).sum(axis=0)
    return out


def _owned_float32(X, keep_cells: np.ndarray, keep_genes: np.ndarray):
    """float32 (CSR when sparse) copy of X restricted to the kept cells and genes, sharing no memory with X."""
    sparse = sp.issparse(X)
    out = sp.csr_matrix(X) if sparse else np.asarray(X)
    if not keep_cells.all():
        out = out[keep_cells]
    if not keep_genes.all():
        out = out[:, keep_genes]
    out = out.astype(np.float32, copy=False)
    if sparse:
        src_arrays = [getattr(X, a) for a in ("data", "indices", "indptr") if hasattr(X, a)]
        shares = any(
            np.may_share_memory(a, b) for a in (out.data, out.indices, out.indptr) for b in src_arrays
        )
    else:
        shares = np.may_share_memory(out, X)
    return out.copy() if shares else out


def library_sizes(obs: pd.DataFrame, column: str | None, keep_cells: np.ndarray) -> np.ndarray | None:
    """The kept cells' library sizes from ``obs[column]`` (None: use the counts' own totals)."""
    if column is None:
        return None
    if column not in obs.columns:
        raise DataError(
            f"library size column {column!r} is not in the cell metadata; choose one of "
            f"{sorted(map(str, obs.columns))[:20]} or leave --library-size-col out"
        )
    values = pd.to_numeric(obs[column], errors="coerce").to_numpy(dtype=np.float64)[keep_cells]
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise DataError(
            f"library size column {column!r} has {int(bad.sum())} cell(s) without a positive number; "
            "fix those values or leave --library-size-col out"
        )
    return values


def _log_normalize(counts, target_sum: float | None, log1p: bool, totals: np.ndarray | None = None):
    """scanpy's normalize_total(target_sum) then log1p, into a new matrix (counts is not modified).

    CSR: the same float32 operations as scanpy (per-cell totals summed in float64 and stored as
    float32, scale = total / target_sum, zero totals left unscaled, data / scale, log1p), row chunk by
    row chunk into one new data array. Dense input goes through scanpy itself. ``totals``: each cell's
    library size given from outside (``QCConfig.library_size_col``) instead of its summed counts.
    """
    import scanpy as sc

    if totals is not None and not sp.issparse(counts):  # the CSR path below, dense again afterwards
        return _log_normalize(sp.csr_matrix(counts), target_sum, log1p, totals).toarray()
    if not sp.issparse(counts):
        import anndata as ad

        tmp = ad.AnnData(X=counts.copy())
        sc.pp.normalize_total(tmp, target_sum=target_sum)
        if log1p:
            sc.pp.log1p(tmp)
        return tmp.X
    total = (_per_cell_stats(counts)[1] if totals is None else totals).astype(counts.dtype)
    scale = total / (np.median(total) if target_sum is None else target_sum)
    scale = scale + (scale == 0)
    if not np.all(total > 0):
        warnings.warn("Some cells have zero counts", UserWarning, stacklevel=3)
    data = np.empty_like(counts.data)
    for r0, r1 in _row_chunks(counts):
        p0, p1 = counts.indptr[r0], counts.indptr[r1]
        np.divide(
            counts.data[p0:p1], np.repeat(scale[r0:r1], np.diff(counts.indptr[r0 : r1 + 1])), out=data[p0:p1]
        )
        if log1p:
            np.log1p(data[p0:p1], out=data[p0:p1])
    return sp.csr_matrix((data, counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)


def _column_sums(X, clip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per gene: sum and sum of squares (float64), of values clipped at ``clip`` when given.

    Unclipped squares are taken in the data's dtype before summing, as scanpy's mean/var kernel does.
    """
    X = _as_csr_or_dense(X)
    n_genes = X.shape[1]
    s1, s2 = np.zeros(n_genes), np.zeros(n_genes)
    for r0, r1 in _row_chunks(X):
        if sp.issparse(X):
            p0, p1 = X.indptr[r0], X.indptr[r1]
            data, idx = X.data[p0:p1], X.indices[p0:p1]
            if clip is not None:
                data = np.minimum(data.astype(np.float64), clip[idx])
            s1 += np.bincount(idx, weights=data, minlength=n_genes)
            s2 += np.bincount(idx, weights=data * data, minlength=n_genes)
        else:
            block = X[r0:r1]
            if clip is not None:
                block = np.minimum(block.astype(np.float64), clip)
            s1 += block.sum(axis=0, dtype=np.float64)
            s2 += (block * block).sum(axis=0, dtype=np.float64)
    return s1, s2


def _umap(out, max_cells: int = 100_000) -> int:
    """2-D embedding on the HVGs, stored so pages never recompute it; fixed seeds for reproducibility.

    Above ``max_cells`` cells the embedding is fitted on a seeded random subsample of ``max_cells``
    cells and the others get NaN coordinates: a 2-D picture of a million cells is no clearer than
    one of 100,000, and the kNN graph and layout would cost tens of GB and hours on a laptop.
    Returns the number of cells embedded.
    """
    import scanpy as sc

    if out.n_obs < 4:
        return 0
    hvg = out.var["highly_variable"].to_numpy()
    if out.n_obs > max_cells > 3:
        rows = np.sort(np.random.default_rng(0).choice(out.n_obs, size=max_cells, replace=False))
        X = out.X[rows][:, hvg]
    else:
        rows = np.arange(out.n_obs)
        X = out.X[:, hvg]
    hv = ad.AnnData(X=X if sp.issparse(X) else np.asarray(X))
    n_comps = int(max(2, min(50, hv.n_vars - 1, hv.n_obs - 1)))
    sc.pp.pca(hv, n_comps=n_comps, random_state=0)
    n_neighbors = int(min(15, hv.n_obs - 1))
    sc.pp.neighbors(
        hv, n_neighbors=n_neighbors, random_state=0, transformer=_knn_transformer(hv.n_obs, n_neighbors)
    )
    sc.tl.umap(hv, random_state=0)
    coords = np.full((out.n_obs, 2), np.nan, dtype=np.float32)
    coords[rows] = np.asarray(hv.obsm["X_umap"], dtype=np.float32)
    out.obsm["X_umap"] = coords
    return int(len(rows))


# scanpy switches from an exact kNN to pynndescent at this many cells (scanpy.neighbors, "legacy logic").
_SCANPY_EXACT_KNN_BELOW = 8192
# up to this many cells statecore keeps the exact kNN (scanpy's own brute-force "sklearn" transformer)
_EXACT_KNN_UP_TO = 200_000


def _knn_transformer(n_obs: int, n_neighbors: int):
    """The kNN transformer for the stored UMAP: None (scanpy's default) below 8,192 cells, scanpy's exact
    brute-force kNN (``"sklearn"``) up to 200,000 cells, pynndescent made to return a ``csr_matrix`` above.

    Why not scanpy's own choice from 8,192 cells on: pynndescent 0.7 returns a ``csr_array``, and scanpy
    1.11 reads its neighbours with ``getnnz``, which scipy's sparse arrays no longer have, so
    ``sc.pp.neighbors`` failed with AttributeError there. And on the 50 PCs the UMAP uses, the exact kNN
    is cheaper than pynndescent up to ~10^5 cells: pynndescent compiles its numba kernels in every new
    process (about 40 CPU-seconds here), while brute force over 10,000 cells takes about one. With the
    UMAP fitted on at most ``QCConfig.umap_max_cells`` (100,000) cells, the exact kNN is the default path.
    Above 200,000 cells (a raised cap) pynndescent gets scanpy's own parameters (those of umap's
    ``nearest_neighbors``), so the graph is the one scanpy would build.
    """
    if n_obs < _SCANPY_EXACT_KNN_BELOW:
        return None
    if n_obs <= _EXACT_KNN_UP_TO:
        return "sklearn"
    import scanpy as sc
    from pynndescent import PyNNDescentTransformer

    class _CsrMatrixNNDescent(PyNNDescentTransformer):
        def transform(self, X, y=None):
            return sp.csr_matrix(super().transform(X, y))

    return _CsrMatrixNNDescent(
        n_neighbors=n_neighbors,
        metric="euclidean",
        metric_kwds={},
        random_state=0,
        n_jobs=sc.settings.n_jobs,
        n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n_obs))),
    )
