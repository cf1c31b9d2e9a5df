"""Session state and places on disk, initialised in one place for every page.

A direct link can open any page first (classic multipage mode), so each page starts with
``init_page``: page config, session defaults, sidebar. Widget values vanish when the user leaves a
page, so what other pages need lives in the ``sc_*`` session keys below, as plain strings/dicts.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import streamlit as st

from statecore.runs import jobs
from statecore.ui import session

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO_ROOT / "sample_data"
# Kang first: its IFN-beta response is strong, so the first run on it (zero-shot CD14+ monocytes, the
# app's default budget) beats every baseline (README "The first hour, measured"). On the PerturBench
# glioma lines even two halves of the real cells barely agree: the verdict there explains the flat result.
SAMPLES: dict[str, Path] = {
    "Kang 2018 PBMC: IFN-beta vs control in 7 cell types (1,975 cells x 6,998 genes)": SAMPLE_DIR
    / "kang2018_pbmc_ifnb.h5ad",
    "PerturBench devel: 4 cell lines, 33 perturbations incl. combos (5,961 cells x 500 genes)": SAMPLE_DIR
    / "perturbench_devel.h5ad",
}
DEFAULT_SAMPLE = next(iter(SAMPLES))

# Session keys shared between pages (plain data only: survives page switches).
DATA = "sc_data"  # {"path", "metadata", "cell_id_col", "label", "spec": DataSpec dict}
PREPARED = "sc_prepared"  # {"path", "qc": QCConfig dict, "n_obs", "n_vars"}
RUN = "sc_run"  # selected run directory (str)
SESSION_ID = "sc_session_id"  # also the name of the session's record and upload folder (ui.session)
SAVED = "sc_saved"  # the record as last written (written again only when it changes)
NOTICE = "sc_session_notice"  # (what a refresh could not restore, the session it left)

PAGES = {
    "home": "app.py",
    "data": "pages/1_Data.py",
    "preprocess": "pages/2_Preprocess.py",
    "train": "pages/3_Train.py",
    "predict": "pages/4_Predict.py",
    "evaluate": "pages/5_Evaluate.py",
    "screen": "pages/6_Screen.py",
}
# Page icons: Material Symbols, which Streamlit ships with its own web font (emoji need a colour-emoji font
# in the browser, and without one they show as empty boxes).
ICONS = {
    "home": ":material/home:",
    "data": ":material/folder_open:",
    "preprocess": ":material/tune:",
    "train": ":material/model_training:",
    "predict": ":material/online_prediction:",
    "screen": ":material/target:",
    "evaluate": ":material/analytics:",
}
# The sidebar's page list (Streamlit's own is hidden in .streamlit/config.toml: it would name the home page
# after its file, "app").
NAV = (
    ("home", "Home"),
    ("data", "Data"),
    ("preprocess", "Preprocess"),
    ("train", "Train"),
    ("predict", "Predict"),
    ("screen", "Screen"),
    ("evaluate", "Evaluate"),
)


def page_link(key: str, label: str) -> None:
    """A link to page ``key`` (of ``PAGES``) with its icon."""
    st.page_link(PAGES[key], label=label, icon=ICONS[key])


def work_dir() -> Path:
    """Uploads and prepared data (git-ignored ``data/``; ``STATECORE_WORKDIR`` overrides)."""
    return Path(os.environ.get("STATECORE_WORKDIR", REPO_ROOT / "data"))


def runs_dir() -> Path:
    """Run directories (``checkpoints/``; ``STATECORE_RUNS`` overrides)."""
    return Path(os.environ.get("STATECORE_RUNS", REPO_ROOT / "checkpoints"))


DATA_ROOTS_ENV = "STATECORE_DATA_ROOTS"  # folders "Path on the server" may read, joined by ":"
UPLOAD_MAX_AGE_ENV = "STATECORE_UPLOAD_MAX_AGE_H"  # uploads older than this (hours) are deleted
MAX_UPLOAD_NAME = 200  # characters


def data_roots() -> tuple[Path, ...]:
    """Folders the app may read server paths from: ``STATECORE_DATA_ROOTS`` (``:``-separated), else
    the shipped samples, the work folder (uploads, prepared data) and the runs folder."""
    value = os.environ.get(DATA_ROOTS_ENV, "").strip()
    roots = [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()] if value else []
    return tuple(roots or (SAMPLE_DIR, work_dir(), runs_dir()))


def upload_max_age_s() -> float:
    try:
        return float(os.environ.get(UPLOAD_MAX_AGE_ENV, "24")) * 3600
    except ValueError:
        return 24 * 3600.0


def clean_old_uploads(keep: str | None = None, now: float | None = None) -> int:
    """Delete upload folders untouched for longer than ``upload_max_age_s``; returns how many.

    ``keep``: this session's folder name, never deleted. Errors (a folder another process is
    deleting at the same moment) are skipped: cleaning is best effort and must not break a page."""
    import shutil
    import time

    root = work_dir() / "uploads"
    if not root.is_dir():
        return 0
    cutoff = (time.time() if now is None else now) - upload_max_age_s()
    removed = 0
    for folder in root.iterdir():
        try:
            if folder.name != keep and folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder)
                removed += 1
        except OSError:
            continue
    return removed


def upload_dir() -> Path:
    """A new, empty folder for one load: a re-upload never reads the bytes of an earlier one."""
    folder = work_dir() / "uploads" / st.session_state[SESSION_ID]
    if not folder.exists():
        clean_old_uploads(keep=folder.name)  # once per session: when its folder is first made
    path = folder / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    os.utime(folder)  # the session folder's age is that of its newest load
    return path


def upload_name(name: str) -> str:
    """An uploaded file's name, safe to write in an upload folder; a StatecoreError when it is not."""
    from statecore.errors import StatecoreError

    base = Path(str(name).replace("\\", "/")).name
    if not base or base in (".", "..") or "\0" in base or len(base) > MAX_UPLOAD_NAME:
        shown = (base[:40] + "…") if len(base) > 40 else base
        raise StatecoreError(
            f"the upload name {shown!r} cannot be used (empty, '.'/'..', or longer than "
            f"{MAX_UPLOAD_NAME} characters); rename the file and upload it again"
        )
    return base


def prepared_dir() -> Path:
    path = work_dir() / "prepared"
    path.mkdir(parents=True, exist_ok=True)
    return path


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&])")


def plain(text: object) -> str:
    """``text`` escaped for Streamlit's markdown, so labels and file names from data show as typed
    (no bold, links, HTML, LaTeX, colour directives or emoji codes)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def _defaults() -> dict[str, Any]:
    return {DATA: None, PREPARED: None, RUN: None}


def sessions_dir() -> Path:
    return work_dir() / "sessions"


def _snapshot() -> dict[str, Any]:
    return session.snapshot(st.session_state[DATA], st.session_state[PREPARED], st.session_state[RUN])


def _start_session() -> None:
    """Once per browser session: a new random id; after a refresh, what the URL's record still allows.

    The restored session gets a new id (``remember`` writes the copy), so whoever holds an old link
    cannot follow what this browser does next."""
    if SESSION_ID in st.session_state:
        return
    st.session_state[SESSION_ID] = session.new_id()
    st.session_state[SAVED] = session.snapshot(None, None, None)
    session.clean_old(sessions_dir())
    old = st.query_params.get(session.PARAM)
    if old is None:
        return
    record = session.read(sessions_dir(), old) if session.valid_id(old) else None
    if record is None:
        st.session_state[NOTICE] = (
            "The session in this page's address was not found (it may be older than a week, or the link is "
            "incomplete): a new session has started. Load your data on **Data**.",
            _snapshot(),
        )
        return
    values, problems = session.restore(
        record, sample_dir=SAMPLE_DIR, work_dir=work_dir(), data_roots=data_roots(), runs_dir=runs_dir()
    )
    for key, name in ((DATA, "data"), (PREPARED, "prepared"), (RUN, "run")):
        if values[name] is not None and st.session_state.get(key) is None:
            st.session_state[key] = values[name]
    if problems:
        st.session_state[NOTICE] = (
            "Restored what was still valid of your previous session, but " + "; ".join(problems) + ". "
            "Load or prepare it again on **Data** and **Preprocess**.",
            _snapshot(),
        )


def remember() -> None:
    """Write this session's record when loaded data, prepared data or run changed (a refresh reads it),
    and name the session in the page's address once it has a record (a refresh before anything was
    loaded starts afresh, without a message)."""
    record = _snapshot()
    if record != st.session_state[SAVED]:
        try:
            session.save(sessions_dir(), st.session_state[SESSION_ID], record)
            st.session_state[SAVED] = record
        except (OSError, TypeError, ValueError):  # e.g. a read-only work dir: the session works, unsaved
            pass
    sid = None if session.is_empty(st.session_state[SAVED]) else st.session_state[SESSION_ID]
    if st.query_params.get(session.PARAM) != sid:
        if sid:
            st.query_params[session.PARAM] = sid
        else:
            del st.query_params[session.PARAM]


def init_page(title: str, icon: str = "🧬") -> None:
    """The one call every page makes first: page config, session defaults and record, sidebar summary."""
    st.set_page_config(page_title=f"statecore · {title}", page_icon=icon, layout="wide")
    for key, value in _defaults().items():
        st.session_state.setdefault(key, value)
    _start_session()
    remember()
    notice = st.session_state.get(NOTICE)
    if notice and notice[1] == _snapshot():  # shown until the user loads, prepares or picks something
        st.info(notice[0])
    elif notice:
        del st.session_state[NOTICE]
    _sidebar()


def _sidebar() -> None:
    with st.sidebar:
        for key, label in NAV:
            page_link(key, label)
        st.divider()
        st.markdown("### statecore")
        data = st.session_state[DATA]
        prepared = st.session_state[PREPARED]
        st.caption("Data: " + (plain(Path(data["path"]).name) if data else "none loaded"))
        st.caption("Prepared: " + (plain(Path(prepared["path"]).name) if prepared else "not yet"))
        run = st.session_state[RUN]
        st.caption("Run: " + (plain(Path(run).name) if run else "none selected"))
        try:
            live = [r for r in jobs.list_runs(runs_dir()) if r.live]
        except OSError:
            live = []
        if live:
            st.caption("Training now: " + plain(", ".join(r.name for r in live)))


def current_run() -> Path | None:
    run = st.session_state.get(RUN)
    return Path(run) if run and Path(run).is_dir() else None
