"""Cached engine calls behind the Predict and Evaluate pages (keyed on path + mtime strings).

Results are shared across sessions: treat the returned AnnData/frames as read-only.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from statecore.ui import analysis, loaders

MODEL = "State (this run)"
BASELINES = ("control", "context_mean", "perturbation_mean", "cell_mean", "additive")


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


@st.cache_resource(max_entries=4, show_spinner="Predicting the test split and every baseline, then scoring…")
def _evaluate(key: str, run_dir: str, seed: int):
    from statecore.data.io import control_label
    from statecore.evaluation.metrics import evaluate
    from statecore.inference.baselines import predict_baseline
    from statecore.inference.predict import predict_split

    run = loaders.load_run(run_dir)
    adata = loaders.read_h5ad(loaders.run_data_path(run_dir))
    control = control_label(adata)
    pred, real = predict_split(run, adata, seed=seed)
    outputs = {MODEL: pred}
    errors: dict[str, str] = {}
    for kind in BASELINES:
        try:
            outputs[f"baseline: {kind}"] = predict_baseline(
                adata, run.split, kind, genes=list(run.genes), seed=seed
            )
        except Exception as exc:  # noqa: BLE001 - one baseline failing must not hide the others
            errors[f"baseline: {kind}"] = str(exc)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, p in outputs.items():
            try:
                results[name] = evaluate(p, real, control=control)
            except Exception as exc:  # noqa: BLE001 - show the others, name the one that failed
                errors[name] = str(exc)
    if not results:
        raise RuntimeError("no method could be scored: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return {"pred": pred, "real": real, "control": control, "results": results, "errors": errors}


def evaluate_cached(run_dir, seed: int = 0) -> dict:
    return _evaluate(run_key(run_dir), str(run_dir), seed)


def summary_table(results: dict, statistic: str = "mean") -> pd.DataFrame:
    """One row per method, one column per metric: the aggregate ``statistic`` over perturbations
    (and contexts)."""
    rows = []
    for name, res in results.items():
        agg = res.agg[res.agg["statistic"] == statistic].drop(
            columns=["statistic", "context"], errors="ignore"
        )
        rows.append({"method": name, **agg.mean(numeric_only=True).to_dict()})
    return pd.DataFrame(rows)
