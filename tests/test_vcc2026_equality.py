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
