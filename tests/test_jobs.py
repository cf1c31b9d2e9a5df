"""The background-run manager against a tiny fake worker that honours the run-directory contract.

The contract is the directory (status.json, metrics.jsonl, STOP, SIGTERM, resume from last state),
so the manager is tested without torch: the fake worker below writes exactly what the trainer does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from statecore.runs import jobs

FAKE_WORKER = textwrap.dedent(
    """
    import argparse, json, os, signal, sys, time
    from datetime import datetime, timezone
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir"); p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sleep", type=float, default=0.05); p.add_argument("--crash-at", type=int, default=-1)
    p.add_argument("--startup", type=float, default=0.0)
    a = p.parse_args()
    d = a.run_dir
    def now(): return datetime.now(timezone.utc).isoformat()
    def write(name, obj):
        tmp = os.path.join(d, "." + name + ".tmp")
        with open(tmp, "w") as fh: json.dump(obj, fh)
        os.replace(tmp, os.path.join(d, name))
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    time.sleep(a.startup)
    last = os.path.join(d, "last.json")
    step = json.load(open(last))["step"] if os.path.exists(last) else 0
    print("threads", os.environ.get("OMP_NUM_THREADS"), "start at", step, flush=True)
    base = dict(total=a.steps, started=now(), pid=os.getpid(), error=None, best_val=None,
                eta_s=None, cells_per_s=100.0)
    while step < a.steps:
        if stop["flag"] or os.path.exists(os.path.join(d, "STOP")):
            write("last.json", {"step": step})
            write("status.json", dict(base, state="cancelled", step=step, updated=now()))
            sys.exit(0)
        if step == a.crash_at:
            raise RuntimeError("boom: fake worker crashed at step %d" % step)
        step += 1
        with open(os.path.join(d, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps({"step": step, "loss": 1.0 / step, "time": time.time()}) + "\\n")
        write("status.json", dict(base, state="running", step=step, updated=now(), eta_s=a.sleep * (a.steps - step)))
        time.sleep(a.sleep)
    open(os.path.join(d, "model.safetensors"), "wb").close()
    write("status.json", dict(base, state="done", step=step, updated=now(), eta_s=0.0))
    """
)


@pytest.fixture()
def worker(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


def _wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_start_poll_to_done(tmp_path, worker):
    run = tmp_path / "runs" / "a"
    first = jobs.start(run, ["--steps", "5", "--sleep", "0.02"], worker=worker, threads=1)
    assert first.state in ("queued", "running")
    final = jobs.wait(run, 30)
    assert final.state == "done" and final.step == 5 and final.total == 5 and final.progress == 1.0
    assert final.has_model and not final.resumable
    rows = jobs.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    log = (run / "log.txt").read_text()
    assert "threads 1" in log  # the thread budget reached the worker
    job = json.loads((run / "job.json").read_text())
    assert job["argv"][-4:] == ["--steps", "5", "--sleep", "0.02"] and "--run-dir" in job["argv"]


def test_queued_before_first_status(tmp_path, worker):
    run = tmp_path / "q"
    status = jobs.start(run, ["--startup", "1.0", "--steps", "2"], worker=worker, threads=1)
    assert status.state == "queued" and status.step == 0
    assert jobs.wait(run, 30).state == "done"


def test_cancel_then_resume_continues(tmp_path, worker):
    run = tmp_path / "c"
    jobs.start(run, ["--steps", "400", "--sleep", "0.02"], worker=worker, threads=1)
    _wait_for(lambda: jobs.poll(run).step >= 3)
    jobs.cancel(run)
    cancelled = jobs.wait(run, 20)
    assert cancelled.state == "cancelled" and cancelled.resumable
    stopped_at = cancelled.step
    assert 3 <= stopped_at < 400
    resumed = jobs.resume(run, threads=1)
    assert resumed.state in ("queued", "running")
    assert not (run / "STOP").exists()  # the stop request is cleared for the new worker
    _wait_for(lambda: jobs.poll(run).step > stopped_at + 2)
    assert f"start at {stopped_at}" in (run / "log.txt").read_text()
    jobs.cancel(run, kill_after_s=10)
    assert jobs.wait(run, 20).state == "cancelled"
    assert json.loads((run / "job.json").read_text())["launches"] == 2


def test_resume_refuses_live_and_unknown_runs(tmp_path, worker):
    run = tmp_path / "live"
    jobs.start(run, ["--steps", "400", "--sleep", "0.02"], worker=worker, threads=1)
    # A live worker holds the run's lock: start and resume both refuse, naming the reason.
    with pytest.raises(jobs.JobError, match="in use by a running worker"):
        jobs.resume(run)
    with pytest.raises(jobs.JobError, match="in use by a running worker"):
        jobs.start(run, [], worker=worker)
    jobs.cancel(run, kill_after_s=10)
    jobs.wait(run, 20)
    cli_run = tmp_path / "cli"
    cli_run.mkdir()
    (cli_run / "status.json").write_text(json.dumps({"state": "cancelled", "step": 1, "total": 2}))
    with pytest.raises(jobs.JobError, match="not started by the app"):
        jobs.resume(cli_run)


def test_crash_is_reported_with_its_error(tmp_path, worker):
    run = tmp_path / "crash"
    jobs.start(run, ["--steps", "50", "--crash-at", "3", "--sleep", "0.01"], worker=worker, threads=1)
    final = jobs.wait(run, 30)
    assert final.state == "failed"
    assert "boom: fake worker crashed at step 3" in final.error
    assert final.resumable  # a crashed run may be retried


def test_worker_that_dies_before_any_status(tmp_path):
    run = tmp_path / "bad"
    final_worker = [sys.executable, "-c", "import sys; sys.exit('error: data file nope.h5ad not found')"]
    jobs.start(run, [], worker=final_worker, threads=1)
    final = jobs.wait(run, 20)
    assert final.state == "failed" and "nope.h5ad not found" in final.error


def test_killed_worker_shows_interrupted(tmp_path, worker):
    run = tmp_path / "killed"
    status = jobs.start(run, ["--steps", "400", "--sleep", "0.02"], worker=worker, threads=1)
    _wait_for(lambda: jobs.poll(run).state == "running")
    os.kill(jobs.poll(run).pid, signal.SIGKILL)  # as if the machine rebooted mid-run
    final = jobs.wait(run, 20)
    assert final.state == "interrupted" and final.resumable
    assert status.pid is None or isinstance(status.pid, int)


def test_reattach_after_app_restart(tmp_path, worker):
    """A run started by another (now finished) process is found, followed and cancelled from here."""
    root = tmp_path / "runs"
    run = root / "r"
    code = (
        "import sys; from statecore.runs import jobs; "
        f"jobs.start({str(run)!r}, ['--steps', '400', '--sleep', '0.02'], worker={worker!r}, threads=1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # the "old app" exits
    _wait_for(lambda: jobs.poll(run).step >= 2)
    listed = jobs.list_runs(root)
    assert [r.name for r in listed] == ["r"] and listed[0].live
    jobs.cancel(run, kill_after_s=10)
    assert jobs.wait(run, 20).state == "cancelled"


def test_two_runs_at_once(tmp_path, worker):
    root = tmp_path / "runs"
    a, b = root / "a", root / "b"
    jobs.start(a, ["--steps", "30", "--sleep", "0.03"], worker=worker, threads=1)
    jobs.start(b, ["--steps", "30", "--sleep", "0.03"], worker=worker, threads=1)
    _wait_for(
        lambda: all(r.state == "running" for r in jobs.list_runs(root)) and len(jobs.list_runs(root)) == 2
    )
    assert jobs.wait(a, 30).state == "done" and jobs.wait(b, 30).state == "done"
    assert len(jobs.read_metrics(a)) == 30 and len(jobs.read_metrics(b)) == 30


def test_helpers(tmp_path):
    assert jobs.worker_threads(0) >= 1 and jobs.worker_threads(5) >= 1
    assert not jobs.pid_alive(None) and not jobs.pid_alive(0)
    first = jobs.new_run_dir(tmp_path, "my run/1")
    assert first.parent == tmp_path and "/" not in first.name and first.name.startswith("my-run-1")
    assert first.is_dir()  # created exclusively: a second call in the same second gets another name
    assert jobs.new_run_dir(tmp_path, "my run/1") != first
    assert jobs.list_runs(tmp_path / "none") == []
    with pytest.raises(jobs.JobError):
        jobs.poll(tmp_path / "missing")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2')  # half-written last line
    assert jobs.read_metrics(tmp_path / "m") == [{"step": 1}]


def test_cancel_while_starting_up_is_a_clean_cancel(tmp_path, worker):
    """No SIGTERM before the worker's first status (it would die without a trace): STOP only."""
    run = tmp_path / "early"
    jobs.start(run, ["--startup", "0.5", "--steps", "400"], worker=worker, threads=1)
    assert jobs.cancel(run).state == "queued" and (run / "STOP").exists()
    final = jobs.wait(run, 30)
    assert final.state == "cancelled" and final.step == 0
