"""Cell-Eval-equivalent evaluation of predicted vs real perturbation responses.

Layers: a small registry (name, best value, description); pure functions over arrays (pseudobulk
metrics on ``PseudobulkArrays``, DE metrics on ``statecore.evaluation.de.DEArrays``); an aggregate and a
baseline score; and an AnnData adapter, ``evaluate``. Definitions follow cell-eval 0.8.2 (see
docs/METRICS.md for each metric and the few places where we knowingly differ).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from statecore.data.pseudobulk import group_means
from statecore.errors import DataError
from statecore.evaluation.de import DEArrays, rank_sum_arrays

FDR_THRESHOLD = 0.05
TOP_K = (50, 100, 200, 500)
CHALLENGE_METRICS = ("overlap_at_N", "discrimination_score_l1", "mae")


@dataclass(frozen=True)
class MetricInfo:
    name: str
    best: float | None  # 1.0, 0.0, or None (not scored against a baseline)
    description: str


def _registry() -> dict[str, MetricInfo]:
    items = (
        [
            MetricInfo(f"{m}_at_{k}", 1.0, f"{m} of the top {k} DE genes (by |log2FC|) of real and pred")
            for m in ("overlap", "precision")
            for k in ("N", *TOP_K)
        ]
        + [
            MetricInfo(
                "de_spearman_sig",
                1.0,
                "Spearman of the number of significant genes, real vs pred, over perturbations",
            ),
            MetricInfo(
                "de_direction_match", 1.0, "fraction of real significant genes with the same LFC sign"
            ),
            MetricInfo("de_spearman_lfc_sig", 1.0, "Spearman of LFCs over the real significant genes"),
            MetricInfo(
                "de_sig_genes_recall", 1.0, "fraction of real significant genes also significant in pred"
            ),
            MetricInfo("de_nsig_counts_real", None, "number of significant genes in real"),
            MetricInfo("de_nsig_counts_pred", None, "number of significant genes in pred"),
            MetricInfo("pr_auc", 1.0, "average precision of -log10(pred FDR) for real significance"),
            MetricInfo("roc_auc", 1.0, "ROC AUC of -log10(pred FDR) for real significance"),
            MetricInfo("pearson_delta", 1.0, "Pearson of pseudobulk deltas from control, pred vs real"),
            MetricInfo("mse", 0.0, "mean squared error of the pseudobulks"),
            MetricInfo("mae", 0.0, "mean absolute error of the pseudobulks"),
            MetricInfo("mse_delta", 0.0, "mean squared error of the deltas from control"),
            MetricInfo("mae_delta", 0.0, "mean absolute error of the deltas from control"),
        ]
        + [
            MetricInfo(
                f"discrimination_score_{d}",
                1.0,
                f"1 - rank/N of the true perturbation among real deltas by {d} distance",
            )
            for d in ("l1", "l2", "cosine")
        ]
        + [  # Systema (Vinas Torne et al., Nat Biotechnol 2025): effects vs the perturbed centroid
            MetricInfo(
                "pearson_delta_pert",
                None,
                "Pearson of pseudobulk deltas from the mean of all real perturbed cells, pred vs real",
            ),
            MetricInfo(
                "discrimination_score_cosine_pert",
                None,
                "PDS (cosine) of deltas from the mean of all real perturbed cells",
            ),
        ]
    )
    return {m.name: m for m in items}


METRICS: dict[str, MetricInfo] = _registry()
# Metrics left undefined (empty, not NaN) for perturbations with no real significant gene,
# exactly as cell-eval's joins leave them; the aggregate's count/null_count depend on this.
_ONLY_WITH_REAL_SIG = ("de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall")


# ---------------------------------------------------------------- pure array metrics


@dataclass(frozen=True)
class PseudobulkArrays:
    """Per-perturbation pseudobulks (mean log1p expression) of real and pred, rows = ``perts``."""

    perts: np.ndarray  # (K,) str
    genes: np.ndarray  # (G,) str
    real: np.ndarray  # (K, G)
    pred: np.ndarray  # (K, G)
    real_ctrl: np.ndarray  # (G,)
    pred_ctrl: np.ndarray  # (G,)

    @property
    def real_delta(self) -> np.ndarray:
        return self.real - self.real_ctrl[None, :]

    @property
    def pred_delta(self) -> np.ndarray:
        return self.pred - self.pred_ctrl[None, :]


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r; NaN where either row is constant (as scipy.stats.pearsonr)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a * b).sum(-1) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho (Pearson of average ranks); NaN for < 2 points or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2:
        return float("nan")
    return float(_pearson_rows(rankdata(x)[None], rankdata(y)[None])[0])


def pseudobulk_metrics(pb: PseudobulkArrays) -> dict[str, np.ndarray]:
    """pearson_delta, mse, mae, mse_delta, mae_delta per perturbation."""
    dr, dp = pb.real_delta, pb.pred_delta
    return {
        "pearson_delta": _pearson_rows(dp, dr),
        "mse": ((pb.pred - pb.real) ** 2).mean(axis=1),
        "mae": np.abs(pb.pred - pb.real).mean(axis=1),
        "mse_delta": ((dp - dr) ** 2).mean(axis=1),
        "mae_delta": np.abs(dp - dr).mean(axis=1),
    }


def _distances(real: np.ndarray, pred_row: np.ndarray, metric: str) -> np.ndarray:
    diff = real - pred_row[None, :]
    if metric == "l1":
        return np.abs(diff).sum(axis=1)
    if metric == "l2":
        return np.sqrt((diff * diff).sum(axis=1))
    if metric == "cosine":  # sklearn: zero vectors stay zero after normalising -> distance 1
        rn = np.linalg.norm(real, axis=1)
        pn = np.linalg.norm(pred_row)
        rn, pn = np.where(rn == 0, 1.0, rn), (pn if pn != 0 else 1.0)
        return np.clip(1.0 - (real @ pred_row) / (rn * pn), 0.0, 2.0)
    raise ValueError(f"unknown distance {metric!r}")


def discrimination_distances(
    pb: PseudobulkArrays, metric: str = "l1", exclude_target_gene: bool = True
) -> np.ndarray:
    """(K, K) distance of each predicted delta (row i) to every real delta (column j): the matrix
    the PDS ranks, and the one the app draws. A gene named like row i's perturbation is left out
    of row i (its knock-down is trivially predictable)."""
    dr, dp = pb.real_delta, pb.pred_delta
    gene_set = set(pb.genes.tolist())
    out = np.empty((len(pb.perts), len(pb.perts)))
    for i, p in enumerate(pb.perts):
        keep = pb.genes != p if exclude_target_gene and p in gene_set else slice(None)
        out[i] = _distances(dr[:, keep], dp[i, keep], metric)
    return out


@dataclass(frozen=True)
class DiscriminationRanks:
    """Where each true perturbation lands among the real deltas, 0 = closest.

    ``rank`` is cell-eval's: the position in ``np.argsort`` of the row, so real deltas at exactly
    the same distance are ordered by their index (alphabetically); ``best``/``worst`` bound the
    rank over every order of those ties, ``tied`` counts the other perturbations at the same distance."""

    rank: np.ndarray  # (K,) int
    best: np.ndarray  # (K,) int
    worst: np.ndarray  # (K,) int
    tied: np.ndarray  # (K,) int


def discrimination_ranks(dist: np.ndarray) -> DiscriminationRanks:
    own = np.diag(dist)[:, None]
    rank = np.array([int(np.flatnonzero(np.argsort(row) == i)[0]) for i, row in enumerate(dist)], dtype=int)
    tied = (dist == own).sum(axis=1) - 1
    best = (dist < own).sum(axis=1)
    return DiscriminationRanks(rank=rank, best=best, worst=best + tied, tied=tied)


def discrimination_score(
    pb: PseudobulkArrays, metric: str = "l1", exclude_target_gene: bool = True
) -> np.ndarray:
    """PDS per perturbation: 1 - rank/N of the true perturbation among all real deltas, ranked by
    distance to the predicted delta (rank 0 = closest; ``discrimination_ranks``). NaN when N == 1."""
    k = len(pb.perts)
    if k < 2:
        return np.full(k, np.nan)
    ranks = discrimination_ranks(discrimination_distances(pb, metric, exclude_target_gene))
    return 1.0 - ranks.rank / k


def pseudobulks(pred, real, *, control: str, pert_col: str = "perturbation") -> PseudobulkArrays:
    """Pseudobulks of the perturbations pred and real share (real's gene order), for views that
    need the arrays ``evaluate`` scores (the PDS heatmap)."""
    genes = np.asarray(real.var_names).astype(str)
    lr, lp = _labels(real, pert_col, "real"), _labels(pred, pert_col, "pred")
    perts = np.array(sorted((set(lr) & set(lp)) - {control}))
    groups = np.append(perts, control)
    br = _group_means(_matrix(real), lr, groups)
    bp = _group_means(_matrix(pred[:, genes]), lp, groups)
    return PseudobulkArrays(
        perts=perts, genes=genes, real=br[:-1], pred=bp[:-1], real_ctrl=br[-1], pred_ctrl=bp[-1]
    )


def _top_sig(fdr: np.ndarray, abs_lfc: np.ndarray, thr: float) -> np.ndarray:
    """Indices of significant genes by descending |LFC|, ties in gene order (polars 'ordinal')."""
    sig = np.flatnonzero(fdr < thr)
    return sig[np.argsort(-abs_lfc[sig], kind="stable")]


def de_metrics(real: DEArrays, pred: DEArrays, fdr_threshold: float = FDR_THRESHOLD) -> dict[str, np.ndarray]:
    """All DE metrics per perturbation (rows of ``real``; ``pred`` must have the same groups/genes).

    Like cell-eval, FDR and LFC are compared as float32 (cell-eval casts its DE tables)."""
    if not (np.array_equal(real.groups, pred.groups) and np.array_equal(real.genes, pred.genes)):
        raise DataError("real and pred DE tables cover different perturbations or genes")
    rf, pf = real.fdr.astype(np.float32), pred.fdr.astype(np.float32)
    rl, pl_ = real.lfc.astype(np.float32), pred.lfc.astype(np.float32)
    k = len(real.groups)
    out: dict[str, np.ndarray] = {
        n: np.full(k, np.nan)
        for n in METRICS
        if not n.startswith(("pearson", "mse", "mae", "discrimination"))
    }
    rsig, psig = rf < fdr_threshold, pf < fdr_threshold
    n_real, n_pred = rsig.sum(axis=1), psig.sum(axis=1)
    for i in range(k):
        rtop = _top_sig(rf[i], np.abs(rl[i]), fdr_threshold)
        ptop = _top_sig(pf[i], np.abs(pl_[i]), fdr_threshold)
        for kk in ("N", *TOP_K):
            for m, base in (("overlap", rtop.size), ("precision", ptop.size)):
                k_eff = base if kk == "N" else min(kk, base)
                val = 0.0 if k_eff == 0 else np.intersect1d(rtop[:k_eff], ptop[:k_eff]).size / k_eff
                out[f"{m}_at_{kk}"][i] = val
        s = rsig[i]
        if n_real[i]:
            out["de_direction_match"][i] = np.mean(np.sign(rl[i, s]) == np.sign(pl_[i, s]))
            out["de_spearman_lfc_sig"][i] = spearman(rl[i, s], pl_[i, s])
            out["de_sig_genes_recall"][i] = (s & psig[i]).sum() / n_real[i]
        if 0 < n_real[i] < rsig.shape[1]:
            # float32 like cell-eval's polars column: FDRs a float32 ULP apart can tie here
            score = -np.log10(np.clip(pf[i], np.float32(1e-10), np.float32(1.0)))
            out["pr_auc"][i], out["roc_auc"][i] = _pr_roc_auc(s, score)
    has = n_real > 0
    rho = 1.0 if not has.any() else spearman(n_real[has], n_pred[has])
    out["de_spearman_sig"][:] = rho
    out["de_nsig_counts_real"] = n_real.astype(np.float64)
    out["de_nsig_counts_pred"] = n_pred.astype(np.float64)
    return out


def _pr_roc_auc(labels: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Average precision and ROC AUC (sklearn's definitions, ties as one threshold)."""
    order = np.argsort(-score, kind="stable")
    s, y = score[order], labels[order].astype(np.float64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # end of each tie group
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    pos, neg = tps[-1], fps[-1]
    recall = tps / pos
    precision = tps / (tps + fps)
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    roc = float(np.trapezoid(np.r_[0.0, tps / pos], np.r_[0.0, fps / neg]))
    return ap, roc


# ---------------------------------------------------------------- aggregate and score


def aggregate(results: pd.DataFrame, missing: pd.DataFrame | None = None) -> pd.DataFrame:
    """cell-eval's aggregate (polars ``describe``): count, null_count, mean, std, min, 25%, 50%,
    75%, max per metric. ``missing`` marks undefined entries (polars nulls, skipped); other NaNs
    propagate into mean/std as in polars, and sort last for the percentiles."""
    stats = ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    cols = [c for c in results.columns if c not in ("perturbation", "context")]
    table = {}
    for c in cols:
        v = results[c].to_numpy(dtype=np.float64)
        miss = missing[c].to_numpy(bool) if missing is not None and c in missing else np.zeros(v.size, bool)
        v = v[~miss]
        n = v.size
        fin = v[~np.isnan(v)]
        srt = np.sort(v)  # NaN last
        col = [float(n), float(miss.sum())]
        if n == 0:
            col += [np.nan] * 7
        else:
            col += [v.mean(), v.std(ddof=1) if n > 1 else np.nan, fin.min() if fin.size else np.nan]
            col += [srt[int(np.floor((n - 1) * q + 0.5))] for q in (0.25, 0.5, 0.75)]
            col += [fin.max() if fin.size else np.nan]
        table[c] = col
    return pd.DataFrame({"statistic": stats, **table})


def score_against_baseline(
    agg: pd.DataFrame, base_agg: pd.DataFrame, statistic: str = "mean"
) -> pd.DataFrame:
    """Challenge-style improvement over a baseline, per metric with a best value: best-0 metrics
    ``1 - user/base``, best-1 metrics ``(user - base) / (1 - base)``; NaN -> 0; clipped at 0.

    Rows: each metric (as cell-eval's ``score``), ``avg_score`` = mean over the challenge metrics
    (overlap_at_N, discrimination_score_l1, mae) and ``avg_score_all`` = mean over every scored
    metric (what ``cell-eval score`` calls avg_score)."""
    u = agg.set_index("statistic").loc[statistic]
    b = base_agg.set_index("statistic").loc[statistic]
    names, vals = [], []
    for best in (0.0, 1.0):  # cell-eval lists the best-0 metrics first
        for m in u.index:
            info = METRICS.get(m)
            if info is None or info.best != best or m not in b.index:
                continue
            uu, bb = np.float64(u[m]), np.float64(b[m])  # x/0 gives inf/NaN, as in numpy
            with np.errstate(divide="ignore", invalid="ignore"):
                s = (1.0 - uu / bb) if best == 0.0 else (uu - bb) / (1.0 - bb)
            names.append(m)
            vals.append(float(max(0.0, 0.0 if np.isnan(s) else s)))
    by = dict(zip(names, vals))
    challenge = [by.get(m, 0.0) for m in CHALLENGE_METRICS]
    names += ["avg_score", "avg_score_all"]
    vals += [float(np.mean(challenge)), float(np.mean(vals)) if vals else float("nan")]
    return pd.DataFrame({"metric": names, "from_baseline": vals})


# ---------------------------------------------------------------- AnnData adapter


@dataclass(frozen=True)
class EvalResult:
    results: pd.DataFrame  # one row per perturbation (and context)
    agg: pd.DataFrame  # statistic x metric (per context when split)
    real_de: pd.DataFrame
    pred_de: pd.DataFrame
    score: pd.DataFrame | None = None
    messages: tuple[str, ...] = ()
    missing: pd.DataFrame | None = field(default=None, repr=False)  # undefined entries mask
    timings: dict[str, float] = field(default_factory=dict, repr=False)  # seconds per phase

    def save(self, outdir) -> None:
        os.makedirs(outdir, exist_ok=True)
        self.results.to_csv(os.path.join(outdir, "results.csv"), index=False)
        self.agg.to_csv(os.path.join(outdir, "agg_results.csv"), index=False)
        self.real_de.to_csv(os.path.join(outdir, "real_de.csv"), index=False)
        self.pred_de.to_csv(os.path.join(outdir, "pred_de.csv"), index=False)
        if self.score is not None:
            self.score.to_csv(os.path.join(outdir, "score.csv"), index=False)


def _matrix(adata):
    x = adata.X
    if x is None:
        raise DataError("AnnData has no X matrix")
    return x if sp.issparse(x) else np.asarray(x)


def _check_log1p(x, which: str) -> None:
    vals = x.data if sp.issparse(x) else x
    if vals.size == 0:
        return
    lo, hi = float(np.min(vals)), float(np.max(vals))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{which} X contains NaN or infinite values; evaluation needs finite log1p values")
    # integer-valued data = raw counts; a leading sample decides, as cell-eval/pdex heuristics do
    head = (x[:2000].data if sp.issparse(x) else np.asarray(x[:2000])).ravel()
    frac = np.abs(head - np.round(head)) > 1e-3
    if not frac.any() and hi > 0:
        raise DataError(
            f"{which} X looks like raw integer counts; pass log1p(normalised) values "
            "(the X of a prepared AnnData or of a prediction)"
        )
    if lo < 0 or hi >= 15.0:
        raise DataError(
            f"{which} X ranges over [{lo:.3g}, {hi:.3g}], outside the log1p range [0, 15); "
            "pass log1p(normalised) values"
        )


def _labels(adata, pert_col: str, which: str) -> np.ndarray:
    if pert_col not in adata.obs.columns:
        raise DataError(f"{which} has no obs column {pert_col!r}; available: {list(adata.obs.columns)}")
    return adata.obs[pert_col].astype(str).to_numpy()


def _group_means(x, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean row per group (float64), in the order of ``groups``."""
    return group_means(x, labels, groups)[1]


def perturbed_reference_metrics(pb: PseudobulkArrays, centroid: np.ndarray) -> dict[str, np.ndarray]:
    """Systema's perturbation-specific scores: both sides' pseudobulks measured from one reference,
    the mean of all real perturbed cells, so the shift shared by every perturbation (perturbed vs
    control) earns nothing. Only the cosine PDS is reported: with one shared reference, L1/L2
    distances between deltas do not depend on the reference at all."""
    ref = PseudobulkArrays(
        perts=pb.perts, genes=pb.genes, real=pb.real, pred=pb.pred, real_ctrl=centroid, pred_ctrl=centroid
    )
    return {
        "pearson_delta_pert": _pearson_rows(ref.pred_delta, ref.real_delta),
        "discrimination_score_cosine_pert": discrimination_score(ref, "cosine"),
    }


def _evaluate_one(
    pred, real, control: str, pert_col: str, timings: dict[str, float], perturbed_reference: bool = False
):
    """Evaluate one context: (results, missing mask, real DE, pred DE, messages)."""
    messages: list[str] = []
    clock = _Clock(timings)
    genes_r, genes_p = np.asarray(real.var_names).astype(str), np.asarray(pred.var_names).astype(str)
    if not np.array_equal(genes_r, genes_p):
        if set(genes_r) != set(genes_p) or len(genes_r) != len(genes_p):
            extra, lack = sorted(set(genes_p) - set(genes_r)), sorted(set(genes_r) - set(genes_p))
            raise DataError(
                f"pred and real have different genes (pred-only {extra[:5]}, real-only "
                f"{lack[:5]}); predict on the same var_names as the real data"
            )
        pred = pred[:, genes_r]
        messages.append("pred genes reordered to match real")
    lr, lp = _labels(real, pert_col, "real"), _labels(pred, pert_col, "pred")
    for lab, which in ((lr, "real"), (lp, "pred")):
        if control not in set(lab):
            raise DataError(
                f"control {control!r} not found in {which} obs[{pert_col!r}]; "
                f"pass --control with one of {sorted(set(lab))[:8]}"
            )
    pr, pp = set(lr) - {control}, set(lp) - {control}
    perts = np.array(sorted(pr & pp))
    if len(perts) == 0:
        raise DataError(
            f"pred and real share no perturbation besides {control!r} "
            f"(real: {sorted(pr)[:5]}, pred: {sorted(pp)[:5]})"
        )
    if pr - pp:
        messages.append(
            f"{len(pr - pp)} perturbation(s) in real but not in pred were skipped: {sorted(pr - pp)[:10]}"
        )
    if pp - pr:
        messages.append(
            f"{len(pp - pr)} perturbation(s) in pred but not in real were skipped: {sorted(pp - pr)[:10]}"
        )
    if len(perts) == 1:
        messages.append("only one perturbation: discrimination scores are undefined (NaN)")
    xr, xp = _matrix(real), _matrix(pred)
    _check_log1p(xr, "real")
    _check_log1p(xp, "pred")
    keep_r, keep_p = np.isin(lr, [*perts, control]), np.isin(lp, [*perts, control])
    if not keep_r.all():  # (copying a large matrix only when something is dropped)
        xr, lr = xr[keep_r], lr[keep_r]
    if not keep_p.all():
        xp, lp = xp[keep_p], lp[keep_p]

    clock("validate")

    groups = np.append(perts, control)
    br, bp = _group_means(xr, lr, groups), _group_means(xp, lp, groups)
    pb = PseudobulkArrays(
        perts=perts, genes=genes_r, real=br[:-1], pred=bp[:-1], real_ctrl=br[-1], pred_ctrl=bp[-1]
    )
    vals = pseudobulk_metrics(pb)
    clock("pseudobulk_metrics")
    for d in ("l1", "l2", "cosine"):
        vals[f"discrimination_score_{d}"] = discrimination_score(pb, d)
    clock("discrimination_scores")
    if perturbed_reference:
        is_pert = np.where(lr == control, control, "\x00perturbed")
        centroid = _group_means(xr, is_pert, np.array(["\x00perturbed"]))[0]
        vals.update(perturbed_reference_metrics(pb, centroid))
        clock("perturbed_reference")
    rde = rank_sum_arrays(xr, lr, control, genes=genes_r)
    clock("de_real")
    pde = rank_sum_arrays(xp, lp, control, genes=genes_r)
    clock("de_pred")
    vals.update(de_metrics(rde, pde))
    clock("de_metrics")
    cols = [n for n in METRICS if n in vals]
    results = pd.DataFrame({"perturbation": perts, **{n: vals[n] for n in cols}})
    missing = pd.DataFrame({n: np.zeros(len(perts), bool) for n in cols})
    no_sig = vals["de_nsig_counts_real"] == 0
    for n in _ONLY_WITH_REAL_SIG:
        missing[n] = no_sig
    out = results, missing, rde.to_frame(), pde.to_frame(), messages
    clock("tables")
    return out


class _Clock:
    """Accumulates wall time per phase into a dict (phases repeat once per context)."""

    def __init__(self, into: dict[str, float]):
        self.into, self.t = into, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.into[phase] = self.into.get(phase, 0.0) + now - self.t
        self.t = now


def evaluate(
    pred,
    real,
    *,
    control: str,
    pert_col: str = "perturbation",
    baseline=None,
    context_col: str | None = "context",
    perturbed_reference: bool = False,
) -> EvalResult:
    """Evaluate a prediction against real data (both AnnData with log1p X and ``obs[pert_col]``,
    control cells included) with cell-eval's metrics.

    When both have ``obs[context_col]``, every context is evaluated on its own and the tables gain
    a ``context`` column. ``baseline`` may be an AnnData (a baseline prediction, evaluated the same
    way), an ``EvalResult`` or an aggregate table; the score is then filled in.
    ``context_col=None`` pools all cells. ``perturbed_reference`` adds Systema's
    ``pearson_delta_pert`` and ``discrimination_score_cosine_pert`` (not part of cell-eval, not
    scored against a baseline). Problems that do not stop the evaluation (perturbations
    present on one side only, reordered genes, a single perturbation) are listed in ``messages``
    and raised as ``UserWarning``; unusable input raises ``DataError``.
    """
    split = context_col is not None and context_col in real.obs.columns and context_col in pred.obs.columns
    parts, messages, timings = [], [], {}
    if split:
        cr, cp = real.obs[context_col].astype(str), pred.obs[context_col].astype(str)
        ctxs = sorted(set(cr) & set(cp))
        for c in sorted(set(cr) ^ set(cp)):
            messages.append(f"context {c!r} is only in {'real' if c in set(cr) else 'pred'}; skipped")
        if not ctxs:
            raise DataError(f"pred and real share no {context_col!r} value")
        for c in ctxs:
            res = _evaluate_one(
                pred[(cp == c).to_numpy()],
                real[(cr == c).to_numpy()],
                control,
                pert_col,
                timings,
                perturbed_reference,
            )
            parts.append((c, res))
            messages += [f"[{c}] {m}" for m in res[4]]
    else:
        res = _evaluate_one(pred, real, control, pert_col, timings, perturbed_reference)
        parts.append((None, res))
        messages += res[4]

    def stack(i):
        frames = []
        for c, res in parts:
            f = res[i].copy()
            if c is not None:
                f.insert(0, "context", c)
            frames.append(f)
        return pd.concat(frames, ignore_index=True)

    aggs = []
    for c, res in parts:
        a = aggregate(res[0], res[1])
        if c is not None:
            a.insert(0, "context", c)
        aggs.append(a)
    agg = pd.concat(aggs, ignore_index=True)
    for m in messages:
        warnings.warn(m, UserWarning, stacklevel=2)
    result = EvalResult(
        results=stack(0),
        agg=agg,
        real_de=stack(2),
        pred_de=stack(3),
        messages=tuple(messages),
        missing=stack(1),
        timings=timings,
    )
    if baseline is not None:
        result = _with_score(result, baseline, real, control, pert_col, context_col)
    return result


def _with_score(result: EvalResult, baseline, real, control, pert_col, context_col) -> EvalResult:
    if isinstance(baseline, EvalResult):
        base_agg = baseline.agg
    elif isinstance(baseline, pd.DataFrame):
        base_agg = baseline
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            base_agg = evaluate(
                baseline, real, control=control, pert_col=pert_col, context_col=context_col
            ).agg
    if "context" in result.agg.columns:
        if "context" not in base_agg.columns:
            raise DataError("the baseline was evaluated without contexts but the prediction has them")
        scores = []
        for c, a in result.agg.groupby("context", sort=True):
            b = base_agg[base_agg["context"] == c]
            if b.empty:
                raise DataError(f"baseline has no context {c!r}")
            s = score_against_baseline(a.drop(columns="context"), b.drop(columns="context"))
            s.insert(0, "context", c)
            scores.append(s)
        score = pd.concat(scores, ignore_index=True)
    else:
        score = score_against_baseline(result.agg, base_agg.drop(columns="context", errors="ignore"))
    return EvalResult(
        results=result.results,
        agg=result.agg,
        real_de=result.real_de,
        pred_de=result.pred_de,
        score=score,
        messages=result.messages,
        missing=result.missing,
        timings=result.timings,
    )
