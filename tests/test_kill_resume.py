"""SIGKILL a training worker at a random moment, many times: no corrupt file, and every resume continues
from the last complete checkpoint (docs/RELIABILITY.md). ``STATECORE_KILL_TRIALS`` sets the count."""

from __future__ import annotations

import json
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


STEPS = 1500  # far more than 20 short lives can reach: every life after the first is a real resume


def _config(data: Path, adata, tmp: Path) -> Path:
    """A RunConfig that checkpoints every 10 steps, so kills land between and inside checkpoint writes."""
    from statecore.cli.main import build_parser
    from statecore.cli.train import config_from_args

    args = build_parser().parse_args(
        ["train", "--data", str(data), "--run-dir", str(tmp / "unused"), "--context", "c0",
         "--task", "underrepresented", "--set-size", "8", "--batch-size", "2"]
    )  # fmt: skip
    cfg = config_from_args(args, adata)
    train = cfg.train.replace(
        steps=STEPS, batch_size=2, ckpt_every_steps=10, log_every=10, val_every=50, num_threads=1
    )
    path = tmp / "cfg.json"
    path.write_text(json.dumps(cfg.replace(train=train).to_dict()))
    return path


def _train(cfg: Path, run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "statecore", "train", "--config", str(cfg), "--run-dir", str(run), "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def _step(run: Path, since: float) -> int:
    """The step this life reported (status.json written after ``since``), 0 before it reports."""
    path = run / "status.json"
    if not path.exists() or path.stat().st_mtime < since:
        return 0
    status = read_json(path)
    return int(status.get("step", 0)) if isinstance(status, dict) else 0


def _check_consistent(run: Path, killed: set[int] = frozenset()) -> int | None:
    """Every file readable, and no temporary file but those of lives killed since the last life that got
    to train (``killed``: their pids; a SIGKILL mid-write leaves one, and the next life that starts
    removes it); returns the resume point (None: a clean restart is due)."""
    for name in ("config.json", "status.json", "train_state.json", "split.json"):
        if (run / name).exists():
            assert read_json(run / name) is not None, f"{name} is corrupt"
    for name in (ckpt.LAST, ckpt.BEST, ckpt.TRAIN_STATE):
        if (run / name).exists():
            ckpt.read_weights(run / name)  # raises on a torn file
    stale = [p.name for p in run.glob(".*.tmp") if ckpt.temp_file_pid(p) not in killed]
    assert not stale, f"temporary files of earlier lives left behind: {stale}"
    return ckpt.resume_point(run)


def _kill_sometime(proc: subprocess.Popen, run: Path, rng: random.Random, floor: int) -> bool:
    """One life in five dies during start-up; the others once this life has written the checkpoint after
    ``floor`` (status.json is rewritten right after each save), at a random moment up to 1.5 s later
    (mid-step, mid-log or mid-checkpoint). Returns whether this life got to train."""
    since = time.time()
    trained = False
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0.3, 3.0))
    else:
        deadline = time.monotonic() + 300
        while _step(run, since) < floor + 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        trained = _step(run, since) >= floor + 10
        time.sleep(rng.uniform(0.0, 1.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return trained


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(prepared_synthetic, tmp_path):
    data = tmp_path / "p.h5ad"
    prepared_synthetic.write_h5ad(data)
    cfg = _config(data, prepared_synthetic, tmp_path)
    run = tmp_path / "run"
    rng = random.Random(0)
    trials = int(os.environ.get("STATECORE_KILL_TRIALS", "20"))
    points, pending = [], set()
    for _ in range(trials):
        point = _check_consistent(run, killed=pending) if run.exists() else None
        proc = _train(cfg, run)
        trained = _kill_sometime(proc, run, rng, floor=point or 0)
        pending = {proc.pid} if trained else pending | {proc.pid}
        after = _check_consistent(run, killed=pending)
        steps = [r["step"] for r in read_metrics(run)] if run.exists() else []
        # metrics continue from the checkpoint: every 10 steps, each once, no gap
        assert steps == list(range(10, 10 * len(steps) + 1, 10)), steps
        if point is not None:
            # a resume continues from its last checkpoint: it never goes back
            assert after is not None and after >= point, (point, after)
            points.append(point)
    assert len({p for p in points if 0 < p < STEPS}) >= trials // 2, points  # resumes really happened
    done = _train(cfg, run)
    assert done.wait(timeout=900) == 0, done.stderr.read().decode()[-2000:]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(10, STEPS + 1, 10)), steps[-5:]
    assert not list(run.glob(".*.tmp")), "the last life did not clear the killed lives' temporary files"
    assert read_json(run / "status.json")["state"] == "done"
    print(f"{trials} kills; resume points: {points}")
