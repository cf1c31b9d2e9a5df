"""Background training runs: start, poll, cancel, resume and list them, all through the run directory.

The run directory (docs/CONTRACTS.md) is the only channel between the app and a worker: the worker
(``python -m statecore train --run-dir DIR ...``) writes ``status.json`` and ``metrics.jsonl``;
this module reads them, asks for a stop through the ``STOP`` file (plus SIGTERM), and records how it
launched the worker in ``job.json`` so that a run can be resumed, and re-attached to after the app
restarts, from the directory alone. The worker runs in its own session (``start_new_session``) so a
refresh, a closed tab or a restarted app never kills it. Nothing here imports streamlit or torch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from statecore.errors import StatecoreError

TRAIN_WORKER: tuple[str, ...] = (sys.executable, "-m", "statecore", "train")
LIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")

# Popen handles of workers this process started: polling them reaps finished children, which would
# otherwise linger as zombies that still answer os.kill(pid, 0) and look alive.
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobError(StatecoreError):
    """A run cannot be started, resumed or cancelled as asked."""


@dataclass(frozen=True)
class RunStatus:
    """What a reader knows about one run directory right now."""

    run_dir: Path
    state: str  # queued | running | done | failed | cancelled | interrupted
    step: int = 0
    total: int = 0
    started: str | None = None
    updated: str | None = None
    pid: int | None = None
    error: str | None = None
    best_val: float | None = None
    eta_s: float | None = None
    cells_per_s: float | None = None
    stop_requested: bool = False

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def has_model(self) -> bool:
        return (self.run_dir / "model.safetensors").exists()

    @property
    def resumable(self) -> bool:
        return not self.live and self.state != "done" and (self.run_dir / "job.json").exists()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        # Missing, or caught between a writer's temp file and os.replace on a non-atomic filesystem.
        return None


def pid_alive(pid: int | None, run_dir: Path | None = None) -> bool:
    """Is ``pid`` a live (non-zombie) process, and, where /proc tells, one working on ``run_dir``?"""
    if not pid or pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The pid exists but belongs to another user: after a reboot that is never our worker, so
        # /proc decides (below) instead of taking it as alive.
        pass
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
            if run_dir is not None:
                # After a reboot the pid may belong to an unrelated process: require our run dir.
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return str(Path(run_dir).resolve()) in cmdline or str(run_dir) in cmdline
        except OSError:
            return False
    return True


LOCK_NAME = ".lock"
RESUME_LOCK_WAIT_S = 5.0
LOCK_FD_ENV = "STATECORE_RUN_LOCK_FD"  # the lock a launched worker inherits (see hold_run_lock)


@dataclass(frozen=True)
class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``, held as long as ``fd`` stays open.

    flock belongs to the open file, so a worker launched with the descriptor keeps the run locked
    for its whole life, and the kernel drops the lock when the worker dies (even by SIGKILL or a
    reboot): a stale lock is impossible."""

    run_dir: Path
    fd: int

    def release(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _try_lock(run_dir: Path, wait_s: float = 0.0) -> RunLock | None:
    """Take the run's lock, trying for up to ``wait_s``; None when another process holds it."""
    import fcntl

    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return RunLock(run_dir=run_dir, fd=fd)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def is_locked(run_dir: str | Path) -> bool:
    """Does a live process (a worker) hold the run's lock right now?"""
    run_dir = Path(run_dir)
    if not (run_dir / LOCK_NAME).exists():
        return False
    lock = _try_lock(run_dir)
    if lock is None:
        return True
    lock.release()
    return False


def _in_use(run_dir: Path) -> JobError:
    return JobError(
        f"run {run_dir.name} is in use by a running worker (its lock is held); wait for it to finish, "
        "or cancel it first"
    )


def hold_run_lock(run_dir: str | Path) -> RunLock:
    """For the worker (``statecore train --run-dir``): hold the run's lock until the process exits.

    A worker launched by ``start``/``resume`` already holds it through the descriptor named in
    ``STATECORE_RUN_LOCK_FD``: that one is adopted. A worker started by hand takes the lock itself,
    and a JobError says the run is in use when another worker holds it. Keep the returned object
    (or just let the process run on): the lock goes when the process ends.
    """
    run_dir = Path(run_dir)
    inherited = os.environ.get(LOCK_FD_ENV, "")
    if inherited.isdigit():
        fd = int(inherited)
        try:
            held, on_disk = os.fstat(fd), os.stat(run_dir / LOCK_NAME)
            same = (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
        except OSError:
            same = False
        if same:
            return RunLock(run_dir=run_dir, fd=fd)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _try_lock(run_dir)
    if lock is None:
        raise _in_use(run_dir)
    return lock


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def log_tail(run_dir: str | Path, n_lines: int = 30) -> str:
    path = Path(run_dir) / "log.txt"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-n_lines:])


def _crash_message(run_dir: Path) -> str:
    """The most useful line of a dead worker's log: its last error line, or a pointer to the log."""
    tail = log_tail(run_dir, 60)
    for line in reversed(tail.splitlines()):
        stripped = line.strip()
        if stripped.startswith("error:") or (
            ": " in stripped and stripped.split(":", 1)[0].endswith(("Error", "Exception"))
        ):
            return stripped
    last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    return f"the worker stopped unexpectedly (last log line: {last}); see {run_dir / 'log.txt'}"


def _worker_alive(run_dir: Path, job: dict[str, Any], *pids: int | None, own_lock: bool = False) -> bool:
    """A worker launched with the run's lock is alive exactly while the lock is held (the kernel
    frees it when the process dies); older runs fall back to the pid and /proc checks.
    ``own_lock``: the caller holds the lock itself, so no worker can."""
    if job.get("locked"):
        return not own_lock and is_locked(run_dir)
    return any(pid_alive(p, run_dir) for p in pids)


def poll(run_dir: str | Path) -> RunStatus:
    """Read a run's status, deriving ``interrupted``/``failed`` when its worker is gone."""
    return _poll(Path(run_dir), own_lock=False)


def _poll(run_dir: Path, *, own_lock: bool) -> RunStatus:
    alive = functools.partial(_worker_alive, own_lock=own_lock)
    if not run_dir.is_dir():
        raise JobError(f"run directory {run_dir} does not exist")
    status = _read_json(run_dir / "status.json") or {}
    job = _read_json(run_dir / "job.json") or {}
    state = status.get("state")
    pid = status.get("pid") or job.get("pid")
    job_pid = job.get("pid")
    error = status.get("error")
    if state is not None and job_pid and float(job.get("launched_ts", 0)) > _mtime(run_dir / "status.json"):
        # Relaunched (resume) since the status was last written: the new worker owns the run.
        if alive(run_dir, job, job_pid):
            state, pid, error = "queued", job_pid, None
        elif state not in LIVE_STATES:
            state, pid, error = "failed", job_pid, _crash_message(run_dir)
    if state is None:
        if job_pid and alive(run_dir, job, job_pid):
            state = "queued"  # importing torch, reading data: no status yet
        elif job_pid and (run_dir / "STOP").exists():
            state = "cancelled"  # stopped before it ever wrote a status
        elif job_pid:
            state, error = "failed", _crash_message(run_dir)
        else:
            state = "failed"
            error = f"{run_dir} holds no status.json: not a statecore run directory"
    elif state in LIVE_STATES and not alive(run_dir, job, pid, job_pid):
        child = _CHILDREN.get(job_pid) if job_pid else None
        crashed = child is not None and child.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL)
        if crashed or "Traceback" in log_tail(run_dir, 200):
            state, error = "failed", error or _crash_message(run_dir)
        else:
            state = "interrupted"
    return RunStatus(
        run_dir=run_dir,
        state=state,
        step=int(status.get("step") or 0),
        total=int(status.get("total") or 0),
        started=status.get("started") or job.get("launched"),
        updated=status.get("updated"),
        pid=pid,
        error=error,
        best_val=status.get("best_val"),
        eta_s=status.get("eta_s"),
        cells_per_s=status.get("cells_per_s"),
        stop_requested=(run_dir / "STOP").exists(),
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of ``metrics.jsonl`` (a half-written last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def worker_threads(n_live: int = 0) -> int:
    """Threads for a new worker: all cores but one (kept for the UI), shared with runs already live."""
    cores = os.cpu_count() or 1
    return max(1, (cores - 1) // (n_live + 1))


def _default_threads(root: Path) -> int:
    """``worker_threads`` shared with the runs live under ``root`` now."""
    return worker_threads(sum(1 for r in list_runs(root) if r.live))


def _launch(
    run_dir: Path, argv: list[str], threads: int, env: dict[str, str] | None, lock: RunLock
) -> tuple[int, float]:
    """Start the worker holding ``lock`` (passed down as an open descriptor: no gap in which a
    second start or resume could take the run)."""
    (run_dir / "STOP").unlink(missing_ok=True)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env[LOCK_FD_ENV] = str(lock.fd)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        child_env[var] = str(threads)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    launched_ts = time.time()  # any status.json older than this predates the new worker
    with open(run_dir / "log.txt", "ab") as log:
        log.write(f"\n== {_now()} launching: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            start_new_session=True,  # survives page refresh, closed tab and app restart
            cwd=os.getcwd(),
            pass_fds=(lock.fd,),
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid, launched_ts


def start(
    run_dir: str | Path,
    train_args: Sequence[str] = (),
    *,
    threads: int | None = None,
    worker: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    dir_flag: str = "--run-dir",
) -> RunStatus:
    """Launch ``worker --run-dir RUN_DIR *train_args`` in the background and return its first status.

    ``dir_flag``: the worker's option naming the directory it reports into (``--job-dir`` for a
    screen, whose ``--run-dir`` is the model it reads).

    ``threads`` defaults to all cores but one, split among live runs; it goes to the worker through
    the usual thread environment variables (and ``train_args`` may carry the CLI's own flag).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # new_run_dir made it already (exclusively)
    lock = _try_lock(run_dir)
    if lock is None:
        raise _in_use(run_dir)
    try:  # under the lock: of two starts at once, exactly one sees an empty directory
        if is_run_dir(run_dir):
            raise JobError(f"{run_dir} already holds a run; resume it or pick a new name")
        if threads is None:
            threads = _default_threads(run_dir.parent)
        argv = [*(worker or TRAIN_WORKER), dir_flag, str(run_dir), *map(str, train_args)]
        pid, launched_ts = _launch(run_dir, argv, threads, env, lock)
        job = {"argv": argv, "pid": pid, "threads": threads, "env": env or {}, "launches": 1, "locked": True}
        _write_json(run_dir / "job.json", {**job, "launched": _now(), "launched_ts": launched_ts})
    finally:
        lock.release()  # the worker keeps its own copy of the lock
    return poll(run_dir)


def resume(run_dir: str | Path, *, threads: int | None = None) -> RunStatus:
    """Relaunch a stopped run with the command it was started with (the worker continues from
    ``last.safetensors``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise JobError(f"run directory {run_dir} does not exist")
    # A worker that has just written "cancelled" may need a moment to exit and free the lock.
    lock = _try_lock(run_dir, wait_s=RESUME_LOCK_WAIT_S)
    if lock is None:
        raise _in_use(run_dir)
    try:  # under the lock: two Resume clicks launch one worker
        current = _poll(run_dir, own_lock=True)
        if current.live:
            raise JobError(f"run {run_dir.name} is still {current.state}; nothing to resume")
        job = _read_json(run_dir / "job.json")
        if not job or not job.get("argv"):
            raise JobError(
                f"run {run_dir.name} was not started by the app (no job.json); resume it from the CLI"
            )
        if threads is None:
            threads = _default_threads(run_dir.parent)
        pid, launched_ts = _launch(run_dir, list(job["argv"]), threads, job.get("env"), lock)
        launches = int(job.get("launches", 1)) + 1
        job.update(
            pid=pid, threads=threads, launched=_now(), launched_ts=launched_ts, launches=launches, locked=True
        )
        _write_json(run_dir / "job.json", job)
    finally:
        lock.release()
    return poll(run_dir)


def cancel(run_dir: str | Path, *, kill_after_s: float | None = None) -> RunStatus:
    """Ask a run to stop: the ``STOP`` file and SIGTERM; the worker checkpoints and exits as
    ``cancelled``. With ``kill_after_s``, the process group is killed if it is still alive then."""
    run_dir = Path(run_dir)
    current = poll(run_dir)
    (run_dir / "STOP").write_text(_now())
    pid = current.pid
    # Before its first status the worker is still importing and has no SIGTERM handler: a signal
    # would kill it without a trace, so the STOP file alone asks it to stop at its first step.
    started = (run_dir / "status.json").exists() and current.state == "running"
    if started and pid_alive(pid, run_dir):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if kill_after_s is not None and current.live:
        deadline = time.monotonic() + kill_after_s
        while time.monotonic() < deadline and pid_alive(pid, run_dir):
            time.sleep(0.1)
        if pid_alive(pid, run_dir):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return poll(run_dir)


def wait(run_dir: str | Path, timeout_s: float, *, interval_s: float = 0.2) -> RunStatus:
    """Poll until the run leaves the live states or ``timeout_s`` passes (tests and scripts)."""
    deadline = time.monotonic() + timeout_s
    status = poll(run_dir)
    while status.live and time.monotonic() < deadline:
        time.sleep(interval_s)
        status = poll(run_dir)
    return status


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "status.json").exists() or (path / "job.json").exists())


def list_runs(root: str | Path) -> list[RunStatus]:
    """Every run directory under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [poll(p) for p in root.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: (r.started or "", r.name), reverse=True)


MAX_RUN_NAME = 100  # characters of the user's prefix kept in a run directory name


def new_run_dir(root: str | Path, prefix: str = "run") -> Path:
    """A new, empty run directory under ``root`` (timestamped), created here and now.

    ``mkdir(exist_ok=False)`` decides: when two sessions ask for the same name in the same second,
    one gets ``NAME-STAMP`` and the other ``NAME-STAMP-2``, never the same directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in prefix).strip("-")[:MAX_RUN_NAME] or "run"
    for n in range(1, 10_000):
        path = root / (f"{safe}-{stamp}" if n == 1 else f"{safe}-{stamp}-{n}")
        try:
            path.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise JobError(f"no free run name for {safe!r} under {root}; pick another name")
