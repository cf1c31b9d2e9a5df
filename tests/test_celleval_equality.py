"""Our metrics against the installed cell-eval 0.8.2 (test-only dependency) on seeded synthetic pairs.

Every per-perturbation metric, the aggregate table and the baseline score must agree to 1e-6;
the one documented difference (a single perturbation: PDS NaN here, 1.0 in cell-eval) is tested too.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from statecore.evaluation.metrics import evaluate, score_against_baseline
from tests.celleval_data import make_pair

cell_eval = pytest.importorskip("cell_eval")
pytest.importorskip("pdex")
logging.getLogger("cell_eval").setLevel(logging.ERROR)

SKIP = ["pearson_edistance", "clustering_agreement"]  # not implemented here (docs/METRICS.md)
CASES = [
    (0, 0.0, False, False),
    (1, 0.3, False, False),
    (2, 0.6, True, False),
    (3, 0.9, False, False),
    (7, 0.4, False, True),  # tied and near-tied fold changes (de_spearman_lfc_sig, top-k order)
    (9, 0.7, True, True),
]


def _cell_eval(pred, real, tmp_path):
    ev = cell_eval.MetricsEvaluator(
        pred.copy(),
        real.copy(),
        control_pert="ctrl",
        pert_col="perturbation",
        num_threads=1,
        outdir=str(tmp_path),
    )
    res, agg = ev.compute(profile="full", skip_metrics=SKIP, write_csv=False)
    return res.to_pandas().set_index("perturbation").sort_index(), agg.to_pandas()


def _ours(pred, real, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return evaluate(pred, real, control="ctrl", **kw)


def _assert_frames_equal(ref, ours, atol=1e-6):
    assert set(ref.columns) == set(ours.columns)
    for c in ref.columns:
        a, b = ref[c].to_numpy(float), ours[c].to_numpy(float)
        ok = np.isclose(a, b, atol=atol, rtol=0, equal_nan=True)
        assert ok.all(), f"{c}: cell-eval {a[~ok]} vs ours {b[~ok]}"


@pytest.fixture(
    scope="module",
    params=CASES,
    ids=lambda c: f"seed{c[0]}-mix{c[1]}-{'csr' if c[2] else 'dense'}{'-ties' if c[3] else ''}",
)
def case(request, tmp_path_factory):
    seed, mix, sparse, ties = request.param
    pred, real = make_pair(seed, mix=mix, ties=ties)
    if sparse:
        pred.X, real.X = sp.csr_matrix(pred.X), sp.csr_matrix(real.X)
    ref_res, ref_agg = _cell_eval(pred, real, tmp_path_factory.mktemp("ce"))
    return pred, real, ref_res, ref_agg, _ours(pred, real), mix


def test_edge_cases_present(case):
    pred, real, ref_res, _, ours, _ = case
    r = ours.results
    assert (r["de_nsig_counts_real"] == 0).any(), "a perturbation without significant genes"
    assert "g1" in set(r["perturbation"]) and "g1" in set(real.var_names), "target gene among genes"
    assert np.isnan(r["pr_auc"]).any()


def test_per_perturbation_metrics_equal(case):
    _, _, ref_res, _, ours, _ = case
    _assert_frames_equal(ref_res, ours.results.set_index("perturbation").sort_index())


def test_aggregate_equal(case):
    _, _, _, ref_agg, ours, _ = case
    assert list(ref_agg["statistic"]) == list(ours.agg["statistic"])
    _assert_frames_equal(ref_agg.set_index("statistic"), ours.agg.set_index("statistic"))


def test_cases_are_not_trivial(case):
    """The comparison must exercise ranks below the top: mixed predictions lose PDS somewhere,
    and the DE metrics see real overlap."""
    _, _, _, _, ours, mix = case
    r = ours.results
    if mix >= 0.6:
        assert r["discrimination_score_l1"].min() < 1.0
    assert 0 < r["overlap_at_N"].max() and r["pearson_delta"].notna().all()


def test_score_equal_to_cell_eval(tmp_path):
    pred, real = make_pair(5, mix=0.2)
    base, _ = make_pair(6, mix=0.8)
    _, agg_user = _cell_eval(pred, real, tmp_path / "u")
    _, agg_base = _cell_eval(base, real, tmp_path / "b")
    ref = cell_eval.score_agg_metrics(pl.from_pandas(agg_user), pl.from_pandas(agg_base))
    ref = ref.to_pandas().set_index("metric")["from_baseline"]
    ours = _ours(pred, real, baseline=base).score.set_index("metric")["from_baseline"]
    for m in ref.index.drop("avg_score"):
        assert ours[m] == pytest.approx(ref[m], abs=1e-6), m
    # cell-eval averages every scored metric; we report that as avg_score_all ...
    assert ours["avg_score_all"] == pytest.approx(ref["avg_score"], abs=1e-6)
    # ... and avg_score over the challenge trio, as the issue asks.
    trio = ref[["overlap_at_N", "discrimination_score_l1", "mae"]].mean()
    assert ours["avg_score"] == pytest.approx(trio, abs=1e-6)
    # scoring a pre-computed aggregate gives the same table
    again = score_against_baseline(_ours(pred, real).agg, _ours(base, real).agg)
    assert np.allclose(again["from_baseline"], ours.to_numpy())


@pytest.mark.parametrize("ties", [False, True])
def test_de_table_equal_to_pdex(ties):
    from pdex import pdex

    from statecore.evaluation.de import compute_de

    pred, _ = make_pair(3, mix=0.5, ties=ties)
    ref = pdex(
        pred, groupby="perturbation", mode="ref", reference="ctrl", threads=1, is_log1p=True, epsilon=0.0
    ).to_pandas()
    ours = compute_de(pred, control="ctrl", pert_col="perturbation")
    assert list(ref.columns) == list(ours.columns)
    assert (ref["target"].to_numpy() == ours["target"].to_numpy()).all()
    assert (ref["feature"].to_numpy() == ours["feature"].to_numpy()).all()
    for c in ("p_value", "statistic", "fdr", "target_membership", "ref_membership"):
        np.testing.assert_allclose(ours[c], ref[c], rtol=0, atol=1e-12, err_msg=c)
    # pseudobulks averaged in the input's dtype as pdex does: bit-identical, ties included
    for c in ("target_mean", "ref_mean", "log2_fold_change", "percent_change"):
        np.testing.assert_array_equal(ours[c].to_numpy(), ref[c].to_numpy(), err_msg=c)


def test_single_perturbation_documented_difference(tmp_path):
    pred, real = make_pair(1, mix=0.0)
    keep_r = real.obs["perturbation"].isin(["ctrl", "p1"]).to_numpy()
    keep_p = pred.obs["perturbation"].isin(["ctrl", "p1"]).to_numpy()
    pred, real = pred[keep_p].copy(), real[keep_r].copy()
    ref, _ = _cell_eval(pred, real, tmp_path)
    ours = _ours(pred, real)
    res = ours.results.set_index("perturbation").sort_index()
    pds = [c for c in res.columns if c.startswith("discrimination_score")]
    assert (ref[pds].to_numpy() == 1.0).all()  # cell-eval: trivially 1 with one candidate
    assert np.isnan(res[pds].to_numpy()).all()  # ours: undefined
    _assert_frames_equal(ref.drop(columns=pds), res.drop(columns=pds))
    assert any("only one perturbation" in m for m in ours.messages)


def _threshold_tables(seed: int):
    """Real and pred DE tables (pdex columns) with FDRs exactly at, a float64 ULP below, and a
    float32 ULP below 0.05, and fold changes that tie exactly or only in float32."""
    import pandas as pd

    from statecore.evaluation.de import DEArrays

    rng = np.random.default_rng(seed)
    perts, genes = np.array(["p1", "p2", "p3"]), np.array([f"g{i}" for i in range(40)])
    k, g = len(perts), len(genes)
    edges = np.array([0.05, np.nextafter(0.05, 0.0), float(np.nextafter(np.float32(0.05), np.float32(0)))])

    def side():
        fdr = rng.choice(np.r_[edges, rng.uniform(0, 0.2, 5)], (k, g))
        lfc = np.round(rng.normal(0, 1, (k, g)), 1)  # many exact ties
        lfc[:, ::7] += 1e-12  # ties in float32 only
        return DEArrays(
            groups=perts,
            genes=genes,
            target_mean=np.ones((k, g)),
            ref_mean=np.ones(g),
            n_target=np.full(k, 10),
            n_ref=20,
            lfc=lfc,
            statistic=np.zeros((k, g)),
            p_value=fdr / 2,
            fdr=fdr,
        )

    real, pred = side(), side()
    real.fdr[2] = 0.05  # a perturbation with no significant gene at all (FDR == threshold)
    frames = [pl.from_pandas(pd.DataFrame(d.to_frame())) for d in (real, pred)]
    return real, pred, frames


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_and_tied_fold_changes_equal(seed, tmp_path):
    """DE metrics from the same DE tables: ties in |LFC| (top-k order) and in the LFCs
    (de_spearman_lfc_sig), and FDRs at the threshold, compared as cell-eval does (float32, <)."""
    from statecore.evaluation.metrics import de_metrics

    real_de, pred_de, (real_tab, pred_tab) = _threshold_tables(seed)
    pred, real = make_pair(seed, n_perts=3, n_genes=40)
    mapping = {"g1": "p1", "p1": "p2", "p2": "p3"}
    for a in (pred, real):
        a.obs["perturbation"] = a.obs["perturbation"].map(lambda v: mapping.get(v, v))
        a.var_names = list(real_de.genes)
    ev = cell_eval.MetricsEvaluator(
        pred,
        real,
        de_pred=pred_tab,
        de_real=real_tab,
        control_pert="ctrl",
        pert_col="perturbation",
        num_threads=1,
        outdir=str(tmp_path),
    )
    ref, _ = ev.compute(profile="de", write_csv=False)
    ref = ref.to_pandas().set_index("perturbation").sort_index()
    ours = de_metrics(real_de, pred_de)
    assert np.isnan(ours["de_spearman_lfc_sig"][2])  # no real significant gene for p3
    for m in ref.columns:
        if m in ours:
            a, b = ref[m].to_numpy(float), np.asarray(ours[m], float)
            ok = np.isclose(a, b, atol=1e-12, rtol=0, equal_nan=True)
            assert ok.all(), f"{m}: cell-eval {a} vs ours {b}"


def _edge_tables(seed: int):
    """Our DE arrays of a seeded pair, edited so that FDRs sit exactly at the 0.05 threshold (and
    one float64/float32 ulp either side) and significant genes share tied and near-tied fold
    changes (equal, and one float32 ulp apart)."""
    from dataclasses import replace

    from statecore.evaluation.de import rank_sum_arrays

    pred, real = make_pair(seed, mix=0.4, ties=True)
    des = []
    for a in (real, pred):
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        des.append(
            rank_sum_arrays(x, a.obs["perturbation"].to_numpy(), "ctrl", genes=np.asarray(a.var_names))
        )
    rng = np.random.default_rng(seed)
    t32 = np.float32(0.05)
    edges = [
        0.05,
        np.nextafter(0.05, 0.0),
        np.nextafter(0.05, 1.0),
        float(t32),
        float(np.nextafter(t32, 0.0)),
    ]
    out = []
    for de in des:
        fdr, lfc = de.fdr.copy(), de.lfc.copy()
        for i in range(fdr.shape[0]):
            cols = rng.choice(fdr.shape[1], 2 * len(edges), replace=False)
            fdr[i, cols[: len(edges)]] = edges
            fdr[i, cols[len(edges) :]] = rng.permutation(edges)
            sig = np.flatnonzero(fdr[i] < 0.04)
            if sig.size >= 4:
                v = np.float32(lfc[i, sig[0]])
                lfc[i, sig[1]] = lfc[i, sig[0]]  # an exact tie
                lfc[i, sig[2]] = -lfc[i, sig[0]]  # tied |LFC|, opposite sign
                lfc[i, sig[3]] = float(np.nextafter(v, np.float32(np.inf)))  # one float32 ulp apart
        out.append(replace(de, fdr=fdr, lfc=lfc))
    return pred, real, out[0], out[1]


@pytest.mark.parametrize("seed", [7, 9, 11])
def test_de_metrics_at_the_threshold_and_with_tied_fold_changes(seed, tmp_path):
    """The same DE tables fed to cell-eval 0.8.2 (de_real/de_pred) and to our de_metrics: every
    DE metric equal, with genes exactly at FDR 0.05 (either side by one ulp) and tied |LFC|."""
    from statecore.evaluation.metrics import de_metrics

    pred, real, rde, pde = _edge_tables(seed)
    ev = cell_eval.MetricsEvaluator(
        pred.copy(),
        real.copy(),
        de_pred=pl.from_pandas(pde.to_frame()),
        de_real=pl.from_pandas(rde.to_frame()),
        control_pert="ctrl",
        pert_col="perturbation",
        num_threads=1,
        outdir=str(tmp_path),
    )
    res, _ = ev.compute(profile="de", write_csv=False)
    ref = res.to_pandas().set_index("perturbation").sort_index()
    ours = pd_frame(de_metrics(rde, pde), rde.groups).reindex(ref.index)
    cols = [c for c in ref.columns if c in ours.columns]
    assert {"de_spearman_lfc_sig", "overlap_at_N", "precision_at_N", "de_sig_genes_recall"} <= set(cols)
    _assert_frames_equal(ref[cols], ours[cols], atol=1e-9)


def pd_frame(values: dict, groups):
    import pandas as pd

    return pd.DataFrame(
        {k: v for k, v in values.items()}, index=pd.Index(groups.astype(str), name="perturbation")
    )
