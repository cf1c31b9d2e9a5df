"""statecore.evaluation.metrics: pure array metrics against scipy/sklearn/polars definitions, and the adapter."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import auc, average_precision_score, roc_curve

from statecore.errors import DataError
from statecore.evaluation.metrics import (
    METRICS,
    EvalResult,
    PseudobulkArrays,
    _pr_roc_auc,
    aggregate,
    discrimination_score,
    evaluate,
    pseudobulk_metrics,
    score_against_baseline,
    spearman,
)
from tests.celleval_data import make_pair


def _quiet_eval(pred, real, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return evaluate(pred, real, control="ctrl", **kw)


def test_registry_best_values():
    assert METRICS["mae"].best == 0.0 and METRICS["overlap_at_N"].best == 1.0
    assert METRICS["de_nsig_counts_real"].best is None
    assert all(m.description for m in METRICS.values())


def test_spearman_and_pearson_match_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman([1.0], [2.0])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    pb = PseudobulkArrays(
        perts=np.array(["a", "b"]),
        genes=np.array(["g0", "g1", "g2"]),
        real=rng.normal(size=(2, 3)),
        pred=rng.normal(size=(2, 3)),
        real_ctrl=np.zeros(3),
        pred_ctrl=np.ones(3),
    )
    m = pseudobulk_metrics(pb)
    assert m["pearson_delta"][0] == pytest.approx(pearsonr(pb.pred[0] - 1, pb.real[0]).statistic)
    assert m["mae"][1] == pytest.approx(np.abs(pb.pred[1] - pb.real[1]).mean())
    assert m["mse_delta"][1] == pytest.approx(((pb.pred[1] - 1 - pb.real[1]) ** 2).mean())


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.random(60) < 0.3
        s = np.round(rng.random(60), 1)  # many tied scores
        ap, roc = _pr_roc_auc(y, s)
        fpr, tpr, _ = roc_curve(y, s)
        assert ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert roc == pytest.approx(auc(fpr, tpr), abs=1e-12)


def test_discrimination_excludes_target_gene():
    genes = np.array(["A", "g1", "g2"])
    real = np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # pert "A" knocks its own gene
    pred = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # ... which the prediction misses
    pb = PseudobulkArrays(np.array(["A", "B"]), genes, real, pred, np.zeros(3), np.zeros(3))
    # With gene "A" excluded, pred "A" is equidistant; B's pred matches B exactly.
    assert discrimination_score(pb, "l1")[1] == 1.0
    assert discrimination_score(pb, "l1", exclude_target_gene=False)[0] == 0.5
    assert np.isnan(
        discrimination_score(
            PseudobulkArrays(np.array(["A"]), genes, real[:1], pred[:1], np.zeros(3), np.zeros(3))
        )
    ).all()


def test_aggregate_matches_polars_describe():
    pl = pytest.importorskip("polars")
    res = pd.DataFrame(
        {"perturbation": list("abcde"), "m1": [1.0, np.nan, 3.0, 4.0, 0.5], "m2": [1.0, 2.0, 3.0, 4.0, 10.0]}
    )
    missing = pd.DataFrame({"m1": [False] * 5, "m2": [False, True, False, False, False]})
    ours = aggregate(res, missing).set_index("statistic")
    ref_df = pl.DataFrame({"m1": [1.0, float("nan"), 3.0, 4.0, 0.5], "m2": [1.0, None, 3.0, 4.0, 10.0]})
    ref = ref_df.describe().to_pandas().set_index("statistic")
    for c in ("m1", "m2"):
        np.testing.assert_allclose(ours[c].to_numpy(float), ref[c].to_numpy(float), equal_nan=True)


def test_score_formula():
    agg = pd.DataFrame(
        {
            "statistic": ["mean"],
            "mae": [0.5],
            "overlap_at_N": [0.4],
            "discrimination_score_l1": [0.9],
            "pearson_delta": [np.nan],
        }
    )
    base = pd.DataFrame(
        {
            "statistic": ["mean"],
            "mae": [1.0],
            "overlap_at_N": [0.6],
            "discrimination_score_l1": [0.5],
            "pearson_delta": [0.2],
        }
    )
    s = score_against_baseline(agg, base).set_index("metric")["from_baseline"]
    assert s["mae"] == pytest.approx(0.5)  # 1 - 0.5/1
    assert s["overlap_at_N"] == 0.0  # worse than baseline: clipped
    assert s["discrimination_score_l1"] == pytest.approx(0.8)  # (0.9-0.5)/(1-0.5)
    assert s["pearson_delta"] == 0.0  # NaN -> 0
    assert s["avg_score"] == pytest.approx((0.5 + 0.0 + 0.8) / 3)


@pytest.mark.parametrize("sparse", [False, True])
def test_evaluate_dense_sparse_identical(sparse):
    pred, real = make_pair(4, mix=0.4)
    ref = _quiet_eval(pred, real)
    if sparse:
        pred.X, real.X = sp.csr_matrix(pred.X), sp.csr_matrix(real.X)
    res = _quiet_eval(pred, real)
    pd.testing.assert_frame_equal(ref.results, res.results, atol=1e-9, rtol=0)
    assert len(res.results) == 6 and len(res.real_de) == 6 * 50
    assert res.score is None and set(res.timings) >= {"de_real", "de_pred", "de_metrics"}


def test_perfect_prediction_is_best():
    _, real = make_pair(0)
    res = _quiet_eval(real.copy(), real)
    r = res.results
    assert (r["mae"] == 0).all() and (r["discrimination_score_l1"] == 1).all()
    sig = r["de_nsig_counts_real"] > 0
    assert (r.loc[sig, "overlap_at_N"] == 1).all() and (r.loc[sig, "de_sig_genes_recall"] == 1).all()


def test_mismatched_perturbations_are_reported():
    pred, real = make_pair(1)
    pred = pred[pred.obs["perturbation"] != "p2"].copy()
    real = real[real.obs["perturbation"] != "p3"].copy()
    with pytest.warns(UserWarning) as record:
        res = evaluate(pred, real, control="ctrl")
    text = " | ".join(str(w.message) for w in record)
    assert "in real but not in pred were skipped: ['p2']" in text
    assert "in pred but not in real were skipped: ['p3']" in text
    assert set(res.results["perturbation"]) == {"g1", "p1", "p4", "p5"}
    assert len(res.messages) == 2


def test_input_errors():
    pred, real = make_pair(1)
    with pytest.raises(DataError, match="control 'nope'"):
        evaluate(pred, real, control="nope")
    other = pred.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(DataError, match="different genes"):
        evaluate(other, real, control="ctrl")
    counts = real.copy()
    counts.X = np.round(np.expm1(counts.X))
    with pytest.raises(DataError, match="raw integer counts"):
        evaluate(pred, counts, control="ctrl")
    with pytest.raises(DataError, match="obs column 'nope'"):
        evaluate(pred, real, control="ctrl", pert_col="nope")
    only_ctrl = pred[pred.obs["perturbation"] == "ctrl"].copy()
    with pytest.raises(DataError, match="share no perturbation"):
        evaluate(only_ctrl, real, control="ctrl")


def test_reordered_genes_are_aligned():
    pred, real = make_pair(2, mix=0.3)
    ref = _quiet_eval(pred, real).results
    shuffled = pred[:, list(pred.var_names[::-1])].copy()
    res = _quiet_eval(shuffled, real).results
    pd.testing.assert_frame_equal(ref, res, atol=1e-9, rtol=0)


def test_contexts_are_evaluated_separately(tmp_path):
    p0, r0 = make_pair(0, mix=0.3)
    p1, r1 = make_pair(1, mix=0.6)
    for a, c in ((p0, "c0"), (r0, "c0"), (p1, "c1"), (r1, "c1")):
        a.obs["context"] = c
        a.obs_names = [f"{c}_{n}" for n in a.obs_names]
    import anndata as ad

    pred, real = ad.concat([p0, p1]), ad.concat([r0, r1])
    res = _quiet_eval(pred, real, baseline=real.copy())
    assert set(res.results["context"]) == {"c0", "c1"} and len(res.results) == 12
    alone = _quiet_eval(p1, r1, context_col=None).results
    got = res.results[res.results["context"] == "c1"].drop(columns="context").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, alone, atol=1e-12, rtol=0)
    assert list(res.agg.columns[:2]) == ["context", "statistic"] and len(res.agg) == 18
    assert set(res.score["context"]) == {"c0", "c1"}
    pooled = _quiet_eval(pred, real, context_col=None)
    assert "context" not in pooled.results.columns
    res.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "results.csv",
        "agg_results.csv",
        "real_de.csv",
        "pred_de.csv",
        "score.csv",
    }
    assert isinstance(res, EvalResult)
