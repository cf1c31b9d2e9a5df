"""Screen page helpers: one view of a screen (in-page or background), its figures, background jobs.

A screen shown on the page is a ``ScreenView``: the ranked table and the pseudobulk change per
perturbation as a frame. It comes either from ``statecore.inference.screen.screen`` run in the page
(small screens) or from a background job's files (``screen.csv`` + ``pseudobulk.h5ad`` written by
``python -m statecore screen --job-dir``), so both paths render identically.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from scipy.cluster.hierarchy import leaves_list, linkage

from statecore.data.io import split_combo
from statecore.runs import jobs
from statecore.ui import figures, loaders, results

PRESELECT = "predict_preselect"  # {"run", "context", "perturbation"}: read once by the Predict page
RESULT = "scr_result"  # the last in-page screen (ScreenView)
SCREEN_WORKER = (sys.executable, "-m", "statecore", "screen")
IN_PAGE_MAX = 300  # screens larger than this (perturbations) are offered as background jobs only


@dataclass(frozen=True)
class ScreenView:
    table: pd.DataFrame
    delta: pd.DataFrame  # [perturbations, genes] predicted mean log1p change vs the context's controls
    context: str
    control_edist: float
    label: str  # where it came from (shown above the results)
    run_dir: str  # the model it screened


def view_of_result(result, label: str) -> ScreenView:
    delta = pd.DataFrame(result.delta, index=list(result.perturbations), columns=list(result.genes))
    return ScreenView(
        result.table,
        delta,
        result.context,
        result.control_edist,
        label,
        str(result.options.get("run_dir", "")),
    )


def view_of_job(job_dir: Path) -> ScreenView:
    """A finished background screen read back from its files."""
    import anndata as ad

    table = pd.read_csv(job_dir / "screen.csv")
    pb = ad.read_h5ad(job_dir / "pseudobulk.h5ad")
    info = pb.uns.get("statecore_screen", {})
    delta = pd.DataFrame(np.asarray(pb.X), index=pb.obs_names.astype(str), columns=pb.var_names.astype(str))
    context, control_edist = str(info.get("context", "")), float(info.get("control_edist", np.nan))
    return ScreenView(table, delta, context, control_edist, job_dir.name, str(info.get("run_dir", "")))


def pseudobulk_bytes(view: ScreenView) -> bytes:
    """The pseudobulk Δ (X) with the table as obs, as .h5ad bytes (write_h5ad needs a real file)."""
    import anndata as ad

    obs = view.table.set_index("perturbation").loc[list(view.delta.index)]
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=view.delta.to_numpy(np.float32), obs=obs, var=pd.DataFrame(index=view.delta.columns))
    adata.uns["statecore_screen"] = {"context": view.context, "control_edist": view.control_edist}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pseudobulk.h5ad"
        adata.write_h5ad(path)
        return path.read_bytes()


@st.cache_data(max_entries=8, show_spinner="Checking the model's ranking on its held-out perturbations…")
def ranking_check(key: str, run_dir: str, n_cells: int, seed: int) -> tuple[str, pd.DataFrame]:
    """(sentence, summary) of ``screen_ranking_check`` on the run's test split (cached per model)."""
    from statecore.inference.screen import screen_ranking_check

    run = loaders.load_run(run_dir)
    adata = loaders.read_h5ad(loaders.run_data_path(run_dir))
    check = screen_ranking_check(run, adata, n_cells=n_cells, seed=seed)
    return check.sentence(), check.summary


def ranking_check_cached(run_dir: Path, n_cells: int = 64, seed: int = 0) -> tuple[str, pd.DataFrame]:
    return ranking_check(results.run_key(run_dir), str(run_dir), n_cells, seed)


# --------------------------------------------------------------------------- background screens


def screens_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "screens"


def screen_jobs(run_dir: Path) -> list[jobs.RunStatus]:
    return jobs.list_runs(screens_dir(run_dir))


def start_job(run_dir: Path, data_path: str, cli_args: list[str], context: str) -> jobs.RunStatus:
    """``python -m statecore screen --job-dir <run>/screens/<context>-<time> ...`` in the background."""
    job_dir = jobs.new_run_dir(screens_dir(run_dir), prefix=f"screen-{context}")
    args = ["--run-dir", str(run_dir), "--data", data_path, *cli_args]
    return jobs.start(job_dir, args, worker=SCREEN_WORKER, dir_flag="--job-dir")


def cancel_job(job_dir: Path) -> jobs.RunStatus:
    return jobs.cancel(job_dir)


def cli_args(
    *, context: str, perts: list[str], pairs: list[str], genes: list[str], n_cells: int, seed: int
) -> list[str]:
    """The ``screen`` CLI options for the page's choices (the same call the page makes in-process)."""
    args = ["--context", context, "--n-cells", str(n_cells), "--seed", str(seed)]
    args += ["--perturbations", ",".join(perts) if perts else "all"]
    if pairs:
        args += ["--pairs-of", ",".join(pairs)]
    if genes:
        args += ["--genes", ",".join(genes)]
    return args


# --------------------------------------------------------------------------- figures


def top_bars(table: pd.DataFrame, n: int, control_edist: float) -> go.Figure:
    top = table.head(n)
    fig = px.bar(
        top, x="perturbation", y="edist", color="source", hover_data=["measured_edist", "n_up", "n_down"]
    )
    if np.isfinite(control_edist):
        fig.add_hline(y=control_edist, line_dash="dash", line_color="gray", annotation_text="model's control")
    fig.update_xaxes(categoryorder="total descending")
    return figures._finish(fig, f"Top {len(top)} by predicted E-distance to the controls", 380)


def clustered(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows and columns in hierarchical-clustering leaf order (average linkage, Euclidean)."""
    rows = leaves_list(linkage(frame.to_numpy(), "average")) if len(frame) > 2 else np.arange(len(frame))
    cols = (
        leaves_list(linkage(frame.to_numpy().T, "average"))
        if frame.shape[1] > 2
        else np.arange(frame.shape[1])
    )
    return frame.iloc[rows, cols]


def hit_heatmap(view: ScreenView, n_hits: int, n_genes: int = 30) -> go.Figure:
    hits = view.table["perturbation"].head(n_hits).tolist()
    sub = view.delta.loc[hits]
    genes = sub.abs().max(axis=0).sort_values(ascending=False).index[:n_genes]
    frame = clustered(sub[genes])
    lim = float(np.abs(frame.to_numpy()).max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=frame.to_numpy(),
            x=list(frame.columns),
            y=list(frame.index),
            colorscale="RdBu_r",
            zmin=-lim,
            zmax=lim,
            colorbar=dict(title="Δ log1p"),
        )
    )
    return figures._finish(fig, "Top hits × most changed genes (clustered)", max(380, 16 * len(frame) + 140))


def gene_scatter(table: pd.DataFrame, gene: str) -> go.Figure:
    fig = px.scatter(
        table,
        x="edist",
        y=f"delta:{gene}",
        color="source",
        hover_name="perturbation",
        labels={"edist": "overall effect (E-distance)", f"delta:{gene}": f"predicted Δ {gene}"},
    )
    fig.add_hline(y=0, line_color="gray", line_dash="dot")
    return figures._finish(fig, f"Effect on {gene} vs overall effect")


def interaction_matrix(table: pd.DataFrame, sep: str) -> pd.DataFrame:
    """Symmetric singles × singles frame of the pairs' non-additivity (NaN on the diagonal)."""
    pairs = table[table["kind"] == "pair"].dropna(subset=["non_additivity"])
    parts = [split_combo(p, sep) for p in pairs["perturbation"]]
    singles = sorted({s for ab in parts for s in ab})
    mat = pd.DataFrame(np.nan, index=singles, columns=singles)
    for (a, b), value in zip(parts, pairs["non_additivity"]):
        mat.loc[a, b] = mat.loc[b, a] = value
    return mat


def interaction_heatmap(mat: pd.DataFrame) -> go.Figure:
    fig = go.Figure(
        go.Heatmap(
            z=mat.to_numpy(),
            x=list(mat.columns),
            y=list(mat.index),
            colorscale="Magma",
            colorbar=dict(title="‖ΔAB−ΔA−ΔB‖"),
        )
    )
    fig.update_yaxes(autorange="reversed")
    return figures._finish(fig, "Pair non-additivity (larger: further from the sum of the singles)", 420)
