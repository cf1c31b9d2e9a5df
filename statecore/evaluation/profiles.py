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

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.data.io import looks_like_counts
from statecore.errors import DataError
from statecore.evaluation.metrics import EvalResult, evaluate
from statecore.evaluation.vcc2026 import Vcc2026Result, evaluate_vcc2026

PROFILES = ("celleval", "vcc2026", "all")


@dataclass(frozen=True)
class ProfileResult:
    profile: str
    results: pd.DataFrame  # one row per perturbation (and context), every selected scorer's columns
    agg: pd.DataFrame  # statistic (and context) x metric
    messages: tuple[str, ...]
    celleval: EvalResult | None = None
    vcc2026: Vcc2026Result | None = None

    def save(self, outdir) -> list[str]:
        """Write results.csv and agg_results.csv (+ DE tables and score of the celleval part)."""
        if self.celleval is not None:
            self.celleval.save(outdir)  # real_de.csv, pred_de.csv, score.csv
        os.makedirs(outdir, exist_ok=True)
        self.results.to_csv(os.path.join(outdir, "results.csv"), index=False)
        self.agg.to_csv(os.path.join(outdir, "agg_results.csv"), index=False)
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


def _vcc_by_context(pred, real, control, pert_col, context_col):
    """(results, agg, messages, last Vcc2026Result), one block per shared context when split."""
    split = context_col is not None and context_col in real.obs and context_col in pred.obs
    if not split:
        r = evaluate_vcc2026(pred, real, control=control, pert_col=pert_col)
        return r.results, r.agg, list(r.messages), r
    res, aggs, msgs, last = [], [], [], None
    cr, cp = real.obs[context_col].astype(str).to_numpy(), pred.obs[context_col].astype(str).to_numpy()
    shared = sorted(set(cr) & set(cp))
    if not shared:
        raise DataError(f"pred and real share no {context_col!r} value")
    for c in shared:
        last = evaluate_vcc2026(pred[cp == c], real[cr == c], control=control, pert_col=pert_col)
        res.append(last.results.assign(context=c))
        aggs.append(last.agg.assign(context=c))
        msgs += [f"[{c}] {m}" for m in last.messages]
    front = lambda f: f[["context", *[k for k in f.columns if k != "context"]]]  # noqa: E731
    return front(pd.concat(res, ignore_index=True)), front(pd.concat(aggs, ignore_index=True)), msgs, last


def evaluate_profile(
    pred,
    real,
    *,
    profile: str = "celleval",
    control: str,
    pert_col: str = "perturbation",
    baseline=None,
    context_col: str | None = "context",
) -> ProfileResult:
    """Score ``pred`` against ``real`` with the scorers of ``profile`` (see module docstring)."""
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    messages: list[str] = []
    ce = vr = None
    tables, aggs = [], []
    if profile in ("celleval", "all"):
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
        res, agg, msgs, vr = _vcc_by_context(
            as_counts(pred, "pred"), as_counts(real, "real"), control, pert_col, context_col
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
    return ProfileResult(profile, results, agg, tuple(messages), ce, vr)
