"""``STConfig.prior_shrink="auto"``: choose the shift prior's shrinkage per run, from its own training pairs.

No single shrinkage of the shift prior won every task on validation (docs/RESULTS.md, issue 17): "zero"
helped the Papalexi screen and cost the synthetic screen discrimination. So a run can choose among
:data:`CANDIDATES` from its data, by cross-validation INSIDE its training pairs (validation pairs stay
unseen, so scoring a run on them stays unbiased; test pairs are never read):

* every training pair (context c, single p) is predicted as the model predicts a held-out pair: from the
  tables built without it. All of it is arithmetic on the per-pair mean shifts and noise of ONE pass over
  the group means (:func:`statecore.training.priors.pair_stats`): the all-context average without the pair
  is ``(sum - own) / (n - 1)``, its noise ``(noise_sum - own_noise) / (n - 1)^2`` (the "context" trust), and
  the context's mean shift without it ``(context_sum - own) / (m - 1)``. A single measured in no other
  training context has no such prediction (held out, the model gets no prior for it): it is skipped, and
  counted in the record;
* a training combination is predicted as the model predicts a held-out one: the sum of its singles' shifts
  in its context (their all-context average where the context did not measure them); combinations never
  enter the tables, so nothing has to be left out;
* each candidate is scored on the target context's (``SplitConfig.context``) pairs when it has at least
  :data:`MIN_TARGET_PAIRS` scorable ones, else on every context's: the mean pearson delta (over genes,
  predicted vs measured shift; 0 for a prediction of no change) and the mean discrimination score
  (cell-eval's PDS with the L1 distance, the target gene left out: the normalised rank of the pair's own
  measured shift among its rivals, the other measured training pairs of its context and kind). A test
  pair's rivals are held out too, so each comparison uses the prediction made without BOTH pairs; only
  "context" needs that (a rival's shift sits in the context mean): ``(context_sum - own - rival) / (m - 2)``;
* the rule (:data:`RULE`): the best PDS; within :data:`TOLERANCE` of it, the best pearson delta; "off",
  the presets' default, stays unless another candidate beats it by more than :data:`TOLERANCE`.

The choice and every candidate's scores go to ``prior_choice.json`` in the run directory; the run's
``config.json`` holds the concrete choice, so a reload or a resume builds the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from statecore.data.sets import PerturbationVocab
from statecore.runs import files as runs
from statecore.training.priors import (
    SHRINK_MODES,
    PairStats,
    context_sums,
    shrinkage_factors,
    single_sums,
    vocab_pair_stats,
)

CANDIDATES = SHRINK_MODES  # ("off", "zero", "context"); "off" first: it wins exact ties
DEFAULT = "off"  # the presets' shrinkage: kept unless another candidate wins by more than TOLERANCE
TOLERANCE = 0.005
MIN_TARGET_PAIRS = 4
CHOICE_FILE = "prior_choice.json"
RULE = (
    f"the candidates within {TOLERANCE} of the best mean PDS (L1) over the scored training pairs; among them "
    f"the best mean pearson delta, but 'off' (the default) when it is among them and within {TOLERANCE} of "
    "that pearson delta"
)


def _single_index(stats: PairStats, vocab: PerturbationVocab) -> np.ndarray:
    """``[K]`` vocabulary index of each single pair, -1 for a combination."""
    index = {name: i for i, name in enumerate(vocab.names)}
    return np.asarray([index.get(p, -1) if p != vocab.control else -1 for p in stats.labels], dtype=np.int64)


@dataclass(frozen=True)
class _ContextMeans:
    """Each context's sum and count of its singles' shifts (``context_shrinkage``'s generic rows)."""

    pos: np.ndarray  # [K] position of each pair's context in ``contexts``
    sums: np.ndarray  # [C, G]
    counts: np.ndarray  # [C]

    @classmethod
    def of(cls, stats: PairStats, vocab: PerturbationVocab, contexts: Sequence[str]) -> _ContextMeans:
        cpos = {c: i for i, c in enumerate(map(str, contexts))}
        sums, counts = context_sums(stats, vocab, contexts)
        return cls(np.asarray([cpos[c] for c in stats.contexts], dtype=np.int64), sums, counts)

    def without(self, c: int, removed: np.ndarray, k: int) -> np.ndarray:
        """``[n, G]``: context ``c``'s mean single shift without ``k`` of its singles, whose shifts sum to
        each row of ``removed [n, G]``; a context left with none takes the mean of the other measured
        contexts' means (as ``context_shrinkage``), zeros when there are none."""
        if self.counts[c] > k:
            return (self.sums[c] - removed) / (self.counts[c] - k)
        others = (self.counts > 0) & (np.arange(len(self.counts)) != c)
        means = self.sums[others] / np.maximum(self.counts[others], 1)[:, None]
        fallback = means.mean(axis=0) if others.any() else np.zeros(self.sums.shape[1])
        return np.broadcast_to(fallback, removed.shape).copy()


@dataclass(frozen=True)
class LooPrediction:
    """One candidate's shift prior of every pair from tables built without that pair."""

    pred: np.ndarray  # [K, G]; NaN rows: a single measured in no other context (no prediction)
    generic_weight: np.ndarray  # [K]: 1 - trust of a single under "context" (weight of its context's mean)


def _combination_prior(
    stats: PairStats, vocab: PerturbationVocab, own: np.ndarray, single: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """``[len(rows), G]``: each combination's prior, the sum over its singles of the single's shift in the
    combination's context where measured there, else its all-context average (zeros when never measured)."""
    index = {name: i for i, name in enumerate(vocab.names)}
    sums, _, counts = single_sums(replace(stats, shift=own), vocab)
    average = sums / np.maximum(counts, 1)[:, None]
    measured = {(stats.contexts[k], int(single[k])): own[k] for k in np.flatnonzero(single >= 0)}
    out = np.zeros((len(rows), stats.shift.shape[1]))
    for r, k in enumerate(rows):
        for part in stats.labels[k].split(vocab.combo_sep):
            i = index[part]
            out[r] += measured.get((stats.contexts[k], i), average[i])
    return out


def loo_predictions(
    stats: PairStats, *, vocab: PerturbationVocab, contexts: Sequence[str], shrink: str
) -> LooPrediction:
    """The shift prior (shrinkage ``shrink``) each pair of ``stats`` would get, as the model gives it to a
    held-out pair, from tables built without that pair (see the module's docstring)."""
    if shrink not in CANDIDATES:
        raise ValueError(f"prior shrinkage must be one of {CANDIDATES}; got {shrink!r}")
    single = _single_index(stats, vocab)
    x = stats.shift
    own = x * shrinkage_factors(x, stats.noise)[:, None] if shrink == "zero" else x
    sums, noise, counts = single_sums(replace(stats, shift=own), vocab)
    pred, weight = np.full_like(x, np.nan), np.zeros(len(x))
    rows = np.flatnonzero(single >= 0)
    rows = rows[counts[single[rows]] >= 2]
    n = (counts[single[rows]] - 1).astype(np.float64)
    avg = (sums[single[rows]] - own[rows]) / n[:, None]
    if shrink == "context":
        trust = shrinkage_factors(avg, (noise[single[rows]] - stats.noise[rows]) / n**2)
        means = _ContextMeans.of(stats, vocab, contexts)
        generic = (
            np.stack([means.without(means.pos[k], x[k][None], 1)[0] for k in rows]) if len(rows) else avg
        )
        avg, weight[rows] = trust[:, None] * avg + (1 - trust[:, None]) * generic, 1 - trust
    pred[rows] = avg
    combos = np.flatnonzero(single < 0)
    if len(combos):
        pred[combos] = _combination_prior(stats, vocab, own, single, combos)
    return LooPrediction(pred, weight)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r; 0 where a row is constant (a prediction of no change carries no direction)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)


def rival_predictions(
    loo: LooPrediction,
    stats: PairStats,
    *,
    vocab: PerturbationVocab,
    contexts: Sequence[str],
    k: int,
    rivals: np.ndarray,
    means: _ContextMeans | None = None,
) -> np.ndarray:
    """``[len(rivals), G]``: pair ``k``'s prediction made without both it and each rival (a test pair's
    rivals are held out too). Only "context" differs from ``loo.pred[k]``: a rival's shift sits in the
    context mean, ``(context_sum - own - rival) / (m - 2)`` replaces ``(context_sum - own) / (m - 1)``."""
    pred = np.broadcast_to(loo.pred[k], (len(rivals), stats.shift.shape[1]))
    if loo.generic_weight[k] == 0:
        return pred
    means = means or _ContextMeans.of(stats, vocab, contexts)
    x, c = stats.shift, means.pos[k]
    shift = means.without(c, x[k][None] + x[rivals], 2) - means.without(c, x[k][None], 1)
    return pred + loo.generic_weight[k] * shift


def pair_scores(
    loo: LooPrediction,
    stats: PairStats,
    *,
    vocab: PerturbationVocab,
    contexts: Sequence[str],
    genes: Sequence[str],
    rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``rows``: pearson delta of the predicted vs the measured shift, and the PDS (L1): 1 - the
    number of rivals nearer the prediction than the pair's own measured shift, over rivals + 1 (NaN
    without rivals), each comparison with :func:`rival_predictions`. Rivals: the other measured training pairs of the same context and kind (singles,
    or combinations: a held-out set is one or the other); the pair's target gene is left out, as
    ``evaluation.metrics.discrimination_score`` does."""
    gpos = {g: i for i, g in enumerate(genes)}
    ctx = np.asarray(stats.contexts, dtype=object)
    kind = _single_index(stats, vocab) >= 0
    means = _ContextMeans.of(stats, vocab, contexts)
    pds = np.full(len(rows), np.nan)
    for r, k in enumerate(rows):
        rivals = np.flatnonzero((ctx == stats.contexts[k]) & (kind == kind[k]))
        rivals = rivals[rivals != k]
        if len(rivals):
            cols = np.ones(stats.shift.shape[1], dtype=bool)
            cols[gpos.get(stats.labels[k], [])] = False
            pred = rival_predictions(
                loo, stats, vocab=vocab, contexts=contexts, k=k, rivals=rivals, means=means
            )[:, cols]
            d_own = np.abs(stats.shift[k, cols] - pred).sum(axis=1)
            d_rival = np.abs(stats.shift[rivals][:, cols] - pred).sum(axis=1)
            pds[r] = 1.0 - float((d_rival < d_own).sum()) / (len(rivals) + 1)
    return _pearson_rows(loo.pred[rows], stats.shift[rows]), pds


@dataclass(frozen=True)
class PriorChoice:
    """The chosen shrinkage and what it was chosen on."""

    choice: str
    scores: dict[str, dict[str, float]]  # candidate -> {"pds": .., "pearson_delta": ..}
    scope: str  # the context scored, or "every context"
    n_scored: int  # pairs scored (singles with a leave-one-out prediction + combinations)
    n_combinations: int  # of them combinations
    n_skipped: int  # singles measured in no other training context (no leave-one-out prediction)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": "auto", "choice": self.choice, "rule": RULE, "scope": self.scope,
            "pairs": "training pairs only (leave-one-pair-out); validation and test pairs are not read",
            "n_scored": self.n_scored, "n_combinations": self.n_combinations, "n_skipped": self.n_skipped,
            "scores": self.scores, **self.extra,
        }  # fmt: skip

    def line(self) -> str:
        """One line for the CLI: the choice and every candidate's scores."""
        if self.n_scored == 0:
            return (
                f"shift prior: kept {self.choice} (no training pair to cross-validate: {self.n_skipped} training "
                "single(s) measured in one context only)"
            )
        s, others = self.scores, [c for c in CANDIDATES if c != self.choice]

        def fmt(v) -> str:
            return f"{v:.3f}" if isinstance(v, float | int) and np.isfinite(v) else "n/a"

        def vs(key: str) -> str:
            return f"{fmt(s[self.choice][key])} vs " + ", ".join(f"{c} {fmt(s[c][key])}" for c in others)

        return (
            f"shift prior: chose {self.choice} (PDS {vs('pds')}; pearson delta {vs('pearson_delta')}; "
            f"{self.n_scored} training pairs of {self.scope}, leave-one-out)"
        )


def decide(scores: Mapping[str, Mapping[str, float]]) -> str:
    """The rule (:data:`RULE`) over ``{candidate: {"pds", "pearson_delta"}}`` for :data:`CANDIDATES`."""
    pds = {c: scores[c]["pds"] for c in CANDIDATES}
    r = {
        c: scores[c]["pearson_delta"] if np.isfinite(scores[c]["pearson_delta"]) else -np.inf
        for c in CANDIDATES
    }
    finite = [c for c in CANDIDATES if np.isfinite(pds[c])]
    best = max((pds[c] for c in finite), default=np.nan)
    near = [c for c in finite if pds[c] >= best - TOLERANCE - 1e-12] if finite else list(CANDIDATES)
    top = max(near, key=lambda c: r[c])  # first of the best: "off" on exact ties
    if DEFAULT in near and r[DEFAULT] >= r[top] - TOLERANCE - 1e-12:
        return DEFAULT
    return top


def choose(
    stats: PairStats,
    *,
    vocab: PerturbationVocab,
    contexts: Sequence[str],
    genes: Sequence[str],
    target: str | None,
) -> PriorChoice:
    """Score every candidate on the pairs of ``stats`` (TRAINING pairs, with noise) and pick one."""
    preds = {c: loo_predictions(stats, vocab=vocab, contexts=contexts, shrink=c) for c in CANDIDATES}
    scorable = np.isfinite(preds["off"].pred).all(axis=1)
    ctx = np.asarray(stats.contexts, dtype=object)
    in_target = scorable & (ctx == target)
    rows = np.flatnonzero(in_target if in_target.sum() >= MIN_TARGET_PAIRS else scorable)
    scope = str(target) if in_target.sum() >= MIN_TARGET_PAIRS else "every context"
    scores = {}
    for c, pred in preds.items():
        pearson, pds = pair_scores(pred, stats, vocab=vocab, contexts=contexts, genes=genes, rows=rows)
        scores[c] = {
            "pds": float(np.nanmean(pds)) if np.isfinite(pds).any() else float("nan"),
            "pearson_delta": float(np.nanmean(pearson)) if np.isfinite(pearson).any() else float("nan"),
        }
    single = _single_index(stats, vocab) >= 0
    return PriorChoice(
        choice=decide(scores) if len(rows) else CANDIDATES[0],
        scores=scores,
        scope=scope,
        n_scored=len(rows),
        n_combinations=int((~single[rows]).sum()),
        n_skipped=int((single & ~scorable).sum()),
    )


def choose_for_run(
    adata,
    *,
    train_pairs: Mapping[str, Sequence[str]],
    vocab: PerturbationVocab,
    contexts: Sequence[str],
    genes: Sequence[str],
    target: str | None,
    cells: np.ndarray | None = None,
) -> PriorChoice:
    """:func:`choose` on a run's TRAINING pairs (``Split.train``; pass nothing else): one pass over their
    group means, singles and combinations (``cells``: the perturbed cells the means may use, as the prior's
    tables; None: all)."""
    stats = vocab_pair_stats(
        adata, genes=genes, vocab=vocab, train_pairs=train_pairs, noise=True, combinations=True, cells=cells
    )
    return choose(stats, vocab=vocab, contexts=contexts, genes=genes, target=target)


def save(choice: PriorChoice, run_dir: str | Path) -> None:
    runs.atomic_write_json(Path(run_dir) / CHOICE_FILE, choice.to_dict())


def saved_choice(run_dir: str | Path) -> str | None:
    """The concrete shrinkage a run chose earlier (``prior_choice.json``), or None."""
    data = runs.read_json(Path(run_dir) / CHOICE_FILE)
    choice = data.get("choice") if isinstance(data, dict) else None
    return choice if choice in CANDIDATES else None


def saved_line(run_dir: str | Path) -> str | None:
    """The CLI line of a run's saved choice (None when the run did not choose)."""
    data = runs.read_json(Path(run_dir) / CHOICE_FILE)
    if not isinstance(data, dict) or data.get("choice") not in CANDIDATES:
        return None
    keys = ("choice", "scores", "scope", "n_scored", "n_combinations", "n_skipped")
    try:
        return PriorChoice(**{k: data[k] for k in keys}).line()
    except (KeyError, TypeError, ValueError):
        return None
