"""Cached engine calls behind the Predict and Evaluate pages (keyed on path + mtime strings).

Results are shared across sessions: treat the returned AnnData/frames as read-only.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from statecore.ui import analysis, loaders

log = logging.getLogger("statecore.app")


def run_key(run_dir: str | Path) -> str:
    """Changes whenever the run's best model does (a resumed run gets new results)."""
    return f"{Path(run_dir).resolve()}|{loaders.mtime(Path(run_dir) / 'model.safetensors')}"


@st.cache_resource(max_entries=8, show_spinner="Predicting…")
def _predict(key: str, run_dir: str, context: str, perts: tuple[str, ...], n_cells: int | None, seed: int):
    from statecore.inference.predict import predict

    run = loaders.load_run(run_dir)
    adata = loaders.read_h5ad(loaders.run_data_path(run_dir))
    return predict(run, adata, context=context, perturbations=list(perts), n_cells=n_cells, seed=seed)


def predict_cached(run_dir, context: str, perts: list[str], n_cells: int | None, seed: int = 0):
    return _predict(run_key(run_dir), str(run_dir), context, tuple(perts), n_cells, seed)


@st.cache_data(max_entries=16, show_spinner="Ranking DE genes…")
def de_table(pred_key: str, _pred, control: str) -> pd.DataFrame:
    """Predicted DE of every predicted perturbation vs the predicted context's controls."""
    from statecore.evaluation.de import compute_de

    return compute_de(_pred, control=control)


@st.cache_data(max_entries=8, show_spinner="Computing a UMAP…")
def umap_frame(key: str, _blocks: tuple, max_cells: int = 1500, seed: int = 0) -> pd.DataFrame:
    """UMAP of labelled blocks ``((label, matrix), ...)`` sharing genes, subsampled to ``max_cells``."""
    per_block = max(50, max_cells // max(1, len(_blocks)))
    mats, labels = [], []
    for label, x in _blocks:
        idx = analysis.subsample_index(x.shape[0], per_block, seed)
        mats.append(analysis.dense(x[idx]))
        labels += [label] * idx.size
    coords = analysis.umap_coords(np.vstack(mats), seed=seed)
    return pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "cells": labels})


@st.cache_data(max_entries=4, show_spinner=False)
def h5ad_bytes(key: str, _adata) -> bytes:
    """write_h5ad needs a real file: go through a temporary one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pred.h5ad"
        _adata.write_h5ad(path)
        return path.read_bytes()


@st.cache_resource(
    max_entries=4, show_spinner="Predicting the test split with the model and every baseline, then scoring…"
)
def _evaluate(key: str, run_dir: str, seed: int):
    from statecore.evaluation.run import evaluate_run
    from statecore.evaluation.verdict import EVALUATION_DIR

    run = loaders.load_run(run_dir)
    adata = loaders.read_h5ad(loaders.run_data_path(run_dir))
    ev = evaluate_run(run, adata, seed=seed)
    try:  # the Predict page reads it back as the run's measured confidence
        ev.save(Path(run_dir) / EVALUATION_DIR)
    except OSError:
        log.warning("could not save the evaluation of %s", run_dir, exc_info=True)
    return ev


def evaluate_cached(run_dir, seed: int = 0):
    """``statecore.evaluation.run.evaluate_run`` of the run (the CLI's and bench's path), cached."""
    return _evaluate(run_key(run_dir), str(run_dir), seed)


def ensemble_candidates(run_dir) -> list[Path]:
    """Other runs with a model on the same prepared data and the same genes (ensemble members)."""
    from statecore.runs.files import read_lines
    from statecore.ui import state, training

    run_dir = Path(run_dir)
    genes, data = read_lines(run_dir / "genes.txt"), loaders.run_data_path(run_dir)
    out = []
    for r in training.model_runs(state.runs_dir()):
        other = Path(r.run_dir)
        if other.resolve() == run_dir.resolve() or not (other / "genes.txt").exists():
            continue
        try:
            same_data = loaders.run_data_path(other) == data
        except Exception:  # noqa: BLE001 - a broken run is simply not a candidate
            continue
        if same_data and read_lines(other / "genes.txt") == genes:
            out.append(other)
    return out


def ensemble_changes(run_dirs: list, context: str, pert: str, n_cells: int) -> pd.DataFrame:
    """Each member's predicted change of ``pert`` in ``context``, and their agreement per gene."""
    rows = {}
    for rd in run_dirs:
        pred = predict_cached(rd, context, [pert], n_cells)
        labels = pred.obs["perturbation"].astype(str).to_numpy()
        x = analysis.dense(pred.X)
        rows[Path(rd).name] = x[labels == pert].mean(axis=0) - x[labels != pert].mean(axis=0)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[str(g) for g in pred.var_names])
    return analysis.ensemble_agreement(frame)
