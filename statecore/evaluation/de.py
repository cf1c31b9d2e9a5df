"""Differential expression of every perturbation against the control, as cell-eval (pdex) does it.

Per perturbation group and gene: a two-sided Mann-Whitney U (Wilcoxon rank-sum) test of the group's
cells against the control cells (normal approximation with tie and continuity correction, as
scipy/numba-mwu), Benjamini-Hochberg within each group, and the log2 fold change of the
pseudobulks ``expm1(mean(log1p values))`` (pdex's geometric mean with ``epsilon=0``, the setting
cell-eval pins: one-sided zeros give +-inf, both-zero gives 0).

Speed: instead of re-ranking group + control for every (group, gene) pair, each block of genes is
turned into sortable integer keys once; the control cells are sorted once per block, all groups'
cells once per block, and every rank sum and tie term is read off the runs of equal keys with
``searchsorted``/``bincount``. No Python loop over genes or groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import ndtr

from statecore.errors import DataError

DE_COLUMNS = (
    "target",
    "feature",
    "target_mean",
    "ref_mean",
    "target_membership",
    "ref_membership",
    "log2_fold_change",
    "percent_change",
    "p_value",
    "statistic",
    "fdr",
)


@dataclass(frozen=True)
class DEArrays:
    """DE of K groups x G genes against one reference group, as dense arrays (row k = groups[k])."""

    groups: np.ndarray  # (K,) str, sorted
    genes: np.ndarray  # (G,) str
    target_mean: np.ndarray  # (K, G) pseudobulk, count space, in the input's dtype (as pdex)
    ref_mean: np.ndarray  # (G,)
    n_target: np.ndarray  # (K,) cells per group
    n_ref: int
    lfc: np.ndarray  # (K, G) log2 fold change
    statistic: np.ndarray  # (K, G) U of the group
    p_value: np.ndarray  # (K, G)
    fdr: np.ndarray  # (K, G) BH within each group

    def to_frame(self) -> pd.DataFrame:
        """The long table pdex writes: one row per (group, gene), groups sorted, genes in var order."""
        k, g = self.lfc.shape
        with np.errstate(divide="ignore", invalid="ignore"):  # pdex: difference in the means' dtype
            pc = (self.target_mean - self.ref_mean).astype(np.float64) / self.ref_mean.astype(np.float64)
        pc[np.isnan(pc)] = 0.0
        return pd.DataFrame(
            {
                "target": np.repeat(self.groups.astype(str), g),
                "feature": np.tile(self.genes.astype(str), k),
                "target_mean": self.target_mean.ravel().astype(np.float64),
                "ref_mean": np.tile(self.ref_mean, k).astype(np.float64),
                "target_membership": np.repeat(self.n_target, g),
                "ref_membership": np.full(k * g, self.n_ref),
                "log2_fold_change": self.lfc.ravel(),
                "percent_change": pc.ravel(),
                "p_value": self.p_value.ravel(),
                "statistic": self.statistic.ravel(),
                "fdr": self.fdr.ravel(),
            },
            columns=list(DE_COLUMNS),
        )


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH adjusted p-values along the last axis: scipy's ``false_discovery_control`` (which pdex
    calls), the same operations in the same order, so bit for bit equal (tests/test_de.py);
    written out because importing scipy.stats costs seconds per ``evaluate`` process."""
    ps = np.asarray(p, dtype=np.float64)
    if ps.size <= 1 or ps.shape[-1] <= 1:
        return ps
    m = ps.shape[-1]
    order = np.argsort(ps, axis=-1)
    s = np.take_along_axis(ps, order, axis=-1) * (m / np.arange(1, m + 1, dtype=np.float64))
    np.minimum.accumulate(s[..., ::-1], out=s[..., ::-1], axis=-1)
    out = np.empty_like(s)
    np.put_along_axis(out, order, s, axis=-1)
    return np.clip(out, 0.0, 1.0)


def _float_keys(block: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (-0.0 folded into +0.0 so they tie)."""
    b = np.ascontiguousarray(block, dtype=np.float32) + np.float32(0.0)
    u = b.view(np.uint32)
    if b.size and b.min() >= 0:  # log1p data: the bit pattern of a non-negative float is ordered
        return u.astype(np.uint64)
    neg = (u >> 31).astype(bool)
    # IEEE trick: flip all bits of negatives, set the sign bit of positives -> unsigned order.
    return np.where(neg, ~u, u | np.uint32(0x80000000)).astype(np.uint64)


def _dense_codes(block: np.ndarray) -> np.ndarray:
    """Dense ranks (0..) of a float block's values, one code table for the whole block (order
    within every column is what matters); used when values are not exact float32. Only the
    non-zero values are sorted: expression data are mostly zeros, which share one code."""
    flat = block.ravel() + 0.0  # -0.0 -> 0.0
    nz = flat != 0
    uniq, inv = np.unique(flat[nz], return_inverse=True)
    if uniq.size >= 2**32 - 1:
        raise DataError("too many distinct values in one gene block; use a smaller block_size")
    zero = np.searchsorted(uniq, 0.0)  # number of distinct negative values
    codes = np.full(flat.shape, zero, dtype=np.uint64)
    inv = inv.ravel().astype(np.uint64)
    codes[nz] = inv + (inv >= zero)  # leave code `zero` to the zeros
    return codes.reshape(block.shape)


def _block_keys(block: np.ndarray) -> np.ndarray:
    """Sortable per-value integer keys (< 2**32, as uint64) for one dense gene block (cells x genes)."""
    if block.dtype == np.float32 or np.array_equal(block.astype(np.float32), block):
        return _float_keys(block)
    return _dense_codes(block)


def _rank_sums_block(keys_ref: np.ndarray, keys_grp: np.ndarray, lab: np.ndarray, n_groups: int):
    """U statistic of each group vs the reference and the tie term sum(t^3 - t) of the pooled
    (group + reference) values, per gene.

    keys_ref: (n_ref, B) value keys (< 2**32) of reference cells; keys_grp: (n_grp, B) of group
    cells, rows sorted by group index ``lab``. Returns U1 and tie, both (n_groups, B) float64.
    One sort of keys packed as gene << 56 | group << 32 | value orders every (gene, group) segment
    at once; each run of equal values then needs one lookup into the sorted reference (gene-major,
    so lookups stay inside one gene's slice: cache-friendly). Count data has few runs, so this is
    much cheaper than touching every value.
    """
    n_ref, b = keys_ref.shape
    s32, s56 = np.uint64(32), np.uint64(56)
    low = np.uint64(0xFFFFFFFF)
    gene = np.arange(b, dtype=np.uint64)
    ref_sorted = np.sort(((gene[None, :] << s32) | keys_ref).ravel())
    rstart = np.flatnonzero(np.r_[True, ref_sorted[1:] != ref_sorted[:-1]])
    rlen = np.diff(np.r_[rstart, ref_sorted.size])
    run_len_at = np.zeros(ref_sorted.size + 1, np.int64)  # ref run length, indexed by run start
    run_len_at[rstart] = rlen
    rl = rlen.astype(np.float64)
    tie_ref = np.bincount(
        (ref_sorted[rstart] >> s32).astype(np.int64), weights=rl * rl * rl - rl, minlength=b
    )

    packed = (gene[None, :] << s56) | (lab.astype(np.uint64)[:, None] << s32) | keys_grp
    grp_sorted = np.sort(packed.ravel())
    gstart = np.flatnonzero(np.r_[True, grp_sorted[1:] != grp_sorted[:-1]])
    t_g = np.diff(np.r_[gstart, grp_sorted.size]).astype(np.float64)
    run_key = grp_sorted[gstart]
    run_gene = (run_key >> s56).astype(np.int64)
    run_grp = ((run_key >> s32) & np.uint64(0xFFFFFF)).astype(np.int64)
    q = (run_gene.astype(np.uint64) << s32) | (run_key & low)
    left = np.searchsorted(ref_sorted, q, side="left")
    hit = ref_sorted[np.minimum(left, ref_sorted.size - 1)] == q
    eq_r = np.where(hit, run_len_at[left], 0).astype(np.float64)
    lt_r = (left - run_gene * n_ref).astype(np.float64)
    out = run_grp * b + run_gene
    size = n_groups * b
    # U1 = sum over the group's values of (#ref below + #ref equal / 2)
    u1 = np.bincount(out, weights=t_g * (lt_r + 0.5 * eq_r), minlength=size)
    # (t^3 - t) - (e^3 - e) with t = g + e, expanded (x ** 3 is a slow pow() call in numpy)
    tie = np.bincount(out, weights=t_g * (t_g * t_g - 1.0 + 3.0 * eq_r * (t_g + eq_r)), minlength=size)
    return u1.reshape(n_groups, b), tie.reshape(n_groups, b) + tie_ref[None, :]


def _value_keys(v: np.ndarray) -> np.ndarray:
    """Order-preserving keys (>= 1, < 2**32, as uint64) of strictly positive values."""
    head = v[:1024]  # continuous values fail on the first few: skip the full float32 round trip
    if v.dtype == np.float32 or (
        np.array_equal(head.astype(np.float32), head) and np.array_equal(v.astype(np.float32), v)
    ):
        return np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    # dense codes: positive float64 bit patterns sort like the values (one uint64 sort, faster
    # than np.unique's argsort), then each value's position among the distinct ones
    bits = np.ascontiguousarray(v, dtype=np.float64).view(np.uint64)
    s = np.sort(bits)
    uniq = s[np.r_[True, s[1:] != s[:-1]]] if s.size else s
    if uniq.size >= 2**32 - 1:
        raise DataError("too many distinct values in one gene block; use a smaller block_size")
    return np.searchsorted(uniq, bits).astype(np.uint64) + np.uint64(1)


def _rank_sums_sparse(blk, n_ref: int, lab: np.ndarray, n_per: np.ndarray, n_groups: int):
    """``_rank_sums_block`` for a non-negative CSC block (rows: reference first, then groups in
    ``lab`` order) that sorts only the stored non-zero values: the zeros of a gene are one tie
    run below every other value, so their rank sums and tie terms are counts. Same U1 and tie
    (sums of half-integers, exact in float64) as the dense path."""
    b = blk.shape[1]
    s32, s56 = np.uint64(32), np.uint64(56)
    col = np.repeat(np.arange(b, dtype=np.int64), np.diff(blk.indptr))
    row, val = blk.indices.astype(np.int64), blk.data
    nz = val != 0
    col, row, val = col[nz], row[nz], val[nz]
    keys = _value_keys(val)
    isref = row < n_ref
    z_ref = (n_ref - np.bincount(col[isref], minlength=b)).astype(np.float64)
    ref_sorted = np.sort((col[isref].astype(np.uint64) << s32) | keys[isref])
    gene_start = np.searchsorted(ref_sorted, np.arange(b, dtype=np.uint64) << s32)
    rstart = _run_starts(ref_sorted)
    rlen = np.diff(np.r_[rstart, ref_sorted.size])
    run_len_at = np.zeros(ref_sorted.size + 1, np.int64)
    run_len_at[rstart] = rlen
    rl = rlen.astype(np.float64)
    tie_ref = np.bincount(
        (ref_sorted[rstart] >> s32).astype(np.int64), weights=rl * rl * rl - rl, minlength=b
    )
    tie_ref += z_ref * z_ref * z_ref - z_ref

    gcol, glab = col[~isref], lab[row[~isref] - n_ref]
    size = n_groups * b
    z_g = (np.repeat(n_per.astype(np.float64), b) - np.bincount(glab * b + gcol, minlength=size)).reshape(
        n_groups, b
    )
    packed = (gcol.astype(np.uint64) << s56) | (glab.astype(np.uint64) << s32) | keys[~isref]
    grp_sorted = np.sort(packed)
    gstart = _run_starts(grp_sorted)
    t_g = np.diff(np.r_[gstart, grp_sorted.size]).astype(np.float64)
    run_key = grp_sorted[gstart]
    run_gene = (run_key >> s56).astype(np.int64)
    run_grp = ((run_key >> s32) & np.uint64(0xFFFFFF)).astype(np.int64)
    q = (run_gene.astype(np.uint64) << s32) | (run_key & np.uint64(0xFFFFFFFF))
    left = np.searchsorted(ref_sorted, q, side="left")
    hit = (
        ref_sorted[np.minimum(left, max(ref_sorted.size - 1, 0))] == q
        if ref_sorted.size
        else np.zeros(q.size, bool)
    )
    eq_r = np.where(hit, run_len_at[left], 0).astype(np.float64)
    lt_r = (left - gene_start[run_gene]).astype(np.float64) + z_ref[run_gene]
    out = run_grp * b + run_gene
    u1 = np.bincount(out, weights=t_g * (lt_r + 0.5 * eq_r), minlength=size).reshape(n_groups, b)
    tie = np.bincount(out, weights=t_g * (t_g * t_g - 1.0 + 3.0 * eq_r * (t_g + eq_r)), minlength=size)
    tie = tie.reshape(n_groups, b)
    zr = z_ref[None, :]
    u1 += z_g * 0.5 * zr  # the group's zeros: no reference value below, the reference's zeros tie
    tie += z_g * (z_g * z_g - 1.0 + 3.0 * zr * (z_g + zr))
    return u1, tie + tie_ref[None, :]


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Start index of every run of equal values of a sorted array (none for an empty one)."""
    if a.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, a[1:] != a[:-1]])


def _mwu_pvalues(u1: np.ndarray, tie: np.ndarray, n1: np.ndarray, n2: int):
    """Two-sided asymptotic MWU with tie + continuity correction (scipy's 'asymptotic' method)."""
    n1 = n1.astype(np.float64)[:, None]
    n = n1 + n2
    u = np.maximum(u1, n1 * n2 - u1)
    s_sq = n1 * n2 / 12.0 * ((n + 1.0) - tie / (n * (n - 1.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2.0 - 0.5) / np.sqrt(s_sq)
        p = np.clip(2.0 * ndtr(-z), 0.0, 1.0)
    p = np.where(s_sq > 0.0, p, 1.0)  # all values identical: no evidence of a difference
    return u1, p


def _column_block(x, cols: slice) -> np.ndarray:
    """Dense float block of columns ``cols`` (x: ndarray or CSC; rows already in the wanted order)."""
    if sp.issparse(x):
        return x[:, cols].toarray()
    return np.ascontiguousarray(x[:, cols])


def rank_sum_arrays(
    x, groups, control: str, *, genes=None, block_size: int = 256, pseudobulks: bool = True
) -> DEArrays:
    """Vectorised DE of every group against ``control`` on log1p values ``x`` (cells x genes).

    ``x`` may be a numpy array or a scipy sparse matrix; ``groups`` holds one label per cell
    (cells with an empty or missing label are ignored, as pdex does). ``pseudobulks=False``
    skips pdex's means and fold changes (NaN): for callers with their own (vcc2026).
    """
    labels = pd.Series(np.asarray(groups, dtype=object))
    valid = labels.notna().to_numpy() & (labels.astype(str) != "").to_numpy()
    labels = labels.astype(str).to_numpy()
    n_cells, n_genes = x.shape
    if len(labels) != n_cells:
        raise DataError(f"groups has {len(labels)} labels but the matrix has {n_cells} cells")
    genes = np.asarray(genes if genes is not None else np.arange(n_genes).astype(str)).astype(str)
    if len(genes) != n_genes:
        raise DataError(f"genes has {len(genes)} names but the matrix has {n_genes} columns")
    uniq = np.unique(labels[valid])
    if control not in uniq:
        raise DataError(f"control {control!r} not found among the groups: {list(uniq)[:10]}")
    tgroups = uniq[uniq != control]
    ref_rows = np.flatnonzero(valid & (labels == control))
    grp_rows = np.flatnonzero(valid & (labels != control))
    lab = np.searchsorted(tgroups, labels[grp_rows]).astype(np.int64)  # tgroups is sorted
    order = np.argsort(lab, kind="stable")  # cells ordered by group, as the keys assume
    grp_rows, lab = grp_rows[order], lab[order]
    k = len(tgroups)
    n_per = np.bincount(lab, minlength=k).astype(np.int64)
    n_ref = len(ref_rows)
    if pseudobulks:
        target_mean, ref_mean = _pdex_means(x, ref_rows, grp_rows, lab, k)
    else:
        target_mean, ref_mean = np.full((k, n_genes), np.nan), np.full(n_genes, np.nan)
    # Reorder the rows once (controls first, then groups in order), so that each gene block is
    # a plain column slice: CSC for sparse input (cheap column slices), a row copy for dense.
    rows = np.r_[ref_rows, grp_rows]
    x = sp.csc_matrix(x[rows]) if sp.issparse(x) else np.asarray(x)[rows]
    sparse_ranks = sp.issparse(x) and (x.nnz == 0 or x.data.min() >= 0)  # zeros lowest: skip them

    u1 = np.zeros((k, n_genes))
    tie = np.zeros((k, n_genes))
    if k >= 2**24:
        raise DataError(f"{k} perturbation groups: at most {2**24 - 1} are supported")
    block_size = max(1, min(block_size, 256))  # the gene index is packed into 8 bits of the key
    for start in range(0, n_genes, block_size):
        cols = slice(start, min(start + block_size, n_genes))
        if k and len(grp_rows) and sparse_ranks:
            u1[:, cols], tie[:, cols] = _rank_sums_sparse(x[:, cols], n_ref, lab, n_per, k)
        elif k and len(grp_rows):
            keys = _block_keys(_column_block(x, cols))
            u1[:, cols], tie[:, cols] = _rank_sums_block(keys[:n_ref], keys[n_ref:], lab, k)

    # pdex: float64 log2 ratio of the (input-dtype) pseudobulks
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = _as_libm("log2", target_mean.astype(np.float64) / ref_mean.astype(np.float64)[None, :])
    lfc[np.isnan(lfc)] = 0.0
    u1, p = _mwu_pvalues(u1, tie, n_per, n_ref)
    return DEArrays(
        groups=tgroups,
        genes=genes,
        target_mean=target_mean,
        ref_mean=ref_mean,
        n_target=n_per,
        n_ref=n_ref,
        lfc=lfc,
        statistic=u1,
        p_value=p,
        fdr=benjamini_hochberg(p),
    )


def _pdex_means(x, ref_rows, grp_rows, lab, k: int):
    """Pseudobulks ``expm1(mean(log1p values))`` computed as pdex does, in the input's dtype:
    the group's rows in their original order, numpy/scipy's own ``mean(axis=0)``, numpy's
    ``expm1``. Averaging float32 input in float32 (not float64) matters: near-tied fold changes
    otherwise order differently from cell-eval's, which moves rank metrics such as
    ``de_spearman_lfc_sig`` (docs/METRICS.md)."""
    x = x.tocsr() if sp.issparse(x) else np.asarray(x)

    def mean(rows):
        if rows.size == 0:
            return np.full(x.shape[1], np.nan, dtype=x.dtype)
        return np.asarray(x[rows].mean(axis=0)).ravel()

    ref_mean = _as_libm("expm1", mean(ref_rows))
    starts = np.searchsorted(lab, np.arange(k + 1))
    target = np.empty((k, x.shape[1]), dtype=ref_mean.dtype)
    for i in range(k):
        target[i] = mean(grp_rows[starts[i] : starts[i + 1]])
    return _as_libm("expm1", target), ref_mean


@functools.cache
def _libm(name: str, dtype: str):
    """The C library's ``name`` for ``dtype`` (``expm1f`` for float32), or None without a libm."""
    import ctypes
    import ctypes.util

    lib = ctypes.util.find_library("m")
    ctype = ctypes.c_float if dtype == "float32" else ctypes.c_double
    f = getattr(ctypes.CDLL(lib), name + ("f" if dtype == "float32" else ""), None) if lib else None
    if f is not None:
        f.restype, f.argtypes = ctype, [ctype]
    return f


def _as_libm(name: str, a: np.ndarray) -> np.ndarray:
    """``np.<name>(a)`` computed value by value by the C library, as pdex computes it, on any CPU.

    numpy's vectorised ``expm1``/``log2`` use SIMD kernels (SVML) where the CPU has AVX-512, and those
    differ from the C library in the last bit for ~10% of values; pdex calls the C library (its
    numba kernels, and numpy on one-element arrays, gene by gene). One ulp is enough to reorder
    near-tied fold changes and move cell-eval's rank metrics, so the pseudobulks and fold changes go
    through the C library too (about 1 µs per value; both are K x G)."""
    a = np.asarray(a)
    f = _libm(name, a.dtype.name) if a.dtype in (np.float32, np.float64) else None
    if f is None:
        return getattr(np, name)(a)
    return np.fromiter(map(f, a.ravel().tolist()), dtype=a.dtype, count=a.size).reshape(a.shape)


def rank_sum_de(x, groups, control: str, *, genes=None) -> pd.DataFrame:
    """DE table with pdex/cell-eval's columns (see ``DE_COLUMNS``) for every group vs ``control``."""
    return rank_sum_arrays(x, groups, control, genes=genes).to_frame()


def compute_de(adata, *, control: str, pert_col: str = "perturbation") -> pd.DataFrame:
    """``rank_sum_de`` on an AnnData's X (log1p values) grouped by ``obs[pert_col]``."""
    if pert_col not in adata.obs.columns:
        raise DataError(f"obs column {pert_col!r} not found; available: {list(adata.obs.columns)}")
    return rank_sum_de(adata.X, adata.obs[pert_col].to_numpy(), control, genes=np.asarray(adata.var_names))
