"""The Evaluate page's scorer switch: the run's test-split prediction scored with one profile
(``celleval``: cell-eval 0.8.2 + Systema's perturbation-specific deltas; ``vcc2026``: cell-eval2's
2026 metrics and scaled score on raw counts; ``all``), and the seed spread of an ensemble."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from statecore.ui import loaders

PROFILE_LABELS = {
    "celleval": "celleval: cell-eval 0.8.2 (2025 challenge) + perturbation-specific Δ",
    "vcc2026": "vcc2026: cell-eval2 0.20.0 (2026 challenge), raw counts, scaled score",
    "all": "all: both, one table",
}
SYSTEMA_NOTE = (
    "“vs control” measures each predicted change from the control cells, so predicting the change every "
    "perturbation shares already scores well; “vs perturbed mean” measures it from the average perturbed "
    "cell (Viñas Torné et al., Systema, Nat Biotechnol 2025), so only what is specific to the perturbation counts."
)
SYSTEMA_PAIRS = (
    ("Pearson Δ", "pearson_delta", "pearson_delta_pert"),
    ("PDS (cosine)", "discrimination_score_cosine", "discrimination_score_cosine_pert"),
)
SCALED_NOTE = (
    "0 = cell-eval2's generic-response baseline (every perturbation predicted as the average response), "
    "1 = the real cells' own agreement between two random halves (mean of 5 splits); above 1 beats the "
    "half-split replicate, below 0 loses to the baseline."
)


def _profile_scores(run_dir: str, seed: int, profile: str):
    from statecore.evaluation.profiles import evaluate_profile
    from statecore.inference.counts import real_counts, sample_counts
    from statecore.ui import results

    ev = results.evaluate_cached(run_dir, seed)
    pred, real = ev.pred, ev.real
    if profile != "celleval":
        prepared = loaders.read_h5ad(loaders.run_data_path(run_dir))
        pred, real = sample_counts(ev.pred, prepared, seed=seed), real_counts(ev.real, prepared)
    return evaluate_profile(pred, real, profile=profile, control=ev.control, context_col=None)


@st.cache_resource(max_entries=6, show_spinner="Scoring the model's test prediction with this profile…")
def _profile_cached(key: str, run_dir: str, seed: int, profile: str):
    return _profile_scores(run_dir, seed, profile)


def profile_scores(run_dir, profile: str, seed: int = 0):
    """``evaluate_profile`` of the run's test-split prediction (counts sampled for vcc2026/all)."""
    from statecore.ui import results

    return _profile_cached(results.run_key(run_dir), str(run_dir), seed, profile)


def mean_row(agg: pd.DataFrame) -> pd.Series:
    return (
        agg[agg["statistic"] == "mean"].drop(columns=["statistic"], errors="ignore").mean(numeric_only=True)
    )


def systema_table(agg: pd.DataFrame) -> pd.DataFrame | None:
    """Control-referenced vs perturbation-specific (Systema) means, one row per metric pair."""
    m = mean_row(agg)
    rows = [
        {"metric": name, "vs control": float(m[a]), "vs perturbed mean": float(m[b])}
        for name, a, b in SYSTEMA_PAIRS
        if a in m.index and b in m.index
    ]
    return pd.DataFrame(rows) if rows else None


def ensemble_members(run_dir) -> list[Path]:
    """The run and its ``<run>-seed<i>`` siblings that hold a model (training.member_dir's naming)."""
    from statecore.ui import training

    out, i = [], 0
    while True:
        member = training.member_dir(run_dir, i)
        if not member.is_dir():
            break
        if (member / "model.safetensors").exists():
            out.append(member)
        i += 1
    return out


def seed_spread(summaries: list[pd.DataFrame], metrics: list[str]) -> pd.DataFrame:
    """mean ± sd (ddof 1) over ensemble members of the model's row of each member's summary."""
    from statecore.evaluation.run import MODEL

    rows = [s[s["method"] == MODEL].iloc[0] for s in summaries if (s["method"] == MODEL).any()]
    out = []
    for m in metrics:
        v = np.array([float(r[m]) for r in rows if m in r.index], dtype=float)
        v = v[np.isfinite(v)]
        out.append(
            {
                "metric": m,
                "members": int(v.size),
                "mean": float(v.mean()) if v.size else np.nan,
                "sd": float(v.std(ddof=1)) if v.size > 1 else np.nan,
                "min": float(v.min()) if v.size else np.nan,
                "max": float(v.max()) if v.size else np.nan,
            }
        )
    return pd.DataFrame(out)
