"""AppTest of the Screen page: same table as the CLI, figures, downloads, the hop to Predict, and a
background screen through the job manager."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # the page imports torch/scanpy and runs a ranking check on a busy 2-core machine


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _prepared_synthetic_master):
    """A real tiny run made by the CLI the app launches (6 steps; test split in c2)."""
    base = tmp_path_factory.mktemp("screenpage")
    data = base / "prep.h5ad"
    _prepared_synthetic_master.write_h5ad(data)
    run = base / "runs" / "tiny"
    cmd = [sys.executable, "-m", "statecore", "train", "--data", str(data), "--run-dir", str(run)]
    cmd += [
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


@pytest.fixture()
def env(tmp_path, monkeypatch, tiny_run):
    runs = tmp_path / "runs"
    monkeypatch.setenv("STATECORE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("STATECORE_RUNS", str(runs))
    monkeypatch.chdir(ROOT)
    shutil.copytree(tiny_run, runs / tiny_run.name)
    return runs / tiny_run.name


def _page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/6_Screen.py")
    at.run()
    return at


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_screen_page_without_runs_points_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("STATECORE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("STATECORE_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)
    at = _page()
    assert not at.exception
    assert "No trained model yet" in " ".join(i.value for i in at.info)


def test_screen_page_table_equals_the_cli(env, tmp_path):
    from statecore.cli.main import main

    at = _page()
    _clean(at)
    assert "held-out perturbations of c2" in " ".join(i.value for i in at.info)  # the ranking check
    assert at.selectbox(key="scr_context").value == "c2"
    singles = at.multiselect(key="scr_perts").options[:3]
    gene = at.multiselect(key="scr_genes").options[0]
    at.multiselect(key="scr_pairs").set_value(singles)
    at.multiselect(key="scr_genes").set_value([gene])
    at.number_input(key="scr_n_cells").set_value(16)
    at.run()
    at.button(key="scr_go").click().run()
    _clean(at)
    page_table = at.dataframe[0].value

    out = tmp_path / "cli.csv"
    argv = ["screen", "--run-dir", str(env), "--context", "c2", "--pairs-of", ",".join(singles)]
    argv += ["--genes", gene, "--n-cells", "16", "-o", str(out)]
    assert main(argv) == 0
    pd.testing.assert_frame_equal(page_table.reset_index(drop=True), pd.read_csv(out), check_dtype=False)

    assert len(at.get("plotly_chart")) == 4  # top-N bars, clustered heatmap, gene scatter, pair matrix
    assert len(at.get("download_button")) == 2
    # Filtering the table leaves only the pairs.
    at.multiselect(key="scr_kinds").set_value(["pair"]).run()
    assert set(at.dataframe[0].value["kind"]) == {"pair"} and len(at.dataframe[0].value) == 3

    # One click from a hit to Predict, with that perturbation selected.
    top = page_table["perturbation"].iloc[0]
    at.button(key="scr_open_0").click().run()
    _clean(at)
    assert at.multiselect(key="pred_perts").value == [top]
    assert at.selectbox(key="pred_context").value == "c2"


def test_screen_page_background_job(env):
    from statecore.runs import jobs

    at = _page()
    at.number_input(key="scr_n_cells").set_value(8)
    at.run()
    at.button(key="scr_bg").click().run()
    _clean(at)
    (job_dir,) = list((env / "screens").iterdir())
    status = jobs.wait(job_dir, 240)
    assert status.state == "done", (status.error, jobs.log_tail(job_dir))
    at.run()
    at.button(key=f"scr_show_{job_dir.name}").click().run()
    _clean(at)
    shown = at.dataframe[0].value
    assert len(shown) == len(pd.read_csv(job_dir / "screen.csv"))
    assert job_dir.name in " ".join(s.value for s in at.subheader)
