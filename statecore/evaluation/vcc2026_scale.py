"""The scaled score of cell-eval2 0.20.0's ``vcc2026`` preset: 0 = a generic-response baseline,
1 = the real data's own split-half replicate.

For each of the six scored members, with ``u`` the prediction's aggregate (the ``mean`` row),
``b`` the baseline's and ``r`` the replicate anchor::

    higher is better (pds_cosine, sig_jaccard, fidelity_yield_raw, reach_raw):
        s = (u - b) / (r - b)                      unclamped; a missing u scores (0 - b) / (r - b)
    lower is better (expr_mse_unbiased_capped_norm, lfc_nmae):
        q = (u - r) / (b - r);  s = 1 - q
        capped_norm: s < 0 -> max(-6, -(q^2 - 1) / 2) (Box-Cox tail), then clipped to [0, 1]
        lfc_nmae:    clipped below at -6
    avg_score = the unweighted mean of the six.

- **b**: cell-eval2's ``baseline`` (``build_generic_baseline``, emit 'dispersed', seed 0): every
  perturbation is predicted by control cells (drawn with replacement, ``default_rng(0)``) whose
  genes are scaled by ``profile / control mean``, ``profile`` being the mean over perturbations
  of the per-perturbation mean counts, each gene's own perturbation left out; scored as an
  ordinary prediction (fractional counts allowed).
- **r**: cell-eval2's ``compute_replicate_anchor`` (5 splits, seeds
  ``SeedSequence(0).generate_state(5)``): each split shuffles every group's cells (control
  included) into two disjoint halves of ``floor(n/2)``, scores half B as the prediction of half
  A with each half against its OWN control (``control_source='pred'``), and takes the mean
  aggregate; ``r`` is the mean over the five splits. ``de_wilcoxon_lfc_nmae``'s anchor is the
  full-gate reference instead: the gate and denominator from the full real data's DE, the
  numerator ``|LFC_A - LFC_B|`` from the two halves' own DE (a gene a half did not test counts
  as 0), perturbations with fewer than 10 gated genes omitted, mean over the rest.

Definitions and known differences: docs/METRICS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.errors import DataError
from statecore.evaluation.vcc2026 import (
    Vcc2026Config,
    _cpm_exact,
    _matrix,
    _on_target,
    aggregate,
    evaluate_vcc2026,
    gated_de,
    results_frame,
    score_counts,
    target_columns,
)

BASE_SEED = 0
N_SPLITS = 5
BASELINE_SEED = 0
SCORED = (  # cell-eval2's frame order: lower-is-better first, then higher, each sorted
    "de_wilcoxon_lfc_nmae",
    "expr_mse_unbiased_capped_norm",
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_sig_jaccard",
    "pds_cosine",
)
LOWER = {"de_wilcoxon_lfc_nmae", "expr_mse_unbiased_capped_norm"}
PENALTY_CAP = 6.0
PENALTY_EXPONENT = 2.0
LFC_NMAE_FLOOR = -6.0


# ---------------------------------------------------------------- the scale's two ends


def _group_means(x, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted labels, float64 mean counts per group), summed as cell-eval2's pseudobulk does."""
    uniq, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes.ravel(), kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes.ravel(), minlength=uniq.size))]
    out = np.zeros((uniq.size, x.shape[1]))
    for g in range(uniq.size):
        sub = x[order[bounds[g] : bounds[g + 1]]]
        if sp.issparse(sub):
            sub = sp.csr_matrix((sub.data.astype(np.float64), sub.indices, sub.indptr), shape=sub.shape)
            out[g] = np.asarray(sub.mean(axis=0)).ravel()
        else:
            out[g] = np.asarray(sub, dtype=np.float64).mean(axis=0)
    return uniq, out


def generic_profile(x, labels: np.ndarray, control: str, genes: np.ndarray) -> np.ndarray:
    """Mean over non-control perturbations of their mean counts; gene g's mean leaves out the
    perturbation that targets g."""
    perts, means = _group_means(x, labels)
    keep = perts != control
    labs, bulk = perts[keep], means[keep]
    if labs.size < 2:
        raise DataError("the generic-response baseline needs at least 2 perturbations besides the control")
    cols = target_columns(labs, genes)
    if not cols:
        raise DataError(
            "no perturbation names a measured gene, so the generic-response baseline cannot "
            "leave each gene's own perturbation out (cell-eval2 refuses this too)"
        )
    total, count = bulk.sum(axis=0), np.full(genes.size, float(labs.size))
    for i, j in cols.items():
        total[j] -= bulk[i, j]
        count[j] -= 1.0
    return total / count


def generic_baseline(real, *, control: str, pert_col: str = "perturbation", seed: int = BASELINE_SEED):
    """cell-eval2's generic-response baseline prediction (emit 'dispersed'), shaped like ``real``:
    control cells drawn with replacement per perturbation and scaled gene-wise by
    ``profile / control mean``, as float32; the control rows are the real control cells."""
    x = _matrix(real, "real")
    labels = real.obs[pert_col].to_numpy().astype(str)
    genes = np.asarray(real.var_names).astype(str)
    profile = generic_profile(x, labels, control, genes)
    is_ctrl = labels == control
    ctrl = x[np.flatnonzero(is_ctrl)]
    ctrl_pb = np.asarray(ctrl.astype(np.float64).mean(axis=0)).ravel()
    zero = ctrl_pb <= 0
    scale = np.where(zero, 0.0, profile / np.where(zero, 1.0, ctrl_pb))
    groups = sorted(set(labels[~is_ctrl].tolist()))
    positions = [np.flatnonzero(labels == g) for g in groups]
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, ctrl.shape[0], size=p.size) for p in positions]
    pool = ctrl.tocsr() if sp.issparse(ctrl) else sp.csr_matrix(ctrl)
    out = pool[np.concatenate(draws).astype(np.intp)].copy()
    out.data = (out.data * scale[out.indices]).astype(np.float32)
    out.eliminate_zeros()
    rows = np.concatenate([*positions, np.flatnonzero(is_ctrl)])
    if sp.issparse(x):
        blocks = sp.vstack([out, pool.astype(np.float32)], format="csr")
        order = np.empty(real.n_obs, dtype=np.intp)
        order[rows] = np.arange(real.n_obs)
        xb = blocks[order].tocsr()
    else:
        xb = np.empty(x.shape, dtype=np.float32)
        xb[rows[: out.shape[0]]] = out.toarray()
        xb[np.flatnonzero(is_ctrl)] = np.asarray(ctrl).astype(np.float32)
    return ad.AnnData(X=xb, obs=real.obs.copy(), var=real.var.copy())


def split_seeds(base_seed: int = BASE_SEED, n_splits: int = N_SPLITS) -> list[int]:
    """cell-eval2's split seeds: ``SeedSequence(base_seed).generate_state(n_splits)``."""
    return [int(s) for s in np.random.SeedSequence(int(base_seed)).generate_state(n_splits)]


def disjoint_halves(obs: pd.DataFrame, pert_col: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two disjoint halves of ``floor(n/2)`` cells of every group (cell-eval2's
    ``_disjoint_halves``: groups in pandas groupby order, one permutation each)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for idx in obs.groupby(pert_col, observed=True).indices.values():
        perm = rng.permutation(np.asarray(idx))
        h = perm.size // 2
        if h >= 1:
            a.append(perm[:h])
            b.append(perm[h : 2 * h])
    if not a:
        raise DataError("no perturbation has 2 cells: the replicate anchor cannot split the real data")
    return np.concatenate(a), np.concatenate(b)


def _mean_row(agg: pd.DataFrame) -> dict[str, float]:
    row = agg[agg["statistic"] == "mean"].iloc[0]
    return {m: float(row[m]) for m in SCORED if m in row.index}


def lfc_nmae_reference(full, half_a, half_b, cfg: Vcc2026Config) -> float:
    """The lfc_nmae anchor at one split: gate and denominator from the FULL real DE (real-
    significant, finite LFC, own gene left out), numerator from the halves' own-control DE (a
    gene a half did not test counts as LFC 0); fewer than 10 gated genes: omitted."""
    rows_a = pd.Index(half_a.perts).get_indexer(full.perts)
    rows_b = pd.Index(half_b.perts).get_indexer(full.perts)
    if (rows_a < 0).any() or (rows_b < 0).any():
        raise DataError("a perturbation is missing from a split half; every group needs 2 or more cells")
    with np.errstate(invalid="ignore"):
        gate = (full.p_adj < cfg.p_adj_threshold) & np.isfinite(full.lfc) & ~_on_target(full)
    la, lb = half_a.lfc[rows_a], half_b.lfc[rows_b]
    la, lb = np.where(np.isfinite(la), la, 0.0), np.where(np.isfinite(lb), lb, 0.0)
    n = gate.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        num = np.where(gate, np.abs(la - lb), 0.0).sum(1) / n
        den = np.where(gate, np.abs(full.lfc), 0.0).sum(1) / n
        val = num / den
    ok = (n >= cfg.lfc_nmae_min_gate) & np.isfinite(den) & (den != 0)
    return float(val[ok].mean()) if ok.any() else float("nan")


def _full_real_de(xr, lr, control, genes, cfg):
    perts = np.array(sorted(set(lr) - {control}))
    cpm = _cpm_exact(xr, cfg.target_sum)
    is_ctrl = lr == control
    return gated_de(
        cpm[np.flatnonzero(~is_ctrl)], lr[~is_ctrl], cpm[np.flatnonzero(is_ctrl)], perts, genes, cfg
    )


def replicate_anchor(real, *, control: str, pert_col: str = "perturbation", cfg=None) -> pd.DataFrame:
    """cell-eval2's replicate anchor: one row per (split, seed) with every member's value, the
    mean over the five splits being ``r``. See the module docstring."""
    cfg = cfg or Vcc2026Config()
    x = _matrix(real, "real")
    labels = real.obs[pert_col].astype(str).to_numpy()
    genes = np.asarray(real.var_names).astype(str)
    if control not in set(labels):
        raise DataError(f"control {control!r} not found in real obs[{pert_col!r}]; pass --control")
    thin = [g for g, n in pd.Series(labels).value_counts().items() if n < 2]
    if thin:
        raise DataError(
            f"perturbation(s) {thin[:5]} have fewer than 2 real cells: the replicate anchor needs 2"
        )
    full = _full_real_de(x, labels, control, genes, cfg)
    rows = []
    for i, seed in enumerate(split_seeds()):
        ia, ib = disjoint_halves(real.obs, pert_col, seed)
        la, lb = labels[ia], labels[ib]
        perts = np.array(sorted(set(la) - {control}))
        sc = score_counts(x[ib], lb, x[ia], la, perts, control, genes, cfg, own_control=True)
        res, omitted = results_frame(perts, sc.values)
        vals = _mean_row(aggregate(res, omitted))
        vals["de_wilcoxon_lfc_nmae"] = lfc_nmae_reference(full, sc.real_de, sc.pred_de, cfg)
        rows.append({"split": i, "seed": seed, **vals})
    return pd.DataFrame(rows)


def baseline_aggregate(real, *, control: str, pert_col: str = "perturbation", cfg=None) -> pd.DataFrame:
    """The generic-response baseline scored as an ordinary prediction (cell-eval2's aggregate)."""
    pred = generic_baseline(real, control=control, pert_col=pert_col)
    return evaluate_vcc2026(
        pred, real, control=control, pert_col=pert_col, config=cfg, allow_fractional=True
    ).agg


# ---------------------------------------------------------------- the score


def member_score(metric: str, u: float, b: float, r: float) -> float:
    """One member on the replicate scale (module docstring); NaN when the scale is degenerate
    (r not beyond b on the better side), where cell-eval2 stops with an error."""
    if not (np.isfinite(b) and np.isfinite(r)):
        return float("nan")
    if metric not in LOWER:
        if r - b <= 0:
            return float("nan")
        return (u - b) / (r - b) if np.isfinite(u) else (0.0 - b) / (r - b)
    if b - r <= 0:
        return float("nan")
    low, high = (0.0, 1.0) if metric == "expr_mse_unbiased_capped_norm" else (LFC_NMAE_FLOOR, np.inf)
    if not np.isfinite(u):
        return low
    q = (u - r) / (b - r)
    s = 1.0 - q
    if s < 0.0 and metric == "expr_mse_unbiased_capped_norm":
        try:
            s = max(-PENALTY_CAP, -(q**PENALTY_EXPONENT - 1.0) / PENALTY_EXPONENT)
        except OverflowError:
            s = -PENALTY_CAP
    if not np.isfinite(s) or s <= low:
        return low
    return high if s >= high else s


@dataclass(frozen=True)
class ScaledScore:
    table: pd.DataFrame  # metric, prediction, baseline, replicate, replicate_sd, scaled (+ avg_score row)
    splits: pd.DataFrame  # the anchor's per-split values
    messages: tuple[str, ...] = ()

    @property
    def avg_score(self) -> float:
        return float(self.table.loc[self.table["metric"] == "avg_score", "scaled"].iloc[0])


def scaled_score(user_agg: pd.DataFrame, real, *, control: str, pert_col: str = "perturbation", cfg=None):
    """The six members and ``avg_score`` of ``user_agg`` (our vcc2026 aggregate of the
    prediction) on cell-eval2's baseline-to-replicate scale for ``real``."""
    u = _mean_row(user_agg)
    b = _mean_row(baseline_aggregate(real, control=control, pert_col=pert_col, cfg=cfg))
    splits = replicate_anchor(real, control=control, pert_col=pert_col, cfg=cfg)
    rows, messages = [], []
    for m in SCORED:
        r = float(splits[m].mean())
        s = member_score(m, u.get(m, np.nan), b[m], r)
        if np.isnan(s):
            messages.append(
                f"{m}: no usable scale (baseline {b[m]:.4g}, replicate {r:.4g}); left out of avg_score"
            )
        rows.append(
            {
                "metric": m,
                "prediction": u.get(m, np.nan),
                "baseline": b[m],
                "replicate": r,
                "replicate_sd": float(splits[m].std(ddof=0)),
                "scaled": s,
            }
        )
    table = pd.DataFrame(rows)
    ok = table["scaled"].notna()
    avg = float(table.loc[ok, "scaled"].mean()) if ok.any() else float("nan")
    table.loc[len(table)] = {"metric": "avg_score", "scaled": avg}
    return ScaledScore(table, splits, tuple(messages))
