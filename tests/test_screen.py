"""In-silico screen: E-distance definition, batching, table contents, errors, CLI = function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
from statecore.errors import DataError
from statecore.inference.screen import (
    SetStats,
    edistance,
    rank_agreement,
    screen,
    screen_ranking_check,
)
from statecore.training.checkpoint import load_run
from statecore.training.engine import train_run


@pytest.fixture(scope="module")
def trained(_prepared_synthetic_master, tmp_path_factory):
    base = tmp_path_factory.mktemp("screen")
    data = base / "prep.h5ad"
    _prepared_synthetic_master.write_h5ad(data)
    cfg = RunConfig(
        split=SplitConfig(task="underrepresented", context="c0"),
        model=STConfig(
            hidden_dim=16,
            transformer_heads=2,
            transformer_layers=1,
            mlp_hidden_dim=32,
            set_size=8,
            shift_prior=True,
            residual="expression",
        ),
        train=TrainConfig(steps=5, batch_size=2, num_threads=1),
        data_path=str(data),
    )
    train_run(_prepared_synthetic_master, cfg, base / "run")
    return base / "run"


def _scperturb_edist(X: np.ndarray, Y: np.ndarray) -> float:
    """scPerturb's edist_to_control, written out: sqeuclidean pairwise distances, σ over N(N−1) pairs."""
    d_xy = cdist(X, Y, "sqeuclidean").mean()
    s_x = cdist(X, X, "sqeuclidean").sum() / (len(X) * (len(X) - 1))
    s_y = cdist(Y, Y, "sqeuclidean").sum() / (len(Y) * (len(Y) - 1))
    return 2 * d_xy - s_x - s_y


def test_edistance_equals_scperturbs_pairwise_definition():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(37, 12)), rng.normal(0.4, 1.3, size=(51, 12))
    assert edistance(SetStats.of(X), SetStats.of(Y)) == pytest.approx(_scperturb_edist(X, Y), rel=1e-9)
    assert edistance(SetStats.of(X), SetStats.of(X)) == pytest.approx(_scperturb_edist(X, X), abs=1e-9)
    # Squared distances: 2·||mean shift||² minus each mean's sampling noise.
    Xs = SetStats.of(X)
    spread = ((X - X.mean(0)) ** 2).sum(1).mean()
    assert Xs.within == pytest.approx(2 * spread * len(X) / (len(X) - 1))


def test_rank_agreement():
    truth = np.array([5.0, 4, 3, 2, 1])
    assert rank_agreement(truth, truth, 2) == (pytest.approx(1.0), 1.0)
    rho, prec = rank_agreement(-truth, truth, 2)
    assert rho == pytest.approx(-1.0) and prec == 0.0


def test_screen_table_batching_pairs_genes(trained, prepared_synthetic):
    run = load_run(trained)
    singles = run.perturbations[1:4]
    genes = run.genes[:2]
    before = prepared_synthetic.X.copy()
    res = screen(run, prepared_synthetic, context="c0", pairs_of=singles, genes=genes, n_cells=20, chunk=4)
    assert (prepared_synthetic.X != before).nnz == 0  # the caller's data untouched
    t = res.table
    n_pairs = 3
    assert len(t) == len(run.perturbations) - 1 + n_pairs
    assert list(t["rank"]) == list(range(1, len(t) + 1))
    assert (np.diff(t["edist"].to_numpy()) <= 0).all()  # best effect first
    assert res.delta.shape == (len(t), len(run.genes)) and tuple(t["perturbation"]) == res.perturbations
    assert np.isfinite(res.control_edist)
    # The same screen one perturbation per forward pass: stacking along the batch changes nothing.
    one = screen(run, prepared_synthetic, context="c0", pairs_of=singles, genes=genes, n_cells=20, chunk=1)
    pd.testing.assert_frame_equal(one.table, t)
    np.testing.assert_allclose(one.delta, res.delta, atol=1e-5)
    # Pairs: labelled with the run's separator, non-additivity = ||Δ_AB − (Δ_A + Δ_B)||.
    pos = {p: i for i, p in enumerate(res.perturbations)}
    a, b = singles[0], singles[1]
    pair = f"{a}{run.vocab.combo_sep}{b}"
    row = t.set_index("perturbation").loc[pair]
    expected = np.linalg.norm(res.delta[pos[pair]] - res.delta[pos[a]] - res.delta[pos[b]])
    assert row["kind"] == "pair" and row["non_additivity"] == pytest.approx(expected, rel=1e-5)
    assert t.loc[t["kind"] == "single", "non_additivity"].isna().all()
    assert sorted(t["interaction_rank"].dropna()) == [1.0, 2.0, 3.0]
    # Up/down counts and per-gene columns follow the pseudobulk change.
    assert (t["n_up"].to_numpy() == (res.delta > 0.25).sum(1)).all()
    g = genes[0]
    np.testing.assert_allclose(t[f"delta:{g}"], res.delta[:, run.genes.index(g)], rtol=1e-6)
    lowest = t.loc[t[f"delta:{g}"].idxmin()]
    assert lowest[f"rank_lower:{g}"] == 1
    # Measured singles carry their real E-distance; the unmeasured pairs say "predicted".
    measured = t[t["source"] == "measured"]
    assert len(measured) and (measured["n_measured_cells"] > 0).all()
    assert measured["measured_edist"].notna().all()
    assert (t.loc[t["kind"] == "pair", "source"] == "predicted").all()
    h5 = res.to_anndata()
    assert h5.shape == res.delta.shape and list(h5.obs_names) == list(res.perturbations)


def test_screen_bad_input_names_it(trained, prepared_synthetic):
    run = load_run(trained)
    with pytest.raises(DataError, match="'nowhere'.*contexts with controls"):
        screen(run, prepared_synthetic, context="nowhere")
    with pytest.raises(DataError, match="NOPE.*valid perturbations include"):
        screen(run, prepared_synthetic, context="c0", perturbations=["NOPE"])
    with pytest.raises(DataError, match="GENE_X.*valid genes include"):
        screen(run, prepared_synthetic, context="c0", genes=["GENE_X"])
    with pytest.raises(DataError, match="at least two"):
        screen(run, prepared_synthetic, context="c0", pairs_of=[run.perturbations[1]])
    with pytest.raises(DataError, match="n_cells"):
        screen(run, prepared_synthetic, context="c0", n_cells=1)


def test_ranking_check_reports_model_baseline_and_ceiling(trained, prepared_synthetic):
    run = load_run(trained)
    check = screen_ranking_check(run, prepared_synthetic, n_cells=16)
    assert list(check.summary["method"]) == ["model", "perturbation_mean", "split_half"]
    assert check.summary["spearman"].between(-1, 1).all()
    assert check.summary["precision_at_k"].between(0, 1).all()
    assert check.n == len(check.per_perturbation) >= 3
    assert f"On the {check.n} held-out perturbations of c0" in check.sentence()


def test_cli_writes_the_same_table_as_the_function(trained, prepared_synthetic, tmp_path, capsys):
    from statecore.cli.main import main

    run = load_run(trained)
    singles = run.perturbations[1:4]
    out, h5 = tmp_path / "screen.csv", tmp_path / "pb.h5ad"
    argv = ["screen", "--run-dir", str(trained), "--context", "c0", "--pairs-of", ",".join(singles)]
    argv += ["--genes", run.genes[0], "--n-cells", "20", "-o", str(out), "--h5ad-out", str(h5)]
    assert main(argv) == 0
    assert "screened" in capsys.readouterr().out
    cli = pd.read_csv(out)
    res = screen(run, prepared_synthetic, context="c0", pairs_of=singles, genes=[run.genes[0]], n_cells=20)
    pd.testing.assert_frame_equal(cli, res.table, check_dtype=False)
    assert main(["screen", "--run-dir", str(trained), "--context", "zz", "-o", str(out)]) == 2
    assert "error: no control cells" in capsys.readouterr().err


def test_cli_job_dir_status_and_stop(trained, tmp_path):
    import anndata as ad

    from statecore.cli.main import main
    from statecore.runs.files import read_status

    job, cells = tmp_path / "job", tmp_path / "cells.h5ad"
    argv = ["screen", "--run-dir", str(trained), "--context", "c0", "--n-cells", "8", "--job-dir", str(job)]
    assert main([*argv, "--cells-out", str(cells), "--cells-top", "2"]) == 0
    pred = ad.read_h5ad(cells)
    assert pred.obs.loc[pred.obs["predicted"], "perturbation"].astype(str).value_counts().tolist() == [8, 8]
    status = read_status(job)
    assert status["state"] == "done" and status["step"] == status["total"] > 0
    assert (job / "screen.csv").exists() and (job / "pseudobulk.h5ad").exists()
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "STOP").write_text("now")
    argv = ["screen", "--run-dir", str(trained), "--context", "c0", "--chunk", "2", "--job-dir", str(stopped)]
    assert main(argv) == 0
    assert read_status(stopped)["state"] == "cancelled" and not (stopped / "screen.csv").exists()


def test_screen_on_the_embedding_track_with_residual_decode(_prepared_synthetic_master, tmp_path, capsys):
    """Track B (SE embeddings in, decoder out, residual decode): batching still changes nothing."""
    from statecore.cli.main import main

    data = tmp_path / "prep.h5ad"
    _prepared_synthetic_master.write_h5ad(data)
    se, run_dir = tmp_path / "se", tmp_path / "run"
    fit = ["embed", "fit", "--data", str(data), "--run-dir", str(se), "--L", "16", "--hidden-dim", "16"]
    fit += ["--heads", "2", "--layers", "1", "--output-dim", "12", "--n-loss-genes", "16", "--steps", "3"]
    assert main([*fit, "--batch-size", "32", "--num-threads", "1"]) == 0, capsys.readouterr().err
    train = ["train", "--data", str(data), "--run-dir", str(run_dir), "--context", "c0", "--steps", "3"]
    train += ["--set-size", "8", "--batch-size", "2", "--threads", "1", "--quiet", "--embedding-run", str(se)]
    assert main([*train, "--decoder-residual", "on"]) == 0, capsys.readouterr().err
    run = load_run(run_dir)
    perts = run.perturbations[1:5]
    a = screen(run, _prepared_synthetic_master, context="c0", perturbations=perts, n_cells=12, chunk=4)
    b = screen(run, _prepared_synthetic_master, context="c0", perturbations=perts, n_cells=12, chunk=1)
    assert a.delta.shape == (4, len(run.genes))
    pd.testing.assert_frame_equal(a.table, b.table)
