"""Our vcc2026 metrics against the installed cell-eval2 0.20.0 (test-only reference, CPU engine
pdex) on seeded raw-count pairs: rank and set metrics exactly, the others to 1e-8 relative."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import numpy as np
import pytest

from statecore.evaluation.vcc2026 import PER_PERT_METRICS, evaluate_vcc2026
from tests.vcc2026_data import CONTROL, make_count_pair

cell_eval2 = pytest.importorskip(
    "cell_eval2", reason="cell-eval2==0.20.0 (requirements-dev.txt) is the reference scorer"
)
pytest.importorskip("pdex", reason="cell-eval2 picks pdex as its CPU DE engine")

EXACT = {
    "pds_cosine",
    "de_wilcoxon_sig_jaccard",
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
}
CASES = {
    "dense": dict(seed=0),
    "csr": dict(seed=1, sparse=True, n_perts=9),
    "few-pred-cells-cap": dict(seed=2, n_pred_cells=8),
    "tiled-budget": dict(seed=3, tiled=True),
    "big-effects-no-noise": dict(seed=4, noise=0.0, n_cells=40),
}


def _reference(pred, real):
    from cell_eval2 import EvalConfig, compute_metrics

    cfg = replace(EvalConfig.from_preset("vcc2026"), pert_col="target", control=CONTROL, num_threads=1)
    cfg = replace(cfg, de=replace(cfg.de, backend="pdex"))
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            long = compute_metrics(pred.copy(), real.copy(), config=cfg)
            agg = cell_eval2.aggregate_metrics_wide(long).to_pandas()
    finally:
        logging.disable(logging.NOTSET)
    wide = long.to_pandas().pivot(index="perturbation", columns="metric", values="value")
    return wide, agg


# The dense case runs by default (~15 s: cell-eval2 + pdex JIT); the rest under -m slow.
PARAMS = [pytest.param(n, marks=() if n == "dense" else pytest.mark.slow, id=n) for n in CASES]


@pytest.fixture(scope="module", params=PARAMS)
def case(request):
    pred, real = make_count_pair(**CASES[request.param])
    ref, ref_agg = _reference(pred, real)
    ours = evaluate_vcc2026(pred, real, control=CONTROL, pert_col="target")
    return ref, ours, ref_agg


def test_every_metric_equal(case):
    ref, ours, _ = case
    res = ours.results.set_index("perturbation")
    assert set(ref.columns) == set(PER_PERT_METRICS)
    for m in PER_PERT_METRICS:
        a = ref[m].reindex(res.index).to_numpy(float)
        b = res[m].to_numpy(float)
        if m in EXACT:
            same = (a == b) | (np.isnan(a) & np.isnan(b))
        else:
            same = np.isclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=True)
        assert same.all(), f"{m}: cell-eval2 {a[~same]} vs ours {b[~same]} at {list(res.index[~same])}"


def test_omitted_rows_match(case):
    """cell-eval2 leaves lfc_nmae rows out (gate < 10 genes); we mark the same rows omitted."""
    ref, ours, _ = case
    res = ours.results.set_index("perturbation")
    ref_rows = ref["de_wilcoxon_lfc_nmae"].dropna().index
    ours_rows = res.index[~ours.omitted["de_wilcoxon_lfc_nmae"].to_numpy()]
    assert sorted(ref_rows) == sorted(ours_rows)


def test_edge_cases_present(case):
    _, ours, _ = case
    r = ours.results.set_index("perturbation")
    assert np.isnan(r["de_wilcoxon_direction_reach_raw"]).any(), "a perturbation with no real sig gene"
    assert {"g1", "zz_out"} <= set(r.index)


@pytest.mark.slow
def test_cap_and_budget_bind():
    """The few-cell and tiled cases exercise the capped numerator's two corrections."""
    for name in ("few-pred-cells-cap", "tiled-budget"):
        pred, real = make_count_pair(**CASES[name])
        r = evaluate_vcc2026(pred, real, control=CONTROL, pert_col="target").results
        assert (r["expr_mse_unbiased_capped"] != r["expr_mse_unbiased"]).any(), name


def test_aggregate_equal(case):
    """Every statistic of cell-eval2's wide aggregate, the ratio-of-sums capped_norm included."""
    _, ours, ref_agg = case
    ref_agg = ref_agg.set_index("statistic")
    agg = ours.agg.set_index("statistic")
    assert list(ref_agg.index) == list(agg.index)
    assert sorted(ref_agg.columns) == sorted(agg.columns)
    for m in ref_agg.columns:
        a, b = ref_agg[m].to_numpy(float), agg[m].to_numpy(float)
        same = np.isclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=True)
        assert same.all(), f"{m}: cell-eval2 {a} vs ours {b}"


# ---------------------------------------------------------------- the scaled score (u - b) / (r - b)

SCALE_PAIR = dict(seed=5, n_cells=60, n_ctrl=150, sparse=True)  # a pair whose six scales are all usable


@pytest.fixture(scope="module")
def scale_case():
    """cell-eval2's own three legs: the generic baseline, the 5-split replicate anchor and the
    replicate-scale scores (its score_metrics core, _replicate_entries + _reference_column)."""
    from cell_eval2 import EvalConfig, aggregate_metrics_wide, compute_metrics
    from cell_eval2.anchor import compute_replicate_anchor
    from cell_eval2.baseline import build_generic_baseline
    from cell_eval2.score import _reference_column, _replicate_entries

    from statecore.evaluation.vcc2026_scale import scaled_score

    pred, real = make_count_pair(**SCALE_PAIR)
    cfg = replace(EvalConfig.from_preset("vcc2026"), pert_col="target", control=CONTROL, num_threads=1)
    cfg = replace(cfg, de=replace(cfg.de, backend="pdex"))
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = build_generic_baseline(real.copy(), config=cfg).agg.to_pandas().set_index("statistic")
            splits, anchor = compute_replicate_anchor(real.copy(), config=cfg)
            user = aggregate_metrics_wide(compute_metrics(pred.copy(), real.copy(), config=cfg))
    finally:
        logging.disable(logging.NOTSET)
    user = user.to_pandas().set_index("statistic")
    entries = _replicate_entries(base.loc["mean"].to_dict(), anchor)
    rows = [*sorted(entries), "avg_score"]
    names = list(user.columns)
    col = _reference_column(rows, [user.loc["mean", m] for m in names], names, entries, column="r", label="r")
    ours = scaled_score(
        evaluate_vcc2026(pred, real, control=CONTROL, pert_col="target").agg,
        real,
        control=CONTROL,
        pert_col="target",
    )
    return ours, base, splits.to_pandas(), dict(zip(rows, col.to_list()))


def test_scaled_score_equal(scale_case):
    ours, _, _, ref = scale_case
    got = ours.table.set_index("metric")["scaled"]
    assert set(ref) == set(got.index)
    for m, v in ref.items():
        assert np.isclose(got[m], v, rtol=1e-8, atol=1e-12), f"{m}: cell-eval2 {v} vs ours {got[m]}"
    assert not ours.messages


def test_scale_ends_equal(scale_case):
    """Both ends: the baseline's aggregate (every metric) and the anchor's value at each split."""
    from statecore.evaluation.vcc2026_scale import SCORED, baseline_aggregate

    ours, base, splits, _ = scale_case
    _, real = make_count_pair(**SCALE_PAIR)
    ob = baseline_aggregate(real, control=CONTROL, pert_col="target").set_index("statistic")
    for m in base.columns:
        a, b = base[m].to_numpy(float), ob[m].to_numpy(float)
        assert np.isclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=True).all(), f"baseline {m}: {a} vs {b}"
    for m in SCORED:
        a = splits[splits["metric"] == m].sort_values("split_index")["value"].to_numpy(float)
        b = ours.splits[m].to_numpy(float)  # means over perturbations: summation order differs
        assert np.isclose(a, b, rtol=1e-8, atol=1e-12).all(), f"anchor {m}: cell-eval2 {a} vs ours {b}"


def test_baseline_cells_and_halves_identical():
    """The baseline's emitted cells bit for bit, and the split halves cell for cell."""
    from cell_eval2.baseline import build_baseline_prediction, generic_response_profile
    from cell_eval2.ceiling import _disjoint_halves

    from statecore.evaluation.vcc2026_scale import disjoint_halves, generic_baseline, split_seeds

    for sparse in (False, True):
        _, real = make_count_pair(seed=3, sparse=sparse)
        prof = generic_response_profile(real, pert_col="target", control=CONTROL)
        ref = build_baseline_prediction(prof, real, pert_col="target", control=CONTROL)
        ours = generic_baseline(real, control=CONTROL, pert_col="target")
        a = ref.X.toarray() if sparse else ref.X
        b = ours.X.toarray() if sparse else ours.X
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for seed in split_seeds():
        ha, hb = _disjoint_halves(real, "target", CONTROL, seed)
        ia, ib = disjoint_halves(real.obs, "target", seed)
        assert list(ha.obs_names) == list(real.obs_names[ia])
        assert list(hb.obs_names) == list(real.obs_names[ib])


def test_degenerate_scale_is_named_not_scored():
    """Where cell-eval2 stops (replicate not beyond the baseline), we leave the member NaN."""
    from statecore.evaluation.vcc2026_scale import member_score

    assert np.isnan(member_score("pds_cosine", 0.8, 0.6, 0.5))
    assert np.isnan(member_score("de_wilcoxon_lfc_nmae", 0.3, 0.4, 0.9))
    assert member_score("expr_mse_unbiased_capped_norm", 5.0, 1.0, 0.0) == 0.0  # Box-Cox tail, clipped at 0
    assert member_score("de_wilcoxon_lfc_nmae", 50.0, 1.0, 0.0) == -6.0
    assert member_score("pds_cosine", np.nan, 0.5, 1.0) == -1.0  # a missing value scores metric_min
