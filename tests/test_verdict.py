"""Verdict sentences and the glossary: each branch of ``metric_verdict`` on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from statecore.evaluation.metrics import discrimination_ranks
from statecore.evaluation.verdict import GLOSSARY, HEADLINE, metric_verdict, overall_sentence

BASES = {"control": 0.10, "perturbation_mean": 0.862, "cell_mean": 0.70}


def test_beats_every_baseline_with_share_of_ceiling():
    v = metric_verdict("pearson_delta", 0.966, BASES, 0.98)
    assert v.beats and v.best_baseline == "perturbation_mean" and not v.low_signal
    assert "beats every baseline by 0.104 (0.966 vs 0.862 for perturbation_mean)" in v.sentence
    assert "reaches 99% of what the data allow (ceiling 0.98)" in v.sentence
    assert v.sentence.startswith("Pearson Δ: ")


def test_above_the_ceiling_is_said_plainly():
    v = metric_verdict("pearson_delta", 0.97, BASES, 0.95)
    assert v.beats and "reaches what the data allow" in v.sentence and v.share_of_ceiling > 1


def test_low_signal_dataset():
    v = metric_verdict("pearson_delta", 0.066, {"cell_mean": 0.208, "control": 0.0}, 0.21)
    assert v.beats is False and v.low_signal
    assert v.sentence == (
        "Pearson Δ: does not beat the cell_mean baseline (0.066 vs 0.208): this dataset carries almost "
        "no signal for these perturbations (the ceiling is 0.21)."
    )


def test_signal_present_but_not_learned():
    v = metric_verdict("pearson_delta", 0.30, {"perturbation_mean": 0.6}, 0.9)
    assert v.beats is False and not v.low_signal
    assert "the data allow 0.9, so the model has not learned" in v.sentence


def test_baseline_at_the_ceiling_is_low_signal():
    v = metric_verdict("discrimination_score_l1", 0.7, {"perturbation_mean": 0.9}, 0.88)
    assert v.low_signal and "almost no signal" in v.sentence


def test_errors_are_lower_is_better():
    v = metric_verdict("mse", 0.065, {"control": 0.054, "cell_mean": 0.07}, 0.03)
    assert v.beats is False and v.best_baseline == "control" and "0.065 vs 0.054" in v.sentence
    w = metric_verdict("mse", 0.04, {"control": 0.054}, 0.03)
    assert w.beats and "by 0.014" in w.sentence and math.isclose(w.share_of_ceiling, 0.75)
    # a baseline already as close as a second sample of the real cells: nothing left to learn
    x = metric_verdict("mae", 0.2, {"cell_mean": 0.1}, 0.12)
    assert x.low_signal and "almost no signal" in x.sentence


def test_tie_is_level_not_a_win():
    v = metric_verdict("pearson_delta", 0.863, BASES, 0.98)
    assert v.beats is False and "is level with the perturbation_mean baseline" in v.sentence


def test_nan_model_says_why():
    v = metric_verdict("discrimination_score_l1", float("nan"), {"control": float("nan")}, float("nan"))
    assert v.beats is None and "fewer than two test perturbations" in v.sentence
    w = metric_verdict("pearson_delta", float("nan"), BASES, 0.9, reason="scoring the model failed: x")
    assert "cannot be scored (scoring the model failed: x)" in w.sentence


def test_de_overlap_zero_everywhere_explains_the_empty_result():
    v = metric_verdict("overlap_at_N", 0.0, {"control": 0.0, "cell_mean": 0.0}, 0.0)
    assert v.beats is False and "no significant gene at FDR 0.05" in v.sentence


def test_overall_sentence():
    win = metric_verdict("pearson_delta", 0.966, BASES, 0.98)
    low = metric_verdict("pearson_delta", 0.066, {"cell_mean": 0.208}, 0.21)
    assert overall_sentence([win, low]) == "The model beats every baseline on 1 of 2 headline metrics."
    assert "almost no signal" in overall_sentence([low])
    nan = metric_verdict("pearson_delta", float("nan"), BASES, 0.9)
    assert "could not be scored" in overall_sentence([nan])


@pytest.mark.parametrize("metric", HEADLINE)
def test_glossary_says_what_best_worst_and_nan_mean(metric):
    g = GLOSSARY[metric]
    assert g.plain and g.one[:1] in "01" and g.nan.startswith("NaN")


def test_discrimination_ranks_report_ties_honestly():
    # row 0's own distance (1.0) ties with column 2: argsort puts the lower index first (cell-eval's rank)
    dist = np.array([[1.0, 0.5, 1.0], [2.0, 0.1, 3.0], [1.0, 1.0, 1.0]])
    r = discrimination_ranks(dist)
    assert list(r.rank) == [1, 0, 2] and list(r.tied) == [1, 0, 2]
    assert list(r.best) == [1, 0, 0] and list(r.worst) == [2, 0, 2]


def test_pds_differences_below_one_rank_place_are_ties():
    v = metric_verdict("discrimination_score_l1", 0.593, {"control": 0.556}, 0.80, n_perturbations=9)
    assert v.beats is False and "is level with the control baseline" in v.sentence
    w = metric_verdict("discrimination_score_l1", 0.593, {"control": 0.556}, 0.80)
    assert w.beats  # without N the plain tolerance applies


def test_baselines_scoring_the_same_are_all_named():
    v = metric_verdict(
        "pearson_delta", 0.96, {"context_mean": 0.862, "additive": 0.862, "control": 0.1}, 0.96
    )
    assert v.best_baseline == "context_mean = additive" and "for context_mean = additive" in v.sentence
