"""Plain-words verdicts: where a model's score stands between the baselines and the data ceiling.

The ceiling is the score of one random half of the real test cells used as the "prediction" of the
other half (cell-eval's ``--ceiling`` idea): what a perfect model could reach given the noise of a
finite sample. A verdict compares three numbers per headline metric (model, best baseline, ceiling)
and says in one sentence what they mean; ``GLOSSARY`` explains each metric in plain words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from statecore.evaluation.metrics import METRICS
from statecore.runs.files import read_json

EVALUATION_DIR = "evaluation"  # <run>/evaluation/: written by evaluate_run's save, read back by the app
VERDICT_FILE = "verdict.json"

HEADLINE = ("pearson_delta", "discrimination_score_l1", "overlap_at_N", "mse", "mae")

# Below these ceilings a higher-is-better metric carries almost no signal: even a second sample of
# the real cells barely agrees with the first (correlation, PDS near random, DE genes not reproducible).
# A random guess scores about 0.5 on PDS, so its bar sits higher.
LOW_CEILING = {"pearson_delta": 0.5, "discrimination_score_l1": 0.7, "overlap_at_N": 0.2}
# Differences smaller than this (absolute for 0..1 metrics, relative for errors) count as a tie; PDS
# moves in steps of 1/N (one rank place), so a difference below 1/N counts as a tie there.
TIE_ABS = 0.005
TIE_REL = 0.01


@dataclass(frozen=True)
class GlossaryEntry:
    name: str
    plain: str  # what the metric asks, in one or two sentences
    one: str  # what its best value means (1, or 0 for errors)
    zero: str
    nan: str


GLOSSARY: dict[str, GlossaryEntry] = {
    "pearson_delta": GlossaryEntry(
        "Pearson Δ",
        "Does the model move the right genes in the right direction? The correlation, over genes, of the "
        "predicted and the real change from control (mean of the perturbed cells minus mean of the controls).",
        "1: the predicted change has exactly the pattern of the real one (its size may still differ).",
        "0: no relation between predicted and real changes; below 0: opposite directions.",
        "NaN: one of the two changes is flat (no gene moves), so there is no pattern to correlate.",
    ),
    "discrimination_score_l1": GlossaryEntry(
        "Perturbation discrimination (PDS)",
        "Can you tell the perturbations apart from the predictions? Every real change is ranked by its "
        "L1 distance to a perturbation's predicted change; the score is 1 − rank / N.",
        "1: the real change closest to the prediction is always its own perturbation's.",
        "0: its own is the farthest; about 0.5: no better than a random guess.",
        "NaN: fewer than two test perturbations, so there is nothing to tell apart.",
    ),
    "overlap_at_N": GlossaryEntry(
        "DE-gene overlap",
        "Are the predicted differentially expressed genes the real ones? The share of the real significant "
        "genes (FDR < 0.05, top N by |log2 fold change|, N = their number) also in the predicted top N.",
        "1: the same genes.",
        "0: none in common, or the real cells have no significant gene at all (then there is nothing "
        "to find, and every method scores 0).",
        "NaN: not computed for this perturbation.",
    ),
    "mse": GlossaryEntry(
        "Mean squared error (MSE)",
        "How far are the predicted mean expression values (log1p) from the real ones, gene by gene? "
        "Compare it with the baselines: most of it is how far perturbed cells sit from controls anyway.",
        "0 (best): identical means.",
        "Larger: further apart (no upper limit).",
        "NaN: not computed.",
    ),
    "mae": GlossaryEntry(
        "Mean absolute error (MAE)",
        "Like MSE, with absolute instead of squared differences: less dominated by a few genes.",
        "0 (best): identical means.",
        "Larger: further apart (no upper limit).",
        "NaN: not computed.",
    ),
}
CEILING_NOTE = (
    "Ceiling: the real test cells split at random into two halves, one scored as the prediction of "
    "the other. It is what the data allow a perfect model to reach; with half the cells on each side "
    "it is a slightly pessimistic bound, so a model can come out above it."
)


@dataclass(frozen=True)
class Verdict:
    """One headline metric: the three numbers and the sentence that reads them."""

    metric: str
    label: str
    model: float
    best_baseline: str | None  # kind of the best-scoring baseline
    baseline: float
    ceiling: float
    beats: bool | None  # None: the model could not be scored on this metric
    share_of_ceiling: float | None  # model / ceiling (ceiling / model for errors)
    low_signal: bool
    sentence: str

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(v: float) -> str:
    return "NaN" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _better(a: float, b: float, higher: bool) -> float:
    """How much better ``a`` is than ``b`` (positive = better), in the metric's own units."""
    return a - b if higher else b - a


def _best_baseline(scored: Mapping[str, float], higher: bool) -> tuple[str | None, float]:
    """The best baseline's value and name (several names joined when they score the same)."""
    if not scored:
        return None, float("nan")
    value = max(scored.values()) if higher else min(scored.values())
    return " = ".join(k for k, v in scored.items() if v == value), value


def metric_verdict(
    metric: str,
    model: float,
    baselines: Mapping[str, float],
    ceiling: float,
    *,
    reason: str = "",
    n_perturbations: int = 0,
) -> Verdict:
    """The verdict for ``metric`` from the model's mean score, each baseline's and the ceiling's.

    ``reason`` says why the model's value is missing (NaN), when known; ``n_perturbations`` sets
    the resolution of PDS (1/N) below which a difference is a tie."""
    info = METRICS[metric]
    higher = info.best == 1.0
    label = GLOSSARY[metric].name if metric in GLOSSARY else metric
    best, base = _best_baseline({k: v for k, v in baselines.items() if _finite(v)}, higher)
    tie_abs = 1.0 / n_perturbations if metric.startswith("discrimination") and n_perturbations else TIE_ABS

    def _is_tie(gap: float, ref: float, higher: bool) -> bool:
        return abs(gap) < (tie_abs if higher else TIE_REL * max(abs(ref), 1e-12))

    low = _low_signal(metric, base, ceiling, higher)

    def verdict(beats, share, sentence) -> Verdict:
        return Verdict(metric, label, model, best, base, ceiling, beats, share, low, f"{label}: {sentence}")

    if not _finite(model):
        why = reason or GLOSSARY.get(metric, GlossaryEntry("", "", "", "", "not defined here")).nan
        return verdict(None, None, f"cannot be scored ({why})")
    if best is None:
        return verdict(None, None, f"{_fmt(model)}; no baseline could be scored to compare with.")
    if higher and model == base == 0 and (not _finite(ceiling) or ceiling == 0):
        return verdict(
            False,
            None,
            "0 for the model, every baseline and the ceiling: the real test cells have no significant "
            "gene at FDR 0.05 (too few cells, or no effect), so there is nothing to overlap.",
        )
    gap = _better(model, base, higher)
    share = _share(model, ceiling, higher)
    if gap > 0 and not _is_tie(gap, base, higher):
        return verdict(True, share, _beats_sentence(model, base, best, ceiling, gap, share, higher))
    level = "is level with" if _is_tie(gap, base, higher) else "does not beat"
    head = f"{level} the {best} baseline ({_fmt(model)} vs {_fmt(base)})"
    if low:
        tail = (
            f"this dataset carries almost no signal for these perturbations (the ceiling is {_fmt(ceiling)})."
        )
    elif _finite(ceiling):
        tail = (
            f"the data allow {_fmt(ceiling)}, so the model has not learned these perturbations yet "
            "(train longer, or choose a task with more training perturbations)."
        )
    else:
        tail = "no ceiling could be computed."
    return verdict(False, share, f"{head}: {tail}")


def _low_signal(metric: str, base: float, ceiling: float, higher: bool) -> bool:
    """Almost no signal: the ceiling itself is low, or a baseline already reaches it."""
    if not _finite(ceiling):
        return False
    if higher and ceiling < LOW_CEILING.get(metric, -math.inf):
        return True
    return _finite(base) and _better(ceiling, base, higher) <= 0


def _share(model: float, ceiling: float, higher: bool) -> float | None:
    if not (_finite(ceiling) and _finite(model)):
        return None
    if higher:
        return model / ceiling if ceiling > 0 else None
    return ceiling / model if model > 0 else None


def _beats_sentence(model, base, best, ceiling, gap, share, higher) -> str:
    head = f"beats every baseline by {_fmt(gap)} ({_fmt(model)} vs {_fmt(base)} for {best})"
    if share is None:
        return f"{head}; no ceiling could be computed."
    if share >= 1.0:
        return (
            f"{head}; it reaches what the data allow (ceiling {_fmt(ceiling)}): as close to the real "
            "cells as a second sample of them."
        )
    return f"{head}; reaches {share:.0%} of what the data allow (ceiling {_fmt(ceiling)})."


def overall_sentence(verdicts: list[Verdict] | tuple[Verdict, ...]) -> str:
    """One line above the details: on how many headline metrics the model beats every baseline."""
    scored = [v for v in verdicts if v.beats is not None]
    if not scored:
        return "The model could not be scored on any headline metric."
    wins = [v for v in scored if v.beats]
    lows = [v for v in scored if not v.beats and v.low_signal]
    text = f"The model beats every baseline on {len(wins)} of {len(scored)} headline metrics"
    if not wins and len(lows) == len(scored):
        return text + ": the data carry almost no signal for these perturbations (see the ceilings)."
    if not wins:
        return text + ": it has not learned what the data allow yet (see the ceilings)."
    return text + "."


def model_stamp(run_dir: str | Path) -> float:
    """mtime of the run's best model: a verdict.json written for an older model is stale."""
    path = Path(run_dir) / "model.safetensors"
    return path.stat().st_mtime if path.exists() else 0.0


def read_verdict(run_dir: str | Path) -> dict | None:
    """The run's saved evaluation (``verdict.json``), or None when there is none or it predates
    the current model. Light on purpose: the app's Home and Predict pages call it on every view."""
    doc = read_json(Path(run_dir) / EVALUATION_DIR / VERDICT_FILE)
    if not isinstance(doc, dict) or doc.get("model_stamp") != model_stamp(run_dir):
        return None
    return doc
