"""Run-directory files: atomic JSON/text writes, ``status.json`` and ``metrics.jsonl``.

Readers (the app's job manager, the CLI) may read these files at any moment, so every whole-file
write goes to a temporary file in the same directory and is moved into place with ``os.replace``.
``metrics.jsonl`` is append-only; a reader may see a final partial line and must skip it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from statecore.errors import StatecoreError

STATES = ("queued", "running", "done", "failed", "cancelled")
STATUS_KEYS = (
    "state",
    "step",
    "total",
    "started",
    "updated",
    "pid",
    "error",
    "best_val",
    "eta_s",
    "cells_per_s",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_output(path: str | os.PathLike, need_bytes: int = 0) -> Iterator[Path]:
    """A unique temporary path beside ``path``; whatever the caller writes there appears at ``path`` only
    when the block ends without error (then with the umask's usual mode, so others on a shared server
    can read it). Refuses up front when the folder cannot hold ``need_bytes`` (HDF5 fails badly on a full
    disk), turns a failed write into one line naming the folder, and never leaves the temporary file
    behind (two writers of one target, e.g. two sessions pressing Apply, never share it)."""
    out = Path(path)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if need_bytes * 1.05 + 1_000_000 > free:
            raise StatecoreError(
                f"not enough disk space in {str(out.parent)!r}: the file needs about {need_bytes / 1e6:,.1f} "
                f"MB and {free / 1e6:,.1f} MB are free; free disk space or choose another output folder"
            )
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        tmp.replace(out)
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise StatecoreError(
            f"cannot write {str(out)!r}: {reason}; free disk space or choose a folder you can write to"
        ) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """Parsed JSON, or None when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_lines(path: str | os.PathLike, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def read_lines(path: str | os.PathLike) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line]


def write_status(run_dir: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``status.json`` (creating it with every key) and return the new status."""
    unknown = sorted(set(fields) - set(STATUS_KEYS))
    if unknown:
        raise ValueError(f"unknown status field(s) {unknown}; known: {STATUS_KEYS}")
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"status state must be one of {STATES}; got {fields['state']!r}")
    path = Path(run_dir) / "status.json"
    status = {k: None for k in STATUS_KEYS}
    status.update({"state": "queued", "step": 0, "total": 0})
    status.update({k: v for k, v in (read_json(path) or {}).items() if k in STATUS_KEYS})
    status.update(fields)
    status["updated"] = now_iso()
    atomic_write_json(path, status)
    return status


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / "status.json")


def append_metrics(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    line = json.dumps(_clean(record), allow_nan=False)
    with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
        fh.write(line + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of ``metrics.jsonl`` (a partial last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def truncate_metrics(run_dir: str | os.PathLike, after_step: int) -> None:
    """Drop records logged after ``after_step`` (a resumed run re-logs them from its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= after_step]
    atomic_write_text(path, "".join(json.dumps(_clean(r), allow_nan=False) + "\n" for r in keep))
