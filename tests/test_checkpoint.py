import os
import pickle

import pytest
import torch

from statecore.errors import CheckpointError
from statecore.models.transition import StateTransitionModel
from statecore.training.checkpoint import load_model_weights, read_weights, save_weights

SMALL = dict(
    num_genes=12,
    hidden_dim=8,
    transformer_heads=2,
    transformer_layers=1,
    mlp_hidden_dim=16,
    perturbation_dim=3,
)


def test_round_trip_identical_predictions(tmp_path):
    torch.manual_seed(0)
    m = StateTransitionModel(**SMALL).eval()
    save_weights(tmp_path / "model.safetensors", m, {"genes": [f"g{i}" for i in range(12)]})
    m2 = StateTransitionModel(**SMALL).eval()
    meta = load_model_weights(m2, tmp_path / "model.safetensors")
    assert meta["meta"]["genes"][0] == "g0" and meta["config"]["hidden_dim"] == 8
    x, z = torch.rand(2, 5, 12), torch.rand(2, 3)
    assert torch.equal(m(x, z), m2(x, z))


def test_shape_mismatch_is_clear(tmp_path):
    save_weights(tmp_path / "m.safetensors", StateTransitionModel(**SMALL), {})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model_weights(StateTransitionModel(**{**SMALL, "num_genes": 13}), tmp_path / "m.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_pickle_named_like_checkpoint_executes_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    for name in ("model.safetensors", "last.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps(_Evil()))
    # also a torch.save-style zip file
    torch.save({"x": _Evil()}, tmp_path / "train_state.safetensors")
    for name in ("model.safetensors", "last.safetensors", "train_state.safetensors"):
        with pytest.raises(CheckpointError, match="never loads pickled"):
            read_weights(tmp_path / name)
    assert not marker.exists()


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    import os
    import subprocess

    from statecore.training.checkpoint import remove_stale_temp_files, temp_file_pid

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        f".train_state.safetensors.{dead.pid}.2e667c49.tmp": True,  # checkpoint write, writer gone
        f".status.json.{dead.pid}.tmp": True,  # JSON write, writer gone
        f".last.safetensors.{dead.pid}.12345678.tmp": True,  # an all-digit random part
        f".status.json.{os.getpid()}.tmp": False,  # this process: not stale
        f".best.safetensors.{os.getppid()}.0badc0de.tmp": False,  # a live writer
        ".odd.tmp": False,  # no pid: not ours to judge
    }
    for name in names:
        (tmp_path / name).write_text("x")
    assert temp_file_pid(tmp_path / f".last.safetensors.{dead.pid}.12345678.tmp") == dead.pid
    removed = {p.name for p in remove_stale_temp_files(tmp_path)}
    assert removed == {n for n, stale in names.items() if stale}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, stale in names.items() if not stale}
