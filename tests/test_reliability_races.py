"""Two starts or two resumes of one run at once launch one worker; stale pids never look alive.

Each trial races several threads (separate open files, so separate flocks) on one run directory,
with a shell worker that appends its pid to ``workers``: one line per trial means one worker.
``STATECORE_RACE_TRIALS=1000`` gives the figure in docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from statecore.runs import jobs

TRIALS = int(os.environ.get("STATECORE_RACE_TRIALS", "8"))
RACERS = 4
# argv: sh -c SCRIPT sh --run-dir DIR  ->  $2 is the run dir
SLEEP = os.environ.get("STATECORE_RACE_SLEEP", "0.3")  # the worker's life in seconds
WORKER = ("/bin/sh", "-c", f'echo + >> "$2/workers"; sleep {SLEEP}; echo - >> "$2/workers"', "sh")


def _race(fn, n: int = RACERS) -> list[object]:
    barrier, results = threading.Barrier(n), [None] * n

    def go(i):
        barrier.wait()
        try:
            results[i] = fn()
        except jobs.JobError as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _workers(run: Path) -> tuple[int, int]:
    """(workers launched, most workers alive at once) from the workers' +/- lines."""
    marks = (run / "workers").read_text().split() if (run / "workers").exists() else []
    depth, most = 0, 0
    for mark in marks:
        depth += 1 if mark == "+" else -1
        most = max(most, depth)
    return marks.count("+"), most


def _wait_idle(run: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while jobs.is_locked(run) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not jobs.is_locked(run)


def test_concurrent_starts_and_resumes_launch_one_worker(tmp_path):
    double = 0
    for trial in range(TRIALS):
        run = tmp_path / f"run{trial}"
        started = _race(lambda run=run: jobs.start(run, [], worker=WORKER, threads=1))
        assert sum(isinstance(r, jobs.RunStatus) for r in started) == 1, started
        time.sleep(0.1)
        _wait_idle(run)
        assert _workers(run) == (1, 1)
        # Resume waits a moment for a finishing worker's lock, so racers may run one after the
        # other; what must never happen is two workers alive at once.
        resumed = _race(lambda run=run: jobs.resume(run, threads=1))
        n_ok = sum(isinstance(r, jobs.RunStatus) for r in resumed)
        time.sleep(0.1)
        _wait_idle(run)
        launched, most = _workers(run)
        assert n_ok >= 1 and launched == 1 + n_ok
        double += most > 1
    assert double == 0


def test_new_run_dir_same_name_same_second(tmp_path):
    made = _race(lambda: jobs.new_run_dir(tmp_path, "same"), n=8)
    assert len({str(p) for p in made}) == 8 and all(p.is_dir() for p in made)
    assert jobs.new_run_dir(tmp_path, "x" * 235).name.startswith("x" * jobs.MAX_RUN_NAME + "-")


def test_lock_is_held_for_the_workers_life_and_freed_by_sigkill(tmp_path):
    run = tmp_path / "r"
    status = jobs.start(run, [], worker=("/bin/sh", "-c", "sleep 30", "sh"), threads=1)
    assert jobs.is_locked(run) and status.live
    with pytest.raises(jobs.JobError, match="in use by a running worker"):
        jobs.resume(run)
    os.killpg(status.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while jobs.poll(run).live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not jobs.is_locked(run) and not jobs.poll(run).live


def test_hold_run_lock_adopts_the_inherited_lock_and_refuses_a_second_worker(tmp_path):
    run = tmp_path / "r"
    code = (
        "import sys, time; from statecore.runs import jobs; "
        "lock = jobs.hold_run_lock(sys.argv[2]); print('held', flush=True); time.sleep(30)"
    )
    status = jobs.start(run, [], worker=(sys.executable, "-c", code), threads=1)
    deadline = time.monotonic() + 60
    while "held" not in jobs.log_tail(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "held" in jobs.log_tail(run) and jobs.is_locked(run)  # adopted, not "in use"
    with pytest.raises(jobs.JobError, match="in use"):
        jobs.hold_run_lock(run)  # a worker started by hand on a busy run
    os.killpg(status.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while jobs.is_locked(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs.hold_run_lock(run).release()  # free again once the worker is gone


def test_permission_error_is_not_taken_as_alive(tmp_path, monkeypatch):
    """After a reboot the recorded pid may belong to another user's process: /proc decides."""
    other = subprocess.Popen(["sleep", "30"])
    try:

        def denied(pid, sig):
            raise PermissionError(1, "Operation not permitted")

        with monkeypatch.context() as m:
            m.setattr(jobs.os, "kill", denied)
            assert not jobs.pid_alive(other.pid, tmp_path / "run")  # alive, but not our worker
    finally:
        other.kill()
        other.wait()
