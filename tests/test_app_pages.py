"""AppTest for every page: the happy path on small data and the error paths (nothing loaded yet,
bad upload, missing file, failed / cancelled runs). A page must never show an exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

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


def _prepared_info(adata, path: Path) -> dict:
    """The session's ``sc_prepared`` entry for ``adata`` written to ``path``."""
    adata.write_h5ad(path)
    return {"path": str(path), "qc": {}, "n_obs": adata.n_obs, "n_vars": adata.n_vars}


def test_train_form_with_prepared_data(env, prepared_synthetic, tmp_path):
    prepared = _prepared_info(prepared_synthetic, tmp_path / "prep.h5ad")
    at = _app("3_Train.py", sc_prepared=prepared)
    _clean(at)
    assert at.selectbox(key="train_context").options == ["c0", "c1", "c2"]
    assert at.button(key="train_start")
    assert "HVG" in at.radio(key="train_track").options[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, _prepared_synthetic_master):
    """A real (tiny) training run made by the CLI the app launches: 6 steps on 400 synthetic cells."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("trained")
    data = base / "prep.h5ad"
    _prepared_synthetic_master.write_h5ad(data)
    run = base / "runs" / "tiny"
    cmd = [
        sys.executable,
        "-m",
        "statecore",
        "train",
        "--data",
        str(data),
        "--run-dir",
        str(run),
        "--context",
        "c2",
        "--steps",
        "6",
        "--set-size",
        "16",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--quiet",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


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
    assert at.dataframe[0].value.columns[0] == "feature"
    # An unmeasured combination of measured singles is offered and predicted.
    options = at.multiselect(key="pred_perts").options
    combo = next(o for o in options if "+" in o)
    at.multiselect(key="pred_perts").set_value([combo]).run()
    _clean(at)
    assert not at.error, _texts(at.error)
    assert "for 1 perturbation(s) in c2" in _texts(at.success)
    assert "never measured" in _texts(at.caption)
    assert len(at.get("download_button")) == 2


def test_evaluate_page_with_a_trained_run(env, trained_run):
    _with_run(env, trained_run)
    at = _app("5_Evaluate.py")
    _clean(at)
    at.button(key="eval_go").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    table = at.dataframe[0].value
    methods = list(table["method"])
    assert methods[0] == "State (this run)" and "baseline: control" in methods and len(methods) >= 5
    assert "pearson_delta" in table.columns
    assert len(at.get("plotly_chart")) >= 4  # bars, PDS heatmap, overlap, Pearson delta (+ UMAP)
    assert not [b for b in at.button if b.key == "eval_go"]  # evaluated: the button is gone


def test_train_page_starts_and_cancels_a_run(env, prepared_synthetic, tmp_path):
    from statecore.runs import jobs

    path = tmp_path / "prep.h5ad"
    at = _app("3_Train.py", sc_prepared=_prepared_info(prepared_synthetic, path))
    at.number_input(key="train_steps").set_value(100_000)
    at.number_input(key="train_set_size").set_value(16)
    at.button(key="train_start").click().run()
    _clean(at)
    assert not at.error, _texts(at.error)
    runs = jobs.list_runs(env["runs"])
    assert len(runs) == 1
    run = runs[0].run_dir
    argv = json.loads((run / "job.json").read_text())["argv"]
    assert argv[1:4] == ["-m", "statecore", "train"] and "--threads" in argv and str(path) in argv
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
def test_train_options_are_accepted_by_the_real_cli(task):
    from statecore.cli import build_parser
    from statecore.ui.training import TrainOptions

    opts = TrainOptions(
        data_path="d.h5ad",
        task=task,
        context="c1",
        test_perts=("P001", "P002"),
        set_size=16,
        max_minutes=2.5,
        threads=1,
        steps=7,
    )
    args = build_parser().parse_args(["train", "--run-dir", "r", *opts.to_args()])
    assert (args.task, args.context, args.steps, args.set_size, args.threads) == (task, "c1", 7, 16, 1)
    assert args.max_minutes == 2.5 and args.quiet
    if task == "explicit":
        assert args.test_perts == "P001,P002"


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


def test_ranked_de_sorts_one_target():
    import pandas as pd

    from statecore.ui import analysis

    de = pd.DataFrame(
        {
            "target": ["A", "A", "A", "B"],
            "feature": ["g1", "g2", "g3", "g1"],
            "log2_fold_change": [0.5, -2.0, 1.0, 9.0],
            "fdr": [0.01, 0.01, 0.001, 0.0],
        }
    )
    ranked = analysis.ranked_de(de, "A")
    assert list(ranked["feature"]) == ["g3", "g2", "g1"] and list(ranked.columns) == list(de.columns)


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
