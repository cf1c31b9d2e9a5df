"""Data in: read .h5ad / MTX bundles, detect the column mapping, validate with clear messages.

Nothing here writes to the input: h5ad files are read into memory, bundles are parsed read-only.
Every problem is a sentence naming the bad value and the fix, so the CLI and the app can show it as is.
"""

from __future__ import annotations

import difflib
import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.config import DataSpec
from statecore.errors import DataError

PERT_COLUMNS = (
    "perturbation",
    "target_gene",
    "gene",
    "condition",
    "guide_target",
    "gene_target",
    "target",
    "perturbation_name",
    "pert",
    "guide_identity",
    "sgrna_target",
    "treatment",
    "drug",
    "compound",
)
CONTEXT_COLUMNS = (
    "context",
    "cell_type",
    "celltype",
    "cell_line",
    "cellline",
    "cell_line_name",
    "cell_type_name",
    "cell_context",
    "tissue",
    "cluster",
)
BATCH_COLUMNS = (
    "batch",
    "gem_group",
    "gemgroup",
    "lane",
    "library",
    "library_id",
    "replicate",
    "plate",
    "sample",
    "donor",
)
CONTROL_LABELS = (
    "ctrl",
    "control",
    "non-targeting",
    "non_targeting",
    "nontargeting",
    "nt",
    "dmso",
    "vehicle",
    "untreated",
    "unperturbed",
    "negative_control",
    "neg_ctrl",
    "safe-targeting",
    "scrambled",
    "none",
)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass
class ValidationReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def control_label(adata) -> str:
    """The control label of prepared (``uns["statecore"]``), synthetic or sample data."""
    uns = adata.uns
    for key in ("statecore", "synthetic"):
        if key in uns and "control" in uns[key]:
            return str(uns[key]["control"])
    if "control_label" in uns:
        return str(uns["control_label"])
    raise DataError(
        "no control label recorded in this data (uns['statecore']['control']); "
        "run `python -m statecore prepare` or pass --control"
    )


# ----------------------------------------------------------------------------------------------- read
def read_data(path, *, metadata=None, cell_id_col: str | None = None):
    """Read ``.h5ad`` or an MTX bundle (directory or ``matrix.mtx[.gz]``) into AnnData.

    ``metadata``: CSV with one row per cell, joined on ``cell_id_col`` (default: the column whose
    values match the cell ids best, else the first column).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {str(path)!r}; check the path")
    if path.is_dir() or _is_mtx_name(path.name):
        adata = _read_mtx_bundle(path)
    elif path.name.endswith(".h5ad"):
        adata = _read_h5ad(path)
    else:
        raise DataError(
            f"{path.name!r} is not a supported file type; give an .h5ad file or an MTX bundle "
            "(a folder with matrix.mtx[.gz], barcodes.tsv[.gz] and genes.tsv/features.tsv[.gz])"
        )
    if metadata is not None:
        adata = _join_metadata(adata, Path(metadata), cell_id_col)
    return adata


def _is_mtx_name(name: str) -> bool:
    return name.endswith(".mtx") or name.endswith(".mtx.gz")


def _read_h5ad(path: Path):
    import anndata as ad

    with open(path, "rb") as fh:
        head = fh.read(8)
    if head != _HDF5_MAGIC:
        raise DataError(
            f"{path.name!r} is not an HDF5/.h5ad file (wrong file type or renamed file); "
            "export it with AnnData.write_h5ad"
        )
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise DataError(
            f"cannot read {path.name!r}: the file is truncated or damaged ({type(exc).__name__}: "
            f"{exc}); copy it again or re-export it"
        ) from exc


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for cand in (folder / name, folder / f"{name}.gz"):
            if cand.exists():
                return cand
    return None


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        with _open_text(path) as fh:
            return pd.read_csv(fh, sep="\t", header=None, dtype=str, comment=None)
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read {path.name!r}: {exc}; the file is damaged or not tab-separated"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path.name!r} is empty; it must list one entry per line") from exc


def _read_mtx_bundle(path: Path):
    import anndata as ad
    import scipy.io

    folder = path if path.is_dir() else path.parent
    mtx = path if not path.is_dir() else _find(folder, ("matrix.mtx",))
    if mtx is None:
        raise DataError(f"no matrix.mtx or matrix.mtx.gz in {str(folder)!r}; an MTX bundle needs it")
    barcodes = _find(folder, ("barcodes.tsv",))
    genes = _find(folder, ("features.tsv", "genes.tsv"))
    if barcodes is None or genes is None:
        missing = [
            n
            for n, p in (("barcodes.tsv[.gz]", barcodes), ("features.tsv or genes.tsv[.gz]", genes))
            if p is None
        ]
        raise DataError(f"MTX bundle {str(folder)!r} lacks {' and '.join(missing)}; put it beside {mtx.name}")
    try:
        with gzip.open(mtx, "rb") if mtx.name.endswith(".gz") else open(mtx, "rb") as fh:
            matrix = scipy.io.mmread(fh)
    except (OSError, EOFError, ValueError, IndexError) as exc:
        raise DataError(
            f"cannot read {mtx.name!r}: the file is truncated or not Matrix Market ({exc}); copy it again"
        ) from exc
    matrix = sp.csr_matrix(matrix)
    bc = _read_tsv(barcodes).iloc[:, 0].astype(str).to_numpy()
    gdf = _read_tsv(genes)
    n_bc, n_genes = bc.size, len(gdf)
    rows, cols = matrix.shape
    if (rows, cols) == (n_genes, n_bc):
        matrix = matrix.T.tocsr()  # 10x layout: genes x cells
    elif (rows, cols) != (n_bc, n_genes):
        raise DataError(
            f"{mtx.name} is {rows} x {cols} but the bundle lists {n_bc} barcodes and {n_genes} genes; "
            "the matrix must be genes x barcodes or barcodes x genes; use the files of one sample"
        )
    var = pd.DataFrame(index=pd.Index(gdf.iloc[:, 1] if gdf.shape[1] >= 2 else gdf.iloc[:, 0], dtype=str))
    var["gene_ids"] = gdf.iloc[:, 0].to_numpy()
    if gdf.shape[1] >= 3:
        var["feature_types"] = gdf.iloc[:, 2].to_numpy()
    var.index.name = None
    obs = pd.DataFrame(index=pd.Index(bc))
    return ad.AnnData(X=matrix.astype(np.float32), obs=obs, var=var)


def _join_metadata(adata, metadata: Path, cell_id_col: str | None):
    if not metadata.exists():
        raise DataError(f"metadata file not found: {str(metadata)!r}")
    try:
        meta = pd.read_csv(metadata, dtype=str, sep=None, engine="python")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read metadata {metadata.name!r} as CSV: {exc}") from exc
    ids = pd.Index(adata.obs_names.astype(str))
    if cell_id_col is None:
        overlap = {c: ids.isin(meta[c]).sum() for c in meta.columns}
        cell_id_col = max(overlap, key=overlap.get) if overlap else None
        if cell_id_col is None or overlap[cell_id_col] == 0:
            raise DataError(
                f"no column of {metadata.name!r} holds the cell ids (e.g. {ids[0]!r}); "
                "pass the cell id column with --cell-id-col"
            )
    if cell_id_col not in meta.columns:
        raise DataError(f"column {cell_id_col!r} not in {metadata.name!r}; columns: {list(meta.columns)}")
    if meta[cell_id_col].duplicated().any():
        dup = meta.loc[meta[cell_id_col].duplicated(), cell_id_col].iloc[0]
        raise DataError(f"metadata column {cell_id_col!r} repeats cell id {dup!r}; each cell needs one row")
    meta = meta.set_index(cell_id_col)
    missing = ~ids.isin(meta.index)
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} of {ids.size} cells (e.g. {ids[missing][0]!r}) have no row in "
            f"{metadata.name!r} (joined on {cell_id_col!r}); check the cell id column"
        )
    adata = adata.copy()
    for col in meta.columns:
        adata.obs[col] = meta.loc[ids, col].to_numpy()
    return adata


# ------------------------------------------------------------------------------------------- detect
def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _pick_column(obs: pd.DataFrame, candidates: tuple[str, ...], exclude: set[str]) -> str | None:
    by_norm = {}
    for col in obs.columns:
        by_norm.setdefault(_norm(col), col)
    for cand in candidates:
        col = by_norm.get(_norm(cand))
        if col is not None and col not in exclude:
            return col
    return None


def _control_in(values: pd.Series) -> str | None:
    labels = pd.Index(values.dropna().astype(str).unique())
    lower = {str(v).lower(): v for v in labels}
    for cand in CONTROL_LABELS:
        if cand in lower:
            return str(lower[cand])
    for v in labels:  # e.g. "non-targeting_2", "NT_guide", "control_1"
        if re.match(r"^(ctrl|control|non[-_ ]?targeting|nt)([-_ ].*)?$", str(v), flags=re.I):
            return str(v)
    return None


def detect_spec(adata) -> DataSpec:
    """Suggest the perturbation, context and batch columns and the control label from common names.

    Among candidate perturbation columns the first that holds a control-like label wins, so that
    e.g. ``condition`` = stimulated/control is not taken over a ``gene`` column with ``non-targeting``.
    """
    obs = adata.obs
    recorded = str(adata.uns.get("control_label", "")) if "control_label" in adata.uns else ""
    pert_col, control = None, None
    for cand in PERT_COLUMNS:
        col = _pick_column(obs, (cand,), set())
        if col is None:
            continue
        values = obs[col].astype(str)
        ctrl = recorded if recorded and (values == recorded).any() else _control_in(obs[col])
        if ctrl is not None:
            pert_col, control = col, ctrl
            break
        if pert_col is None:
            pert_col = col
    pert_col = pert_col or "perturbation"
    context_col = _pick_column(obs, CONTEXT_COLUMNS, {pert_col})
    batch_col = _pick_column(obs, BATCH_COLUMNS, {pert_col, context_col or ""})
    return DataSpec(
        pert_col=pert_col, control=control or "ctrl", context_col=context_col, batch_col=batch_col
    )


# ----------------------------------------------------------------------------------------- validate
def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _values(X) -> np.ndarray:
    """The stored values of X (sparse: the non-zeros only), for value checks without densifying."""
    if sp.issparse(X):
        return np.asarray(X.data)
    if hasattr(X, "toarray") and not isinstance(X, np.ndarray):
        X = X.toarray()
    return np.asarray(X).ravel()


def looks_like_counts(X) -> bool:
    """Non-negative integers (checked on up to 1e6 stored values)."""
    v = _values(X)[:1_000_000]
    return bool(v.size == 0 or (np.all(np.isfinite(v)) and v.min() >= 0 and np.all(v == np.round(v))))


def looks_log_normalized(X) -> bool:
    """Non-integer, non-negative and small: what log1p of normalised counts looks like."""
    v = _values(X)[:1_000_000]
    return bool(
        v.size > 0
        and np.all(np.isfinite(v))
        and v.min() >= 0
        and v.max() < 30
        and not np.all(v == np.round(v))
    )


def check(adata, spec: DataSpec, *, require_counts: bool = False) -> ValidationReport:
    """Every problem found, as sentences naming the bad value and the fix. Never raises."""
    rep = ValidationReport()
    obs = adata.obs
    if adata.n_obs == 0 or adata.n_vars == 0:
        rep.errors.append(
            f"the matrix is empty ({adata.n_obs} cells x {adata.n_vars} genes); load a file with "
            "cells and genes"
        )
        return rep
    values = _values(adata.X)
    if values.size == 0 or not np.any(values):
        rep.errors.append("the expression matrix holds only zeros; check that the right matrix was loaded")
    n_nan = int(np.isnan(values).sum()) if values.dtype.kind == "f" else 0
    n_inf = int(np.isinf(values).sum()) if values.dtype.kind == "f" else 0
    if n_nan or n_inf:
        rep.errors.append(
            f"the expression matrix holds {n_nan} NaN and {n_inf} infinite values; "
            "remove or impute them before loading"
        )
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size and finite.min() < 0:
        rep.errors.append(
            f"the expression matrix holds negative values (minimum {float(finite.min()):.3g}); "
            "give raw counts or log-normalised data, not scaled/centred data"
        )
    elif finite.size and not np.all(finite == np.round(finite)):
        example = float(finite[finite != np.round(finite)][0])
        if require_counts:
            rep.errors.append(
                f"raw counts are required but X holds non-integer values (e.g. {example:.4g}); "
                "give raw counts or choose --hvg-flavor seurat for log-normalised data"
            )
        elif finite.max() >= 30:
            rep.errors.append(
                f"X holds non-integer values (e.g. {example:.4g}) up to {float(finite.max()):.4g} "
                "that are neither counts nor log-normalised; give raw counts"
            )
    if adata.var_names.duplicated().any():
        dup = adata.var_names[adata.var_names.duplicated()]
        rep.warnings.append(
            f"{dup.size} duplicate gene names (e.g. {dup[0]!r}) will be made unique "
            f"({dup[0]!r} -> {dup[0]!r}-1)"
        )
    if adata.obs_names.duplicated().any():
        dup = adata.obs_names[adata.obs_names.duplicated()]
        rep.errors.append(
            f"{dup.size} duplicate cell ids (e.g. {dup[0]!r}); make them unique "
            "(AnnData.obs_names_make_unique) or load one sample per file"
        )

    cols = list(obs.columns)
    for role, col, flag in (
        ("perturbation", spec.pert_col, "--pert-col"),
        ("context", spec.context_col, "--context-col"),
        ("batch", spec.batch_col, "--batch-col"),
    ):
        if col is not None and col not in obs.columns:
            rep.errors.append(
                f"{role} column {col!r} not found in obs{_suggest(col, cols)}; available columns: "
                f"{cols[:20]}; pass {flag}"
            )
    if spec.pert_col not in obs.columns:
        return rep
    pert = obs[spec.pert_col]
    n_missing = int(pert.isna().sum())
    if n_missing:
        rep.errors.append(
            f"{n_missing} cells have no value in perturbation column {spec.pert_col!r}; "
            "label them or drop them"
        )
    pert = pert.astype(str)
    is_ctrl = (pert == spec.control).to_numpy()
    if not is_ctrl.any():
        guess = _control_in(obs[spec.pert_col])
        hint = f"; it looks like {guess!r}: pass --control {guess}" if guess else "; pass --control LABEL"
        examples = sorted(pert.unique())[:8]
        rep.errors.append(
            f"no control cells: label {spec.control!r} not found in column {spec.pert_col!r} "
            f"(values include {examples}){hint}"
        )
    elif spec.context_col is not None and spec.context_col in obs.columns:
        ctx = obs[spec.context_col].astype(str).to_numpy()
        no_ctrl = sorted(set(ctx[~is_ctrl]) - set(ctx[is_ctrl]))
        if no_ctrl:
            rep.errors.append(
                f"context(s) {no_ctrl} have perturbed cells but no control cells "
                f"({spec.control!r}); drop those cells or choose another --context-col"
            )
    counts = pert[~is_ctrl].value_counts()
    small = counts[counts < spec.min_cells_per_perturbation]
    if len(small):
        listed = ", ".join(f"{k!r} ({v})" for k, v in small.head(10).items())
        rep.warnings.append(
            f"{len(small)} perturbation(s) have fewer than {spec.min_cells_per_perturbation} cells: "
            f"{listed}{' ...' if len(small) > 10 else ''}; their predictions will be noisy"
        )
    return rep


def validate(adata, spec: DataSpec, *, require_counts: bool = False) -> list[str]:
    """Warnings as a list; raises DataError listing every error when there is one."""
    rep = check(adata, spec, require_counts=require_counts)
    if rep.errors:
        raise DataError(" | ".join(rep.errors) if len(rep.errors) > 1 else rep.errors[0])
    return rep.warnings


def file_signature(path) -> str:
    """(path, size, mtime) string: a cache key that changes when the file does."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def obs_labels(adata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(perturbation, context, batch) labels of a prepared AnnData as str arrays (batch "all" when absent)."""
    missing = [c for c in ("perturbation", "context") if c not in adata.obs.columns]
    if missing:
        raise DataError(f"obs column(s) {missing} not found; run `python -m statecore prepare` first")
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    ctx = adata.obs["context"].astype(str).to_numpy()
    batch = (
        adata.obs["batch"].astype(str).to_numpy()
        if "batch" in adata.obs.columns
        else np.full(adata.n_obs, "all", dtype=object)
    )
    return pert, ctx, batch
