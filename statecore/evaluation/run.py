"""Evaluate a run: the model vs every baseline vs the data ceiling, on the run's test split.

The one path behind ``python -m statecore evaluate --run-dir``, the app's Evaluate page and
``bench/quality.py``: predict the test split with the model and each baseline, score everything
with ``metrics.evaluate`` against the real test cells, score two halves of the real cells against
each other (the ceiling), and read the headline metrics as verdict sentences.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from statecore.data.io import control_label
from statecore.errors import StatecoreError
from statecore.evaluation import metrics
from statecore.evaluation.verdict import (
    CEILING_NOTE,
    HEADLINE,
    VERDICT_FILE,
    Verdict,
    metric_verdict,
    model_stamp,
    overall_sentence,
)
from statecore.inference.baselines import BASELINE_KINDS, UNSEEN_BASELINES, predict_baseline
from statecore.inference.predict import predict_split
from statecore.runs.files import atomic_write_json

MODEL = "State (this run)"
CEILING = "ceiling (two halves of the real cells)"
BASELINE_PREFIX = "baseline: "


def baseline_name(kind: str) -> str:
    return f"{BASELINE_PREFIX}{kind}"


@dataclass(frozen=True)
class PDSView:
    """The model's PDS matrix and ranks, from the very distances ``discrimination_score`` ranks.

    Rows and columns of ``distances`` are ordered by rank (best first) so the diagonal shows how
    often each prediction is closest to its own perturbation."""

    distances: pd.DataFrame  # predicted (rows) x real (columns), L1
    ranks: pd.DataFrame  # perturbation, rank (1 = closest, cell-eval's), best, worst, tied, pds
    # How much the distances change between predictions (down a column) relative to between real
    # perturbations (along a row). Near 0: the predictions hardly differ, so every row ranks the real
    # perturbations the same way (by the size of their real change) and the ranks say little of the model.
    prediction_spread: float = float("nan")

    @property
    def predictions_alike(self) -> bool:
        return bool(self.prediction_spread < 0.25)


@dataclass(frozen=True)
class RunEvaluation:
    run_dir: str
    context: str
    control: str
    seed: int
    pred: object  # AnnData: the model's predicted test cells (+ controls)
    real: object  # AnnData: the real test cells (+ controls)
    results: Mapping[str, metrics.EvalResult]  # method -> its scores (MODEL, baselines, CEILING)
    errors: Mapping[str, str]  # method -> why it could not be predicted or scored
    summary: pd.DataFrame  # one row per method: mean of every metric over test perturbations
    verdicts: tuple[Verdict, ...]
    overall: str
    pds: PDSView | None = None
    messages: tuple[str, ...] = field(default=())
    # method -> its predicted cells (the ceiling's: the half scored as the prediction)
    predictions: Mapping[str, object] = field(default_factory=dict, repr=False)

    @property
    def n_perturbations(self) -> int:
        return len(set(self.real.obs["perturbation"].astype(str)) - {self.control})

    def to_dict(self) -> dict:
        """What ``verdict.json`` holds (also read back by the Predict page as the run's confidence)."""
        return {
            "run_dir": self.run_dir,
            "context": self.context,
            "control": self.control,
            "seed": self.seed,
            "n_test_perturbations": self.n_perturbations,
            "overall": self.overall,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "summary": self.summary.to_dict(orient="records"),
            "errors": dict(self.errors),
            "ceiling_note": CEILING_NOTE,
            "model_stamp": model_stamp(self.run_dir),
        }

    def text(self) -> str:
        lines = [self.overall, *(f"- {v.sentence}" for v in self.verdicts)]
        lines += [f"note: {name} skipped: {msg}" for name, msg in self.errors.items()]
        return "\n".join(lines)

    def save(self, outdir: str | Path) -> list[Path]:
        """summary.csv, verdict.json and each method's per-perturbation results."""
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        self.summary.to_csv(out / "summary.csv", index=False)
        written = [out / "summary.csv"]
        for name, res in self.results.items():
            path = out / f"results_{_slug(name)}.csv"
            res.results.to_csv(path, index=False)
            written.append(path)
        atomic_write_json(out / VERDICT_FILE, self.to_dict())
        return [*written, out / VERDICT_FILE]


def _slug(name: str) -> str:
    if name == MODEL:
        return "model"
    if name == CEILING:
        return "ceiling"
    return name.removeprefix(BASELINE_PREFIX)


def split_halves(real, seed: int = 0):
    """Two random halves of the real cells of every group (controls too): the data's own agreement."""
    rng = np.random.default_rng(seed)
    labels = real.obs["perturbation"].astype(str).to_numpy()
    take = np.zeros(real.n_obs, dtype=bool)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        take[idx[: len(idx) // 2]] = True
    return real[take].copy(), real[~take].copy()


def default_baselines(split) -> tuple[str, ...]:
    """The baselines run beside the model: an unseen-genes run meets the generic response and the linear
    model on gene features (the others need measured perturbations); other tasks the classic ones."""
    if split is not None and split.task == "unseen":
        return ("control", "context_mean", *UNSEEN_BASELINES)
    return tuple(k for k in BASELINE_KINDS if k not in UNSEEN_BASELINES)


def _predictions(run, adata, seed: int, baselines: Sequence[str]):
    """The model's prediction, the real cells and each baseline's prediction (failures named)."""
    pred, real = predict_split(run, adata, seed=seed)
    outputs, errors = {MODEL: pred}, {}
    vocab = getattr(run, "vocab", None)
    table = vocab.feature_table() if vocab is not None else None
    for kind in baselines:
        try:
            outputs[baseline_name(kind)] = predict_baseline(
                adata, run.split, kind, genes=list(run.genes), seed=seed, features=table,
                combo_sep=vocab.combo_sep if vocab is not None else "+",
            )  # fmt: skip
        except StatecoreError as exc:  # e.g. additive without measured parts: the others still count
            errors[baseline_name(kind)] = str(exc)
    return pred, real, outputs, errors


def _score_all(outputs: dict, real, control: str, seed: int, ceiling: bool):
    results, errors, messages = {}, {}, []
    if ceiling:
        outputs = {**outputs, CEILING: split_halves(real, seed)}
    for name, pred in outputs.items():
        truth = real
        if name == CEILING:
            pred, truth = pred
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                res = metrics.evaluate(pred, truth, control=control)
            except (StatecoreError, ValueError) as exc:  # show the others, name the one that failed
                errors[name] = str(exc)
                continue
        results[name] = res
        messages += [f"{name}: {m}" for m in res.messages]
    return results, errors, messages, outputs


def summary_table(results: Mapping[str, metrics.EvalResult], statistic: str = "mean") -> pd.DataFrame:
    """One row per method, one column per metric: the aggregate ``statistic`` over perturbations."""
    rows = []
    for name, res in results.items():
        agg = res.agg[res.agg["statistic"] == statistic].drop(
            columns=["statistic", "context"], errors="ignore"
        )
        rows.append({"method": name, **agg.mean(numeric_only=True).to_dict()})
    return pd.DataFrame(rows)


def _nan_reason(metric: str, errors: Mapping[str, str], n_perts: int) -> str:
    if MODEL in errors:
        return f"scoring the model failed: {errors[MODEL]}"
    if metric.startswith("discrimination") and n_perts < 2:
        return f"it needs at least two test perturbations; this split has {n_perts}"
    return ""


def verdicts_from_summary(
    summary: pd.DataFrame, errors: Mapping[str, str] | None = None, n_perts: int = 0
) -> tuple[Verdict, ...]:
    """A verdict per headline metric from a summary table (rows MODEL, baselines, CEILING)."""
    errors = errors or {}
    by = summary.set_index("method")
    out = []
    for m in HEADLINE:
        col = by[m] if m in by.columns else pd.Series(dtype=float)
        model = float(col.get(MODEL, np.nan))
        ceiling = float(col.get(CEILING, np.nan))
        bases = {
            k.removeprefix(BASELINE_PREFIX): float(v) for k, v in col.items() if k.startswith(BASELINE_PREFIX)
        }
        reason = _nan_reason(m, errors, n_perts)
        out.append(metric_verdict(m, model, bases, ceiling, reason=reason, n_perturbations=n_perts))
    return tuple(out)


def pds_view(pred, real, control: str, metric: str = "l1") -> PDSView | None:
    """The PDS matrix of ``pred`` vs ``real`` and every perturbation's rank (None below 2 of them)."""
    pb = metrics.pseudobulks(pred, real, control=control)
    k = len(pb.perts)
    if k < 2:
        return None
    dist = metrics.discrimination_distances(pb, metric)
    r = metrics.discrimination_ranks(dist)
    ranks = pd.DataFrame(
        {
            "perturbation": pb.perts,
            "rank": r.rank + 1,
            "best": r.best + 1,
            "worst": r.worst + 1,
            "tied": r.tied,
            "pds": 1.0 - r.rank / k,
        }
    ).sort_values(["rank", "perturbation"], kind="stable", ignore_index=True)
    order = [list(pb.perts).index(p) for p in ranks["perturbation"]]
    perts = list(ranks["perturbation"])
    frame = pd.DataFrame(dist[np.ix_(order, order)], index=perts, columns=perts)
    along_row = float(dist.std(axis=1).mean())
    spread = float(dist.std(axis=0).mean()) / along_row if along_row > 0 else float("nan")
    return PDSView(distances=frame, ranks=ranks, prediction_spread=spread)


def linear_sentence(summary: pd.DataFrame, n_perts: int = 0) -> str:
    """Unseen genes: say plainly on which headline metrics the linear model on gene features beats the model
    (as it often does: Ahlmann-Eltze, Huber & Anders, Nat Methods 2025), whichever baseline is best overall."""
    by = summary.set_index("method")
    lin = baseline_name("linear_features")
    if MODEL not in by.index or lin not in by.index:
        return ""
    lost = []
    for m in HEADLINE:
        if m not in by.columns:
            continue
        v = metric_verdict(m, float(by.at[MODEL, m]), {"linear_features": float(by.at[lin, m])},
                           float(by[m].get(CEILING, np.nan)), n_perturbations=n_perts)  # fmt: skip
        if v.beats is False and "does not beat" in v.sentence:
            lost.append(v.label)
    if not lost:
        return ""
    return (
        f"On these unseen genes the linear model on gene features beats it on {', '.join(lost)}: "
        "prefer the linear_features baseline there."
    )


def evaluate_run(
    run,
    adata,
    *,
    seed: int = 0,
    baselines: Sequence[str] | None = None,
    ceiling: bool = True,
) -> RunEvaluation:
    """Score a loaded run's test split: model, every baseline in ``baselines`` and the ceiling.

    ``adata`` is the prepared data the run was trained on. A baseline that cannot predict this
    split (e.g. additive on a zero-shot task whose parts were never measured) or a method whose
    scoring fails is left out and named in ``errors``; the rest is still scored."""
    control = control_label(adata)
    if baselines is None:
        baselines = default_baselines(run.split)
    pred, real, outputs, errors = _predictions(run, adata, seed, baselines)
    results, score_errors, messages, outputs = _score_all(outputs, real, control, seed, ceiling)
    errors.update(score_errors)
    if not results:
        raise StatecoreError(
            "no method could be scored: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
        )
    summary = summary_table(results)
    n_perts = len(set(real.obs["perturbation"].astype(str)) - {control})
    verdicts = verdicts_from_summary(summary, errors, n_perts)
    pds = pds_view(pred, real, control) if MODEL in results else None
    overall = overall_sentence(verdicts)
    if run.split is not None and run.split.task == "unseen":
        overall = f"{overall} {linear_sentence(summary, n_perts)}".strip()
    return RunEvaluation(
        run_dir=str(run.run_dir),
        context=str(run.split.context),
        control=control,
        seed=seed,
        pred=pred,
        real=real,
        results=results,
        errors=errors,
        summary=summary,
        verdicts=verdicts,
        overall=overall,
        pds=pds,
        messages=tuple(messages),
        predictions={k: (v[0] if k == CEILING else v) for k, v in outputs.items()},
    )
