"""The 2026 Virtual Cell Challenge metrics (cell-eval2 0.20.0, ``--preset vcc2026``) on raw counts.

cell-eval2 scores raw integer counts only and measures every effect against the REAL control.
Per perturbation it reports (names exactly cell-eval2's):

- ``pds_cosine``: rank of the true perturbation among all real effects by cosine distance to the
  predicted effect, in the ``bulk_lognorm`` space, midrank ties, ``1 - rank / (N - 1)``; every
  panel target gene is dropped from the feature space;
- ``expr_mse_unbiased`` / ``expr_mse_unbiased_capped`` / ``expr_distance_unbiased``: squared
  distances of ``bulk_lognorm`` pseudobulks minus a delete-1 jackknife estimate of each side's
  sampling noise (the prediction's capped at the real side's and scaled to the
  across-perturbation budget), per gene, the perturbation's own gene left out;
- ``expr_real_mass_ratio``: a diagnostic, ``sum(expm1(real bulk)) / bulk_target_sum``;
- ``de_wilcoxon_sig_jaccard``, ``de_wilcoxon_direction_fidelity_yield_raw``,
  ``de_wilcoxon_direction_reach_raw``, ``de_wilcoxon_lfc_nmae``: from Wilcoxon rank-sum DE of
  CPM-normalised log1p values against the real control (pdex's test: tie and continuity
  corrected), genes gated on the control's mean CPM > 5, BH within each perturbation.

Aggregate: mean (NaN skipped) per metric, and ``expr_mse_unbiased_capped_norm`` =
sum(capped) / sum(distance). Definitions and the known differences: docs/METRICS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.errors import DataError
from statecore.evaluation.de import benjamini_hochberg, rank_sum_arrays


@dataclass(frozen=True)
class Vcc2026Config:
    """cell-eval2 0.20.0's ``vcc2026`` preset values that move a number."""

    bulk_target_sum: float = 5e4  # the expression comparator's per-group target sum
    target_sum: float = 1e6  # per-cell normalisation for DE (CPM)
    min_control_cpm: float = 5.0  # DE gene gate: control mean CPM must exceed this
    p_adj_threshold: float = 0.05
    epsilon: float = 1e-9  # LFC pseudo-count on arithmetic CPM means
    pred_trace_cap_k: float = 1.0  # pred jackknife capped at k x the real one
    reach_purity_floor: float = 0.9
    lfc_nmae_min_gate: int = 10


PER_PERT_METRICS = (
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_lfc_nmae",
    "de_wilcoxon_sig_jaccard",
    "expr_distance_unbiased",
    "expr_mse_unbiased",
    "expr_mse_unbiased_capped",
    "expr_real_mass_ratio",
    "pds_cosine",
)
DERIVED = {"expr_mse_unbiased_capped_norm": ("expr_mse_unbiased_capped", "expr_distance_unbiased")}
AGG_STATISTICS = ("count", "null_count", "mean", "std", "min", "max", "median")


# ---------------------------------------------------------------- input


def check_counts(x, which: str, allow_fractional: bool = False) -> None:
    """cell-eval2 refuses anything but finite, non-negative integer counts; so do we
    (``allow_fractional``: its baseline allowance, non-negative finite values)."""
    vals = x.data if sp.issparse(x) else np.asarray(x)
    if vals.size == 0:
        return
    integer = allow_fractional or np.array_equal(vals, np.round(vals))
    if not np.isfinite(vals).all() or vals.min() < 0 or not integer:
        raise DataError(
            f"{which} X is not raw counts (non-negative integers); the vcc2026 profile scores raw "
            "counts only: write predictions with `predict --counts` and the real cells with "
            "`--real-out` (taken from layers['counts'])"
        )


def _group_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique labels and each cell's index into them (cell-eval2's group order)."""
    groups, codes = np.unique(labels.astype(str), return_inverse=True)
    return groups, codes.ravel()


def _indicator(codes: np.ndarray, k: int) -> sp.csr_matrix:
    n = codes.size
    return sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(k, n))


def _row_sums(x) -> np.ndarray:
    """Row totals summed in float64 (cell-eval2 widens before scanpy's normalize_total; a float32
    sum rounds fractional counts, e.g. its generic baseline's)."""
    if sp.issparse(x):
        if x.dtype != np.float64:
            x = sp.csr_matrix((x.data.astype(np.float64), x.indices, x.indptr), shape=x.shape)
        return np.asarray(x.sum(axis=1)).ravel()
    return np.asarray(x, dtype=np.float64).sum(axis=1)


# ---------------------------------------------------------------- expression space


@dataclass(frozen=True)
class CountBulks:
    """Per-group count sums, their ``bulk_lognorm`` means and jackknife corrections."""

    groups: np.ndarray  # (K,) str, sorted
    sums: np.ndarray  # (K, G) summed counts
    means: np.ndarray  # (K, G) log1p(TS * sums / row total)
    jk: np.ndarray  # (K,) delete-1 jackknife variance of the bulk, summed over genes


def bulk_lognorm(sums: np.ndarray, target_sum: float) -> np.ndarray:
    """``log1p(TS * P / sum_g P)`` per group; an all-zero group stays zero."""
    tot = sums.sum(axis=1)
    scale = np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0)
    return np.log1p(sums * scale[:, None])


def jackknife(x_group, target_sum: float, chunk: int = 512) -> float:
    """Delete-1 jackknife ``C = (n-1)/n sum_g sum_i (v_ig - mean_i v_ig)^2`` of the bulk_lognorm
    bulk of one group, where ``v_i`` is the bulk without cell ``i``. Deviations are taken from
    the full bulk before squaring (variance is shift-invariant; it avoids cancellation)."""
    n = x_group.shape[0]
    if n < 2:
        return 0.0
    p = np.asarray(x_group.sum(axis=0), dtype=np.float64).ravel()
    lib = _row_sums(x_group)
    tot = float(p.sum())
    if tot <= 0:
        return 0.0
    b = np.log1p(target_sum * p / tot)
    s1 = np.zeros(p.size)
    s2 = np.zeros(p.size)
    for s in range(0, n, chunk):
        blk = x_group[s : s + chunk]
        y = blk.toarray() if sp.issparse(blk) else np.asarray(blk, dtype=np.float64)
        r = tot - lib[s : s + chunk]
        if (r < 0).any():
            raise DataError("negative leave-one-out library: the input is not counts")
        safe = np.where(r > 0, r, 1.0)[:, None]
        v = np.where((r > 0)[:, None], np.log1p(target_sum * (p[None, :] - y) / safe), 0.0) - b
        s1 += v.sum(axis=0)
        s2 += np.einsum("ij,ij->j", v, v)
    return max((n - 1) / n * float((s2 - s1 * s1 / n).sum()), 0.0)


def count_bulks(x, labels: np.ndarray, target_sum: float, need_jk=None) -> CountBulks:
    """Bulks of every group; jackknife only for groups in ``need_jk`` (default: all)."""
    groups, codes = _group_codes(labels)
    ind = _indicator(codes, len(groups))
    xf = x.astype(np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    sums = ind @ xf
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(groups) + 1))
    jk = np.zeros(len(groups))
    for k, g in enumerate(groups):
        if need_jk is None or g in need_jk:
            jk[k] = jackknife(xf[order[bounds[k] : bounds[k + 1]]], target_sum)
    return CountBulks(groups=groups, sums=sums, means=bulk_lognorm(sums, target_sum), jk=jk)


def target_columns(labels, genes: np.ndarray) -> dict[int, int]:
    """``{row -> gene column}`` for labels that name a measured gene (cell-eval2's resolution
    without a target_gene_map: the label itself matched against var_names)."""
    pos = {g: j for j, g in enumerate(np.asarray(genes).astype(str))}
    return {i: pos[str(p)] for i, p in enumerate(labels) if str(p) in pos}


def _row_weights(n_rows: int, n_genes: int, cols: dict[int, int]) -> np.ndarray:
    n_row = np.full(n_rows, float(n_genes))
    n_row[list(cols)] = n_genes - 1
    return np.divide(1.0, n_row, out=np.zeros_like(n_row), where=n_row > 0)


def _across_pert_budget(pred: np.ndarray, cols: dict[int, int], w: np.ndarray) -> float:
    """Weighted across-perturbation sum of squares of the predicted bulks, each perturbation's
    own gene left out (cell-eval2's bound on the prediction's sampling correction)."""
    dev = pred - pred.mean(axis=0)
    s1 = w @ dev
    s2 = w @ (dev * dev)
    wsum = np.full(pred.shape[1], w.sum())
    cnt = np.full(pred.shape[1], float(pred.shape[0]))
    for k, c in cols.items():
        s1[c] -= w[k] * dev[k, c]
        s2[c] -= w[k] * dev[k, c] ** 2
        wsum[c] -= w[k]
        cnt[c] -= 1.0
    ok = (cnt >= 2.0) & (wsum > 0.0)
    if not ok.any():
        return 0.0
    return float(np.maximum(s2[ok] - s1[ok] ** 2 / wsum[ok], 0.0).sum())


def _unbiased_per_gene(a, b, a_jk, b_jk, cols: dict[int, int]) -> np.ndarray:
    """(||a - b||^2 - a_jk - b_jk) per gene, each row's own gene dropped from the distance."""
    d = a - b
    summed = np.einsum("ij,ij->i", d, d) - a_jk - b_jk
    n_row = np.full(a.shape[0], float(a.shape[1]))
    for k, c in cols.items():
        summed[k] -= d[k, c] ** 2
        n_row[k] = a.shape[1] - 1
    return np.divide(summed, n_row, out=np.full(summed.shape, np.nan), where=n_row > 0)


def expression_metrics(
    pred: CountBulks, real: CountBulks, perts: np.ndarray, control: str, genes, cfg: Vcc2026Config
) -> dict[str, np.ndarray]:
    """The four expr_* metrics for ``perts`` (rows present in both bulks)."""
    ri = pd.Index(real.groups).get_indexer(perts)
    pi = pd.Index(pred.groups).get_indexer(perts)
    ci = int(np.flatnonzero(real.groups == control)[0])
    cols = target_columns(perts, genes)
    pm, rm = pred.means[pi], real.means[ri]
    pj, rj = pred.jk[pi], real.jk[ri]
    capped = np.minimum(pj, cfg.pred_trace_cap_k * rj)
    w = _row_weights(len(perts), pm.shape[1], cols)
    claim = float((capped * w).sum())
    if claim > 0.0:
        ratio = _across_pert_budget(pm, cols, w) / claim
        if ratio < 1.0:
            capped = capped * ratio
    ctrl = np.broadcast_to(real.means[ci], rm.shape)
    return {
        "expr_mse_unbiased": _unbiased_per_gene(pm, rm, pj, rj, cols),
        "expr_mse_unbiased_capped": _unbiased_per_gene(pm, rm, capped, rj, cols),
        "expr_distance_unbiased": _unbiased_per_gene(rm, ctrl, rj, np.full(len(perts), real.jk[ci]), cols),
        "expr_real_mass_ratio": np.expm1(rm).sum(axis=1) / cfg.bulk_target_sum,
    }


def pds_cosine(
    pred: CountBulks, real: CountBulks, perts: np.ndarray, control: str, genes, own_control: bool = False
) -> np.ndarray:
    """1 - midrank / (N - 1) of each true perturbation among all N real effects by cosine
    distance to the predicted effect (both against the REAL control, or with ``own_control``
    the prediction's against its own: control_source 'pred'); every column that is the
    target gene of some real perturbation is removed first (scope 'panel')."""
    ci = int(np.flatnonzero(real.groups == control)[0])
    real_perts = np.delete(real.groups, ci)
    real_eff = np.delete(real.means, ci, axis=0) - real.means[ci]
    pred_ctrl = pred.means[int(np.flatnonzero(pred.groups == control)[0])] if own_control else real.means[ci]
    pred_eff = pred.means[pd.Index(pred.groups).get_indexer(perts)] - pred_ctrl
    panel = np.unique(list(target_columns(real_perts, genes).values())).astype(int)
    keep = np.ones(real_eff.shape[1], bool)
    keep[panel] = False
    if not keep.any():
        raise DataError("every gene is the target of some perturbation: pds_cosine has no features left")
    real_eff, pred_eff = real_eff[:, keep], pred_eff[:, keep]
    sim = pred_eff @ real_eff.T
    den = (
        np.sqrt(np.einsum("ij,ij->i", pred_eff, pred_eff))[:, None]
        * np.sqrt(np.einsum("ij,ij->i", real_eff, real_eff))[None, :]
    )
    cos = np.divide(sim, den, out=np.zeros_like(sim), where=den != 0)
    dist = np.clip(1.0 - cos, 0.0, 2.0)
    match = pd.Index(real_perts).get_indexer(perts)
    own = dist[np.arange(len(perts)), match][:, None]
    rank = (dist < own).sum(axis=1) + ((dist == own).sum(axis=1) - 1) / 2.0
    n = len(real_perts) - 1
    return np.ones(len(perts)) if n <= 0 else 1.0 - rank / n


# ---------------------------------------------------------------- differential expression


@dataclass(frozen=True)
class GatedDE:
    """DE of K perturbations vs a control over all G genes (row k = perts[k]); genes outside
    the control-CPM gate are absent from cell-eval2's table: NaN here and ``keep`` False."""

    perts: np.ndarray  # (K,)
    genes: np.ndarray  # (G,) every gene
    keep: np.ndarray  # (G,) bool: the gene passes this side's control-CPM gate
    lfc: np.ndarray  # (K, G) log2((mean CPM + eps) / (control mean CPM + eps)), NaN off the gate
    p_value: np.ndarray  # (K, G) pdex's rank-sum p-value, NaN off the gate
    p_adj: np.ndarray  # (K, G) BH within each perturbation over the gated genes, NaN off the gate


def _cpm_exact(x, target_sum: float):
    """Row division (not multiplication by the reciprocal), so values equal scanpy's bit for bit."""
    f = _row_sums(x) / target_sum
    f[f == 0] = 1.0
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64, copy=True)
        x.data /= np.repeat(f, np.diff(x.indptr))
        return x
    return np.asarray(x, dtype=np.float64) / f[:, None]


def _log1p(x):
    if sp.issparse(x):
        x = x.copy()
        np.log1p(x.data, out=x.data)
        return x
    return np.log1p(x)


def control_gate(ctrl_cpm, cfg: Vcc2026Config) -> np.ndarray:
    """Genes kept for DE: the control's arithmetic mean CPM above ``min_control_cpm``."""
    mean = np.asarray(ctrl_cpm.mean(axis=0), dtype=np.float64).ravel()
    return mean * (1e6 / cfg.target_sum) > cfg.min_control_cpm


def gated_de(cpm_target, labels, cpm_ctrl, perts, genes, cfg: Vcc2026Config) -> GatedDE:
    """DE of each label group of ``cpm_target`` (CPM rows) vs the control rows ``cpm_ctrl``,
    over the genes that pass this control's CPM gate."""
    keep = control_gate(cpm_ctrl, cfg)
    genes = np.asarray(genes)
    ctrl = "\x00control"  # a label no perturbation can carry
    parts = [cpm_ctrl[:, keep], cpm_target[:, keep]]  # gated genes only: no full-width copy
    sub = sp.vstack(parts).tocsr() if sp.issparse(cpm_target) else np.vstack(parts)
    lab = np.r_[np.full(cpm_ctrl.shape[0], ctrl, dtype=object), np.asarray(labels, dtype=object)]
    de = rank_sum_arrays(_log1p(sub), lab, ctrl, genes=genes[keep], pseudobulks=False)
    idx = pd.Index(de.groups).get_indexer(perts)
    if (idx < 0).any():
        raise DataError(f"no cells for perturbation(s) {list(np.asarray(perts)[idx < 0])[:5]}")
    # LFC of arithmetic CPM means (cell-eval2's mean_calc='arithmetic', epsilon 1e-9)
    codes = pd.Index(perts).get_indexer(np.asarray(labels, dtype=str))
    ok = codes >= 0
    ind = _indicator(codes[ok], len(perts))
    n = np.asarray(ind.sum(axis=1)).ravel()
    tsub = parts[1] if ok.all() else cpm_target[np.flatnonzero(ok)][:, keep]
    tmean = ind @ tsub
    tmean = (tmean.toarray() if sp.issparse(tmean) else np.asarray(tmean)) / n[:, None]
    rmean = np.asarray(cpm_ctrl[:, keep].mean(axis=0), dtype=np.float64).ravel()
    p = de.p_value[idx]

    def wide(v):
        out = np.full((len(perts), genes.size), np.nan)
        out[:, keep] = v
        return out

    return GatedDE(
        perts=np.asarray(perts),
        genes=genes,
        keep=keep,
        lfc=wide(np.log2((tmean + cfg.epsilon) / (rmean + cfg.epsilon))),
        p_value=wide(p),
        p_adj=wide(benjamini_hochberg(p) if p.shape[1] else p),
    )


def _defined(v: np.ndarray) -> np.ndarray:
    return ~np.isnan(v) & (v != 0)


def _on_target(real: GatedDE) -> np.ndarray:
    """(K, G) each perturbation's own gene, where it resolves: its label names a gene of the
    REAL table (cell-eval2's dataset-global resolution against the real DE features)."""
    k, g = real.lfc.shape
    out = np.zeros((k, g), bool)
    for i, c in target_columns(real.perts, real.genes).items():
        out[i, c] = bool(real.keep[c])
    return out


def de_metrics(real: GatedDE, pred: GatedDE, cfg: Vcc2026Config) -> dict[str, np.ndarray]:
    """sig_jaccard, direction_fidelity_yield_raw, direction_reach_raw and lfc_nmae per
    perturbation; each perturbation's own gene row is excluded first (cell-eval2 #172). The
    direction metrics rank only genes in BOTH tables (cell-eval2's inner join)."""
    on_target = _on_target(real)
    a = cfg.p_adj_threshold
    with np.errstate(invalid="ignore"):
        rsig = (real.p_adj < a) & ~on_target
        psig = (pred.p_adj < a) & ~on_target
    inter, union = (rsig & psig).sum(1), (rsig | psig).sum(1)
    out = {"de_wilcoxon_sig_jaccard": np.where(union == 0, 1.0, inter / np.maximum(union, 1))}
    both = (real.keep & pred.keep)[None, :]
    in_denom = _defined(real.lfc) & both
    match = in_denom & _defined(pred.lfc) & (np.sign(pred.lfc) == np.sign(real.lfc))
    n_conf = rsig.sum(1)
    scored = psig & in_denom
    n_pred, hits = scored.sum(1), (scored & match).sum(1)
    den = np.maximum(n_pred, n_conf)
    out["de_wilcoxon_direction_fidelity_yield_raw"] = np.where(den == 0, np.nan, hits / np.maximum(den, 1))
    out["de_wilcoxon_direction_reach_raw"] = _reach_raw(pred, rsig & both, psig, in_denom, match, n_conf, cfg)
    out["de_wilcoxon_lfc_nmae"] = _lfc_nmae(real, pred, rsig, cfg)
    return out


def _reach_raw(pred, pool, psig, in_denom, match, n_conf, cfg) -> np.ndarray:
    """Largest prefix (pred-significant first, then by pred p_adj, p-value, -|LFC|, gene name)
    of the ranked pool (real-significant genes in both tables) whose sign-match purity stays
    >= the floor, over n_conf (all real-significant genes)."""
    name_rank = np.argsort(np.argsort(pred.genes.astype(str), kind="stable"), kind="stable")
    out = np.full(len(pred.perts), np.nan)
    for i in range(len(pred.perts)):
        if n_conf[i] == 0:
            continue
        u = np.flatnonzero(pool[i])
        pa, pv, pl = pred.p_adj[i, u], pred.p_value[i, u], pred.lfc[i, u]
        pa = np.where(np.isnan(pa), np.inf, pa)
        pv = np.where(np.isnan(pv), np.inf, pv)
        abs_l = np.where(np.isnan(pl), -np.inf, np.abs(pl))
        order = np.lexsort((name_rank[u], -abs_l, pv, pa, ~psig[i, u]))
        nd = np.cumsum(in_denom[i, u][order])
        nm = np.cumsum(match[i, u][order])
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = (nd > 0) & (nm / np.where(nd > 0, nd, 1) >= cfg.reach_purity_floor)
        out[i] = (nd[ok].max() if ok.any() else 0) / n_conf[i]
    return out


def _lfc_nmae(real, pred, rsig, cfg) -> np.ndarray:
    """mean |pred LFC - real LFC| / mean |real LFC| over the real-significant genes with a finite
    real LFC (a gene missing from the pred table counts as LFC 0); NaN (omitted, as cell-eval2
    leaves no row) below ``lfc_nmae_min_gate`` genes."""
    gate = rsig & np.isfinite(real.lfc)
    n = gate.sum(1)
    pl = np.where(np.isfinite(pred.lfc), pred.lfc, 0.0)
    rl = np.where(gate, real.lfc, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        num = (np.abs(pl - rl) * gate).sum(1) / n
        den = np.abs(rl).sum(1) / n
        val = num / den
    bad = (n < cfg.lfc_nmae_min_gate) | ~np.isfinite(den) | (den == 0)
    return np.where(bad, np.nan, val)


# ---------------------------------------------------------------- AnnData adapter and aggregate


@dataclass(frozen=True)
class Vcc2026Result:
    results: pd.DataFrame  # one row per perturbation, cell-eval2's metric names
    agg: pd.DataFrame  # statistic x metric (+ expr_mse_unbiased_capped_norm)
    messages: tuple[str, ...] = ()
    omitted: pd.DataFrame | None = field(default=None, repr=False)  # rows cell-eval2 leaves out


def aggregate(results: pd.DataFrame, omitted: pd.DataFrame | None = None) -> pd.DataFrame:
    """cell-eval2's wide aggregate: count (rows, NaN included, omitted rows not), null_count,
    then mean/std/min/max/median over the non-NaN values; the derived capped_norm is the
    ratio of sums over perturbations where both parts are finite."""
    table = {}
    for c in [c for c in results.columns if c not in ("perturbation", "context")]:
        v = results[c].to_numpy(np.float64)
        if omitted is not None and c in omitted:
            v = v[~omitted[c].to_numpy(bool)]
        f = v[~np.isnan(v)]
        stats = [float(v.size), 0.0]
        if f.size:
            stats += [f.mean(), f.std(ddof=1) if f.size > 1 else np.nan, f.min(), f.max(), np.median(f)]
        else:
            stats += [np.nan] * 5
        table[c] = stats
    for name, (num, den) in DERIVED.items():
        if num in results and den in results:
            n, d = results[num].to_numpy(np.float64), results[den].to_numpy(np.float64)
            ok = np.isfinite(n) & np.isfinite(d)
            ratio = n[ok].sum() / d[ok].sum() if ok.any() else np.nan
            table[name] = [np.nan, np.nan, ratio, np.nan, np.nan, np.nan, np.nan]
    return pd.DataFrame({"statistic": list(AGG_STATISTICS), **dict(sorted(table.items()))})


def _matrix(adata, which: str, allow_fractional: bool = False):
    x = adata.X
    if x is None:
        raise DataError(f"{which} AnnData has no X matrix")
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    check_counts(x, which, allow_fractional)
    return x


@dataclass(frozen=True)
class CountScores:
    """Per-perturbation values (``perts`` order) and both sides' DE, from :func:`score_counts`."""

    values: dict[str, np.ndarray]
    real_de: GatedDE
    pred_de: GatedDE


def score_counts(
    xp, lp, xr, lr, perts, control: str, genes, cfg: Vcc2026Config, own_control=False, threads: int = 2
):
    """Every per-perturbation vcc2026 metric from aligned count matrices and labels.

    ``xr``/``lr`` hold the real perturbations and control; ``xp``/``lp`` the predicted
    perturbations (and, with ``own_control``, the prediction's own control cells: cell-eval2's
    ``control_source='pred'``, used by its replicate anchor, where pds and the predicted DE are
    measured against the prediction's control). Otherwise every effect is against the REAL
    control (``control_source='real'``, the scored setting). The real and the predicted side
    (bulks and DE) run in ``threads`` threads (numpy releases the GIL; the sides are
    independent, so results do not depend on it)."""
    is_ctrl = lr == control

    def real_side():
        rb = count_bulks(xr, lr, cfg.bulk_target_sum, need_jk=set(perts) | {control})
        cpm = _cpm_exact(xr, cfg.target_sum)
        ctrl = cpm[np.flatnonzero(is_ctrl)]
        return rb, gated_de(cpm[np.flatnonzero(~is_ctrl)], lr[~is_ctrl], ctrl, perts, genes, cfg)

    def pred_side():
        pb = count_bulks(xp, lp, cfg.bulk_target_sum, need_jk=set(perts))
        cpm = _cpm_exact(xp, cfg.target_sum)
        if own_control:
            pc = lp == control
            return pb, gated_de(cpm[np.flatnonzero(~pc)], lp[~pc], cpm[np.flatnonzero(pc)], perts, genes, cfg)
        ctrl = _cpm_exact(xr[np.flatnonzero(is_ctrl)], cfg.target_sum)  # row-wise: as the real side's
        return pb, gated_de(cpm, lp, ctrl, perts, genes, cfg)

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            fr, fp = pool.submit(real_side), pool.submit(pred_side)
            (rb, rde), (pb, pde) = fr.result(), fp.result()
    else:
        (rb, rde), (pb, pde) = real_side(), pred_side()
    vals = expression_metrics(pb, rb, perts, control, genes, cfg)
    vals["pds_cosine"] = pds_cosine(pb, rb, perts, control, genes, own_control=own_control)
    vals.update(de_metrics(rde, pde, cfg))
    return CountScores(vals, rde, pde)


def _shared_perts(lp, lr, control, pert_col, messages, own_control):
    if control not in set(lr):
        raise DataError(f"control {control!r} not found in real obs[{pert_col!r}]; pass --control")
    if own_control and control not in set(lp):
        raise DataError(f"control {control!r} not found in pred obs[{pert_col!r}]")
    pr, pp = set(lr) - {control}, set(lp) - {control}
    perts = np.array(sorted(pr & pp))
    if perts.size == 0:
        raise DataError(f"pred and real share no perturbation besides {control!r}")
    for only, side in ((pr - pp, "real"), (pp - pr, "pred")):
        if only:
            messages.append(f"{len(only)} perturbation(s) only in {side} were left out: {sorted(only)[:10]}")
    return perts


def results_frame(perts, values: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per perturbation, which cells cell-eval2 omits: lfc_nmae below its gate)."""
    results = pd.DataFrame({"perturbation": perts, **{m: values[m] for m in PER_PERT_METRICS}})
    omitted = pd.DataFrame({m: np.zeros(len(perts), bool) for m in PER_PERT_METRICS})
    omitted["de_wilcoxon_lfc_nmae"] = np.isnan(values["de_wilcoxon_lfc_nmae"])
    return results, omitted


def evaluate_vcc2026(
    pred,
    real,
    *,
    control: str,
    pert_col: str = "perturbation",
    config: Vcc2026Config | None = None,
    control_source: str = "real",
    allow_fractional: bool = False,
) -> Vcc2026Result:
    """Score a raw-count prediction against raw-count real cells with the vcc2026 metrics.

    Both AnnData carry ``obs[pert_col]``; ``real`` must hold the control cells. With
    ``control_source='real'`` (the preset) ``pred``'s own control cells, if any, are not used:
    every effect is measured against the real control; ``'pred'`` measures the prediction's
    effects against its own control cells. ``allow_fractional`` accepts non-integer predicted
    counts (cell-eval2's allowance for its generic-response baseline).
    Perturbations present on one side only are left out and listed in ``messages``."""
    cfg = config or Vcc2026Config()
    if control_source not in ("real", "pred"):
        raise DataError(f"control_source must be 'real' or 'pred', not {control_source!r}")
    own = control_source == "pred"
    messages: list[str] = []
    genes = np.asarray(real.var_names).astype(str)
    if not np.array_equal(genes, np.asarray(pred.var_names).astype(str)):
        if set(genes) != set(np.asarray(pred.var_names).astype(str)):
            raise DataError("pred and real have different genes; predict on the real data's var_names")
        pred = pred[:, genes]
        messages.append("pred genes reordered to match real")
    for a, which in ((real, "real"), (pred, "pred")):
        if pert_col not in a.obs.columns:
            raise DataError(f"{which} has no obs column {pert_col!r}; pass --pert-col")
    lr = real.obs[pert_col].astype(str).to_numpy()
    lp = pred.obs[pert_col].astype(str).to_numpy()
    perts = _shared_perts(lp, lr, control, pert_col, messages, own)
    keep_r = np.isin(lr, [*perts, control])
    keep_p = np.isin(lp, [*perts, control] if own else perts)
    xr = _matrix(real, "real")[keep_r]
    xp = _matrix(pred, "pred", allow_fractional)[keep_p]
    if not target_columns(perts, genes):
        messages.append(
            "no perturbation names a measured gene: nothing is excluded (cell-eval2 refuses this)"
        )
    scores = score_counts(xp, lp[keep_p], xr, lr[keep_r], perts, control, genes, cfg, own_control=own)
    results, omitted = results_frame(perts, scores.values)
    return Vcc2026Result(results, aggregate(results, omitted), tuple(messages), omitted)
