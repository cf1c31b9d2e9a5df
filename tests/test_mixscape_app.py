"""The app's side of the perturbed-cell classifier: Preprocess offers it and shows the calls per context,
Train offers 'Train on classified cells' only for data that carry the calls and writes it into the run's
config."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app_helpers import open_page, prepared_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("STATECORE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("STATECORE_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)
    return {"runs": tmp_path / "runs"}


def _app(page: str, **session) -> AppTest:
    return open_page(page, timeout=TIMEOUT, **session)


def test_preprocess_classifies_and_shows_the_calls(env, tmp_path, synthetic_counts):
    import anndata as ad

    from statecore.config import DataSpec

    path = tmp_path / "small.h5ad"
    synthetic_counts.write_h5ad(path)
    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    info = {
        "path": str(path),
        "metadata": None,
        "cell_id_col": None,
        "label": path.name,
        "spec": spec.to_dict(),
    }
    at = _app("2_Preprocess.py", sc_data=info)
    box = at.checkbox(key="prep_classify")
    assert box.help and "No cell is removed" in box.help and not box.value
    at.number_input(key="prep_min_genes").set_value(0)
    at.number_input(key="prep_min_cells").set_value(0)
    at.checkbox(key="prep_umap").uncheck()
    box.check().run()
    at.button(key="prep_apply").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    out = ad.read_h5ad(at.session_state["sc_prepared"]["path"])
    assert out.n_obs == synthetic_counts.n_obs and "perturbed_call" in out.obs
    totals = at.dataframe[0].value  # the per-context table
    assert list(totals["context"]) == ["c0", "c1", "c2", "all"]
    assert int(totals["targeting cells"].iloc[-1]) == int((out.obs["perturbation"] != "ctrl").sum())


def test_train_offers_classified_cells_only_with_calls(env, tmp_path, prepared_synthetic):
    from statecore.data.mixscape import annotate, classify_perturbed
    from statecore.runs import jobs

    info = prepared_info(prepared_synthetic, tmp_path / "plain.h5ad")
    at = _app("3_Train.py", sc_prepared=info)
    assert not at.exception and "train_classified" not in [c.key for c in at.checkbox]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        annotate(prepared_synthetic, classify_perturbed(prepared_synthetic, control="ctrl"))
    path = tmp_path / "called.h5ad"
    prepared_synthetic.write_h5ad(path)
    at = _app("3_Train.py", sc_prepared={**info, "path": str(path)})
    box = at.checkbox(key="train_classified")
    assert box.help and "never filtered" in box.help
    box.check().run()
    at.number_input(key="train_steps").set_value(1)
    at.number_input(key="train_set_size").set_value(8)
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    run = jobs.list_runs(env["runs"])[0].run_dir
    try:  # the worker trains exactly this RunConfig (tests/test_mixscape.py trains one with the flag)
        assert json.loads((run / "config.json").read_text())["split"]["train_on_classified"] is True
    finally:
        jobs.cancel(run, kill_after_s=1)
