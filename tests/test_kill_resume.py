"""SIGKILL a training worker at a random moment, many times: no corrupt file, and every resume continues
from the last complete checkpoint (docs/RELIABILITY.md). ``STATECORE_KILL_TRIALS`` sets the count."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from statecore.runs.files import read_json, read_metrics
from statecore.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "statecore", "train", "--data", str(data), "--run-dir", str(run)]
    cmd += ["--context", "c0", "--task", "underrepresented", "--steps", "60", "--set-size", "8"]
    cmd += ["--batch-size", "2", "--threads", "1", "--quiet"]
    # checkpoints often, so kills land between and inside checkpoint writes
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def _check_consistent(run: Path) -> int | None:
    """Every file readable; returns the resume point (None: a clean restart is due)."""
    for name in ("config.json", "status.json", "train_state.json", "split.json"):
        if (run / name).exists():
            assert read_json(run / name) is not None, f"{name} is corrupt"
    for name in (ckpt.LAST, ckpt.BEST, ckpt.TRAIN_STATE):
        if (run / name).exists():
            ckpt.read_weights(run / name)  # raises on a torn file
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
    return ckpt.resume_point(run)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(prepared_synthetic, tmp_path):
    data = tmp_path / "p.h5ad"
    prepared_synthetic.write_h5ad(data)
    run = tmp_path / "run"
    rng = random.Random(0)
    trials = int(os.environ.get("STATECORE_KILL_TRIALS", "20"))
    resumed_from = []
    for _ in range(trials):
        point = _check_consistent(run) if run.exists() else None
        proc = _train(data, run)
        time.sleep(rng.uniform(2.0, 9.0))  # imports take ~2-4 s: kills land in start-up, training and writes
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if point is not None:
            steps = [r["step"] for r in read_metrics(run)]
            assert steps == sorted(set(steps)), "duplicated metrics lines after a resume"
            resumed_from.append(point)
    _check_consistent(run)
    done = _train(data, run)
    assert done.wait(timeout=600) == 0, done.stderr.read().decode()[-2000:]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [10, 20, 30, 40, 50, 60], steps  # logged every 10 steps, each once
    assert read_json(run / "status.json")["state"] == "done"
    print(f"{trials} kills; resume points seen: {resumed_from}")
