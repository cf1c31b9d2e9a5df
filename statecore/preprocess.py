"""QC, normalisation and HVG selection (scanpy underneath) into the canonical prepared AnnData.

``prepare`` never touches the caller's object: it works on a copy. Raw counts travel in
``layers["counts"]`` and HVGs are chosen with seurat_v3 on those counts; data that arrive already
log-normalised fall back to a log-based flavor with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.config import DataSpec, QCConfig
from statecore.errors import DataError
from statecore.io import looks_like_counts, looks_log_normalized, validate

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
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        n_genes = np.diff(X.indptr) if X.nnz == np.count_nonzero(X.data) else np.asarray((X > 0).sum(axis=1)).ravel()
        total = np.asarray(X.sum(axis=1)).ravel()
    else:
        X = np.asarray(X)
        n_genes, total = (X > 0).sum(axis=1), X.sum(axis=1)
    return pd.DataFrame({"n_genes": np.asarray(n_genes, dtype=np.int64), "total_counts": np.asarray(total, float)},
                        index=adata.obs_names.copy())


def choose_hvg_flavor(requested: str, has_counts: bool) -> str:
    """seurat_v3 needs raw counts; 'auto' takes it when counts exist, else the log-based 'seurat'."""
    if requested not in HVG_FLAVORS:
        raise DataError(f"unknown HVG flavor {requested!r}; use one of {', '.join(HVG_FLAVORS)}")
    if requested == "auto":
        return "seurat_v3" if has_counts else "seurat"
    if requested == "seurat_v3" and not has_counts:
        raise DataError("HVG flavor seurat_v3 needs raw counts but this data is log-normalised; "
                        "use --hvg-flavor seurat (or auto)")
    return requested


def prepare(adata, *, spec: DataSpec, qc: QCConfig = QCConfig(), source: str = ""):
    """Canonical prepared AnnData (see docs/CONTRACTS.md) as a new object."""
    import scanpy as sc

    counts_src = _counts_source(adata)
    log_input = counts_src is None
    for msg in validate(adata, spec, require_counts=qc.hvg_flavor == "seurat_v3"):
        warnings.warn(msg, stacklevel=2)
    flavor = choose_hvg_flavor(qc.hvg_flavor, has_counts=not log_input)
    if log_input:
        warnings.warn("X looks log-normalised and no raw counts were found: skipping normalize_total/log1p, "
                      f"QC thresholds apply to detected genes, HVG flavor {flavor!r} on log data", stacklevel=2)

    out = adata.copy()
    out.var_names_make_unique()
    out.obs = _canonical_obs(adata.obs, spec)
    if not log_input:
        counts = out.layers[counts_src] if counts_src != "X" else out.X
        counts = counts.astype(np.float32) if sp.issparse(counts) else np.asarray(counts, dtype=np.float32)
        out.X = counts.tocsr() if sp.issparse(counts) else counts
        out.layers["counts"] = out.X.copy()
    for key in [k for k in out.layers if k != "counts"]:
        del out.layers[key]  # stale derived layers (e.g. a shipped log1p) would no longer match the cells

    report = {"cells_in": int(out.n_obs), "genes_in": int(out.n_vars)}
    out = _filter(out, qc, report)
    _check_controls_left(out, spec.control, qc)
    if not log_input:
        sc.pp.normalize_total(out, target_sum=qc.target_sum)
        if qc.log1p:
            sc.pp.log1p(out)
        out.uns.pop("log1p", None)
    out.X = out.X.astype(np.float32) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
    if sp.issparse(out.X):
        out.X = sp.csr_matrix(out.X)

    n_top = int(min(qc.n_hvg, out.n_vars))
    _select_hvg(out, flavor, n_top)
    report.update(hvg_flavor=flavor, n_hvg=int(out.var["highly_variable"].sum()), input="log" if log_input
                  else "counts", cells_out=int(out.n_obs), genes_out=int(out.n_vars))
    if qc.umap:
        _umap(out)
    for key in ("hvg",):
        out.uns.pop(key, None)
    out.uns["statecore"] = {
        "control": spec.control,
        "columns": {"perturbation": spec.pert_col, "context": spec.context_col, "batch": spec.batch_col},
        "spec": spec.to_dict(), "qc": qc.to_dict(), "qc_report": report, "source": str(source or ""),
    }
    return out


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
        "context": obs[spec.context_col].astype(str).to_numpy() if spec.context_col else np.full(len(obs), "all"),
        "batch": obs[spec.batch_col].astype(str).to_numpy() if spec.batch_col else np.full(len(obs), "all"),
    }
    for name, values in canon.items():
        new[name] = pd.Categorical(values)
    # The control first: readers and plots list it before the perturbations.
    cats = [spec.control] + sorted(c for c in new["perturbation"].cat.categories if c != spec.control)
    new["perturbation"] = new["perturbation"].cat.reorder_categories(cats)
    return new


def _filter(out, qc: QCConfig, report: dict):
    metrics = qc_metrics(out)
    min_genes = effective_min_genes(qc, out.n_vars)
    report["min_genes_applied"] = min_genes
    report["min_cells_applied"] = int(qc.min_cells)
    keep_cells = metrics["n_genes"].to_numpy() >= min_genes
    if not keep_cells.any():
        raise DataError(f"min_genes={min_genes} would remove all {out.n_obs} cells (median "
                        f"{int(np.median(metrics['n_genes']))} genes per cell, max {int(metrics['n_genes'].max())}); "
                        "lower --min-genes")
    X = out.layers["counts"] if "counts" in out.layers else out.X
    X = X[keep_cells] if not keep_cells.all() else X  # no copy of X when every cell stays
    if sp.issparse(X):  # detected cells per gene from the stored entries: no boolean copy of the matrix
        X = sp.csr_matrix(X)
        stored = X.data > 0
        cells_per_gene = np.bincount(X.indices[stored], minlength=X.shape[1])
    else:
        cells_per_gene = np.asarray((X > 0).sum(axis=0)).ravel()
    del X
    if not (cells_per_gene >= qc.min_cells).any():
        raise DataError(f"min_cells={qc.min_cells} would remove all {out.n_vars} genes (a gene is detected in at "
                        f"most {int(cells_per_gene.max())} of the {int(keep_cells.sum())} cells kept); "
                        "lower --min-cells")
    keep_genes = cells_per_gene >= qc.min_cells
    report["cells_removed_min_genes"] = int((~keep_cells).sum())
    report["genes_removed_min_cells"] = int((~keep_genes).sum())
    # One subset of cells and genes together (scanpy's filter_cells + filter_genes copied X and every
    # layer twice, the peak memory of prepare at a million cells), and none when nothing is dropped.
    if not keep_cells.all() or not keep_genes.all():
        out = out[keep_cells, keep_genes].copy()
    return out


def _check_controls_left(out, control: str, qc: QCConfig) -> None:
    pert = out.obs["perturbation"].astype(str).to_numpy()
    ctx = out.obs["context"].astype(str).to_numpy()
    is_ctrl = pert == control
    if not is_ctrl.any():
        raise DataError(f"QC (min_genes={effective_min_genes(qc, out.n_vars)}) removed every control cell ({control!r}); lower --min-genes")
    lost = sorted(set(ctx[~is_ctrl]) - set(ctx[is_ctrl]))
    if lost:
        warnings.warn(f"after QC, context(s) {lost} have no control cells left; they cannot be predicted "
                      "(lower --min-genes to keep them)", stacklevel=3)


def _select_hvg(out, flavor: str, n_top: int) -> None:
    import scanpy as sc

    for col in ("highly_variable", "highly_variable_rank", "means", "variances", "variances_norm",
                "dispersions", "dispersions_norm", "highly_variable_nbatches"):
        if col in out.var:
            del out.var[col]
    if n_top >= out.n_vars:
        # Every gene is kept anyway; seurat_v3's loess fit is unstable on very few genes.
        out.var["highly_variable"] = True
        return
    if flavor == "seurat_v3":
        sc.pp.highly_variable_genes(out, flavor="seurat_v3", n_top_genes=n_top, layer="counts")
    else:
        sc.pp.highly_variable_genes(out, flavor=flavor, n_top_genes=n_top)
    out.var["highly_variable"] = out.var["highly_variable"].astype(bool)


def _umap(out) -> None:
    """2-D embedding on the HVGs, stored so pages never recompute it; fixed seeds for reproducibility."""
    import scanpy as sc

    if out.n_obs < 4:
        return
    hv = out[:, out.var["highly_variable"].to_numpy()].copy()
    n_comps = int(max(2, min(50, hv.n_vars - 1, hv.n_obs - 1)))
    sc.pp.pca(hv, n_comps=n_comps, random_state=0)
    sc.pp.neighbors(hv, n_neighbors=int(min(15, hv.n_obs - 1)), random_state=0)
    sc.tl.umap(hv, random_state=0)
    out.obsm["X_umap"] = np.asarray(hv.obsm["X_umap"], dtype=np.float32)
