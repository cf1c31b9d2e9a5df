import json

import pytest
import torch

from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
from statecore.runs.files import read_metrics, read_status
from statecore.training.engine import lr_at, train_run

MODEL = STConfig(hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=32, set_size=8)


def _cfg(steps=20, **train):
    t = TrainConfig(
        steps=steps, batch_size=4, val_every=10, log_every=1, num_threads=1, warmup_steps=5, lr=3e-3, **train
    )
    return RunConfig(split=SplitConfig(task="underrepresented", context="c0"), model=MODEL, train=t)


def test_few_steps_lower_loss_and_write_run_files(prepared_synthetic, tmp_path):
    res = train_run(prepared_synthetic, _cfg(steps=40), tmp_path / "run")
    first = sum(v for _, v in res.losses[:5]) / 5
    last = sum(v for _, v in res.losses[-5:]) / 5
    assert last < first
    run = tmp_path / "run"
    for name in (
        "config.json",
        "split.json",
        "status.json",
        "metrics.jsonl",
        "genes.txt",
        "perturbations.txt",
        "contexts.txt",
        "model.safetensors",
        "last.safetensors",
        "train_state.safetensors",
    ):
        assert (run / name).exists(), name
    assert not (run / "train_state.json").exists()  # the resume state is one file now
    status = read_status(run)
    assert status["state"] == "done" and status["step"] == 40 and status["error"] is None
    assert status["best_val"] is not None
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 41))
    assert "val_loss" in recs[9] and {"loss", "lr", "cells_per_s", "eta_s", "time"} <= set(recs[0])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["shapes"]["num_genes"] == len((run / "genes.txt").read_text().split())


def test_resume_reproduces_uninterrupted_curve(prepared_synthetic, tmp_path):
    full = train_run(prepared_synthetic, _cfg(steps=24), tmp_path / "a")
    part = train_run(prepared_synthetic, _cfg(steps=24, max_minutes=1e-9), tmp_path / "b")  # stops at once
    assert part.step == 0

    # stop after 11 steps via the STOP file, from a hook
    def stopper(p):
        if p.step == 11:
            (tmp_path / "c" / "STOP").touch()

    stopped = train_run(prepared_synthetic, _cfg(steps=24), tmp_path / "c", hook=stopper)
    assert stopped.state == "cancelled" and stopped.step == 11
    assert read_status(tmp_path / "c")["state"] == "cancelled"
    (tmp_path / "c" / "STOP").unlink()
    resumed = train_run(prepared_synthetic, _cfg(steps=24), tmp_path / "c")
    assert resumed.state == "done" and resumed.losses[0][0] == 12
    curve = [r["loss"] for r in read_metrics(tmp_path / "c")]
    assert len(curve) == 24
    assert curve == pytest.approx([v for _, v in full.losses], rel=1e-4, abs=1e-5)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert torch.get_num_threads() >= 1
