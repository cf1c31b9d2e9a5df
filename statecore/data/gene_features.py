"""Gene feature matrices for the State Embedding model: one row per gene, in the model's gene order.

Four sources, all offline (nothing is downloaded):

- ``random`` / ``learned``: a fixed Gaussian vector per gene, seeded by ``(seed, crc32(gene name))``
  so a gene gets the same vector in every dataset (``learned`` starts there and is then trained);
- ``pca``: each gene's loadings on the top principal components of the training expression, an
  informative default (co-varying genes get nearby features) derived from the data itself;
- ``file``: a user matrix (for example ESM-2 protein embeddings) aligned by gene name, from a
  ``.csv``/``.tsv`` (first column gene names), an ``.npz`` (arrays ``genes`` and ``features``) or an
  ``.npy`` with a sidecar ``<stem>.genes.txt`` (one name per line, one per row).

Every builder returns ``float32 [n_genes, dim]``; they are pure functions of their arguments.

Perturbation features (issue 14, :class:`GeneFeatureTable`): a perturbed gene is described by its feature
row, from ``data`` (:func:`data_gene_features`, PCA loadings of control-cell expression) or from a user
table (``.csv``/``.tsv``/``.parquet``/``.npz``/``.npy`` + names), aligned by gene symbol; a combination is the
sum of its genes' rows, and a gene without a row is a DataError naming it, never a zero vector.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from statecore.data.io import obs_labels
from statecore.errors import DataError

GENE_FEATURE_KINDS = ("learned", "random", "pca", "file")


def random_gene_features(genes: Sequence[str], dim: int, *, seed: int = 0) -> np.ndarray:
    """A seeded Gaussian vector per gene (a random projection of the gene's one-hot identity).

    Rows have expected unit norm. Seeding by the gene's name rather than its position keeps a
    gene's vector stable when the gene list changes between datasets.
    """
    if dim < 1:
        raise DataError(f"gene feature width must be >= 1, got {dim}")
    out = np.empty((len(genes), dim), dtype=np.float32)
    for i, name in enumerate(genes):
        rng = np.random.default_rng([int(seed), zlib.crc32(str(name).encode())])
        out[i] = rng.standard_normal(dim) / np.sqrt(dim)
    return out


def pca_gene_features(X, dim: int, *, seed: int = 0, max_cells: int = 4000) -> np.ndarray:
    """Gene loadings on the top ``dim`` principal components of ``X`` (cells x genes, log1p).

    Loadings are right singular vectors scaled by each component's standard deviation, so genes
    that vary more get longer vectors; the whole matrix is then scaled so that the mean row norm
    of non-constant genes is 1. At most ``max_cells`` rows (a seeded subsample) enter the
    randomized SVD. When the data has fewer than ``dim`` informative components (tiny data) the
    remaining columns are zero: the projection layer simply ignores them.
    """
    if dim < 1:
        raise DataError(f"gene feature width must be >= 1, got {dim}")
    n_cells, n_genes = X.shape
    if n_cells < 2:
        raise DataError(f"PCA gene features need at least 2 cells, got {n_cells}; use gene_features='random'")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n_cells, size=min(n_cells, max_cells), replace=False))
    A = X[rows]
    A = np.asarray(A.toarray() if sp.issparse(A) else A, dtype=np.float64)
    A -= A.mean(axis=0, keepdims=True)
    k = min(dim, A.shape[0] - 1, n_genes)
    _, s, vt = _randomized_svd(A, k, rng)
    loadings = np.zeros((n_genes, dim), dtype=np.float64)
    loadings[:, :k] = vt.T * (s / np.sqrt(A.shape[0] - 1))
    norms = np.linalg.norm(loadings, axis=1)
    scale = norms[norms > 0].mean() if np.any(norms > 0) else 1.0
    return (loadings / scale).astype(np.float32)


def _randomized_svd(
    A: np.ndarray, k: int, rng: np.random.Generator, *, oversample: int = 10, n_iter: int = 4
):
    """Halko et al. randomized SVD with a seeded generator (deterministic, unlike torch.svd_lowrank)."""
    width = min(k + oversample, min(A.shape))
    Q = A @ rng.standard_normal((A.shape[1], width))
    for _ in range(n_iter):  # power iterations sharpen the spectrum; QR keeps them stable
        Q, _ = np.linalg.qr(Q)
        Q, _ = np.linalg.qr(A.T @ Q)
        Q = A @ Q
    Q, _ = np.linalg.qr(Q)
    u, s, vt = np.linalg.svd(Q.T @ A, full_matrices=False)
    return (Q @ u)[:, :k], s[:k], vt[:k]


def read_feature_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a gene feature file; returns (gene names, float32 [n, dim]). See the module docstring."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"gene feature file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        import pandas as pd

        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", index_col=0)
        try:
            values = df.to_numpy(dtype=np.float32)
        except ValueError as exc:
            raise DataError(
                f"{path}: every column after the first (gene names) must be numeric ({exc})"
            ) from exc
        names = [str(g) for g in df.index]
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            missing = {"genes", "features"} - set(z.files)
            if missing:
                raise DataError(
                    f"{path}: an .npz gene feature file needs arrays 'genes' and 'features'; missing {sorted(missing)}"
                )
            names = [str(g) for g in z["genes"]]
            values = np.asarray(z["features"], dtype=np.float32)
    elif suffix == ".npy":
        sidecar = path.with_name(path.stem + ".genes.txt")
        if not sidecar.exists():
            raise DataError(
                f"{path}: an .npy gene feature matrix needs its gene names in {sidecar} (one per line, one per row)"
            )
        values = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
        names = [line.strip() for line in sidecar.read_text().splitlines() if line.strip()]
    else:
        raise DataError(
            f"gene feature file {str(path)!r}: unsupported type {suffix!r}; use .csv, .tsv, .npz or .npy (+ .genes.txt)"
        )
    if values.ndim != 2 or values.shape[0] != len(names):
        raise DataError(f"{path}: {len(names)} gene names but a feature matrix of shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: the feature matrix holds NaN or infinite values")
    if len(set(names)) != len(names):
        dup = sorted({g for g in names if names.count(g) > 1})[:5]
        raise DataError(f"{path}: duplicated gene names, e.g. {dup}")
    return names, values


def file_gene_features(path: str | Path, genes: Sequence[str]) -> np.ndarray:
    """Rows of the feature file reordered to ``genes``; a gene absent from the file is an error."""
    names, values = read_feature_file(path)
    pos = {g: i for i, g in enumerate(names)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise DataError(
            f"gene feature file {str(path)!r} lacks {len(missing)} of the {len(genes)} genes "
            f"(e.g. {missing[:5]}); add rows for them or restrict the data to the genes the file covers"
        )
    return values[[pos[g] for g in genes]]


def build_gene_features(
    kind: str, genes: Sequence[str], dim: int, *, X=None, path: str | Path | None = None, seed: int = 0
) -> np.ndarray:
    """Dispatch on ``kind`` (one of :data:`GENE_FEATURE_KINDS`); ``X`` is needed for ``pca``."""
    if kind in ("learned", "random"):
        return random_gene_features(genes, dim, seed=seed)
    if kind == "pca":
        if X is None:
            raise DataError("gene_features='pca' needs the training expression matrix")
        if X.shape[1] != len(genes):
            raise DataError(f"expression has {X.shape[1]} genes but {len(genes)} gene names were given")
        return pca_gene_features(X, dim, seed=seed)
    if kind == "file":
        if not path:
            raise DataError("gene_features='file' needs gene_features_path (a .csv, .tsv, .npz or .npy file)")
        return file_gene_features(path, genes)
    raise DataError(f"unknown gene feature kind {kind!r}; choose one of {GENE_FEATURE_KINDS}")


# --------------------------------------------------------------------------- perturbation features (issue 14)
# A perturbation of gene g is described by g's feature vector, so a gene that no training context perturbed
# can still be encoded. Two sources, both offline: ``data`` (computed from the training data's own control
# cells) or a user table (for example ESM-2 or text-model embeddings exported elsewhere).

DATA_SOURCE = "data"
DATA_FEATURE_DIM = 32


@dataclass(frozen=True)
class GeneFeatureTable:
    """One feature row per gene symbol; ``source`` says where it came from (shown in messages)."""

    genes: tuple[str, ...]
    values: np.ndarray  # float32 [len(genes), dim]
    source: str

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[0] != len(self.genes):
            raise DataError(
                f"gene features from {self.source}: {len(self.genes)} genes but shape {self.values.shape}"
            )

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def index(self) -> dict[str, int]:
        cache = self.__dict__.get("_idx")
        if cache is None:
            cache = {g: i for i, g in enumerate(self.genes)}
            object.__setattr__(self, "_idx", cache)
        return cache

    def __contains__(self, gene: str) -> bool:
        return str(gene) in self.index()

    def missing(self, genes: Sequence[str]) -> list[str]:
        idx = self.index()
        return [str(g) for g in genes if str(g) not in idx]

    def rows(self, genes: Sequence[str]) -> np.ndarray:
        """``[len(genes), dim]`` in the asked order; DataError naming every gene without a row."""
        lacking = self.missing(genes)
        if lacking:
            raise DataError(missing_features_message(lacking, self))
        idx = self.index()
        return self.values[[idx[str(g)] for g in genes]]

    def encode(self, label: str, sep: str = "+") -> np.ndarray:
        """A perturbation label's features: the sum of its genes' rows (``"A+B"`` -> f(A) + f(B))."""
        return self.rows(split_parts(label, sep)).sum(axis=0)


def split_parts(label: str, sep: str = "+") -> list[str]:
    return [p for p in str(label).split(sep) if p] if sep else [str(label)]


def missing_features_message(genes: Sequence[str], table: GeneFeatureTable) -> str:
    shown = ", ".join(repr(g) for g in list(genes)[:8]) + (" ..." if len(genes) > 8 else "")
    where = (
        "the training data's genes (features computed from control cells exist only for measured genes)"
        if table.source == DATA_SOURCE
        else f"the gene feature table {table.source!r}"
    )
    return (
        f"no gene features for {shown}: {len(genes)} gene(s) missing from {where} ({len(table.genes)} genes, "
        f"e.g. {list(table.genes[:5])}); to predict them, train with a gene feature table that has a row for them "
        "(train --gene-features PATH)"
    )


def data_gene_features(
    adata, *, control: str, dim: int = DATA_FEATURE_DIM, seed: int = 0, max_cells: int = 4000
) -> GeneFeatureTable:
    """Features for every measured gene, from the control cells of ``adata`` (log1p expression).

    The choice: each gene's loadings on the top ``dim`` principal components of control-cell expression,
    after centring every context separately (so that differences between cell lines do not become the top
    components). The dot product of two genes' loadings approximates their covariance across control cells,
    so this is a low-rank co-expression profile: genes of one complex or pathway, which tend to co-vary in
    unperturbed cells, get nearby features, and their knockouts often give similar responses (the premise
    of Ahlmann-Eltze, Huber & Anders, Nat Methods 2025, who use PCA of the training data as gene embeddings).
    Only controls enter: they are training data in every split, and no perturbed (possibly held-out) cell
    leaks into the features.
    """
    pert, ctx, _ = obs_labels(adata)
    rows = np.flatnonzero(pert == control)
    if rows.size < 2:
        raise DataError(f"gene features from the data need control cells ({control!r}); found {rows.size}")
    X = adata.X[rows]
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    for c in np.unique(ctx[rows]):
        sel = ctx[rows] == c
        X[sel] -= X[sel].mean(axis=0, keepdims=True)
    values = pca_gene_features(X, dim, seed=seed, max_cells=max_cells)
    return GeneFeatureTable(tuple(adata.var_names.astype(str)), values, DATA_SOURCE)


def read_feature_table(path: str | Path) -> GeneFeatureTable:
    """A user table: ``.csv``/``.tsv`` (first column gene names), ``.parquet`` (gene names in the index or a
    first text column), ``.npz`` (``genes`` + ``features``) or ``.npy`` with ``<stem>.genes.txt``."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        names, values = _read_parquet(path)
    else:
        names, values = read_feature_file(path)
    return GeneFeatureTable(tuple(names), values, str(path))


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    if not path.exists():
        raise DataError(f"gene feature file {str(path)!r} does not exist")
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"cannot read gene feature file {str(path)!r} ({exc})") from exc
    if isinstance(df.index, pd.RangeIndex) and len(df.columns) and df[df.columns[0]].dtype == object:
        df = df.set_index(df.columns[0])
    try:
        values = df.to_numpy(dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"{path}: every column except the gene names must be numeric ({exc})") from exc
    names = [str(g) for g in df.index]
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: the feature matrix holds NaN or infinite values")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicated gene names")
    return names, values


def perturbation_feature_table(
    source: str, adata, *, control: str, dim: int = DATA_FEATURE_DIM, seed: int = 0
) -> GeneFeatureTable:
    """``source``: ``"data"`` (computed from ``adata``'s controls) or the path of a user table."""
    if not source:
        raise DataError("give a gene feature source: 'data' or the path of a feature table")
    if source == DATA_SOURCE:
        return data_gene_features(adata, control=control, dim=dim, seed=seed)
    return read_feature_table(source)
