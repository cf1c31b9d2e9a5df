"""One entry point for every scorer: ``celleval`` (cell-eval 0.8.2 on log1p values, plus the
perturbation-referenced Systema metrics), ``vcc2026`` (cell-eval2 0.20.0 on raw counts) or ``all``.

Each profile reads the representation its reference reads: ``celleval`` the log1p X (under
``all``, count input is normalised like ``prepare`` does: normalize_total to the recorded target
sum, log1p);
``vcc2026`` raw counts (an integer X, else ``layers["counts"]``). ``all`` writes one results table
(one row per perturbation and context) and one aggregate with both scorers' columns.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.data.io import looks_like_counts
from statecore.errors import DataError
from statecore.evaluation.vcc2026 import Vcc2026Result, evaluate_vcc2026
from statecore.evaluation.vcc2026_scale import scaled_score

if TYPE_CHECKING:  # metrics (scipy.stats) is imported only when the celleval part runs
    from statecore.evaluation.metrics import EvalResult

PROFILES = ("celleval", "vcc2026", "all")


@dataclass(frozen=True)
class ProfileResult:
    profile: str
    results: pd.DataFrame  # one row per perturbation (and context), every selected scorer's columns
    agg: pd.DataFrame  # statistic (and context) x metric
    messages: tuple[str, ...]
    celleval: EvalResult | None = None
    vcc2026: Vcc2026Result | None = None
    # cell-eval2's baseline-to-replicate scaled score: metric, prediction, baseline, replicate,
    # replicate_sd, scaled (+ avg_score row, + context), and the anchor's five splits
    scaled: pd.DataFrame | None = None
    anchor_splits: pd.DataFrame | None = None

    def save(self, outdir) -> list[str]:
        """Write results.csv and agg_results.csv (+ DE tables and score of the celleval part,
        vcc2026_score.csv and anchor_splits.csv of the vcc2026 scaled score)."""
        if self.celleval is not None:
            self.celleval.save(outdir)  # real_de.csv, pred_de.csv, score.csv
        os.makedirs(outdir, exist_ok=True)
        self.results.to_csv(os.path.join(outdir, "results.csv"), index=False)
        self.agg.to_csv(os.path.join(outdir, "agg_results.csv"), index=False)
        if self.scaled is not None:
            self.scaled.to_csv(os.path.join(outdir, "vcc2026_score.csv"), index=False)
            self.anchor_splits.to_csv(os.path.join(outdir, "anchor_splits.csv"), index=False)
        return sorted(os.listdir(outdir))


def as_counts(adata, which: str):
    """The AnnData with raw counts in X: X itself when integer, else ``layers['counts']``."""
    if adata.X is not None and looks_like_counts(adata.X):
        return adata
    if "counts" in adata.layers and looks_like_counts(adata.layers["counts"]):
        out = adata.copy()
        out.X = out.layers["counts"]
        return out
    raise DataError(
        f"{which}: the vcc2026 profile scores raw counts, and X is not counts and there is no "
        "layers['counts']; write them with `predict --counts` (and `--real-out`)"
    )


def as_log1p(adata, which: str):
    """The AnnData with log1p(normalised) X; count input is normalised as ``prepare`` does."""
    if adata.X is None or not looks_like_counts(adata.X):
        return adata
    import scanpy as sc

    target = float(adata.uns.get("statecore", {}).get("qc", {}).get("target_sum", 1e4))
    out = adata.copy()
    out.X = out.X.astype(np.float32) if sp.issparse(out.X) else np.asarray(out.X, dtype=np.float32)
    sc.pp.normalize_total(out, target_sum=target)
    sc.pp.log1p(out)
    out.uns.pop("log1p", None)
    return out


def _front(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    if not frames:
        return None
    f = pd.concat(frames, ignore_index=True)
    return f[["context", *[k for k in f.columns if k != "context"]]] if "context" in f else f


def _vcc_one(pred, real, control, pert_col, scale: bool, ctx: str | None):
    """One context: the Vcc2026Result and, with ``scale``, its ScaledScore (None if it cannot
    be built: the reason is the second message list)."""
    r = evaluate_vcc2026(pred, real, control=control, pert_col=pert_col)
    tag = f"[{ctx}] " if ctx is not None else ""
    msgs = [tag + m for m in r.messages]
    sc = None
    if scale:
        try:
            sc = scaled_score(r.agg, real, control=control, pert_col=pert_col)
            msgs += [f"{tag}scaled score: {m}" for m in sc.messages]
        except DataError as exc:
            msgs.append(f"{tag}scaled score skipped: {exc}")
    return r, sc, msgs


def _vcc_by_context(pred, real, control, pert_col, context_col, scale: bool = True):
    """(results, agg, messages, last Vcc2026Result, scaled, splits), one block per shared
    context when split."""
    split = context_col is not None and context_col in real.obs and context_col in pred.obs
    if not split:
        blocks = [(None, pred, real)]
    else:
        cr, cp = real.obs[context_col].astype(str).to_numpy(), pred.obs[context_col].astype(str).to_numpy()
        shared = sorted(set(cr) & set(cp))
        if not shared:
            raise DataError(f"pred and real share no {context_col!r} value")
        blocks = [(c, pred[cp == c], real[cr == c]) for c in shared]
    res, aggs, scaled, splits, msgs, last = [], [], [], [], [], None
    for c, p, r in blocks:
        last, sc, m = _vcc_one(p, r, control, pert_col, scale, c)
        msgs += m
        tag = {} if c is None else {"context": c}
        res.append(last.results.assign(**tag))
        aggs.append(last.agg.assign(**tag))
        if sc is not None:
            scaled.append(sc.table.assign(**tag))
            splits.append(sc.splits.assign(**tag))
    return _front(res), _front(aggs), msgs, last, _front(scaled), _front(splits)


def evaluate_profile(
    pred,
    real,
    *,
    profile: str = "celleval",
    control: str,
    pert_col: str = "perturbation",
    baseline=None,
    context_col: str | None = "context",
    scale: bool = True,
) -> ProfileResult:
    """Score ``pred`` against ``real`` with the scorers of ``profile`` (see module docstring);
    ``scale``: also cell-eval2's baseline-to-replicate scaled score of the vcc2026 part."""
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    messages: list[str] = []
    ce = vr = scaled = splits = None
    tables, aggs = [], []
    if profile in ("celleval", "all"):
        from statecore.evaluation.metrics import evaluate

        # only 'all' converts counts (it is given count files); celleval alone keeps refusing them
        lp, lr = (as_log1p(pred, "pred"), as_log1p(real, "real")) if profile == "all" else (pred, real)
        for a, b, which in ((pred, lp, "pred"), (real, lr, "real")):
            if a is not b:
                messages.append(f"{which} X holds counts: normalised and log1p'd for the celleval metrics")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ce = evaluate(
                lp,
                lr,
                control=control,
                pert_col=pert_col,
                baseline=baseline,
                context_col=context_col,
                perturbed_reference=True,
            )
        messages += ce.messages
        tables.append(ce.results)
        aggs.append(ce.agg)
    if profile in ("vcc2026", "all"):
        res, agg, msgs, vr, scaled, splits = _vcc_by_context(
            as_counts(pred, "pred"), as_counts(real, "real"), control, pert_col, context_col, scale
        )
        messages += msgs
        tables.append(res)
        aggs.append(agg)
    keys = [k for k in ("context", "perturbation") if k in tables[0].columns]
    results = tables[0]
    for t in tables[1:]:
        results = results.merge(t, on=keys, how="outer")
    akeys = [k for k in ("context", "statistic") if k in aggs[0].columns]
    agg = aggs[0]
    for a in aggs[1:]:
        agg = agg.merge(a, on=akeys, how="outer", sort=False)
    return ProfileResult(profile, results, agg, tuple(messages), ce, vr, scaled, splits)
