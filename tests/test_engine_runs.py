"""The one training engine: clean restarts, byte-stable checkpoints, early stopping, old run directories,
and SE runs trained, stopped and resumed exactly like ST runs."""

from __future__ import annotations

import json

import torch

from statecore.config import RunConfig, SEConfig, SplitConfig, STConfig, TrainConfig
from statecore.runs.files import read_metrics, read_status
from statecore.training import checkpoint as ckpt
from statecore.training.engine import train_run

MODEL = STConfig(
    hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=32, set_size=8, shift_prior=True
)


def _cfg(steps=12, **train):
    base = dict(steps=steps, batch_size=4, val_every=6, log_every=1, num_threads=1, warmup_steps=2, lr=3e-3)
    t = TrainConfig(**{**base, **train})
    return RunConfig(split=SplitConfig(task="underrepresented", context="c0"), model=MODEL, train=t)


def test_incomplete_training_state_restarts_cleanly_with_the_prior(prepared_synthetic, tmp_path):
    """A crash that left weights but no training state: no resume from step 0 with a zeroed prior."""
    run = tmp_path / "r"
    train_run(prepared_synthetic, _cfg(steps=6), run)
    (run / ckpt.TRAIN_STATE).unlink()  # the crash left weights but no optimizer state
    assert ckpt.resume_point(run) is None
    res = train_run(prepared_synthetic, _cfg(steps=6), run)
    assert res.losses[0][0] == 1  # started over
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))  # no duplicated lines
    loaded = ckpt.load_run(run)
    assert loaded.model.pert_shift.abs().sum() > 0  # the shift prior was rebuilt, not zeros


def test_resume_state_is_one_file_whatever_last_safetensors_holds(prepared_synthetic, tmp_path):
    """A kill between the training state's write and last.safetensors' (either order) must not force a
    restart: the resume state is one atomically written file, which also holds the weights."""
    run = tmp_path / "r"
    train_run(prepared_synthetic, _cfg(steps=6, ckpt_every_steps=3), run)
    stale = tmp_path / "last_at_3.safetensors"
    train_run(prepared_synthetic, _cfg(steps=3), tmp_path / "r3")
    (tmp_path / "r3" / ckpt.LAST).replace(stale)
    stale.replace(run / ckpt.LAST)  # last.safetensors one checkpoint behind the training state
    assert ckpt.resume_point(run) == 6
    res = train_run(prepared_synthetic, _cfg(steps=8), run)
    ref_run = tmp_path / "intact"
    train_run(prepared_synthetic, _cfg(steps=6, ckpt_every_steps=3), ref_run)
    ref = train_run(prepared_synthetic, _cfg(steps=8), ref_run)  # the same resume, last.safetensors intact
    assert res.losses == ref.losses  # resumed from the state's own weights, not the stale file


def test_identical_runs_write_identical_checkpoint_bytes(prepared_synthetic, tmp_path):
    for name in ("a", "b"):
        train_run(prepared_synthetic, _cfg(steps=4), tmp_path / name)
    for f in (ckpt.BEST, ckpt.LAST):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_early_stopping_keeps_the_best_checkpoint(prepared_synthetic, tmp_path):
    cfg = _cfg(steps=400, patience=1, lr=0.5)  # a step size that cannot keep improving validation
    res = train_run(prepared_synthetic, cfg.replace(train=cfg.train.replace(val_every=2)), tmp_path / "r")
    assert res.step < 400 and res.reason.startswith("early stop"), res.reason
    assert read_status(tmp_path / "r")["state"] == "done"
    assert res.best_val == min(v for _, v in res.val_losses)


def test_runs_written_before_the_shapes_split_still_load(prepared_synthetic, tmp_path):
    run = tmp_path / "r"
    train_run(prepared_synthetic, _cfg(steps=3), run)
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg["shapes"]) >= {"num_genes", "perturbation_dim"} and "num_genes" not in cfg["model"]
    cfg["model"].update(cfg.pop("shapes"))  # the older layout: one model dict
    (run / "config.json").write_text(json.dumps(cfg))
    loaded = ckpt.load_run(run)
    assert loaded.config.model_config().num_genes == len(loaded.genes)


def _se_config(steps: int) -> RunConfig:
    se = SEConfig(L=16, hidden_dim=16, gene_feature_dim=8, heads=2, layers=1, output_dim=8, n_loss_genes=16)
    train = TrainConfig(steps=steps, lr=1e-3, warmup_steps=1, val_every=3, log_every=1, num_threads=1)
    return RunConfig(track="se", se=se.replace(batch_cells=16), train=train)


def test_se_runs_stop_and_resume_like_st_runs(prepared_synthetic, tmp_path):
    from statecore.embedding.se import load_embedding

    full = train_run(prepared_synthetic, _se_config(8), tmp_path / "full")

    def stopper(p):
        if p.step == 4:
            (tmp_path / "part" / "STOP").touch()

    part = train_run(prepared_synthetic, _se_config(8), tmp_path / "part", hook=stopper)
    assert part.state == "cancelled" and part.step == 4
    assert read_status(tmp_path / "part")["state"] == "cancelled"
    (tmp_path / "part" / "STOP").unlink()
    resumed = train_run(prepared_synthetic, _se_config(8), tmp_path / "part")
    assert resumed.state == "done" and resumed.losses[0][0] == 5
    curve = [r["loss"] for r in read_metrics(tmp_path / "part")]
    assert curve == [v for _, v in full.losses]  # the same batches, the same curve
    a, b = load_embedding(tmp_path / "full"), load_embedding(tmp_path / "part")
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), n


def test_se_runs_written_before_runconfig_still_load(prepared_synthetic, tmp_path):
    from statecore.embedding.se import load_embedding, transform

    run = tmp_path / "se"
    train_run(prepared_synthetic, _se_config(3), run)
    cfg = json.loads((run / "config.json").read_text())
    legacy = {
        "kind": "embedding",
        "data_path": "",
        "se": cfg["se"],
        "train": cfg["train"],
        "tiebreak_seed": 0,
    }
    legacy["train"]["batch_size"] = legacy["se"].pop("batch_cells")
    legacy["se"].pop("hvg_only")
    (run / "config.json").write_text(json.dumps(legacy))
    loaded = load_embedding(run)
    assert loaded.config.batch_cells == 16
    assert transform(loaded, prepared_synthetic[:5]).shape == (5, 8)


def test_validation_logs_pearson_delta_and_a_short_run_still_has_a_model(prepared_synthetic, tmp_path):
    train_run(prepared_synthetic, _cfg(steps=6), tmp_path / "a")
    val_rows = [r for r in read_metrics(tmp_path / "a") if "val_loss" in r]
    assert val_rows and all(-1.0 <= r["val_pearson_delta"] <= 1.0 for r in val_rows)

    def stop_early(p):  # as a time budget would: before the first validation
        if p.step == 3:
            (tmp_path / "b" / "STOP").touch()

    res = train_run(prepared_synthetic, _cfg(steps=6), tmp_path / "b", hook=stop_early)
    assert res.step == 3 and res.best_val is None and (tmp_path / "b" / ckpt.BEST).exists()


def test_cli_ensemble_trains_members_with_their_own_seeds_on_one_split(prepared_synthetic, tmp_path):
    from statecore.cli.main import main
    from statecore.ui.training import ensemble_configs, member_dir

    data = tmp_path / "p.h5ad"
    prepared_synthetic.write_h5ad(data)
    args = ["train", "--data", str(data), "--run-dir", str(tmp_path / "r"), "--context", "c0", "--steps", "2"]
    args += [
        "--set-size",
        "8",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--ensemble",
        "2",
        "--seed",
        "3",
    ]
    assert main(args) == 0
    a, b = ckpt.read_config(tmp_path / "r"), ckpt.read_config(tmp_path / "r-seed1")
    assert (a.train.seed, b.train.seed) == (3, 4) and a.split == b.split
    assert (tmp_path / "r" / "split.json").read_text() == (tmp_path / "r-seed1" / "split.json").read_text()
    members = ensemble_configs(a, 3)
    assert [m.train.seed for m in members] == [3, 4, 5] and member_dir(tmp_path / "r", 2).name == "r-seed2"


def test_a_second_worker_on_a_locked_run_is_refused(prepared_synthetic, tmp_path, capsys):
    from statecore.cli.main import main
    from statecore.runs.jobs import hold_run_lock

    data = tmp_path / "p.h5ad"
    prepared_synthetic.write_h5ad(data)
    held = hold_run_lock(tmp_path / "r")  # a worker already owns the run
    try:
        args = ["train", "--data", str(data), "--run-dir", str(tmp_path / "r"), "--context", "c0"]
        assert main([*args, "--steps", "1", "--set-size", "8", "--threads", "1", "--quiet"]) == 2
        assert "in use" in capsys.readouterr().err
        assert not (tmp_path / "r" / "status.json").exists()
    finally:
        held.release()
