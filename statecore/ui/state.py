"""Session state and places on disk, initialised in one place for every page.

A direct link can open any page first (classic multipage mode), so each page starts with
``init_page``: page config, session defaults, sidebar. Widget values vanish when the user leaves a
page, so what other pages need lives in the ``sc_*`` session keys below, as plain strings/dicts.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import streamlit as st

from statecore.runs import jobs

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO_ROOT / "sample_data"
SAMPLES: dict[str, Path] = {
    "PerturBench devel: 4 cell lines, 33 perturbations incl. combos (5,961 cells x 500 genes)": SAMPLE_DIR
    / "perturbench_devel.h5ad",
    "Kang 2018 PBMC: IFN-beta vs control in 7 cell types (1,975 cells x 6,998 genes)": SAMPLE_DIR
    / "kang2018_pbmc_ifnb.h5ad",
}
DEFAULT_SAMPLE = next(iter(SAMPLES))

# Session keys shared between pages (plain data only: survives page switches).
DATA = "sc_data"  # {"path", "metadata", "cell_id_col", "label", "spec": DataSpec dict}
PREPARED = "sc_prepared"  # {"path", "qc": QCConfig dict, "n_obs", "n_vars"}
RUN = "sc_run"  # selected run directory (str)
SESSION_ID = "sc_session_id"

PAGES = {
    "home": "app.py",
    "data": "pages/1_Data.py",
    "preprocess": "pages/2_Preprocess.py",
    "train": "pages/3_Train.py",
    "predict": "pages/4_Predict.py",
    "evaluate": "pages/5_Evaluate.py",
}


def work_dir() -> Path:
    """Uploads and prepared data (git-ignored ``data/``; ``STATECORE_WORKDIR`` overrides)."""
    return Path(os.environ.get("STATECORE_WORKDIR", REPO_ROOT / "data"))


def runs_dir() -> Path:
    """Run directories (``checkpoints/``; ``STATECORE_RUNS`` overrides)."""
    return Path(os.environ.get("STATECORE_RUNS", REPO_ROOT / "checkpoints"))


def upload_dir() -> Path:
    """This session's upload folder: files are written here as soon as they arrive."""
    path = work_dir() / "uploads" / st.session_state[SESSION_ID]
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepared_dir() -> Path:
    path = work_dir() / "prepared"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _defaults() -> dict[str, Any]:
    return {DATA: None, PREPARED: None, RUN: None, SESSION_ID: uuid.uuid4().hex[:12]}


def init_page(title: str, icon: str = "🧬") -> None:
    """The one call every page makes first: page config, session defaults, sidebar summary."""
    st.set_page_config(page_title=f"statecore · {title}", page_icon=icon, layout="wide")
    for key, value in _defaults().items():
        st.session_state.setdefault(key, value)
    _sidebar()


def _sidebar() -> None:
    with st.sidebar:
        st.markdown("### statecore")
        data = st.session_state[DATA]
        prepared = st.session_state[PREPARED]
        st.caption("Data: " + (Path(data["path"]).name if data else "none loaded"))
        st.caption("Prepared: " + (Path(prepared["path"]).name if prepared else "not yet"))
        run = st.session_state[RUN]
        st.caption("Run: " + (Path(run).name if run else "none selected"))
        try:
            live = [r for r in jobs.list_runs(runs_dir()) if r.live]
        except OSError:
            live = []
        if live:
            st.caption(f"Training now: {', '.join(r.name for r in live)}")


def current_run() -> Path | None:
    run = st.session_state.get(RUN)
    return Path(run) if run and Path(run).is_dir() else None
