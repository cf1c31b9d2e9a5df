"""The Mixscape-style perturbed-cell classifier (statecore.data.mixscape): it recovers planted escapers,
calls a perturbation without effect all NP, never removes a cell at prepare, and training on classified
cells leaves NP cells out of training while scoring reads every test cell."""

from __future__ import annotations

import hashlib
import warnings

import anndata as ad
import numpy as np
import pytest

from statecore.cli import main
from statecore.config import (
    DataSpec,
    PerturbedCallConfig,
    QCConfig,
    RunConfig,
    SplitConfig,
    STConfig,
    TrainConfig,
)
from statecore.data import mixscape
from statecore.data.preprocess import prepare
from statecore.errors import DataError

SPEC = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col=None)
QC = QCConfig(min_genes=0, min_cells=0, n_hvg=200, umap=False)


@pytest.fixture(scope="module")
def raw():
    """Half of every targeting cell escapes its guide (expression of a control cell); P001 has no effect."""
    from statecore.data.synthetic import make_perturbation_adata

    return make_perturbation_adata(
        n_cells=1600, n_genes=200, n_perturbations=4, contexts=("a", "b"), frac_no_effect=0.25,
        frac_control=0.25, frac_escape=0.5, effect_size=2.0, context_scale_sd=0.1, seed=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def classified(raw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(raw, spec=SPEC, qc=QC.replace(classify_perturbed=True))


def test_recovers_the_planted_perturbed_cells(raw, classified):
    no_effect = set(raw.uns["synthetic"]["no_effect"])
    assert no_effect == {"P001"}
    pert = classified.obs["perturbation"].astype(str).to_numpy()
    call = classified.obs["perturbed_call"].astype(str).to_numpy()
    truth = ~classified.obs["escaped"].to_numpy(bool)
    effective = (pert != "ctrl") & ~np.isin(pert, list(no_effect))
    accuracy = float(((call == "KO") == truth)[effective].mean())
    assert accuracy >= 0.9, accuracy
    assert set(call[pert == "ctrl"]) == {"control"}
    prob = classified.obs["perturbed_prob"].to_numpy()
    assert np.isnan(prob[pert == "ctrl"]).all() and ((prob[effective] >= 0) & (prob[effective] <= 1)).all()
    assert ((prob > 0.5) == (call == "KO"))[pert != "ctrl"].all()


def test_a_perturbation_without_effect_is_all_np(classified):
    pert = classified.obs["perturbation"].astype(str).to_numpy()
    assert set(classified.obs["perturbed_call"].astype(str)[pert == "P001"]) == {"NP"}
    summary = mixscape.call_summary(classified)
    rows = summary[summary["perturbation"] == "P001"]
    assert len(rows) == 2 and (rows["status"] == mixscape.NO_EFFECT).all() and (rows["ko"] == 0).all()
    assert (rows["de_genes"] < PerturbedCallConfig().min_de_genes).all()


def test_prepare_keeps_every_cell_and_leaves_its_input(raw, classified):
    before = raw.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = prepare(raw, spec=SPEC, qc=QC.replace(classify_perturbed=True))
        plain = prepare(raw, spec=SPEC, qc=QC)
    assert np.array_equal(again.obs["perturbed_call"], classified.obs["perturbed_call"])  # deterministic
    assert classified.n_obs == plain.n_obs == raw.n_obs
    assert (classified.X != plain.X).nnz == 0 and "perturbed_call" not in plain.obs
    assert (raw.X != before.X).nnz == 0 and list(raw.obs.columns) == list(before.obs.columns)
    rec = classified.uns["statecore"]["perturbed_call"]
    assert rec["targeting_cells"] == int((classified.obs["perturbation"] != "ctrl").sum())
    assert rec["ko_cells"] == int((classified.obs["perturbed_call"] == "KO").sum())
    assert classified.uns["statecore"]["qc"]["classify_perturbed"] is True


def test_cli_prepare_reports_kept_cells_and_never_writes_its_input(raw, tmp_path, capsys):
    src, out = tmp_path / "raw.h5ad", tmp_path / "p.h5ad"
    raw.write_h5ad(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    args = ["prepare", str(src), "-o", str(out), "--no-umap", "--min-genes", "0", "--min-cells", "0"]
    assert main([*args, "--batch-col", "none", "--classify-perturbed"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    p = ad.read_h5ad(out)
    assert p.n_obs == raw.n_obs
    totals = mixscape.context_totals(mixscape.call_summary(p)).set_index("context")
    for name, where in (("a", "context 'a'"), ("b", "context 'b'"), ("all", "overall")):
        line = next(x for x in lines if x.startswith(f"perturbed-cell calls, {where}:"))
        assert f"keeps {totals.loc[name, 'KO']:,} of {totals.loc[name, 'targeting cells']:,}" in line
    assert totals.loc["all", "KO"] == int((p.obs["perturbed_call"] == "KO").sum())


def test_ko_posterior_keeps_the_np_component_fixed():
    rng = np.random.default_rng(0)
    np_cells, ko_cells = rng.normal(0.0, 1.0, 300), rng.normal(4.0, 1.0, 300)
    post = mixscape.ko_posterior(np.concatenate([np_cells, ko_cells]), mu0=0.0, sd0=1.0, init=np.arange(5.0))
    assert ((post > 0.5) == np.repeat([False, True], 300)).mean() > 0.97
    # cells exactly like the controls: the fixed NP component explains them, almost none is KO
    post = mixscape.ko_posterior(rng.normal(0.0, 1.0, 500), mu0=0.0, sd0=1.0, init=rng.normal(0, 1, 500))
    assert (post > 0.5).mean() < 0.1


def test_too_few_controls_keeps_cells_unclassified(classified):
    few = classified[
        (classified.obs["perturbation"] != "ctrl") | (np.arange(classified.n_obs) % 50 == 0)
    ].copy()
    result = mixscape.classify_perturbed(few, control="ctrl", cfg=PerturbedCallConfig(min_cells=10))
    ctrl_per_ctx = few.obs[few.obs["perturbation"] == "ctrl"]["context"].value_counts()
    starved = set(ctrl_per_ctx[ctrl_per_ctx < 10].index) | (set(few.obs["context"]) - set(ctrl_per_ctx.index))
    assert starved  # the subsample leaves a context with too few controls
    rows = result.summary[result.summary["context"].isin(starved)]
    assert (rows["status"] == mixscape.FEW_CONTROLS).all() and (rows["unclassified"] == rows["cells"]).all()
    with pytest.raises(DataError, match="n_neighbors"):
        mixscape.classify_perturbed(few, control="ctrl", cfg=PerturbedCallConfig(n_neighbors=0))


def _config(adata, path: str = "") -> RunConfig:
    return RunConfig(
        data_path=path,
        spec=SPEC,
        split=SplitConfig(task="underrepresented", context="b", keep_fraction=0.5, val_fraction=0.3, seed=0,
                          train_on_classified=True),
        model=STConfig(hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=16, set_size=8,
                       residual="expression", shift_prior=True),
        train=TrainConfig(steps=2, batch_size=2, num_threads=1, val_every=1, log_every=1, device="cpu"),
    )  # fmt: skip


def test_training_sets_exclude_np_cells(classified):
    from statecore.data.splits import make_split
    from statecore.training.st_track import classified_cells, make_train_data

    cfg = _config(classified)
    split = make_split(classified, cfg.split)
    with pytest.warns(UserWarning, match="keep all their cells"):
        cells = classified_cells(classified, cfg, split)
    data = make_train_data(classified, split, set_size=8, cells=cells)
    call = classified.obs["perturbed_call"].astype(str).to_numpy()
    pert = classified.obs["perturbation"].astype(str).to_numpy()
    ctx = classified.obs["context"].astype(str).to_numpy()
    groups = data.train.groups + (data.val.groups if data.val is not None else [])
    for g in groups:
        rows = np.flatnonzero((ctx == g.context) & (pert == g.perturbation))
        if g.perturbation == "ctrl":
            assert len(g.cells) == len(rows)
        elif g.perturbation == "P001":  # no KO cell at all: the pair keeps its cells (and its note)
            assert len(g.cells) == len(rows) and set(call[g.cells]) == {"NP"}
        else:
            assert set(call[g.cells]) == {"KO"} and len(g.cells) == int((call[rows] == "KO").sum())
    assert any(g.perturbation not in ("ctrl", "P001") for g in groups)


def test_evaluation_reads_every_test_cell(classified, tmp_path):
    from statecore.evaluation.run import evaluate_run
    from statecore.training.checkpoint import load_run
    from statecore.training.engine import train_run

    data = tmp_path / "p.h5ad"
    classified.write_h5ad(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_run(classified, _config(classified, str(data)), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.config.split.train_on_classified
    ev = evaluate_run(run, classified, seed=0, baselines=["control"], ceiling=False)
    pert = classified.obs["perturbation"].astype(str).to_numpy()
    ctx = classified.obs["context"].astype(str).to_numpy()
    test = [p for p in run.split.test["b"]]
    expected = int(((ctx == "b") & np.isin(pert, test)).sum())
    real = ev.real.obs["perturbation"].astype(str).to_numpy()
    assert int((real != "ctrl").sum()) == expected
    np_test = (
        (ctx == "b") & np.isin(pert, test) & (classified.obs["perturbed_call"].astype(str).to_numpy() == "NP")
    )
    assert np_test.sum() > 0  # NP cells are among the scored test cells


def test_missing_calls_name_the_prepare_flag(tmp_path, capsys):
    from statecore.data.synthetic import make_perturbation_adata

    raw = make_perturbation_adata(n_cells=200, n_genes=40, n_perturbations=3, contexts=("a", "b"), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = prepare(raw, spec=SPEC, qc=QCConfig(min_genes=0, min_cells=0, n_hvg=40, umap=False))
    with pytest.raises(DataError, match="prepare --classify-perturbed"):
        mixscape.training_cells(plain, control="ctrl", pairs=set())
    data = tmp_path / "plain.h5ad"
    plain.write_h5ad(data)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--run-dir", str(run), "--context", "b", "--train-on-classified"]
    assert main([*args, "--steps", "1", "--quiet"]) == 2
    assert "prepare --classify-perturbed" in capsys.readouterr().err
    assert not run.exists()
