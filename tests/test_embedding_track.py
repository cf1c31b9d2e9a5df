"""Track B: ST on State Embedding cell embeddings with a gene decoder (statecore.embedding.track)."""

import json

import anndata as ad
import numpy as np
import pytest
import torch

from statecore.cli import main
from statecore.config import SEConfig, STConfig, TrainConfig
from statecore.models.losses import get_loss


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def data_path(prepared_synthetic, tmp_path):
    path = tmp_path / "prep.h5ad"
    prepared_synthetic.write_h5ad(path)
    return path


@pytest.fixture
def se_run(prepared_synthetic, tmp_path):
    from statecore.embedding.se import fit_embedding

    cfg = SEConfig(
        L=16,
        hidden_dim=16,
        gene_feature_dim=8,
        heads=2,
        layers=1,
        output_dim=12,
        n_loss_genes=16,
        batch_cells=32,
    )
    run_dir = tmp_path / "se"
    fit_embedding(
        prepared_synthetic,
        cfg,
        TrainConfig(steps=5, lr=1e-3, warmup_steps=1, val_every=5, log_every=5, num_threads=1),
        run_dir,
    )
    return run_dir


def _tiny_model(D=6, G=5, alpha=0.1):
    from statecore.models.transition import StateTransitionModel

    torch.manual_seed(0)
    return StateTransitionModel(
        STConfig(
            num_genes=D,
            hidden_dim=8,
            transformer_heads=2,
            transformer_layers=1,
            mlp_hidden_dim=16,
            perturbation_dim=3,
            decoder_dim=G,
            decoder_weight=alpha,
            relu_output=False,
            set_size=4,
        )
    )


def _batch(D=6, G=5, B=2, S=4):
    from statecore.embedding.track import EmbeddingSetBatch

    g = torch.Generator().manual_seed(1)
    return EmbeddingSetBatch(
        torch.randn(B, S, D, generator=g),
        torch.eye(3)[:B],
        torch.randn(B, S, D, generator=g),
        torch.full((B, S), -1, dtype=torch.long),
        [0] * B,
        torch.rand(B, S, G, generator=g) * 3,
    )


@pytest.mark.parametrize("alpha", [0.0, 0.1, 2.5])
def test_step_loss_is_emb_plus_alpha_expr(alpha):
    from statecore.embedding.track import step_loss_fn

    model, b = _tiny_model(alpha=alpha), _batch()
    energy = get_loss("energy")
    pred = model(b.x_ctrl, b.z_pert, b.batch_idx)
    total, extra = step_loss_fn(model, energy)(pred, b)
    with torch.no_grad():
        emb = float(energy(pred, b.x_target).mean())
        expr = float(energy(model.decode(pred), b.expr_target).mean())
        dec = float(((model.decode(b.x_target) - b.expr_target) ** 2).mean())
    assert extra["loss_emb"] == pytest.approx(emb, rel=1e-5)
    assert extra["loss_expr"] == pytest.approx(expr, rel=1e-5)
    assert extra["loss_dec"] == pytest.approx(dec, rel=1e-5)
    assert expr > 0.1  # the decoder term is not negligible, so a dropped alpha would show
    assert float(total.detach()) == pytest.approx(emb + alpha * expr + dec, rel=1e-5)
    # ST's own parameters see exactly loss_emb + alpha * loss_expr: the paired decoder term never reaches them
    st_params = [p for n, p in model.named_parameters() if not n.startswith("gene_decoder.")]
    got = torch.autograd.grad(total, st_params, retain_graph=True, allow_unused=True)
    ref_loss = energy(pred, b.x_target).mean() + alpha * energy(model.decode(pred), b.expr_target).mean()
    ref = torch.autograd.grad(ref_loss, st_params, retain_graph=True, allow_unused=True)
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)
    # the set loss in gene space reaches ST exactly when alpha > 0
    w = model.project_out[-1].weight
    g_total = torch.autograd.grad(total, w, retain_graph=True)[0]
    g_emb = torch.autograd.grad(energy(pred, b.x_target).mean(), w, retain_graph=True)[0]
    assert bool((g_total - g_emb).abs().max() > 1e-6) == (alpha > 0)


def test_decoder_warm_up_fits_true_embeddings(prepared_synthetic, se_run):
    """The decoder alone learns (embedding, expression) pairs of the training cells; ST is untouched."""
    from statecore.config import RunConfig
    from statecore.data.splits import make_split
    from statecore.embedding.track import decoder_reconstruction_loss, to_embedding_data, warm_up_decoder
    from statecore.models.transition import StateTransitionModel
    from statecore.training.st_track import make_train_data

    run_cfg = RunConfig().replace(track="embedding", embedding_run=str(se_run))
    run_cfg = run_cfg.replace(split=run_cfg.split.replace(context="c2"))
    split = make_split(prepared_synthetic, run_cfg.split)
    data = make_train_data(prepared_synthetic, split, set_size=8, seed=0)
    data, run_cfg = to_embedding_data(prepared_synthetic, data, run_cfg)
    torch.manual_seed(0)
    model = StateTransitionModel(
        run_cfg.model_config().replace(
            perturbation_dim=data.vocab.dim,
            hidden_dim=16,
            mlp_hidden_dim=32,
            transformer_heads=2,
            transformer_layers=1,
        )
    )
    st_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("gene_decoder.")
    }
    rows = np.arange(prepared_synthetic.n_obs)
    emb = torch.from_numpy(data.train.gather(rows))
    expr = torch.from_numpy(data.train.expr_gather(rows))
    with torch.no_grad():
        before = float(decoder_reconstruction_loss(model, emb, expr))
    losses = warm_up_decoder(model, data.train, steps=60, batch_cells=64, lr=3e-3)
    with torch.no_grad():
        after = float(decoder_reconstruction_loss(model, emb, expr))
    assert len(losses) == 60
    assert after < 0.5 * before
    for n, p in model.named_parameters():
        if n in st_before:
            assert torch.equal(p, st_before[n]), n


def test_hvg_model_has_no_decoder_and_plain_loss():
    from statecore.embedding.track import step_loss_fn
    from statecore.models.transition import StateTransitionModel

    model = StateTransitionModel(
        STConfig(
            num_genes=6,
            hidden_dim=8,
            transformer_heads=2,
            transformer_layers=1,
            mlp_hidden_dim=16,
            perturbation_dim=3,
        )
    )
    assert model.gene_decoder is None
    b = _batch()
    with torch.no_grad():
        pred = model(b.x_ctrl, b.z_pert, b.batch_idx)
        loss, extra = step_loss_fn(model, get_loss("energy"))(pred, b)
    assert extra == {} and float(loss) == pytest.approx(float(get_loss("energy")(pred, b.x_target).mean()))
    with pytest.raises(ValueError, match="no gene decoder"):
        model.decode(pred)


def test_track_b_end_to_end_and_checkpoint_round_trip(data_path, se_run, tmp_path, capsys):
    from statecore.inference.predict import predict
    from statecore.runs.files import read_lines, read_metrics
    from statecore.training.checkpoint import load_run

    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(data_path),
        "--run-dir",
        str(run),
        "--task",
        "underrepresented",
        "--context",
        "c0",
        "--steps",
        "6",
        "--set-size",
        "8",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--track",
        "embedding",
        "--embedding-run",
        str(se_run),
        "--decoder-weight",
        "0.5",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("done: step 6")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["track"] == "embedding" and cfg["embedding_run"] == str(se_run.resolve())
    assert cfg["shapes"]["num_genes"] == 12 and cfg["shapes"]["decoder_dim"] == 100  # D, and the 100 HVGs
    assert cfg["model"]["decoder_weight"] == 0.5 and cfg["model"]["relu_output"] is False
    rows = [r for r in read_metrics(run) if "loss_emb" in r]
    assert rows, "metrics.jsonl logs loss_emb / loss_expr on the embedding track"
    for r in rows:  # the logged loss is the step's total, with alpha applied
        assert r["loss"] == pytest.approx(r["loss_emb"] + 0.5 * r["loss_expr"] + r["loss_dec"], rel=1e-4)

    # resume extends the same run (embeddings recomputed deterministically)
    assert main([*argv[: argv.index("--steps")], "--steps", "8", *argv[argv.index("--steps") + 2 :]]) == 0
    assert "step 8" in capsys.readouterr().out

    pred_p, real_p = tmp_path / "pred.h5ad", tmp_path / "real.h5ad"
    assert (
        main(
            [
                "predict",
                "--run-dir",
                str(run),
                "--split",
                "test",
                "-o",
                str(pred_p),
                "--real-out",
                str(real_p),
            ]
        )
        == 0
    )
    pred, real = ad.read_h5ad(pred_p), ad.read_h5ad(real_p)
    genes = read_lines(run / "genes.txt")
    assert list(pred.var_names) == list(real.var_names) == genes and len(genes) == 100
    assert pred.obs["predicted"].any() and (~pred.obs["predicted"]).any()
    perturbed = pred.X[pred.obs["predicted"].to_numpy()]
    assert np.isfinite(perturbed).all() and perturbed.min() >= 0  # decoded log1p expression
    assert set(pred.obs["perturbation"].astype(str)) == set(real.obs["perturbation"].astype(str))

    # checkpoint round trip: two independent loads predict identically; weights include the decoder
    adata = ad.read_h5ad(data_path)
    one, two = load_run(run), load_run(run)
    assert any(k.startswith("gene_decoder.") for k in one.model.state_dict())
    assert one.embedding is not None and one.embedding.config.output_dim == 12
    kw = dict(context="c1", perturbations=["P001", "P002"], n_cells=10, seed=3)
    a, b = predict(one, adata, **kw), predict(two, adata, **kw)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.n_vars == 100 and int(a.obs["predicted"].sum()) == 20

    # residual decode: a model that predicts its input embeddings unchanged returns the control cells themselves
    import torch

    from statecore.models.transition import StateTransitionModel

    ident = StateTransitionModel(
        one.model.cfg.replace(decoder_residual=True, residual="expression", relu_output=False)
    )
    with torch.no_grad():
        ident.project_out[-1].weight.zero_()
        ident.project_out[-1].bias.zero_()
    ident.gene_decoder.load_state_dict(one.model.gene_decoder.state_dict())
    one.model = ident.eval()
    ctrl_rows = np.flatnonzero(
        (adata.obs["context"].astype(str) == "c1").to_numpy()
        & (adata.obs["perturbation"].astype(str) == "ctrl").to_numpy()
    )
    res = predict(one, adata, context="c1", perturbations=["P001"], control_cells=ctrl_rows, seed=3)
    moved = res.X[res.obs["predicted"].to_numpy()]
    controls = res.X[~res.obs["predicted"].to_numpy()]
    np.testing.assert_allclose(np.sort(moved, axis=0), np.sort(controls, axis=0), atol=1e-5)


def test_embedding_track_errors(data_path, tmp_path, capsys):
    base = [
        "train",
        "--data",
        str(data_path),
        "--run-dir",
        str(tmp_path / "r"),
        "--context",
        "c0",
        "--steps",
        "1",
        "--quiet",
    ]
    assert main([*base, "--track", "embedding"]) == 2
    assert "--embedding-run" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--embedding-run", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "embed fit" in err and err.count("\n") == 1


@pytest.mark.slow
def test_train_page_offers_and_starts_the_embedding_track(se_run, data_path, tmp_path, monkeypatch):
    """App path: an SE run in the runs folder makes the Train page offer Track B, and its worker trains it."""
    import shutil
    from pathlib import Path

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from statecore.runs import jobs

    root = Path(__file__).resolve().parents[1]
    runs = tmp_path / "runs"
    shutil.copytree(se_run, runs / "se-small")
    monkeypatch.setenv("STATECORE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("STATECORE_RUNS", str(runs))
    monkeypatch.chdir(root)
    at = AppTest.from_file(str(root / "app.py"), default_timeout=180)
    at.session_state["sc_prepared"] = {"path": str(data_path), "qc": {}, "n_obs": 400, "n_vars": 120}
    at.run()
    at.switch_page("pages/3_Train.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "State Embedding" in at.radio(key="train_track").options
    at.radio(key="train_track").set_value("State Embedding").run()
    at.number_input(key="train_steps").set_value(4)
    at.number_input(key="train_set_size").set_value(8)
    at.number_input(key="train_batch").set_value(2)
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    run = next(r.run_dir for r in jobs.list_runs(runs) if r.name != "se-small")
    try:
        final = jobs.wait(run, 240)
        assert final.state == "done", (final, jobs.log_tail(run))
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["track"] == "embedding" and cfg["embedding_run"] == str((runs / "se-small").resolve())
    finally:
        jobs.cancel(run, kill_after_s=10)


def test_decoder_weight_is_validated(data_path, se_run, tmp_path, capsys):
    base = [
        "train",
        "--data",
        str(data_path),
        "--run-dir",
        str(tmp_path / "r"),
        "--context",
        "c0",
        "--steps",
        "1",
        "--quiet",
    ]
    assert main([*base, "--embedding-run", str(se_run), "--decoder-weight", "-1"]) == 2
    assert "--decoder-weight" in capsys.readouterr().err
    assert main([*base, "--decoder-weight", "0.3"]) == 2  # HVG track: no decoder to weigh
    assert "--track embedding" in capsys.readouterr().err
