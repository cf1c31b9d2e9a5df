"""Data in: read .h5ad / MTX bundles, detect the column mapping, validate with clear messages.

Nothing here writes to the input: h5ad files are read into memory, bundles are parsed read-only.
Every problem is a sentence naming the bad value and the fix, so the CLI and the app can show it as is.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import os
import re
import stat
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
    "stim",
    "stimulation",
    "treatment",
    "drug",
    "compound",
    "guide",
    "guide_id",
    "guide_ids",
    "sgrna",
    "grna",
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
    "unstim",
    "unstimulated",
    "mock",
    "none",
)
# Values that mean "no label" in a label column (besides NaN): such cells are dropped with a warning.
UNLABELED = ("", "nan", "NaN", "NA", "<NA>", "None")

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
MEMORY_BUDGET_ENV = "STATECORE_MAX_MEMORY_GB"  # the most memory one read may take, in GB (decimal)
_DEFAULT_BUDGET_SHARE = 0.8  # of physical memory, when the variable is not set
_METADATA_NAMES = ("metadata.csv", "metadata.tsv", "metadata.txt")  # [.gz], found beside an MTX bundle
# Reading a Matrix Market file costs about this much per stored value (scipy's COO row, column and
# value arrays, then the CSR copy), and a stored value takes at least this many bytes of text ("1 1\n").
_MTX_BYTES_PER_ENTRY = 32
_MTX_MIN_ENTRY_TEXT = 4
_GZIP_MAX_RATIO = 1032  # deflate cannot compress more than this
_BYTES_PER_STRING = 64  # a Python str for each stored label (HDF5 variable-length strings)


def memory_budget_bytes() -> int:
    """The memory one read may take: ``STATECORE_MAX_MEMORY_GB``, else 80% of physical memory."""
    value = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if value:
        try:
            budget = float(value)
        except ValueError:
            budget = -1.0
        if not budget > 0:
            raise DataError(
                f"{MEMORY_BUDGET_ENV}={value!r} is not a positive number of GB; e.g. set it to 16"
            )
        return int(budget * 1e9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _DEFAULT_BUDGET_SHARE)


def _check_budget(need: int, what: str) -> None:
    budget = memory_budget_bytes()
    if need > budget:
        raise DataError(
            f"{what} needs about {need / 1e9:.1f} GB of memory, more than the {budget / 1e9:.1f} GB allowed; "
            f"use a machine with more memory or raise {MEMORY_BUDGET_ENV}"
        )


def _not_found(path: Path) -> DataError:
    # One message for missing, forbidden and non-regular paths: the app must not reveal which it is.
    return DataError(
        f"no readable data at {str(path)!r}: the path does not exist, is not a regular file or folder, "
        "or lies outside the allowed data folders; check the path"
    )


def checked_path(path, roots=None, *, folder_ok: bool = False) -> Path:
    """``path`` resolved, when it is a regular file (or, with ``folder_ok``, a folder) inside ``roots``.

    ``roots``: allowed folders (None: anywhere, for the CLI run by the data's owner). Symbolic links
    are resolved first, so a link inside a root that points elsewhere is refused. FIFOs, devices and
    sockets are always refused: reading them blocks forever or never ends (``/dev/zero``).
    """
    path = Path(path)
    try:
        resolved = path.expanduser().resolve(strict=True)
        st = resolved.stat()
    except (OSError, RuntimeError):
        raise _not_found(path) from None
    kind_ok = stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode))
    inside = roots is None or any(resolved.is_relative_to(Path(r).resolve()) for r in roots)
    if not (kind_ok and inside):
        raise _not_found(path)
    return resolved


def read_data(path, *, metadata=None, cell_id_col: str | None = None, roots=None):
    """Read ``.h5ad`` or an MTX bundle (directory or ``matrix.mtx[.gz]``) into AnnData.

    ``metadata``: CSV/TSV with one row per cell, joined on ``cell_id_col`` (default: the column whose
    values match the cell ids best); for a bundle, a ``metadata.csv``/``.tsv``[.gz] beside the matrix
    is used when none is given. ``roots``: the folders reads are allowed in (the app's server paths).
    Sizes are checked against the memory budget before anything large is read.
    """
    shown = Path(path)
    path = checked_path(shown, roots, folder_ok=True)
    if path.is_dir() or _is_mtx_name(path.name):
        adata, folder = _read_mtx_bundle(path, roots), (path if path.is_dir() else path.parent)
        if metadata is None:
            metadata = _find(folder, _METADATA_NAMES)
    elif path.name.endswith(".h5ad"):
        adata = _read_h5ad(path)
    else:
        raise DataError(
            f"{shown.name!r} is not a supported file type; give an .h5ad file or an MTX bundle "
            "(a folder with matrix.mtx[.gz], barcodes.tsv[.gz] and genes.tsv/features.tsv[.gz])"
        )
    if metadata is not None:
        adata = _join_metadata(adata, Path(metadata), cell_id_col, roots)
    return adata


def _is_mtx_name(name: str) -> bool:
    return name.endswith(".mtx") or name.endswith(".mtx.gz")


def _h5_bytes(f) -> int:
    """Memory the datasets of an open HDF5 file take once read (labels as Python strings)."""
    import h5py

    total = 0

    def add(_name, obj):
        nonlocal total
        if isinstance(obj, h5py.Dataset):
            per = _BYTES_PER_STRING if obj.dtype.kind in "OSU" else obj.dtype.itemsize
            total += int(obj.size or 0) * per  # size None: an empty (null) dataset

    f.visititems(add)
    return total


def _h5ad_preflight(path: Path) -> None:
    """Shapes and sizes from the HDF5 headers, before anndata reads any array."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            need = _h5_bytes(f)
            shape = _h5_x_shape(f)
            n_obs, n_vars = _h5_index_len(f, "obs"), _h5_index_len(f, "var")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(
            f"cannot read {path.name!r}: the file is truncated or damaged ({type(exc).__name__}: "
            f"{exc}); copy it again or re-export it"
        ) from exc
    if shape is not None and None not in (n_obs, n_vars) and tuple(shape) != (n_obs, n_vars):
        raise DataError(
            f"{path.name!r} is damaged: X is {shape[0]} x {shape[1]} but the file lists {n_obs} cells and "
            f"{n_vars} genes; re-export it with AnnData.write_h5ad"
        )
    _check_budget(need, f"reading {path.name!r}")


def _h5_x_shape(f) -> tuple[int, int] | None:
    import h5py

    if "X" not in f:
        return None
    x = f["X"]
    shape = tuple(int(v) for v in (x.attrs["shape"] if "shape" in x.attrs else x.shape))
    if len(shape) != 2:
        raise ValueError(f"X has {len(shape)} dimensions, not 2")
    if isinstance(x, h5py.Group) and "indptr" in x:  # CSR: one pointer per row (+1), CSC: per column
        major = shape[1] if str(x.attrs.get("encoding-type", "")).startswith("csc") else shape[0]
        if x["indptr"].shape[0] != major + 1 or x["data"].shape != x["indices"].shape:
            raise ValueError("the sparse X arrays do not match its shape")
    return shape


def _h5_index_len(f, key: str) -> int | None:
    group = f.get(key)
    if group is None or "_index" not in group.attrs:
        return None
    return int(group[group.attrs["_index"]].shape[0])


def _read_h5ad(path: Path):
    import anndata as ad

    with open(path, "rb") as fh:
        head = fh.read(8)
    if head != _HDF5_MAGIC:
        raise DataError(
            f"{path.name!r} is not an HDF5/.h5ad file (wrong file type or renamed file); "
            "export it with AnnData.write_h5ad"
        )
    _h5ad_preflight(path)
    try:
        return ad.read_h5ad(path)
    except MemoryError:
        raise DataError(f"not enough memory to read {path.name!r}; use a machine with more memory") from None
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


def _read_tsv(path: Path) -> pd.DataFrame:
    _check_budget(path.stat().st_size * _text_factor(path), f"reading {path.name!r}")
    try:  # a path, not an open file: pandas' C parser, gzip by extension
        return pd.read_csv(path, sep="\t", header=None, dtype=str, engine="c", quoting=csv.QUOTE_NONE)
    except (OSError, EOFError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read {path.name!r}: {exc}; the file is damaged or not tab-separated"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path.name!r} is empty; it must list one entry per line") from exc


def _text_factor(path: Path) -> int:
    """Memory per byte of a text file once parsed into strings (gzip: times its best ratio, ~10)."""
    return 8 * (10 if path.name.endswith(".gz") else 1)


def _bundle_files(path: Path, roots) -> tuple[Path, Path, Path]:
    folder = path if path.is_dir() else path.parent
    mtx = path if not path.is_dir() else _find(folder, ("matrix.mtx",))
    if mtx is None:
        raise DataError(f"no matrix.mtx or matrix.mtx.gz in {folder.name!r}; an MTX bundle needs it")
    barcodes = _find(folder, ("barcodes.tsv",))
    genes = _find(folder, ("features.tsv", "genes.tsv"))
    if barcodes is None or genes is None:
        missing = [
            n
            for n, p in (("barcodes.tsv[.gz]", barcodes), ("features.tsv or genes.tsv[.gz]", genes))
            if p is None
        ]
        raise DataError(f"MTX bundle {folder.name!r} lacks {' and '.join(missing)}; put it beside {mtx.name}")
    return tuple(checked_path(p, roots) for p in (mtx, barcodes, genes))


def _mtx_preflight(mtx: Path, n_bc: int, n_genes: int) -> bool:
    """Check the Matrix Market header against the bundle and the file size; True: genes x cells."""
    import scipy.io

    try:
        rows, cols, entries, fmt, _field, _symmetry = scipy.io.mminfo(str(mtx))
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"cannot read {mtx.name!r}: it is not a Matrix Market file ({exc}); copy it again"
        ) from exc
    if (rows, cols) not in ((n_genes, n_bc), (n_bc, n_genes)):
        raise DataError(
            f"{mtx.name} is {rows} x {cols} but the bundle lists {n_bc} barcodes and {n_genes} genes; "
            "the matrix must be genes x barcodes or barcodes x genes; use the files of one sample"
        )
    stored = rows * cols if fmt == "array" else entries
    size = mtx.stat().st_size * (_GZIP_MAX_RATIO if mtx.name.endswith(".gz") else 1)
    if entries > rows * cols or stored * (2 if fmt == "array" else _MTX_MIN_ENTRY_TEXT) > size:
        raise DataError(
            f"{mtx.name!r} declares {entries} values for a {rows} x {cols} matrix, more than the "
            "matrix or the file can hold; the file is damaged or truncated: copy it again"
        )
    _check_budget(stored * _MTX_BYTES_PER_ENTRY, f"reading {mtx.name!r}")
    return (rows, cols) == (n_genes, n_bc)


def _read_mtx_bundle(path: Path, roots=None):
    import anndata as ad
    import scipy.io

    mtx, barcodes, genes = _bundle_files(path, roots)
    bc = _read_tsv(barcodes).iloc[:, 0].astype(str).to_numpy()
    gdf = _read_tsv(genes)
    genes_x_cells = _mtx_preflight(mtx, bc.size, len(gdf))
    try:
        # A file name, not an open file: scipy reads in a thread of its own, and a file object closed
        # by an exception while that thread still reads it aborts the whole process.
        matrix = scipy.io.mmread(str(mtx))
    except (OSError, EOFError, ValueError, IndexError, OverflowError) as exc:
        raise DataError(
            f"cannot read {mtx.name!r}: the file is truncated or not Matrix Market ({exc}); copy it again"
        ) from exc
    matrix = sp.csr_matrix(matrix)
    if genes_x_cells:
        matrix = matrix.T.tocsr()  # 10x layout: genes x cells
    var = pd.DataFrame(index=pd.Index(gdf.iloc[:, 1] if gdf.shape[1] >= 2 else gdf.iloc[:, 0], dtype=str))
    var["gene_ids"] = gdf.iloc[:, 0].to_numpy()
    if gdf.shape[1] >= 3:
        var["feature_types"] = gdf.iloc[:, 2].to_numpy()
    var.index.name = None
    obs = pd.DataFrame(index=pd.Index(bc))
    return ad.AnnData(X=matrix.astype(np.float32), obs=obs, var=var)


def _sniff_separator(path: Path) -> str:
    """Tab, comma or semicolon: whichever the header line holds most of (comma when none)."""
    try:
        with gzip.open(path, "rt") if path.name.endswith(".gz") else open(path, errors="replace") as fh:
            header = fh.readline(1_000_000)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read metadata {path.name!r}: {exc}; copy it again") from exc
    counts = {sep: header.count(sep) for sep in ("\t", ",", ";")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_metadata(metadata: Path) -> pd.DataFrame:
    _check_budget(metadata.stat().st_size * _text_factor(metadata), f"reading metadata {metadata.name!r}")
    try:
        meta = pd.read_csv(metadata, dtype=str, sep=_sniff_separator(metadata), engine="c")
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read metadata {metadata.name!r} as CSV/TSV: {exc}; fix or re-export it"
        ) from exc
    if meta.empty or meta.shape[1] < 2:
        raise DataError(
            f"metadata {metadata.name!r} has {meta.shape[0]} rows and {meta.shape[1]} columns; it needs a "
            "header line, a cell id column and at least one label column"
        )
    return meta


def _join_metadata(adata, metadata: Path, cell_id_col: str | None, roots=None):
    meta = _read_metadata(checked_path(metadata, roots))
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
        raise DataError(
            f"column {cell_id_col!r} not in {metadata.name!r}; columns: {list(meta.columns)[:20]}"
        )
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


@dataclass(frozen=True)
class Detection:
    """What ``detect`` found: the suggested spec, whether a control label was recognised, and notes.

    When no control label is recognised ``spec.control`` is ``""``: validation blocks until the user
    chooses one (``--control`` on the CLI, the Control picker in the app); nothing is guessed.
    """

    spec: DataSpec
    control_found: bool
    notes: tuple[str, ...] = ()


def unlabeled(values: pd.Series) -> np.ndarray:
    """Bool mask of cells whose label is missing (NaN, empty, or 'nan'/'NA'/'None' text)."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # test the categories, not a million cells
        bad = np.append(pd.Index(values.cat.categories.astype(str).str.strip()).isin(UNLABELED), True)
        return bad[values.cat.codes.to_numpy()]  # code -1 (NaN) picks the appended True
    return values.isna().to_numpy() | values.astype(str).str.strip().isin(UNLABELED).to_numpy()


def labelled_mask(obs: pd.DataFrame, spec: DataSpec) -> np.ndarray:
    """Cells with a perturbation label (and a context label when a context column is mapped)."""
    keep = np.ones(len(obs), dtype=bool)
    for col in (spec.pert_col, spec.context_col):
        if col is not None and col in obs.columns:
            keep &= ~unlabeled(obs[col])
    return keep


def detect(adata) -> Detection:
    """Suggest the perturbation, context and batch columns and the control label from common names.

    Column names match case-insensitively, ignoring punctuation. Candidate perturbation columns with
    fewer than two labels are skipped (a column where every cell says ``none`` is no perturbation
    column). Among the rest, the first that holds a control-like label wins, so that e.g.
    ``condition`` = stimulated/control is not taken over a ``gene`` column with ``non-targeting``; a
    column passed over for that reason is named in the notes. When no candidate holds a control
    label, the first candidate stays the perturbation column and the control is left unchosen.
    """
    obs = adata.obs
    recorded = str(adata.uns.get("control_label", "")) if "control_label" in adata.uns else ""
    pert_col, control, passed_over = None, None, []
    for cand in PERT_COLUMNS:
        col = _pick_column(obs, (cand,), set())
        if col is None or col == pert_col or col in passed_over:
            continue
        values = obs[col][~unlabeled(obs[col])].astype(str)
        if values.nunique() < 2:
            continue
        ctrl = recorded if recorded and (values == recorded).any() else _control_in(values)
        if ctrl is not None:
            pert_col, control = col, ctrl
            break
        passed_over.append(col)
    notes = []
    if pert_col is None and passed_over:
        pert_col = passed_over[0]
        examples = sorted(obs[pert_col].dropna().astype(str).unique())[:8]
        notes.append(
            f"no control label recognised in perturbation column {pert_col!r} (values include "
            f"{examples}); choose the control label (--control LABEL)"
        )
    elif passed_over:
        notes.append(
            f"column(s) {passed_over} hold no control label; using {pert_col!r} (control {control!r}) "
            "as the perturbation column; pass --pert-col to choose another"
        )
    pert_col = pert_col or "perturbation"
    context_col = _pick_column(obs, CONTEXT_COLUMNS, {pert_col})
    batch_col = _pick_column(obs, BATCH_COLUMNS, {pert_col, context_col or ""})
    spec = DataSpec(pert_col=pert_col, control=control or "", context_col=context_col, batch_col=batch_col)
    return Detection(spec=spec, control_found=control is not None, notes=tuple(notes))


def suggest_control(values: pd.Series) -> str:
    """A control-like label among ``values`` (case-insensitive), or ``""`` when none is recognised."""
    return _control_in(values[~unlabeled(values)]) or ""


def detect_spec(adata) -> DataSpec:
    """``detect(adata).spec``: the suggested mapping (``control == ""`` when none was recognised)."""
    return detect(adata).spec


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
        rep.warnings.append(
            f"{dup.size} duplicate cell ids (e.g. {dup[0]!r}) will be made unique "
            f"({dup[0]!r} -> {dup[0]!r}-1)"
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
    if spec.pert_col in obs.columns:
        _check_labels(obs, spec, rep)
    return rep


def _check_labels(obs: pd.DataFrame, spec: DataSpec, rep: ValidationReport) -> None:
    """The perturbation labels: unlabeled cells, the control, perturbed cells, controls per context."""
    labelled = labelled_mask(obs, spec)
    n_unlabeled = int((~labelled).sum())
    if n_unlabeled:
        rep.warnings.append(
            f"{n_unlabeled} of {len(obs)} cells have no label in column {spec.pert_col!r}"
            + (f" or {spec.context_col!r}" if spec.context_col in obs.columns else "")
            + "; they will be dropped"
        )
    if not labelled.any():
        rep.errors.append(f"no cell has a label in column {spec.pert_col!r}; choose the perturbation column")
        return
    pert = obs[spec.pert_col][labelled].astype(str)
    for col in (spec.pert_col, spec.context_col):
        if col is not None and col in obs.columns:
            bad = [v for v in obs[col][labelled].astype(str).unique() if "\x00" in v]
            if bad:
                rep.errors.append(
                    f"{len(bad)} label(s) in column {col!r} hold a NUL character (e.g. {bad[0]!r}), "
                    "which an .h5ad file cannot store; clean the labels in the metadata and load it again"
                )
    is_ctrl = (pert == spec.control).to_numpy()
    if not spec.control:
        examples = sorted(pert.unique())[:8]
        rep.errors.append(
            f"no control label chosen: no value of column {spec.pert_col!r} (values include {examples}) "
            "looks like a control; choose the control label (--control LABEL)"
        )
    elif not is_ctrl.any():
        guess = _control_in(pert)
        hint = f"; it looks like {guess!r}: pass --control {guess}" if guess else "; pass --control LABEL"
        examples = sorted(pert.unique())[:8]
        rep.errors.append(
            f"no control cells: label {spec.control!r} not found in column {spec.pert_col!r} "
            f"(values include {examples}){hint}"
        )
    elif is_ctrl.all():
        rep.errors.append(
            f"every labelled cell is a control ({spec.control!r} in column {spec.pert_col!r}): there "
            "are no perturbed cells; choose the column that names the perturbations (--pert-col)"
        )
    elif spec.context_col is not None and spec.context_col in obs.columns:
        ctx = obs[spec.context_col][labelled].astype(str).to_numpy()
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


def split_combo(label: str, sep: str) -> list[str]:
    """The single perturbations of a combination label ("A+B" -> ["A", "B"]); a single is its own list."""
    if not sep:
        return [str(label)]
    return [p.strip() for p in str(label).split(sep) if p.strip()]


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
