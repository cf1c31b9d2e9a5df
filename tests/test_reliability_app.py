"""The Data page as a shared server sees it: allowed folders only, the control chosen by the user
when it is not recognised, labels shown as typed, uploads in fresh folders with safe names."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from statecore.errors import StatecoreError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180
SERVER = "Path on the server"


@pytest.fixture()
def env(tmp_path, monkeypatch):
    work, runs = tmp_path / "work", tmp_path / "runs"
    work.mkdir()
    monkeypatch.setenv("STATECORE_WORKDIR", str(work))
    monkeypatch.setenv("STATECORE_RUNS", str(runs))
    monkeypatch.delenv("STATECORE_DATA_ROOTS", raising=False)
    monkeypatch.chdir(ROOT)
    return {"work": work, "tmp": tmp_path}


def _load_server_path(path: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/1_Data.py")
    at.run()
    at.radio(key="data_source").set_value(SERVER).run()
    at.text_input(key="data_server_path").input(path).run()
    at.button(key="data_load_path").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def _kang_bundle(folder: Path, labels=None) -> Path:
    """An MTX bundle whose metadata.csv (found without --metadata) calls the condition `stim`."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n_cells, n_genes = 60, 30
    X = sp.coo_matrix(rng.poisson(2.0, (n_genes, n_cells)).astype(np.float32))
    scipy.io.mmwrite(folder / "matrix.mtx", X)
    bcs = [f"C{i}" for i in range(n_cells)]
    (folder / "barcodes.tsv").write_text("\n".join(bcs) + "\n")
    (folder / "features.tsv").write_text("".join(f"E{i}\tG{i}\n" for i in range(n_genes)))
    # STIM is the most frequent value: the page must not propose it as the control.
    stim = labels if labels is not None else ["CTRL"] * 20 + ["STIM"] * 40
    pd.DataFrame({"barcode": bcs, "stim": stim}).to_csv(folder / "metadata.csv", index=False)
    return folder


def test_mtx_bundle_with_metadata_proposes_the_real_control(env):
    folder = _kang_bundle(env["work"] / "kang")
    at = _load_server_path(str(folder))
    assert at.selectbox(key="data_pert_col").value == "stim"
    assert at.selectbox(key="data_control").value == "CTRL"
    assert "No blocking problems" in _texts(at.success)


def test_unrecognised_control_must_be_chosen(env):
    folder = _kang_bundle(env["work"] / "ab", labels=["lo"] * 20 + ["hi"] * 40)
    at = _load_server_path(str(folder))
    assert at.selectbox(key="data_control").value is None  # not the most frequent value
    assert "no control label chosen" in _texts(at.error)
    assert "No blocking problems" not in _texts(at.success)
    at.selectbox(key="data_control").set_value("lo").run()
    assert not at.error and "No blocking problems" in _texts(at.success)


@pytest.mark.parametrize("where", ["outside", "missing", "etc", "dotdot", "symlink"])
def test_server_paths_outside_the_data_roots_are_refused_alike(env, where):
    outside = _kang_bundle(env["tmp"] / "outside")
    link = env["work"] / "link"
    link.symlink_to(outside)
    path = {
        "outside": str(outside),
        "missing": str(env["work"] / "nope.h5ad"),
        "etc": "/etc/passwd",
        "dotdot": str(env["work"] / ".." / "outside"),
        "symlink": str(link),
    }[where]
    at = _load_server_path(path)
    errors = _texts(at.error)
    assert "no readable data at" in errors and "lies outside the allowed data folders" in errors
    assert "root:" not in errors and not at.selectbox  # nothing from the file reached the page


def test_labels_are_shown_as_plain_text(env):
    labels = ["CTRL"] * 50 + ["**bold** [link](http://x)"] * 5 + ["STIM"] * 5
    folder = _kang_bundle(env["work"] / "md", labels=labels)
    at = _load_server_path(str(folder))
    warnings = _texts(at.warning)
    assert r"\*\*bold\*\* \[link\]\(http\://x\)" in warnings  # escaped: shown as typed


def test_upload_names_and_fresh_upload_folders(env, monkeypatch):
    import streamlit as st

    from statecore.ui import state

    for bad in ("..", "", ".", "x" * 300, "a/.."):
        with pytest.raises(StatecoreError, match="cannot be used"):
            state.upload_name(bad)
    assert state.upload_name("../../etc/data.h5ad") == "data.h5ad"
    monkeypatch.setattr(st, "session_state", {state.SESSION_ID: "sess1"})
    first, second = state.upload_dir(), state.upload_dir()
    assert first != second and first.parent == second.parent and not any(first.iterdir())
    old = env["work"] / "uploads" / "old-session"
    old.mkdir()
    stale = time.time() - 3 * 24 * 3600
    os.utime(old, (stale, stale))
    monkeypatch.setenv("STATECORE_UPLOAD_MAX_AGE_H", "24")
    assert state.clean_old_uploads(keep="sess1") == 1
    assert not old.exists() and first.exists()
