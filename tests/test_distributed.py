"""DistributedDataParallel on CPU (gloo): two processes reproduce single-process training exactly."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
from statecore.data.sets import PerturbationVocab, SetDataset, build_groups
from statecore.errors import DataError
from statecore.runs.files import read_metrics, read_status
from statecore.training import distributed
from statecore.training.checkpoint import read_weights

MODEL = STConfig(hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=32, set_size=8)


def _cfg(steps: int) -> RunConfig:
    t = TrainConfig(
        steps=steps,
        batch_size=4,
        val_every=3,
        log_every=1,
        num_threads=1,
        warmup_steps=2,
        lr=3e-3,
        device="cpu",
        ckpt_every_steps=100,
    )
    return RunConfig(split=SplitConfig(task="underrepresented", context="c0"), model=MODEL, train=t)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, h5ad: str, out: str) -> None:
    """One rank: a full 6-step run, then a 3-step run resumed to 6 steps, and a flag agreement."""
    import anndata as ad

    from statecore.training.engine import train_run

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    adata = ad.read_h5ad(h5ad)
    with distributed.session("cpu") as info:
        assert info.world_size == world and distributed.current().rank == rank
        train_run(adata, _cfg(6), os.path.join(out, "full"))
        train_run(adata, _cfg(3), os.path.join(out, "resumed"))
        res = train_run(adata, _cfg(6), os.path.join(out, "resumed"))
        agreed = distributed.any_true(rank == world - 1)  # only the last rank asks to stop
        mean = distributed.mean_scalar(float(rank))
        same = [distributed.same_on_all(7), distributed.same_on_all(rank)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"agreed": agreed, "mean": mean, "same": same, "first_resumed_step": res.losses[0][0]}, fh)


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_two_gloo_ranks_match_single_process(prepared_synthetic, tmp_path):
    from statecore.training.engine import train_run

    h5ad = tmp_path / "data.h5ad"
    prepared_synthetic.write_h5ad(h5ad)
    torch.multiprocessing.spawn(
        _worker, args=(2, _free_port(), str(h5ad), str(tmp_path)), nprocs=2, join=True
    )

    torch.set_num_threads(1)
    single = train_run(prepared_synthetic, _cfg(6), tmp_path / "single")
    assert single.state == "done"

    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info["agreed"] is True and info["mean"] == pytest.approx(0.5)
        assert info["same"] == [True, False]
        assert info["first_resumed_step"] == 4
    # rank 0 wrote the run directory, with the same loss curve as one process on the whole batch
    for name in ("full", "resumed"):
        assert read_status(tmp_path / name)["state"] == "done"
        assert len(_losses(tmp_path / name)) == 6
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "single"), rel=1e-4, abs=1e-6)
    w_single, _ = read_weights(tmp_path / "single" / "last.safetensors")
    for name in ("full", "resumed"):
        w_ddp, _ = read_weights(tmp_path / name / "last.safetensors")
        assert set(w_ddp) == set(w_single)
        for key, value in w_single.items():
            # The gradients agree to float rounding (different reduction order); Adam divides each
            # gradient by its own running RMS, so near-zero entries can move by up to ~lr per step.
            torch.testing.assert_close(w_ddp[key], value, rtol=1e-3, atol=1e-3)
    assert _losses(tmp_path / "single")[-1] < _losses(tmp_path / "single")[0]  # training did move the weights
    assert not list(tmp_path.glob("full/.*.tmp"))  # only one writer: no leftover temporary files


def test_rank_slices_partition_the_global_batch(prepared_synthetic):
    a = prepared_synthetic
    groups = build_groups(a, control="ctrl")
    vocab = PerturbationVocab.from_labels(a.obs["perturbation"].astype(str), "ctrl")
    ds = SetDataset(a, groups, genes=list(a.var_names[:20]), vocab=vocab, set_size=8, seed=3)
    for step in (0, 7):
        whole = ds.batch(step, 6)
        parts = [ds.batch(step, 6, rank=r, world_size=3) for r in range(3)]
        assert [g for p in parts for g in p.groups] == whole.groups
        np.testing.assert_array_equal(torch.cat([p.x_target for p in parts]).numpy(), whole.x_target.numpy())
        np.testing.assert_array_equal(torch.cat([p.x_ctrl for p in parts]).numpy(), whole.x_ctrl.numpy())
    with pytest.raises(DataError, match="multiple"):
        ds.batch(0, 5, rank=0, world_size=2)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.env_info() == distributed.DistInfo()
    with distributed.session("cpu") as info:
        assert not info.enabled and info.is_main
        assert distributed.any_true(True) and not distributed.any_true(False)
        assert distributed.mean_scalar(2.5) == 2.5
        distributed.barrier()
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda") == "nccl"


def test_missing_master_address_is_a_clear_error(monkeypatch):
    from statecore.errors import StatecoreError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(StatecoreError, match="MASTER_ADDR"):
        distributed.setup("cpu")
