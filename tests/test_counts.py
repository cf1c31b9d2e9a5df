"""``statecore.inference.counts``: raw-count cells from a prediction (``predict --counts``)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from statecore.errors import DataError
from statecore.inference.counts import estimate_dispersion, real_counts, sample_counts
from statecore.inference.predict import make_prediction_adata


def _prediction(prepared, n_rep: int = 40):
    """A prediction in predict's format for P001 in c0 over the HVG panel: the real P001 cells'
    log1p values, each repeated ``n_rep`` times (many cells, so sampling error is small)."""
    panel = prepared.var_names[prepared.var["highly_variable"].to_numpy(bool)]
    sub = prepared[:, panel]
    pert, ctx = sub.obs["perturbation"].astype(str), sub.obs["context"].astype(str)
    xp = sub[(pert == "P001").to_numpy() & (ctx == "c0").to_numpy()].X
    xp = np.asarray(xp.todense() if sp.issparse(xp) else xp)
    ctrl = sub[(pert == "ctrl").to_numpy() & (ctx == "c0").to_numpy()]
    xc = np.asarray(ctrl.X.todense() if sp.issparse(ctrl.X) else ctrl.X)
    return make_prediction_adata(
        [np.repeat(xp, n_rep, axis=0)],
        ["P001"],
        xc,
        context="c0",
        control="ctrl",
        genes=list(panel),
        ctrl_names=ctrl.obs_names.astype(str),
    )


def test_counts_are_integers_with_carried_over_genes(prepared_synthetic):
    pred = _prediction(prepared_synthetic, n_rep=2)
    out = sample_counts(pred, prepared_synthetic, seed=0)
    x = out.X.toarray()
    assert np.array_equal(x, np.round(x)) and x.min() >= 0
    assert list(out.var_names) == list(prepared_synthetic.var_names)
    info = out.uns["statecore"]["counts"]
    carried = info["carried_over_genes"]
    assert len(carried) == prepared_synthetic.n_vars - pred.n_vars > 0
    # carried-over genes are the paired control cell's own counts
    counts = prepared_synthetic.layers["counts"]
    rows = prepared_synthetic.obs_names.get_indexer(out.obs["paired_control"])
    cols = prepared_synthetic.var_names.get_indexer(carried)
    np.testing.assert_array_equal(x[:, cols], np.asarray(counts[rows][:, cols].todense()))
    # the prediction's own control cells are returned with their real counts, every gene
    ctrl = ~out.obs["predicted"].to_numpy(bool)
    np.testing.assert_array_equal(x[ctrl], np.asarray(counts[rows[ctrl]].todense()))
    again = sample_counts(pred, prepared_synthetic, seed=0)
    assert (again.X != out.X).nnz == 0  # seeded


@pytest.mark.parametrize("method", ["nb", "poisson"])
def test_mean_expression_within_sampling_error(prepared_synthetic, method):
    """The pseudobulk of the sampled counts, normalised by the paired library size, is the
    prediction's mean normalised expression to within its sampling error (z-test per gene)."""
    pred = _prediction(prepared_synthetic)
    out = sample_counts(pred, prepared_synthetic, method=method, seed=1)
    is_pred = out.obs["predicted"].to_numpy(bool)
    panel = prepared_synthetic.var_names.get_indexer(pred.var_names)
    t = prepared_synthetic.uns["statecore"]["qc"]["target_sum"]
    lib = out.obs["control_library_size"].to_numpy()[is_pred]
    c = out.X.toarray()[is_pred][:, panel]
    expected = np.expm1(np.asarray(pred.X)[is_pred])  # per cell, normalised space
    mu = expected * (lib / t)[:, None]
    train = prepared_synthetic.obs["perturbation"].astype(str).to_numpy() == "ctrl"
    groups = prepared_synthetic.obs["context"].astype(str).to_numpy()[train]
    counts = prepared_synthetic.layers["counts"][np.flatnonzero(train)][:, panel]
    alpha = estimate_dispersion(counts, groups) if method == "nb" else np.zeros(panel.size)
    var = (mu + alpha * mu * mu) * (t / lib)[:, None] ** 2
    n = c.shape[0]
    m_hat = (c * (t / lib)[:, None]).mean(axis=0)
    m = expected.mean(axis=0)
    se = np.sqrt(var.sum(axis=0)) / n
    live = m > 0
    z = (m_hat[live] - m[live]) / se[live]
    assert np.mean(np.abs(z) < 4.0) >= 0.99, np.sort(np.abs(z))[-5:]
    # in log space too: log1p of the pseudobulks agree to within a few standard errors
    assert np.all(np.abs(np.log1p(m_hat) - np.log1p(m)) <= 5 * se / (1 + m) + 1e-9)


def test_dispersion_recovers_known_overdispersion():
    """Six test genes beside 300 Poisson genes (so library sizes, as on real panels, are set by
    many genes): the estimate recovers each gene's alpha."""
    rng = np.random.default_rng(0)
    n = 4000
    alpha = np.r_[np.zeros(300), 0.0, 0.05, 0.2, 0.5, 1.0, 2.0]
    depth = rng.uniform(0.5, 2.0, n)
    mu = np.r_[np.full(300, 10.0), 5.0, 8.0, 10.0, 4.0, 6.0, 3.0][None, :] * depth[:, None]
    lam = np.where(alpha > 0, rng.gamma(1 / np.maximum(alpha, 1e-12), mu * alpha), mu)
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    est = estimate_dispersion(counts, np.zeros(n, dtype=str))
    np.testing.assert_allclose(est[300:], alpha[300:], atol=0.03, rtol=0.15)
    assert np.abs(est[:300]).max() < 0.01


def test_bad_method_and_missing_counts(prepared_synthetic):
    pred = _prediction(prepared_synthetic, n_rep=1)
    with pytest.raises(DataError, match="count model"):
        sample_counts(pred, prepared_synthetic, method="zinb")
    no_counts = prepared_synthetic.copy()
    del no_counts.layers["counts"]
    with pytest.raises(DataError, match="layers\\['counts'\\]"):
        sample_counts(pred, no_counts)


def test_real_counts_are_the_raw_counts(prepared_synthetic):
    real = prepared_synthetic[:50]
    out = real_counts(real, prepared_synthetic)
    np.testing.assert_array_equal(
        out.X.toarray(), np.asarray(prepared_synthetic.layers["counts"][:50].todense())
    )


@pytest.mark.slow
def test_cell_eval2_scores_sampled_counts(prepared_synthetic):
    """cell-eval2 (vcc2026 preset, CPU) accepts a --counts prediction and its --real-out unchanged."""
    cell_eval2 = pytest.importorskip("cell_eval2")
    from dataclasses import replace

    prep = prepared_synthetic
    pert, ctx = prep.obs["perturbation"].astype(str), prep.obs["context"].astype(str)
    panel = prep.var_names[prep.var["highly_variable"].to_numpy(bool)]
    keep = (ctx == "c0").to_numpy()
    real = prep[keep]
    perts = sorted(set(pert[keep]) - {"ctrl"})
    blocks = [np.asarray(real[real.obs["perturbation"] == p][:, panel].X.todense()) for p in perts]
    ctrl = real[real.obs["perturbation"] == "ctrl"]
    pred = make_prediction_adata(
        blocks,
        perts,
        np.asarray(ctrl[:, panel].X.todense()),
        context="c0",
        control="ctrl",
        genes=list(panel),
        ctrl_names=ctrl.obs_names.astype(str),
    )
    pc, rc = sample_counts(pred, prep, seed=0), real_counts(real, prep)
    rc.var_names = [f"G{i}" for i in range(rc.n_vars)]  # synthetic gene names; give P001 a target
    pc.var_names = rc.var_names
    cfg = replace(cell_eval2.EvalConfig.from_preset("vcc2026"), pert_col="perturbation", control="ctrl")
    cfg = replace(cfg, de=replace(cfg.de, backend="pdex"), target_gene_map={p: None for p in perts})
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = cell_eval2.compute_metrics(pc, rc, config=cfg).to_pandas()
    finally:
        logging.disable(logging.NOTSET)
    assert set(res["perturbation"]) == set(perts)
    assert res["value"].notna().any()


def test_cli_predict_counts_then_evaluate_vcc2026(_prepared_synthetic_master, tmp_path, capsys):
    """predict --split test --counts --real-out, then evaluate --profile vcc2026 on the files."""
    import anndata as ad

    from statecore.cli import main
    from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
    from statecore.training.engine import train_run

    data = tmp_path / "prep.h5ad"
    _prepared_synthetic_master.write_h5ad(data)
    cfg = RunConfig(
        data_path=str(data),
        split=SplitConfig(task="underrepresented", context="c0"),
        model=STConfig(
            hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=32, set_size=8
        ),
        train=TrainConfig(steps=3, batch_size=2, num_threads=1),
    )
    train_run(_prepared_synthetic_master, cfg, tmp_path / "run")
    pred, real = tmp_path / "pred.h5ad", tmp_path / "real.h5ad"
    argv = ["predict", "--run-dir", str(tmp_path / "run"), "--split", "test", "--counts"]
    assert main([*argv, "-o", str(pred), "--real-out", str(real)]) == 0
    assert "carried over" in capsys.readouterr().out
    p, r = ad.read_h5ad(pred), ad.read_h5ad(real)
    assert list(p.var_names) == list(r.var_names) == list(_prepared_synthetic_master.var_names)
    for a in (p, r):
        x = a.X.toarray()
        assert np.array_equal(x, np.round(x)) and x.min() >= 0
    assert p.uns["statecore"]["counts"]["dispersion_cells"] == "training cells"
    out = tmp_path / "ev"
    rc = main(["evaluate", "--pred", str(pred), "--real", str(real), "--profile", "vcc2026", "-o", str(out)])
    assert rc == 0
    assert "pds_cosine" in (out / "results.csv").read_text()
