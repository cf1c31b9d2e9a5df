"""The session record that lets a browser refresh keep the loaded data, the prepared data and the run.

A refresh starts a new Streamlit session with an empty ``st.session_state``. The page therefore keeps a
random session id in the URL (``?session=<id>``) and a small JSON record of the session's choices in
``<work dir>/sessions/<id>.json``. The record holds paths only, never data.

Restoring trusts nothing in the record: every path must still exist and lie inside the folders the app
may read (samples, uploads, the allowed data roots, prepared data, runs); anything else is dropped with
a plain message. Ids are 128 random bits, so one user cannot guess another's. A restored session gets a
new id (the record is copied), so a shared link hands over a snapshot, not the live session.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PARAM = "session"  # the URL query parameter
VERSION = 1
MAX_BYTES = 64_000  # a record is a few hundred bytes; anything larger was not written by the app
MAX_AGE_S = 7 * 24 * 3600  # records untouched this long are deleted
_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    return secrets.token_hex(16)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def record_path(folder: Path, sid: str) -> Path:
    if not valid_id(sid):
        raise ValueError(f"not a session id: {sid!r}")
    return Path(folder) / f"{sid}.json"


def snapshot(data: dict | None, prepared: dict | None, run: str | None) -> dict[str, Any]:
    return {"version": VERSION, "data": data, "prepared": prepared, "run": run}


def is_empty(record: dict[str, Any]) -> bool:
    return not (record.get("data") or record.get("prepared") or record.get("run"))


def save(folder: Path, sid: str, record: dict[str, Any]) -> None:
    """Write the record atomically (a unique temporary file, then ``os.replace``)."""
    path = record_path(folder, sid)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{sid}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(folder: Path, sid: str) -> dict[str, Any] | None:
    """The stored record, or None when there is none (or it is not a record the app wrote)."""
    path = record_path(folder, sid)
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == VERSION else None


def clean_old(folder: Path, keep: str | None = None, now: float | None = None) -> int:
    """Delete records untouched for ``MAX_AGE_S``; best effort (never breaks a page)."""
    cutoff = (time.time() if now is None else now) - MAX_AGE_S
    removed = 0
    try:
        files = list(Path(folder).glob("*.json"))
    except OSError:
        return 0
    for path in files:
        try:
            if path.stem != keep and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _inside(path: object, roots: Iterable[Path], *, folder_ok: bool = False) -> bool:
    from statecore.data.io import checked_path
    from statecore.errors import StatecoreError

    if not isinstance(path, str) or not path:
        return False
    try:
        checked_path(path, tuple(str(r) for r in roots), folder_ok=folder_ok)
    except (StatecoreError, OSError, ValueError):
        return False
    return True


def _data_ok(data: object, sample_dir: Path, work_dir: Path, data_roots: Iterable[Path]) -> bool:
    from statecore.config import DataSpec

    if not isinstance(data, dict) or not isinstance(data.get("label"), str):
        return False
    # Server paths may come from the allowed data roots; samples and uploads only from their own folders.
    roots = list(data_roots) if data.get("source") == "server" else [sample_dir, work_dir / "uploads"]
    if not _inside(data.get("path"), roots, folder_ok=True):
        return False
    metadata = data.get("metadata")
    if metadata is not None and not _inside(metadata, roots):
        return False
    if data.get("cell_id_col") is not None and not isinstance(data.get("cell_id_col"), str):
        return False
    spec = data.get("spec")
    if not isinstance(spec, dict) or not all(isinstance(v, str | int | None) for v in spec.values()):
        return False
    try:
        DataSpec.from_dict(spec)
    except (TypeError, ValueError):
        return False
    return True


def _prepared_ok(prepared: object, prepared_dir: Path) -> bool:
    return (
        isinstance(prepared, dict)
        and _inside(prepared.get("path"), [prepared_dir])
        and str(prepared["path"]).endswith(".h5ad")
        and isinstance(prepared.get("qc"), dict)
        and all(isinstance(prepared.get(k), int) for k in ("n_obs", "n_vars"))
    )


def restore(
    record: dict[str, Any],
    *,
    sample_dir: Path,
    work_dir: Path,
    data_roots: Iterable[Path],
    runs_dir: Path,
) -> tuple[dict[str, Any], list[str]]:
    """``({"data", "prepared", "run"}, problems)``: the parts of ``record`` that are still valid and a
    plain sentence for each part that was dropped."""
    out: dict[str, Any] = {"data": None, "prepared": None, "run": None}
    problems: list[str] = []
    data, prepared, run = record.get("data"), record.get("prepared"), record.get("run")
    if data is not None:
        if _data_ok(data, sample_dir, work_dir, data_roots):
            out["data"] = data
        else:
            problems.append("the loaded data is no longer on disk or not in a folder the app may read")
    if prepared is not None:
        if out["data"] and _prepared_ok(prepared, work_dir / "prepared"):
            out["prepared"] = prepared
        else:
            problems.append("the prepared data is no longer available")
    if run is not None:
        if _inside(run, [runs_dir], folder_ok=True) and Path(run).is_dir():
            out["run"] = run
        else:
            problems.append("the selected run no longer exists")
    return out, problems
