"""AppTest for every page: the happy path on small data and the error paths (nothing loaded yet,
bad upload, missing file, failed / cancelled runs). A page must never show an exception."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app_helpers import prepared_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # pages import scanpy/torch; the first import on a busy 2-core machine is slow


@pytest.fixture()
def env(tmp_path, monkeypatch):
    work, runs = tmp_path / "work", tmp_path / "runs"
    monkeypatch.setenv("STATECORE_WORKDIR", str(work))
    monkeypatch.setenv("STATECORE_RUNS", str(runs))
    monkeypatch.chdir(ROOT)
    return {"work": work, "runs": runs}


@pytest.fixture()
def small_h5ad(tmp_path, synthetic_counts) -> Path:
    path = tmp_path / "small.h5ad"
    synthetic_counts.write_h5ad(path)
    return path


def _app(page: str | None = None, **session) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    for key, value in session.items():
        at.session_state[key] = value
    at.run()
    if page:
        at.switch_page(f"pages/{page}")
        at.run()
    return at


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def _data_info(path: Path) -> dict:
    from statecore.config import DataSpec

    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    return {
        "path": str(path),
        "metadata": None,
        "cell_id_col": None,
        "label": path.name,
        "spec": spec.to_dict(),
    }


def test_home_without_anything(env):
    at = _app()
    _clean(at)
    assert "No runs yet" in _texts(at.info)
    assert any("Quick start" in s.value for s in at.subheader)


@pytest.mark.parametrize(
    "page", ["1_Data.py", "2_Preprocess.py", "3_Train.py", "4_Predict.py", "5_Evaluate.py"]
)
def test_pages_with_nothing_loaded_point_the_way(env, page):
    at = _app(page)
    _clean(at)
    assert at.info, "an empty page must say what to do first"
    assert not at.error


def test_data_load_from_server_path(env, small_h5ad, monkeypatch):
    # Server paths are read only inside the allowed data folders (see test_reliability_app.py).
    monkeypatch.setenv("STATECORE_DATA_ROOTS", str(small_h5ad.parent))
    at = _app("1_Data.py")
    at.radio(key="data_source").set_value("Path on the server").run()
    at.text_input(key="data_server_path").input(str(small_h5ad)).run()
    at.button(key="data_load_path").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    assert "400 cells" in _texts(at.success)
    info = at.session_state["sc_data"]
    assert info["path"] == str(small_h5ad) and info["spec"]["pert_col"] == "perturbation"
    assert at.selectbox(key="data_control").value == "ctrl"
    assert [m.value for m in at.metric][:2] == ["400", "120"]
    # A context x perturbation table is shown.
    assert at.dataframe and at.dataframe[0].value.shape[1] == 3


def test_data_bad_upload_shows_one_error(env):
    at = _app("1_Data.py")
    at.radio(key="data_source").set_value("Upload .h5ad").run()
    at.file_uploader(key="data_upload_h5ad").upload(
        "broken.h5ad", b"this is not hdf5", "application/octet-stream"
    )
    at.run()
    at.button(key="data_load_upload").click().run()
    _clean(at)
    assert len(at.error) == 1 and "Reading the data failed" in at.error[0].value
    assert at.session_state["sc_data"] is None  # a broken file never replaces the loaded data
    saved = list((env["work"] / "uploads").rglob("broken.h5ad"))
    assert saved, "uploads are written to disk at once"


def test_data_missing_server_path(env, tmp_path):
    at = _app("1_Data.py")
    at.radio(key="data_source").set_value("Path on the server").run()
    at.text_input(key="data_server_path").input(str(tmp_path / "nope.h5ad")).run()
    at.button(key="data_load_path").click().run()
    _clean(at)
    assert "no readable data" in _texts(at.error)


def test_data_blocking_mapping_error_stops_preprocess(env, small_h5ad):
    at = _app("1_Data.py", sc_data=_data_info(small_h5ad))
    _clean(at)
    assert not at.error
    at.selectbox(key="data_context_col").set_value("perturbation").run()  # contexts without controls
    _clean(at)
    assert "no control cells" in _texts(at.error)
    assert at.session_state["sc_data"]["spec"]["context_col"] == "perturbation"
    at.switch_page("pages/2_Preprocess.py")
    at.run()
    _clean(at)
    assert "blocking problems" in _texts(at.error)
    assert not [b for b in at.button if b.key == "prep_apply"]


def test_preprocess_apply_saves_prepared_data(env, small_h5ad):
    at = _app("2_Preprocess.py", sc_data=_data_info(small_h5ad))
    _clean(at)
    assert not at.error, _texts(at.error)
    at.number_input(key="prep_min_genes").set_value(0)
    at.number_input(key="prep_min_cells").set_value(0)
    at.number_input(key="prep_n_hvg").set_value(60)
    at.checkbox(key="prep_umap").uncheck()
    at.run()
    assert len(at.get("plotly_chart")) >= 3  # genes/cell, counts/cell, removal
    at.button(key="prep_apply").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    prepared = at.session_state["sc_prepared"]
    assert Path(prepared["path"]).exists() and prepared["n_obs"] == 400
    import anndata as ad

    out = ad.read_h5ad(prepared["path"])
    assert int(out.var["highly_variable"].sum()) == 60 and "counts" in out.layers


def test_preprocess_impossible_threshold_is_one_error(env, small_h5ad):
    at = _app("2_Preprocess.py", sc_data=_data_info(small_h5ad))
    at.checkbox(key="prep_scale").uncheck()
    at.number_input(key="prep_min_genes").set_value(100_000).run()
    at.button(key="prep_apply").click().run()
    _clean(at)
    assert len(at.error) == 1 and "Preprocessing failed" in at.error[0].value
    assert at.session_state["sc_prepared"] is None


def _fake_run(root: Path, name: str, status: dict, *, job: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    base = {
        "step": 5,
        "total": 20,
        "started": "2026-01-01T00:00:00+00:00",
        "updated": "2026-01-01T00:00:01+00:00",
        "pid": 999_999_99,
        "error": None,
        "best_val": 0.5,
        "eta_s": None,
        "cells_per_s": 100.0,
    }
    (run / "status.json").write_text(json.dumps({**base, **status}))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    )
    if job:
        (run / "job.json").write_text(json.dumps({"argv": ["true"], "pid": 999_999_99, "launched_ts": 0}))
    return run


def test_train_shows_cancelled_run_with_resume(env):
    _fake_run(env["runs"], "was-cancelled", {"state": "cancelled"})
    at = _app("3_Train.py")
    _clean(at)
    assert "Cancelled" in _texts(at.info)
    assert at.button(key="train_resume")
    assert at.get("plotly_chart"), "the loss curve of the stopped run is shown"


def test_train_shows_crashed_runs_error(env):
    _fake_run(env["runs"], "crashed", {"state": "failed", "error": "CUDA out of memory: lower the set size"})
    at = _app("3_Train.py")
    _clean(at)
    assert "CUDA out of memory" in _texts(at.error)


def test_train_running_without_worker_is_interrupted(env):
    _fake_run(env["runs"], "orphan", {"state": "running"}, job=False)
    at = _app("3_Train.py")
    _clean(at)
    assert "stopped without finishing" in _texts(at.warning)


def test_train_form_with_prepared_data(env, prepared_synthetic, tmp_path):
    prepared = prepared_info(prepared_synthetic, tmp_path / "prep.h5ad")
    at = _app("3_Train.py", sc_prepared=prepared)
    _clean(at)
    assert at.selectbox(key="train_context").options == ["c0", "c1", "c2"]
    assert at.button(key="train_start")
    assert at.radio(key="train_track").options[0] == "State Transition on expression"
    assert "State Embedding model (SE)" in at.radio(key="train_track").options
    assert at.radio(key="train_track").help and "Kang sample" in _texts(at.caption)
    # every control carries a plain-words help text
    widgets = [*at.selectbox, *at.number_input, *at.text_input, *at.slider, *at.multiselect]
    assert widgets and all(w.help for w in widgets), [w.key for w in widgets if not w.help]
    # the run name follows context and task until the user edits it
    first = at.selectbox(key="train_context").value
    assert at.text_input(key="train_name").value == f"{first}-zeroshot"
    at.selectbox(key="train_context").set_value("c0").run()
    at.selectbox(key="train_task").set_value("underrepresented").run()
    assert at.text_input(key="train_name").value == "c0-underrepresented"
    at.text_input(key="train_name").input("mine").run()
    at.selectbox(key="train_context").set_value("c1").run()
    assert at.text_input(key="train_name").value == "mine"


def _with_run(env, run: Path) -> Path:
    import shutil

    target = env["runs"] / run.name
    shutil.copytree(run, target)
    return target


def test_predict_page_with_a_trained_run(env, trained_run):
    _with_run(env, trained_run)
    at = _app("4_Predict.py")
    _clean(at)
    assert not at.error, _texts(at.error)
    assert at.selectbox(key="pred_context").value == "c2"  # the run's target context
    assert "Predicted" in _texts(at.success)
    assert len(at.get("plotly_chart")) == 3  # means, volcano, UMAP
    de = at.dataframe[0].value
    assert (
        list(de.columns[:2]) == ["gene", "mean change (log1p)"] and np.isfinite(de["log2 fold change"]).all()
    )
    change = de["mean change (log1p)"].abs().to_numpy()
    assert (change[:-1] >= change[1:] - 1e-12).all()  # ranked by effect size, not by p-value
    assert "depends on how many cells were generated" in _texts(at.caption)
    # not evaluated yet: the page says so, offers to measure, and says a single model has no spread
    assert "Not measured yet" in _texts(at.info) and at.button(key="pred_measure")
    assert "single model (k = 1)" in _texts(at.caption)
    # An unmeasured combination of measured singles is offered and predicted.
    options = at.multiselect(key="pred_perts").options
    combo = next(o for o in options if "+" in o)
    at.multiselect(key="pred_perts").set_value([combo]).run()
    _clean(at)
    assert not at.error, _texts(at.error)
    assert "for 1 perturbation(s) in c2" in _texts(at.success)
    assert "never measured" in _texts(at.caption)
    assert "not among the model's" in _texts(at.caption)  # synthetic perturbations name no gene
    assert len(at.get("download_button")) == 2


def test_predict_page_ensemble_of_two_runs(env, trained_run):
    import shutil

    _with_run(env, trained_run)
    shutil.copytree(trained_run, env["runs"] / "tiny-seed1")
    at = _app("4_Predict.py", sc_run=str(env["runs"] / "tiny"))
    _clean(at)
    pick = at.multiselect(key="pred_ensemble")
    assert pick.options == ["tiny-seed1"]
    pick.set_value(["tiny-seed1"]).run()
    _clean(at)
    assert not at.error, _texts(at.error)
    assert any("Agreement between 2 ensemble members" in s.value for s in at.subheader)
    table = next(d.value for d in at.dataframe if "direction disputed" in d.value.columns)
    assert {"sd between members", "direction disputed"} <= set(table.columns)
    assert not table["direction disputed"].any()  # two copies of one model agree everywhere


def test_ensemble_agreement_flags_sign_disputes():
    import pandas as pd

    from statecore.ui import analysis

    changes = pd.DataFrame([[1.0, 0.2, 0.01], [0.8, -0.3, -0.01], [1.2, 0.1, 0.0]], columns=["a", "b", "c"])
    table = analysis.ensemble_agreement(changes).set_index("gene")
    assert list(table.index) == ["a", "b", "c"]
    assert table.loc["b", "direction disputed"] and not table.loc["a", "direction disputed"]
    assert not table.loc["c", "direction disputed"]  # below min_change: noise, not a dispute
    assert np.isclose(table.loc["b", "members agreeing on direction"], 2 / 3)
    with pytest.raises(ValueError, match="two ensemble members"):
        analysis.ensemble_agreement(changes.iloc[:1])


def test_evaluate_page_with_a_trained_run(env, trained_run):
    run = _with_run(env, trained_run)
    at = _app("5_Evaluate.py")
    _clean(at)
    at.button(key="eval_go").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    table = at.dataframe[0].value
    methods = list(table["method"])
    assert methods[0] == "State (this run)" and "baseline: control" in methods and len(methods) >= 5
    assert methods[-1].startswith("ceiling")
    assert "pearson_delta" in table.columns
    verdict = _texts(at.success) + _texts(at.warning)
    assert "The model beats every baseline on" in verdict
    text = _texts(at.markdown)
    assert "Pearson Δ:" in text and "ceiling" in text and "NaN:" in text  # verdicts + glossary
    ranks = [d.value for d in at.dataframe if "rank" in d.value.columns][0]
    assert list(ranks["rank"]) == sorted(ranks["rank"]) and {"best", "worst", "tied"} <= set(ranks.columns)
    charts = len(at.get("plotly_chart"))
    infos = _texts(at.info)
    assert charts >= 4 or "No bars" in infos  # an empty chart is replaced by the reason
    assert not [b for b in at.button if b.key == "eval_go"]  # evaluated: the button is gone
    assert (run / "evaluation" / "verdict.json").exists()
    assert at.radio(key="eval_profile").value == "celleval"  # the scorer switch (slow test: all three)
    systema = [d.value for d in at.dataframe if "vs perturbed mean" in d.value.columns][0]
    assert list(systema["metric"]) == ["Pearson Δ", "PDS (cosine)"]
    # the Predict page now carries the measured confidence
    at.switch_page("pages/4_Predict.py")
    at.run()
    _clean(at)
    assert "this run's predictions reached" in _texts(at.markdown)
    assert not [b for b in at.button if b.key == "pred_measure"]


def test_train_page_points_a_finished_run_to_its_evaluation(env, trained_run):
    _with_run(env, trained_run)
    at = _app("3_Train.py")
    _clean(at)
    assert "Not evaluated yet" in _texts(at.caption)
    assert "(done)" in at.selectbox(key="train_run_pick").options[0]


def test_train_page_starts_and_cancels_a_run(env, prepared_synthetic, tmp_path):
    from statecore.runs import jobs

    path = tmp_path / "prep.h5ad"
    at = _app("3_Train.py", sc_prepared=prepared_info(prepared_synthetic, path))
    at.number_input(key="train_steps").set_value(100_000)
    at.number_input(key="train_set_size").set_value(16)
    at.button(key="train_start").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    runs = jobs.list_runs(env["runs"])
    assert len(runs) == 1
    run = runs[0].run_dir
    argv = json.loads((run / "job.json").read_text())["argv"]
    assert argv[1:4] == ["-m", "statecore", "train"] and "--threads" in argv and "--config" in argv
    saved = json.loads((run / "config.json").read_text())  # the RunConfig the worker trains
    assert saved["data_path"] == str(path.resolve()) and saved["model"]["set_size"] == 16
    assert saved["train"]["steps"] == 100_000
    try:
        at.button(key="train_cancel").click().run()
        _clean(at)
        final = jobs.wait(run, 120)
        assert final.state == "cancelled", (final, jobs.log_tail(run))
        at.run()
        assert "Cancelled" in _texts(at.info) and at.button(key="train_resume")
    finally:
        jobs.cancel(run, kill_after_s=10)


# ---- the app's non-UI helpers (statecore/ui/analysis.py, training.py)


@pytest.mark.parametrize("task", ["zeroshot", "underrepresented", "explicit"])
def test_the_app_config_is_what_the_cli_trains(task, tmp_path):
    """The Train page writes a RunConfig; `train --config` reads back the same object (no argv round trip)."""
    import argparse

    from statecore.cli import build_parser
    from statecore.cli.train import _load_config, _overrides
    from statecore.config import APP_TRAIN, DataSpec, SplitConfig
    from statecore.runs.files import atomic_write_json
    from statecore.ui.training import st_run_config

    split = SplitConfig(task=task, context="-c1", test_perts=("P,001", "P002"), keep_fraction=0.4)
    cfg = st_run_config(
        data_path="d.h5ad", spec=DataSpec(control="NT"), split=split, set_size=16, steps=7, max_minutes=2.5
    )
    atomic_write_json(tmp_path / "config.json", cfg.to_dict())
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "config.json"), "--threads", "1"])
    assert isinstance(args, argparse.Namespace)
    back = _overrides(_load_config(args.config), args)
    assert back.replace(train=back.train.replace(num_threads=None)) == cfg
    assert back.train.num_threads == 1 and back.split.test_perts == ("P,001", "P002")  # commas survive
    assert cfg.train.steps == 7 and cfg.model.set_size == 16 and APP_TRAIN.steps == 400


def test_unmeasured_combos_and_crosstab():
    import pandas as pd

    from statecore.ui import analysis

    measured = ["ctrl", "A", "B", "C", "A+B"]
    assert analysis.unmeasured_combos(measured, "ctrl") == ["A+C", "B+C"]  # B+A counts as measured
    assert analysis.unmeasured_combos(["ctrl", "B+A", "A", "B"], "ctrl") == []
    obs = pd.DataFrame({"p": ["ctrl", "A", "A", "ctrl"], "c": ["x", "x", "y", "y"]})
    table = analysis.crosstab(obs, "p", "c")
    assert table.loc["A", "y"] == 1 and table.loc["ctrl"].sum() == 2
    assert list(analysis.crosstab(obs, "p", None).columns) == ["all"]


def test_prediction_choices_offer_only_what_the_run_can_encode():
    import pandas as pd

    from statecore.ui import analysis

    obs = pd.DataFrame(
        {
            "perturbation": ["ctrl", "ctrl", "A", "B", "C", "A+B", "Z"],
            "context": ["x", "y", "x", "x", "y", "x", "y"],
        }
    )
    contexts, measured, combos = analysis.prediction_choices(obs, "ctrl", ["y", "w"], ["A", "B", "C", "ctrl"])
    assert contexts == ["y"]  # the run's contexts that have control cells
    assert measured == ["A", "A+B", "B", "C"]  # "Z" is not in the run's vocabulary
    assert combos == ["A+C", "B+C"]
    assert analysis.prediction_choices(obs, "ctrl", ["w"], ["A"])[0] == ["x", "y"]  # none known: all


def test_readable_de_ranks_by_change_puts_the_perturbed_gene_first():
    import pandas as pd

    from statecore.ui import analysis

    de = pd.DataFrame(
        {
            "target": ["A", "A", "A", "A", "B"],
            "feature": ["g1", "g2", "A", "g0", "g1"],
            "target_mean": [1.0, 0.0, 0.5, 3.0, 9.0],
            "ref_mean": [0.0, 2.0, 1.0, 3.0, 0.0],  # g1: zero control mean (was +inf before)
            "fdr": [0.5, 0.01, 0.2, 1e-30, 0.0],
        }
    )
    table, note = analysis.readable_de(de, "A")
    assert list(table["gene"]) == ["A", "g2", "g1", "g0"]  # the knock-down first, then by |change|
    assert np.isfinite(table["log2 fold change"]).all()
    assert np.isclose(table.loc[2, "log2 fold change"], 1.0)  # log2((1 + 1) / (0 + 1))
    assert np.isclose(table.loc[1, "mean change (log1p)"], -np.log1p(2.0))
    assert "Knock-down check: A" in note
    _, note = analysis.readable_de(de, "B")
    assert "B is not among the model's 1 genes" in note
    _, note = analysis.readable_de(de.assign(target="A+g9"), "A+g9")
    assert "Knock-down check: A" in note


def test_empty_charts_say_why():
    import pandas as pd

    from statecore.ui import analysis

    assert "0 for every method" in analysis.nothing_to_show(pd.Series([0.0, 0.0, np.nan]))
    assert "undefined (NaN)" in analysis.nothing_to_show(pd.Series([np.nan, np.nan]))
    assert analysis.nothing_to_show(pd.Series([0.0, 0.2])) == ""
    zero = pd.Series([0.0, 0.0], index=["A", "B"])
    assert "no significant DE gene" in analysis.overlap_empty_reason(zero, pd.Series([0, 0]))
    assert "share none" in analysis.overlap_empty_reason(zero, pd.Series([0, 12]))
    assert analysis.overlap_empty_reason(pd.Series([0.0, 0.5]), pd.Series([3, 4])) == ""


def test_confidence_text_reads_the_saved_verdict():
    from statecore.ui import analysis

    doc = {
        "context": "c2",
        "n_test_perturbations": 3,
        "verdicts": [
            {
                "metric": "pearson_delta",
                "model": 0.9,
                "baseline": 0.8,
                "ceiling": 0.95,
                "beats": True,
                "sentence": "Pearson Δ: beats every baseline by 0.1.",
            }
        ],
    }
    same = analysis.confidence_text(doc, context="c2", perts=["A"], test_perts=["A", "B"])
    assert "Pearson Δ 0.900" in same and "0.950" in same and "guide" not in same
    other = analysis.confidence_text(doc, context="c0", perts=["A"], test_perts=[])
    assert "in another context" in other
    assert analysis.confidence_text(None, context="c2", perts=["A"], test_perts=[]) == ""
    assert "0.420" in analysis.confidence_text(None, context="c2", perts=[], test_perts=[], val_pearson=0.42)


def test_umap_colours_tell_roles_apart():
    from statecore.ui import figures

    labels = ["predicted A", "control (c2)", "real A", "real control"]
    assert [figures.role_of(lab) for lab in labels] == ["predicted", "control", "real", "control"]
    fig = figures.embedding_scatter(np.zeros((4, 2)), np.array(labels), title="t")
    colours = {t.name: t.marker.color for t in fig.data}
    assert colours["predicted A"] != colours["real A"] != colours["control (c2)"]
    assert colours["control (c2)"] == colours["real control"]


def test_qc_removal_chart_has_a_legend_and_counts():
    import pandas as pd

    from statecore.ui import figures

    table = pd.DataFrame({"filter": ["cells", "genes"], "removed": [4, 6000], "kept": [996, 1000]})
    fig = figures.removal_bars(table)
    names = {t.name for t in fig.data}
    assert names == {"kept", "removed"} and len({t.marker.color for t in fig.data}) == 2
    assert any("4 (0.4%)" in list(t.text) for t in fig.data)


def test_cached_loaders_reread_a_rewritten_file(tmp_path, synthetic_counts):
    """The file's mtime is part of the cache key: a rewritten file is read again, not served stale."""
    import os

    from statecore.ui import loaders

    path = tmp_path / "d.h5ad"
    synthetic_counts.write_h5ad(path)
    assert loaders.read_h5ad(path).n_obs == synthetic_counts.n_obs
    synthetic_counts[:10].copy().write_h5ad(path)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # a distinct mtime even on a coarse clock
    assert loaders.read_h5ad(path).n_obs == 10


def test_pds_matrix_ranks_the_true_perturbation():
    import numpy as np
    import pandas as pd

    from statecore.ui import analysis

    rng = np.random.default_rng(0)
    real = pd.DataFrame(rng.normal(size=(4, 30)), index=list("abcd"))
    pred = real + rng.normal(scale=0.05, size=real.shape)  # close to its own truth
    pred.loc["d"] = real.loc["a"]  # "d" predicted exactly like "a"
    dist, ranks = analysis.pds_matrix(pred, real)
    assert dist.shape == (4, 4) and list(ranks[["a", "b", "c"]]) == [1, 1, 1]
    assert ranks["d"] > 1
    assert np.isclose(dist.loc["d", "a"], 0.0)


def test_deltas_and_group_means(prepared_synthetic):
    from statecore.ui import analysis

    d = analysis.deltas(prepared_synthetic, "ctrl")
    assert "ctrl" not in d.index and d.shape[1] == prepared_synthetic.n_vars
    x = analysis.dense(prepared_synthetic.X)
    labels = prepared_synthetic.obs["perturbation"].astype(str).to_numpy()
    p = d.index[0]
    expect = x[labels == p].mean(0) - x[labels == "ctrl"].mean(0)
    assert abs(d.loc[p].to_numpy() - expect).max() < 1e-5


def test_evaluate_page_when_the_model_cannot_be_scored(env, trained_run, monkeypatch):
    """The model's scoring fails (e.g. out-of-range predictions): one error, the baselines still shown."""
    import statecore.evaluation.metrics as metrics
    from statecore.errors import DataError

    real_evaluate = metrics.evaluate
    calls = []

    def flaky(pred, real, **kw):
        calls.append(1)
        if len(calls) == 1:  # the model is scored first
            raise DataError("pred X ranges over [0, 18.1], outside the log1p range [0, 15)")
        return real_evaluate(pred, real, **kw)

    monkeypatch.setattr(metrics, "evaluate", flaky)
    _with_run(env, trained_run)
    at = _app("5_Evaluate.py")
    at.button(key="eval_go").click().run()
    _clean(at)
    assert (
        len(at.error) == 1 and "Scoring the model failed" in at.error[0].value and "18.1" in at.error[0].value
    )
    methods = list(at.dataframe[0].value["method"])
    assert "State (this run)" not in methods and "baseline: control" in methods


@pytest.mark.parametrize("which", [0, 1])
def test_data_each_sample_loads_with_one_click(env, which):
    from statecore.ui.state import SAMPLES

    name = list(SAMPLES)[which]
    if not SAMPLES[name].exists():
        pytest.skip(f"sample missing: {SAMPLES[name]}")
    at = _app("1_Data.py")
    at.selectbox(key="data_sample").set_value(name).run()
    at.button(key="data_load_sample").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    assert "No blocking problems" in _texts(at.success)
    assert at.session_state["sc_data"]["spec"]["control"] == "ctrl"
    assert at.selectbox(key="data_context_col").value == "context"


def test_sidebar_lists_home_first_on_every_page(env):
    for page in (None, "1_Data.py", "6_Screen.py"):
        at = _app(page)
        labels = [link.proto.label for link in at.sidebar.get("page_link")]
        assert labels[:2] == ["Home", "Data"] and "Screen" in labels, (page, labels)


def test_stop_reason_says_why_a_run_ended_early(tmp_path):
    from statecore.ui.training import stop_reason

    (tmp_path / "log.txt").write_text(
        "== launching: python -m statecore train ...\n"
        "done: step 208, loss 0.4289, best val n/a (time budget of 3.0 min reached) -> /runs/kang\n"
    )
    assert stop_reason(tmp_path) == "time budget of 3.0 min reached"
    (tmp_path / "log.txt").write_text("done: step 400, loss 0.4, best val 0.5 -> /runs/kang\n")
    assert stop_reason(tmp_path) is None
    assert stop_reason(tmp_path / "missing") is None


def _keyed(at, key: str):
    """The dataframes of one page table, told apart by their columns (AppTest keeps no key)."""
    marker = {"eval_systema": "vs perturbed mean", "eval_scaled": "scaled"}[key]
    return [d for d in at.dataframe if marker in d.value.columns]


@pytest.mark.slow
def test_evaluate_page_switches_scorer_profile(env, trained_run):
    """celleval shows the perturbation-specific (Systema) Δ beside the control-referenced one;
    vcc2026 scores sampled raw counts and shows cell-eval2's scaled score."""
    _with_run(env, trained_run)
    at = _app("5_Evaluate.py")
    at.button(key="eval_go").click().run()
    _clean(at)
    radio = at.radio(key="eval_profile")
    assert radio.value == "celleval" and list(radio.options) == [
        "celleval: cell-eval 0.8.2 (2025 challenge) + perturbation-specific Δ",
        "vcc2026: cell-eval2 0.20.0 (2026 challenge), raw counts, scaled score",
        "all: both, one table",
    ]
    systema = _keyed(at, "eval_systema")[0].value
    assert list(systema["metric"]) == ["Pearson Δ", "PDS (cosine)"]
    assert {"vs control", "vs perturbed mean"} <= set(systema.columns)
    assert "Systema" in _texts(at.caption)
    assert not _keyed(at, "eval_scaled")
    radio.set_value("vcc2026").run()
    _clean(at)
    assert not at.error, _texts(at.error)
    every = [d.value for d in at.dataframe if list(d.value.columns) == ["mean"]][0]
    assert {"pds_cosine", "de_wilcoxon_sig_jaccard", "expr_mse_unbiased_capped_norm"} <= set(every.index)
    assert not _keyed(at, "eval_systema")  # vcc2026 has no control-vs-perturbed pairs
    # the synthetic labels name no gene: cell-eval2's baseline cannot leave a gene's own
    # perturbation out, so the scaled score is skipped with that reason (tests/test_eval_profiles
    # and test_vcc2026_equality cover the score itself)
    assert "scaled score skipped: no perturbation names a measured gene" in _texts(at.caption)
    radio.set_value("all").run()
    _clean(at)
    assert _keyed(at, "eval_systema")
    every = [d.value for d in at.dataframe if list(d.value.columns) == ["mean"]][0]
    assert {"pds_cosine", "pearson_delta_pert", "overlap_at_N"} <= set(every.index)


def test_seed_spread_of_ensemble_members(env, trained_run):
    import pandas as pd

    from statecore.evaluation.run import MODEL
    from statecore.ui import scoring

    run = _with_run(env, trained_run)
    import shutil

    shutil.copytree(run, run.with_name(f"{run.name}-seed1"))
    assert scoring.ensemble_members(run) == [run, run.with_name(f"{run.name}-seed1")]
    sums = [
        pd.DataFrame({"method": [MODEL, "baseline: control"], "pearson_delta": [v, 0.0]}) for v in (0.2, 0.4)
    ]
    spread = scoring.seed_spread(sums, ["pearson_delta"]).iloc[0]
    assert spread["members"] == 2 and spread["mean"] == pytest.approx(0.3)
    assert spread["sd"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
