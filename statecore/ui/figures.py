"""Plotly figure builders (interactive everywhere); pure functions of arrays and frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), template="plotly_white")


def _finish(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=title, height=height, **_LAYOUT)
    return fig


def histogram(values: np.ndarray, *, title: str, x_label: str, threshold: float | None = None) -> go.Figure:
    fig = px.histogram(x=np.asarray(values), nbins=60, labels={"x": x_label})
    if threshold is not None and threshold > 0:
        fig.add_vline(x=threshold, line_dash="dash", line_color="crimson", annotation_text="threshold")
    return _finish(fig, title, 300)


def removal_bars(table: pd.DataFrame) -> go.Figure:
    """Kept vs removed per filter as shares of what the filter looked at (cells or genes), each part
    labelled with its count and share: a filter removing 4 cells must not look like one removing 6,000,
    and a 2,000-cell bar must not be dwarfed by a 7,000-gene one."""
    long = table.melt(
        id_vars="filter", value_vars=["kept", "removed"], var_name="outcome", value_name="count"
    )
    totals = long.groupby("filter")["count"].transform("sum").clip(lower=1)
    long["share"] = 100 * long["count"] / totals
    long["label"] = [f"{c:,} ({c / t:.1%})" for c, t in zip(long["count"], totals)]
    fig = px.bar(
        long,
        x="share",
        y="filter",
        color="outcome",
        orientation="h",
        barmode="stack",
        text="label",
        color_discrete_map={"kept": "#4c78a8", "removed": "#e45756"},
        category_orders={"outcome": ["kept", "removed"]},
        labels={"share": "% of cells or genes", "filter": ""},
        hover_data={"count": ":,", "share": ":.1f"},
    )
    fig.update_traces(textposition="auto", insidetextanchor="middle")
    fig.update_layout(
        legend=dict(title_text="", orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        xaxis_range=[0, 100],
    )
    return _finish(fig, "What each filter removes (kept vs removed)", 230)


def hvg_scatter(mean: np.ndarray, dispersion: np.ndarray, is_hvg: np.ndarray, *, y_label: str) -> go.Figure:
    """Mean vs variability per gene, log mean axis (expression spans orders of magnitude); the
    variability axis is log too unless it holds normalised dispersions (which go below zero)."""
    frame = pd.DataFrame(
        {"mean": mean, y_label: dispersion, "highly variable": np.where(is_hvg, "yes", "no")}
    )
    log_y = bool((frame[y_label] > 0).all())
    fig = px.scatter(
        frame[frame["mean"] > 0],
        x="mean",
        y=y_label,
        color="highly variable",
        opacity=0.6,
        log_x=True,
        log_y=log_y,
        color_discrete_map={"yes": "#e45756", "no": "#9ca3af"},
    )
    return _finish(fig, f"Highly variable genes ({int(np.sum(is_hvg))}; log axes)")


def training_curves(metrics: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    if "loss" in metrics:
        m = metrics.dropna(subset=["loss"])
        fig.add_scatter(x=m["step"], y=m["loss"], mode="lines", name="train loss")
    if "val_loss" in metrics:
        v = metrics.dropna(subset=["val_loss"])
        fig.add_scatter(x=v["step"], y=v["val_loss"], mode="lines+markers", name="validation loss")
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss")
    return _finish(fig, "Loss", 320)


def mean_scatter(
    control_mean: np.ndarray, pred_mean: np.ndarray, genes: list[str], *, title: str
) -> go.Figure:
    frame = pd.DataFrame({"control mean": control_mean, "predicted mean": pred_mean, "gene": genes})
    fig = px.scatter(frame, x="control mean", y="predicted mean", hover_name="gene", opacity=0.7)
    hi = float(max(frame["control mean"].max(), frame["predicted mean"].max(), 1e-6))
    fig.add_scatter(x=[0, hi], y=[0, hi], mode="lines", line=dict(dash="dash", color="gray"), name="y = x")
    return _finish(fig, title)


def volcano(
    de: pd.DataFrame, *, lfc_col: str, p_col: str, gene_col: str, fdr: float = 0.05, title: str = "Volcano"
) -> go.Figure:
    frame = de[[gene_col, lfc_col, p_col]].copy()
    frame["-log10 p"] = -np.log10(np.clip(frame[p_col].astype(float), 1e-300, 1.0))
    frame["significant"] = np.where(frame[p_col].astype(float) < fdr, f"{p_col} < {fdr}", "n.s.")
    fig = px.scatter(
        frame,
        x=lfc_col,
        y="-log10 p",
        color="significant",
        hover_name=gene_col,
        opacity=0.7,
        color_discrete_map={f"{p_col} < {fdr}": "#e45756", "n.s.": "#9ca3af"},
    )
    fig.update_xaxes(title="log2 fold change")
    return _finish(fig, title)


# Cell roles on every UMAP: predicted cells warm, controls grey, real perturbed cells blue.
ROLE_COLOURS = {"predicted": "#e4572e", "control": "#9ca3af", "real": "#1f77b4"}


def role_of(label: str) -> str:
    """'predicted X' / 'control (...)' / 'real X' / 'real control' -> the colour role."""
    text = str(label).lower()
    if text.startswith("predicted"):
        return "predicted"
    if "control" in text:
        return "control"
    return "real"


def embedding_scatter(coords: np.ndarray, groups: np.ndarray, *, title: str) -> go.Figure:
    """UMAP with one fixed colour per role (predicted / control / real), so they read at a glance."""
    groups = np.asarray(groups).astype(str)
    frame = pd.DataFrame({"UMAP1": coords[:, 0], "UMAP2": coords[:, 1], "cells": groups})
    colours = {g: ROLE_COLOURS[role_of(g)] for g in pd.unique(groups)}
    order = sorted(colours, key=lambda g: ("control", "real", "predicted").index(role_of(g)))
    fig = px.scatter(
        frame,
        x="UMAP1",
        y="UMAP2",
        color="cells",
        opacity=0.6,
        color_discrete_map=colours,
        category_orders={"cells": order},  # controls drawn first, predictions on top
    )
    fig.update_traces(marker=dict(size=4))
    return _finish(fig, title, 480)


def metric_bars(table: pd.DataFrame, metric: str, *, better: str | None = None) -> go.Figure:
    """One bar per method for one metric: the model in colour, baselines grey, the ceiling green."""
    frame = table[["method", metric]].copy()
    frame["kind"] = [
        "ceiling" if m.startswith("ceiling") else "baseline" if m.startswith("baseline") else "model"
        for m in frame["method"]
    ]
    fig = px.bar(
        frame,
        x="method",
        y=metric,
        color="kind",
        text_auto=".3g",
        color_discrete_map={"model": "#e4572e", "baseline": "#9ca3af", "ceiling": "#54a24b"},
    )
    suffix = f" ({better} is better)" if better else ""
    fig.update_layout(legend_title_text="")
    return _finish(fig, f"{metric}{suffix}", 340)


def distance_heatmap(dist: pd.DataFrame, *, title: str) -> go.Figure:
    fig = go.Figure(
        go.Heatmap(
            z=dist.to_numpy(),
            x=list(dist.columns),
            y=list(dist.index),
            colorscale="Viridis",
            colorbar=dict(title="L1"),
        )
    )
    fig.update_xaxes(title="real perturbation")
    fig.update_yaxes(title="predicted perturbation", autorange="reversed")
    return _finish(fig, title, max(380, 18 * len(dist) + 120))


def delta_scatter(real: np.ndarray, pred: np.ndarray, genes: list[str], *, title: str) -> go.Figure:
    frame = pd.DataFrame({"real Δ": real, "predicted Δ": pred, "gene": genes})
    fig = px.scatter(frame, x="real Δ", y="predicted Δ", hover_name="gene", opacity=0.7)
    lo = float(min(frame.min(numeric_only=True).min(), 0))
    hi = float(max(frame.max(numeric_only=True).max(), 0))
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="gray"), name="y = x")
    return _finish(fig, title)


def per_perturbation_bars(values: pd.Series, *, title: str, y_label: str) -> go.Figure:
    frame = values.sort_values(ascending=False).rename(y_label).reset_index()
    frame.columns = ["perturbation", y_label]
    fig = px.bar(frame, x="perturbation", y=y_label)
    return _finish(fig, title, 340)
