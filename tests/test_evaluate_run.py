"""``evaluate_run``: the one evaluation of a run (model vs every baseline vs the ceiling), its files,
the CLI's ``evaluate --run-dir`` and the PDS view drawn from the very distances the metric ranks."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from statecore.cli import main
from statecore.data.splits import Split
from statecore.errors import DataError
from statecore.evaluation.run import (
    CEILING,
    MODEL,
    baseline_name,
    default_baselines,
    evaluate_run,
    split_halves,
)
from statecore.evaluation.verdict import HEADLINE, read_verdict
from statecore.inference.baselines import BASELINE_KINDS


@pytest.fixture(scope="module")
def evaluated(trained_run):
    import anndata as ad

    from statecore.training.checkpoint import load_run

    run = load_run(trained_run)
    adata = ad.read_h5ad(run.config.data_path)
    return evaluate_run(run, adata, seed=0)


def test_every_method_and_the_ceiling_are_scored(evaluated):
    methods = list(evaluated.summary["method"])
    assert methods[0] == MODEL and methods[-1] == CEILING
    # zero-shot on singles: additive needs its parts measured in the target context or elsewhere
    split = Split.load(os.path.join(evaluated.run_dir, "split.json"))
    assert set(default_baselines(split)) == set(BASELINE_KINDS) - {"generic_response", "linear_features"}
    for kind in default_baselines(split):
        assert baseline_name(kind) in methods or baseline_name(kind) in evaluated.errors
    assert set(HEADLINE) <= set(evaluated.summary.columns)
    assert [v.metric for v in evaluated.verdicts] == list(HEADLINE)
    assert all(v.sentence for v in evaluated.verdicts)
    assert evaluated.overall.startswith("The model beats every baseline on ")
    ceiling = evaluated.summary.set_index("method").loc[CEILING]
    assert np.isfinite(ceiling["pearson_delta"]) and np.isfinite(ceiling["mse"])


def test_pds_view_uses_the_metric_distances(evaluated):
    """The heatmap's ranks give back exactly the PDS the model's results report (one function)."""
    pds = evaluated.pds
    res = evaluated.results[MODEL].results.set_index("perturbation")["discrimination_score_l1"]
    got = pds.ranks.set_index("perturbation")["pds"]
    assert np.allclose(got.sort_index().to_numpy(), res.sort_index().to_numpy())
    assert list(pds.ranks["rank"]) == sorted(pds.ranks["rank"])  # shown by rank, not alphabetically
    assert list(pds.distances.index) == list(pds.ranks["perturbation"]) == list(pds.distances.columns)
    assert (pds.ranks["best"] <= pds.ranks["rank"]).all() and (pds.ranks["rank"] <= pds.ranks["worst"]).all()
    assert np.isfinite(pds.prediction_spread) and pds.prediction_spread > 0


def test_pds_view_notices_predictions_that_do_not_differ(evaluated):
    """A mean baseline predicts one change for all: its ranks follow the real changes' sizes."""
    from statecore.evaluation.run import baseline_name, pds_view

    same = pds_view(evaluated.predictions[baseline_name("cell_mean")], evaluated.real, evaluated.control)
    assert same.prediction_spread < 1e-6 and same.predictions_alike


def test_split_halves_keeps_every_group_on_both_sides(evaluated):
    a, b = split_halves(evaluated.real, seed=1)
    la, lb = (set(x.obs["perturbation"].astype(str)) for x in (a, b))
    assert la == lb == set(evaluated.real.obs["perturbation"].astype(str))
    assert a.n_obs + b.n_obs == evaluated.real.n_obs and abs(a.n_obs - b.n_obs) <= len(la)


def test_save_and_read_back_the_verdict(evaluated, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = run / "evaluation"
    written = evaluated.save(out)
    assert {p.name for p in written} >= {
        "summary.csv",
        "verdict.json",
        "results_model.csv",
        "results_ceiling.csv",
    }
    doc = json.loads((out / "verdict.json").read_text())
    assert doc["overall"] == evaluated.overall and len(doc["verdicts"]) == len(HEADLINE)
    # the file names the run it came from; read back for another copy of the run only when stamps match
    stamp = doc["model_stamp"]
    os.utime(run / "model.safetensors", (stamp, stamp))
    assert read_verdict(run)["overall"] == evaluated.overall
    os.utime(run / "model.safetensors", (stamp + 10, stamp + 10))  # a newer model: the verdict is stale
    assert read_verdict(run) is None


def test_cli_evaluate_run_dir_prints_the_verdict(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["evaluate", "--run-dir", str(run)]) == 0
    text = capsys.readouterr().out
    assert "The model beats every baseline on" in text and "Pearson Δ:" in text and CEILING in text
    assert (run / "evaluation" / "verdict.json").exists() and read_verdict(run) is not None


def test_cli_evaluate_needs_run_dir_or_files(trained_run, tmp_path, capsys):
    assert main(["evaluate", "--run-dir", str(trained_run), "--pred", "x.h5ad"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["evaluate", "--pred", "x.h5ad"]) == 2
    assert "give --pred, --real and -o" in capsys.readouterr().err


def test_baseline_kinds_are_one_list():
    from statecore.cli import baseline as cli_baseline

    assert tuple(cli_baseline.KINDS) == BASELINE_KINDS  # the CLI's copy (kept to keep --help fast)
    with pytest.raises(DataError, match="use one of control, context_mean"):
        from statecore.inference.baselines import predict_baseline

        predict_baseline(None, None, "nope", genes=[])


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scores_through_evaluate_run(trained_run, tmp_path):
    import argparse

    import anndata as ad

    from statecore.training.checkpoint import load_run

    bench = _bench()
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    prepared = load_run(run).config.data_path
    args = argparse.Namespace(celleval=False, score_on="test")
    out = bench.score_task({"task": "zeroshot"}, args, 0, prepared, run)
    assert {"ST", "control", bench.CEILING_ROW} <= set(out["rows"])
    assert out["overall"].startswith("The model beats every baseline on") and len(out["verdicts"]) == 5
    assert (
        out["n_test_perturbations"]
        == len(ad.read_h5ad(prepared).obs.query("context == 'c2'")["perturbation"].unique()) - 1
    )


def test_bench_mean_and_sd_over_seeds():
    bench = _bench()
    runs = [
        {
            "seed": s,
            "train_seconds": 10.0 * (s + 1),
            "overall": "o",
            "verdicts": [],
            "n_genes": 5,
            "rows": {"ST": {"pearson_delta": v, "mae": np.nan}},
        }
        for s, v in ((0, 0.5), (1, 0.7))
    ]
    out = bench.over_seeds(runs)
    assert np.isclose(out["rows"]["ST"]["pearson_delta"], 0.6)
    assert np.isclose(out["rows_sd"]["ST"]["pearson_delta"], np.std([0.5, 0.7], ddof=1))
    assert np.isnan(out["rows"]["ST"]["mae"]) and out["train_seconds"] == 15.0 and len(out["seeds"]) == 2
    assert bench.fmt(0.6, 0.1414) == "0.600 ± 0.141" and bench.fmt(float("nan")) == "—"
    assert bench.over_seeds(runs[:1]) is runs[0]
