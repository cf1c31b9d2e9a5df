"""Cached loaders. AnnData cannot be hashed, so caches key on (path, mtime) strings; what they hand
out is shared across sessions and must be treated as read-only (``.copy()`` before mutating).

Streamlit leaves parameters named with a leading underscore out of the cache key, so the mtimes
are named ``stamp`` (no underscore): they must be part of the key for a rewritten file to be read again."""

from __future__ import annotations

from pathlib import Path

import streamlit as st


def mtime(path: str | Path | None) -> float:
    if not path:
        return 0.0
    p = Path(path)
    if p.is_dir():  # MTX bundle directory: newest file inside
        return max((f.stat().st_mtime for f in p.iterdir()), default=p.stat().st_mtime)
    return p.stat().st_mtime


@st.cache_resource(max_entries=3, show_spinner="Reading data…")
def _read_data(
    path: str,
    stamp: float,
    metadata: str | None,
    meta_stamp: float,
    cell_id_col: str | None,
    roots: tuple[str, ...] | None,
):
    from statecore.data.io import read_data

    return read_data(path, metadata=metadata, cell_id_col=cell_id_col, roots=roots)


def read_data(info: dict):
    """The raw AnnData described by the session's ``sc_data`` entry.

    Paths typed by the user ("source": "server") are read only inside ``state.data_roots()``; the
    path is checked before anything else touches it (even its mtime)."""
    from statecore.data.io import checked_path
    from statecore.ui import state

    path, metadata = info["path"], info.get("metadata")
    roots = None
    if info.get("source") == "server":
        roots = tuple(str(r) for r in state.data_roots())
        path = str(checked_path(path, roots, folder_ok=True))
        metadata = str(checked_path(metadata, roots)) if metadata else None
    return _read_data(path, mtime(path), metadata, mtime(metadata), info.get("cell_id_col"), roots)


@st.cache_resource(max_entries=3, show_spinner="Reading prepared data…")
def _read_h5ad(path: str, stamp: float):
    import anndata as ad

    return ad.read_h5ad(path)


def read_h5ad(path: str | Path):
    return _read_h5ad(str(path), mtime(path))


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def _load_run(run_dir: str, stamp: float):
    from statecore.training.checkpoint import load_run

    return load_run(run_dir, device="cpu")


def load_run(run_dir: str | Path):
    """A finished run's model (``model.safetensors`` mtime in the key: a resumed run reloads)."""
    run_dir = Path(run_dir)
    return _load_run(str(run_dir), mtime(run_dir / "model.safetensors"))


def run_data_path(run_dir: str | Path) -> str:
    """The prepared data a run was trained on (``config.json``'s ``data_path``)."""
    from statecore.errors import CheckpointError
    from statecore.training.checkpoint import read_config

    data_path = read_config(run_dir).data_path  # CheckpointError naming the file when it is unreadable
    if not data_path or not Path(data_path).exists():
        raise CheckpointError(
            f"the data this run was trained on ({data_path or 'unknown'}) is no longer on disk; "
            "prepare the same data again on Preprocess"
        )
    return data_path
