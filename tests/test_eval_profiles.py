"""``evaluate --profile``: the vcc2026 and all profiles from the CLI, count/log1p routing, and
Systema's perturbation-referenced deltas."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from statecore.cli import main
from statecore.errors import DataError
from statecore.evaluation.metrics import evaluate
from statecore.evaluation.profiles import evaluate_profile
from statecore.evaluation.vcc2026 import PER_PERT_METRICS, evaluate_vcc2026
from tests.celleval_data import make_pair
from tests.vcc2026_data import CONTROL, make_count_pair


def _write_counts(tmp_path):
    pred, real = make_count_pair(0)
    paths = {n: tmp_path / f"{n}.h5ad" for n in ("pred", "real")}
    pred.write_h5ad(paths["pred"])
    real.write_h5ad(paths["real"])
    return pred, real, paths


def _run(paths, out, profile):
    args = ["evaluate", "--pred", str(paths["pred"]), "--real", str(paths["real"])]
    args += ["--control", CONTROL, "--pert-col", "target", "--profile", profile, "-o", str(out)]
    return main(args)


def test_cli_vcc2026_writes_cell_eval2_names(tmp_path, capsys):
    pred, real, paths = _write_counts(tmp_path)
    assert _run(paths, tmp_path / "out", "vcc2026") == 0
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    agg = pd.read_csv(tmp_path / "out" / "agg_results.csv").set_index("statistic")
    assert list(res.columns) == ["perturbation", *PER_PERT_METRICS]
    direct = evaluate_vcc2026(pred, real, control=CONTROL, pert_col="target").results
    np.testing.assert_allclose(res[list(PER_PERT_METRICS)], direct[list(PER_PERT_METRICS)], rtol=1e-12)
    assert np.isfinite(agg.loc["mean", "expr_mse_unbiased_capped_norm"])
    assert "pds_cosine" in capsys.readouterr().out


def test_cli_vcc2026_writes_the_scaled_score(tmp_path, capsys):
    """vcc2026_score.csv: six members + avg_score, equal to the library call; --no-scale skips it."""
    from statecore.evaluation.vcc2026_scale import SCORED, scaled_score

    pred, real, paths = _write_counts(tmp_path)
    assert _run(paths, tmp_path / "out", "vcc2026") == 0
    table = pd.read_csv(tmp_path / "out" / "vcc2026_score.csv")
    assert list(table["metric"]) == [*SCORED, "avg_score"]
    agg = evaluate_vcc2026(pred, real, control=CONTROL, pert_col="target").agg
    direct = scaled_score(agg, real, control=CONTROL, pert_col="target").table
    np.testing.assert_allclose(table["scaled"], direct["scaled"], rtol=1e-12)
    assert len(pd.read_csv(tmp_path / "out" / "anchor_splits.csv")) == 5
    assert "scaled score" in capsys.readouterr().out
    main(
        [
            "evaluate",
            "--pred",
            str(paths["pred"]),
            "--real",
            str(paths["real"]),
            "--control",
            CONTROL,
            "--pert-col",
            "target",
            "--profile",
            "vcc2026",
            "--no-scale",
            "-o",
            str(tmp_path / "o2"),
        ]
    )
    assert not (tmp_path / "o2" / "vcc2026_score.csv").exists()


def test_cli_all_profile_has_both_scorers(tmp_path):
    _, _, paths = _write_counts(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _run(paths, tmp_path / "out", "all") == 0
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    for col in ("overlap_at_N", "pearson_delta_pert", "pds_cosine", "de_wilcoxon_lfc_nmae"):
        assert col in res.columns
    assert res["perturbation"].is_unique
    agg = pd.read_csv(tmp_path / "out" / "agg_results.csv")
    assert {"25%", "median", "mean"} <= set(agg["statistic"])


def test_vcc2026_refuses_log_values():
    pred, real = make_pair(0)
    with pytest.raises(DataError, match="raw counts"):
        evaluate_profile(pred, real, profile="vcc2026", control="ctrl")


def test_cli_bad_profile_input_is_one_line(tmp_path, capsys):
    pred, real = make_pair(0)
    paths = {n: tmp_path / f"{n}.h5ad" for n in ("pred", "real")}
    pred.write_h5ad(paths["pred"])
    real.write_h5ad(paths["real"])
    args = ["evaluate", "--pred", str(paths["pred"]), "--real", str(paths["real"]), "--control", "ctrl"]
    assert main([*args, "--profile", "vcc2026", "-o", str(tmp_path / "o")]) == 2
    assert "raw counts" in capsys.readouterr().err


def _generic_shift_pair():
    """Real: every perturbation = a shared shift + its own effect. Pred: the shared shift only."""
    rng = np.random.default_rng(0)
    pred, real = make_pair(1, n_perts=8, n_genes=80)
    labels = real.obs["perturbation"].to_numpy()
    perts = sorted(set(labels) - {"ctrl"})
    shared = rng.normal(0, 0.4, real.n_vars).clip(-0.3, None)
    own = {p: rng.normal(0, 0.4, real.n_vars) for p in perts}
    x = np.asarray(real.X, dtype=np.float64).copy()
    for p in perts:
        x[labels == p] = np.clip(x[labels == p] + shared + own[p], 0, None)
    real.X = x.astype(np.float32)
    generic = x.copy()
    pert_rows = labels != "ctrl"
    generic[pert_rows] = x[pert_rows].mean(axis=0) + rng.normal(0, 0.01, (pert_rows.sum(), x.shape[1]))
    pred = real.copy()
    pred.X = np.clip(generic, 0, None).astype(np.float32)
    return pred, real


def test_systema_deltas_do_not_reward_the_generic_shift():
    pred, real = _generic_shift_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate(pred, real, control="ctrl", perturbed_reference=True).results
        perfect = evaluate(real, real, control="ctrl", perturbed_reference=True).results
    assert r["pearson_delta"].mean() > 0.5  # the control-referenced delta rewards the shared shift
    assert abs(r["pearson_delta_pert"].mean()) < 0.3  # the perturbation-specific one does not
    assert r["discrimination_score_cosine_pert"].mean() < 0.8
    np.testing.assert_allclose(perfect["pearson_delta_pert"], 1.0, atol=1e-6)
    np.testing.assert_allclose(perfect["discrimination_score_cosine_pert"], 1.0)


def test_celleval_tables_unchanged_without_perturbed_reference():
    pred, real = make_pair(2, mix=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = evaluate(pred, real, control="ctrl").results
        extra = evaluate(pred, real, control="ctrl", perturbed_reference=True).results
    assert "pearson_delta_pert" not in plain.columns
    pd.testing.assert_frame_equal(plain, extra[plain.columns])
