"""Small Streamlit building blocks shared by the pages: guarded engine calls, status panels."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from statecore.errors import StatecoreError
from statecore.ui import state

T = TypeVar("T")
log = logging.getLogger("statecore.app")


class Failed:
    """Returned by ``attempt`` when the call failed (the error is already on the page)."""

    def __bool__(self) -> bool:
        return False


FAILED = Failed()


def failed(value: object) -> bool:
    """Did ``attempt`` fail? (AnnData/DataFrame truthiness is unsafe, so test the marker.)"""
    return isinstance(value, Failed)


# The engine's messages name CLI flags (and QC field names); the pages show them with the labels of
# the fields on screen instead. Data and Preprocess fields only: a flag like --context means different
# fields on different pages, so it stays as it is. tests/test_app_session.py checks the labels exist.
FIELD_LABELS: dict[str, str] = {
    "--pert-col": "Perturbation column",
    "--control": "Control label",
    "--context-col": "Context column",
    "--batch-col": "Batch column",
    "--cell-id-col": "Cell id column in the CSV",
    "--min-genes": "Min genes per cell",
    "--min-cells": "Min cells per gene",
    "--n-hvg": "Highly variable genes",
    "--hvg-flavor": "HVG flavor",
    "min_genes": "Min genes per cell",
    "min_cells": "Min cells per gene",
}
_FLAG = "(" + "|".join(re.escape(f) for f in sorted(FIELD_LABELS, key=len, reverse=True) if f[0] == "-") + ")"
_END = r"(?![\w-])"
_PLACEHOLDER = r"(?: [A-Z]{2,}\b)?"  # "--control LABEL": the metavar, not a value
_WORDING = (  # (pattern, replacement with {} for the field's label), applied in this order
    # "pass --control ctrl", "choose --hvg-flavor seurat": set the field to that value
    (re.compile(rf"\b(?:pass|use|choose) {_FLAG}{_END} (?!to\b|with\b|[A-Z]{{2,}}\b)"), 'set "{}" to '),
    (re.compile(rf"\bpass {_FLAG}{_END}{_PLACEHOLDER}"), 'use "{}"'),
    (re.compile(rf"{_FLAG}{_END}{_PLACEHOLDER}"), '"{}"'),
    (re.compile(r"\b(min_genes|min_cells)="), '"{}" = '),
)


def page_words(text: str) -> str:
    """``text`` with the CLI flags (and QC field names) of ``FIELD_LABELS`` replaced by the labels of
    the fields on screen: "lower --min-genes" -> 'lower "Min genes per cell"'."""
    for pattern, template in _WORDING:
        text = pattern.sub(lambda m, t=template: t.format(FIELD_LABELS[m[1]]), text)
    return text


def error_message(exc: BaseException, what: str) -> str:
    """One line for the page: our own errors already say what to do (in the page's field names);
    others get a generic hint."""
    if isinstance(exc, StatecoreError):
        return f"{what} failed: {page_words(str(exc))}"
    if isinstance(exc, MemoryError):
        return f"{what} failed: not enough memory. Try a smaller dataset, fewer cells or fewer genes (HVGs)."
    if isinstance(exc, FileNotFoundError):
        return (
            f"{what} failed: file not found ({exc.filename or exc}). Check the path and load the data again."
        )
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{what} failed: {type(exc).__name__}{': ' + text if text else ''}. Check the inputs on this page and try again."


def attempt(fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T | Failed:
    """Run an engine call; on any error show one clear ``st.error`` (never a traceback)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the page must never show a traceback
        log.warning("%s failed", what, exc_info=True)  # the traceback goes to the server log only
        st.error(state.plain(error_message(exc, what)))
        return FAILED


def need_data(kind: str = "prepared") -> dict | None:
    """The session's loaded (``kind="data"``) or prepared data, or an info box pointing to the page."""
    key = state.DATA if kind == "data" else state.PREPARED
    value = st.session_state.get(key)
    if value:
        return value
    if kind == "data":
        st.info("No data loaded yet. Open **Data** and load the sample dataset (one click) or your own file.")
        state.page_link("data", "Go to Data")
    else:
        st.info("No prepared data yet. Load data on **Data**, then press **Apply** on **Preprocess**.")
        state.page_link("preprocess", "Go to Preprocess")
    return None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0, int(seconds))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s"


def download(col: Any, label: str, data: Any, file_name: str, *, key: str) -> None:
    """A download button in ``col``; nothing when ``data`` is missing (``None`` or a failed ``attempt``).

    A DataFrame is offered as CSV; the mime type follows the file name's extension."""
    if data is None or failed(data):
        return
    if isinstance(data, pd.DataFrame):
        data = data.to_csv(index=False).encode()
    mime = "text/csv" if file_name.endswith(".csv") else "application/octet-stream"
    col.download_button(label, data, file_name=file_name, mime=mime, key=key)


def pick_run(key: str, empty_message: str) -> Path:
    """The run selector of Predict and Evaluate: runs with a model, the session's current run preselected.

    Stops the page with ``empty_message`` and a link to Train when no run has a model yet."""
    from statecore.ui import training

    runs = training.model_runs(state.runs_dir())
    if not runs:
        st.info(empty_message)
        state.page_link("train", "Go to Train")
        st.stop()
    names = [r.name for r in runs]
    chosen = state.current_run()
    if st.session_state.get(key) not in names:
        st.session_state[key] = chosen.name if chosen and chosen.name in names else names[0]
    name = st.selectbox(
        "Run",
        names,
        key=key,
        help="A trained run from the Train page (newest first); its model is used here.",
    )
    run_dir = runs[names.index(name)].run_dir
    st.session_state[state.RUN] = str(run_dir)
    state.remember()  # a refresh keeps the chosen run
    return run_dir
