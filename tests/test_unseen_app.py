"""AppTest of the unseen-genes task (issue 14): Train offers it, Predict and Screen take any gene of the feature
table and mark predictions of genes no training context perturbed, with the run's validation score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app_helpers import open_page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


@pytest.fixture(scope="module")
def unseen_data(tmp_path_factory):
    from statecore.config import DataSpec, QCConfig
    from statecore.data.preprocess import prepare
    from statecore.data.synthetic import make_perturbation_adata

    raw = make_perturbation_adata(
        n_cells=900, n_genes=80, n_perturbations=12, contexts=("c0", "c1"), modules=3, seed=2
    )
    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    adata = prepare(raw, spec=spec, qc=QCConfig(min_genes=0, min_cells=0, n_hvg=2000, umap=False))
    path = tmp_path_factory.mktemp("unseen_app") / "prep.h5ad"
    adata.write_h5ad(path)
    return adata, path


@pytest.fixture(scope="module")
def unseen_run(unseen_data):
    from statecore.cli import main

    _, path = unseen_data
    run = path.parent / "runs" / "unseen"
    argv = ["train", "--data", str(path), "--run-dir", str(run), "--task", "unseen", "--context", "c1"]
    argv += ["--steps", "2", "--set-size", "8", "--batch-size", "2", "--threads", "1", "--quiet"]
    assert main([*argv, "--test-fraction", "0.3"]) == 0  # 3+ held-out genes: the Screen page's ranking check
    return run


@pytest.fixture()
def env(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("STATECORE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("STATECORE_RUNS", str(runs))
    monkeypatch.chdir(ROOT)
    return runs


def _app(page: str, **session) -> AppTest:
    return open_page(page, timeout=TIMEOUT, **session)


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _never_perturbed(adata) -> str:
    perturbed = set(adata.obs["perturbation"].astype(str))
    return next(g for g in adata.var_names if g not in perturbed)


def test_train_page_offers_the_unseen_task_and_feature_source(env, unseen_data):
    from statecore.runs import jobs

    adata, path = unseen_data
    prepared = {"path": str(path), "qc": {}, "n_obs": adata.n_obs, "n_vars": adata.n_vars}
    at = _app("3_Train.py", sc_prepared=prepared)
    _clean(at)
    at.selectbox(key="train_task").set_value("unseen").run()
    _clean(at)
    assert at.radio(key="train_features").options[0] == "from the data (control cells)"
    assert at.selectbox(key="train_pert_type").options == ["none", "knockdown", "knockout", "activation"]
    widgets = [*at.selectbox, *at.slider, *at.multiselect, *at.radio]
    assert all(w.help for w in widgets), [w.key for w in widgets if not w.help]
    at.radio(key="train_features").set_value("a table on the server").run()
    at.button(key="train_start").click().run()
    assert "Gene feature table path" in " ".join(e.value for e in at.error)  # the field is named
    at.radio(key="train_features").set_value("from the data (control cells)").run()
    at.selectbox(key="train_pert_type").set_value("knockdown")
    at.number_input(key="train_steps").set_value(100_000)
    at.button(key="train_start").click().run()
    _clean(at)
    run = jobs.list_runs(env)[0].run_dir
    try:
        saved = json.loads((run / "config.json").read_text())
        assert saved["split"]["task"] == "unseen"
        assert saved["model"]["pert_encoding"] == "features" and saved["model"]["gene_features"] == "data"
        assert saved["model"]["perturbation_type"] == "knockdown"
    finally:
        jobs.cancel(run, kill_after_s=10)


def test_predict_page_predicts_and_marks_an_unmeasured_gene(env, unseen_data, unseen_run):
    adata, _ = unseen_data
    shutil.copytree(unseen_run, env / unseen_run.name)
    at = _app("4_Predict.py")
    _clean(at)
    gene = _never_perturbed(adata)
    assert gene in at.multiselect(key="pred_perts").options
    assert "genes of the feature table" in at.multiselect(key="pred_perts").label
    at.multiselect(key="pred_perts").set_value([gene]).run()
    _clean(at)
    warning = " ".join(w.value for w in at.warning)
    assert f"Unseen genes ({gene})" in warning and "no training context perturbed" in warning
    assert "pearson delta was" in warning  # the run's validation score on unseen genes


def test_screen_page_marks_unseen_genes(env, unseen_data, unseen_run):
    adata, _ = unseen_data
    shutil.copytree(unseen_run, env / unseen_run.name)
    at = _app("6_Screen.py")
    _clean(at)
    gene = _never_perturbed(adata)
    trained = json.loads((unseen_run / "split.json").read_text())["train"]["c1"][0]
    at.multiselect(key="scr_perts").set_value([gene, trained])
    at.number_input(key="scr_n_cells").set_value(16)
    at.run()
    at.button(key="scr_go").click().run()
    _clean(at)
    table = at.dataframe[0].value.set_index("perturbation")
    assert bool(table.loc[gene, "unseen_gene"]) and not bool(table.loc[trained, "unseen_gene"])
    assert "no training context perturbed" in " ".join(w.value for w in at.warning)
