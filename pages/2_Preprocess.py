"""Preprocess: QC thresholds, normalization, HVGs; plots; Apply saves the prepared data to disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import streamlit as st

from statecore.config import DataSpec, QCConfig
from statecore.ui import analysis, figures, loaders, state, widgets

state.init_page("Preprocess", "🧪")
st.title("Preprocess")

info = widgets.need_data("data")
if not info:
    st.stop()
adata = widgets.attempt(loaders.read_data, info, what="Reading the data")
if widgets.failed(adata):
    st.stop()
spec = DataSpec.from_dict(info["spec"])

from statecore.data import preprocess  # noqa: E402 - scanpy import after the page shell renders
from statecore.data.io import check  # noqa: E402
from statecore.data.mixscape import call_summary, context_totals  # noqa: E402

report = widgets.attempt(check, adata, spec, what="Validating the data")
if not widgets.failed(report) and report.errors:
    st.error("The column mapping has blocking problems; fix them on **Data** first.")
    state.page_link("data", "Go to Data")
    st.stop()

suggested = widgets.attempt(analysis.suggest_qc, adata, what="Suggesting QC settings")
if widgets.failed(suggested):
    st.stop()
st.subheader("Settings")
c1, c2, c3 = st.columns(3)
min_genes = c1.number_input(
    "Min genes per cell",
    0,
    100_000,
    suggested.min_genes,
    key="prep_min_genes",
    help="Cells with fewer detected genes are removed as empty droplets or broken cells. The chart below "
    "shows how many that removes.",
)
scale = c1.checkbox(
    "Scale min genes on gene panels",
    value=suggested.scale_min_genes,
    key="prep_scale",
    help="min genes is meant for ~20,000-gene data; on a smaller panel it is scaled by n_genes / 20,000",
)
min_cells = c2.number_input(
    "Min cells per gene",
    0,
    1_000_000,
    suggested.min_cells,
    key="prep_min_cells",
    help="Genes detected in fewer cells are removed (too rare to learn from). The highly variable genes are "
    "chosen among the genes that remain.",
)
target_sum = c2.number_input(
    "Normalize to total counts",
    1.0,
    1e7,
    float(suggested.target_sum),
    key="prep_target",
    help="Each cell's counts are scaled to this total, so deeply and shallowly sequenced cells compare.",
)
log1p = c2.checkbox(
    "log1p",
    value=suggested.log1p,
    key="prep_log1p",
    help="Take log(1 + x) of the normalized counts, the usual scale for comparing expression changes.",
)
n_hvg = c3.number_input(
    "Highly variable genes",
    10,
    50_000,
    suggested.n_hvg,
    key="prep_n_hvg",
    help="How many of the most variable genes the model reads and predicts. At most the number of genes "
    "left after 'Min cells per gene'; after Apply the page says how many were kept and why.",
)
flavor = c3.selectbox(
    "HVG flavor",
    preprocess.HVG_FLAVORS,
    key="prep_flavor",
    help="auto: seurat_v3 on raw counts, seurat on log data",
)
umap = c3.checkbox(
    "Store a UMAP (for plots)",
    value=True,
    key="prep_umap",
    help="Compute a 2-D map of the cells once, for the UMAP plots on Predict and Evaluate (adds some seconds).",
)
classify = c3.checkbox(
    "Classify perturbed cells (Mixscape-style)",
    value=False,
    key="prep_classify",
    help="Many cells that carry a targeting guide are not perturbed. This calls each targeting cell perturbed "
    "(KO) or not (NP), per context, from how far its expression moves from its most similar control cells "
    "along the perturbation's own direction (Mixscape, Papalexi et al. 2021). No cell is removed: Train can "
    "then use only the perturbed cells, and Evaluate still scores every cell.",
)
qc = QCConfig(
    min_genes=int(min_genes),
    min_cells=int(min_cells),
    target_sum=float(target_sum),
    log1p=log1p,
    n_hvg=int(n_hvg),
    hvg_flavor=flavor,
    umap=umap,
    scale_min_genes=scale,
    classify_perturbed=classify,
)

st.subheader("Quality control")
metrics = widgets.attempt(preprocess.qc_metrics, adata, what="Computing QC metrics")
if not widgets.failed(metrics):
    applied = preprocess.effective_min_genes(qc, adata.n_vars)
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    gene_cells = widgets.attempt(analysis.cells_per_gene, counts, what="Counting cells per gene")
if not widgets.failed(metrics) and not widgets.failed(gene_cells):
    p1, p2 = st.columns(2)
    p1.plotly_chart(
        figures.histogram(
            metrics["n_genes"].to_numpy(), title="Genes per cell", x_label="genes detected", threshold=applied
        ),
        width="stretch",
        key="prep_fig_genes",
    )
    p2.plotly_chart(
        figures.histogram(
            metrics["total_counts"].to_numpy(), title="Counts per cell", x_label="total counts"
        ),
        width="stretch",
        key="prep_fig_counts",
    )
    removal = analysis.qc_removal(
        metrics["n_genes"].to_numpy(), gene_cells, min_genes=applied, min_cells=qc.min_cells
    )
    st.plotly_chart(figures.removal_bars(removal), width="stretch", key="prep_fig_removal")
    if applied != qc.min_genes:
        st.caption(f"min genes applied on this {adata.n_vars:,}-gene panel: {applied}")


def _target_path() -> Path:
    key = json.dumps(
        {
            "src": loaders.mtime(info["path"]),
            "path": info["path"],
            "meta": info.get("metadata"),
            "spec": spec.to_dict(),
            "qc": qc.to_dict(),
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    stem = Path(info["path"]).name.split(".")[0] or "data"
    return state.prepared_dir() / f"{stem}-prepared-{digest}.h5ad"


def _apply() -> dict:
    target = _target_path()
    if not target.exists():  # same input, mapping and settings: reuse the file on disk
        steps = "Preparing: QC, normalization, HVGs" + (", UMAP" if qc.umap else "")
        with st.spinner(steps + (", perturbed-cell calls" if qc.classify_perturbed else "") + "…"):
            from statecore.cli._common import write_h5ad

            prepared = preprocess.prepare(adata, spec=spec, qc=qc, source=info["path"])
            write_h5ad(prepared, target)  # unique temp name: two sessions may Apply at once
    prepared = loaders.read_h5ad(target)
    return {
        "path": str(target),
        "qc": qc.to_dict(),
        "n_obs": int(prepared.n_obs),
        "n_vars": int(prepared.n_vars),
    }


if st.button("Apply", type="primary", key="prep_apply"):
    result = widgets.attempt(_apply, what="Preprocessing")
    if result:
        st.session_state[state.PREPARED] = result
        st.rerun()  # the sidebar (drawn before this button's handler) shows the prepared data

done = st.session_state[state.PREPARED]
if not done:
    st.info("Press **Apply** to prepare the data with these settings.")
    st.stop()
prepared = widgets.attempt(loaders.read_h5ad, done["path"], what="Reading the prepared data")
if widgets.failed(prepared):
    st.stop()
st.success(
    f"Prepared: {prepared.n_obs:,} cells × {prepared.n_vars:,} genes, saved to `{done['path']}`. Next: **Train**."
)
state.page_link("train", "Go to Train")
if done["qc"] != qc.to_dict():
    st.warning("The settings above have changed since **Apply**: press **Apply** again to prepare with them.")
qc_report = prepared.uns.get("statecore", {}).get("qc_report", {})
if {"genes_in", "n_hvg"} <= set(qc_report):
    st.markdown(analysis.hvg_explanation(qc_report, int(done["qc"].get("n_hvg", qc_report["n_hvg"]))))
calls = call_summary(prepared)
if calls is not None and not calls.empty:
    st.subheader("Perturbed-cell calls")
    st.caption(
        "Targeting cells called perturbed (KO) or not perturbed (NP) per context. No cell was removed; "
        "**Train** offers 'Train on classified cells' for this data."
    )
    st.dataframe(context_totals(calls), hide_index=True, key="prep_calls_totals")
    with st.expander("Per perturbation"):
        st.dataframe(calls, hide_index=True, key="prep_calls_table")
if qc_report:
    with st.expander("QC report: every number of this preparation"):
        st.json({k: (v.item() if hasattr(v, "item") else v) for k, v in qc_report.items()})
var = prepared.var
hvg = var["highly_variable"].to_numpy(bool) if "highly_variable" in var else np.ones(prepared.n_vars, bool)
if "means" in var and ("variances_norm" in var or "dispersions_norm" in var):
    y_col = "variances_norm" if "variances_norm" in var else "dispersions_norm"
    mean, disp = var["means"].to_numpy(float), var[y_col].to_numpy(float)
else:  # every gene kept (panel smaller than the HVG count): plot log-space mean and variance
    x = analysis.dense(prepared.X[analysis.subsample_index(prepared.n_obs, 3000)])
    y_col, mean, disp = "variance (log1p)", x.mean(axis=0), x.var(axis=0)
st.plotly_chart(
    figures.hvg_scatter(mean, np.nan_to_num(disp), hvg, y_label=y_col), width="stretch", key="prep_fig_hvg"
)
