"""Predict: in-silico perturbation of a context's control cells with a trained run."""

from __future__ import annotations

import streamlit as st

from statecore.ui import analysis, figures, loaders, results, state, widgets

state.init_page("Predict", "🔮")
st.title("Predict")

run_dir = widgets.pick_run(
    "pred_run", "No trained model yet. Start a run on **Train** (the defaults train in a few minutes)."
)

run = widgets.attempt(loaders.load_run, run_dir, what="Loading the model")
if widgets.failed(run):
    st.stop()
data_path = widgets.attempt(loaders.run_data_path, run_dir, what="Finding the run's data")
if widgets.failed(data_path):
    st.stop()
adata = widgets.attempt(loaders.read_h5ad, data_path, what="Reading the run's data")
if widgets.failed(adata):
    st.stop()
from statecore.data.io import control_label  # noqa: E402

control = widgets.attempt(control_label, adata, what="Reading the control label")
if widgets.failed(control):
    st.stop()
obs = adata.obs
contexts, trainable, combos = analysis.prediction_choices(
    obs, control, run.contexts, run.perturbations, run.config.spec.combo_sep
)

split = run.split
default_ctx = split.context if split is not None and split.context in contexts else contexts[0]
preselect = st.session_state.pop("predict_preselect", None) or {}  # a hit opened from the Screen page
default_ctx = preselect.get("context") if preselect.get("context") in contexts else default_ctx
c1, c2, c3 = st.columns([1, 3, 1])
context = c1.selectbox("Context", contexts, index=contexts.index(default_ctx), key="pred_context")
options = trainable + combos
test_perts = list(split.test.get(context, [])) if split is not None else []
default = [p for p in test_perts if p in options][:2] or options[:2]
default = [preselect["perturbation"]] if preselect.get("perturbation") in options else default
perts = c2.multiselect(
    f"Perturbations ({len(trainable)} measured, {len(combos)} unmeasured combinations of measured singles)",
    options,
    default=default,
    key="pred_perts",
)
n_cells = c3.number_input("Cells per perturbation", 10, 5000, 200, key="pred_n_cells")
if not perts:
    st.info("Pick one or more perturbations.")
    st.stop()

pred = widgets.attempt(results.predict_cached, run_dir, context, perts, int(n_cells), what="Prediction")
if widgets.failed(pred):
    st.stop()
pred_key = f"{results.run_key(run_dir)}|{context}|{'|'.join(perts)}|{int(n_cells)}"
labels = pred.obs["perturbation"].astype(str).to_numpy()
shown = st.selectbox("Show", [p for p in perts if p in set(labels)], key="pred_show")
genes = [str(g) for g in pred.var_names]
pred_ctrl, pred_shown = pred.X[labels == control], pred.X[labels == shown]
ctrl_mean = analysis.dense(pred_ctrl).mean(axis=0)
pert_mean = analysis.dense(pred_shown).mean(axis=0)
st.success(
    f"Predicted {int((labels != control).sum()):,} cells for {len(perts)} perturbation(s) in {context}."
)

left, right = st.columns(2)
left.plotly_chart(
    figures.mean_scatter(ctrl_mean, pert_mean, genes, title=f"{shown}: predicted vs control mean"),
    width="stretch",
    key="pred_fig_means",
)
de = widgets.attempt(results.de_table, pred_key, pred, control, what="Differential expression")
if not widgets.failed(de):
    ranked = analysis.ranked_de(de, shown)
    right.plotly_chart(
        figures.volcano(
            ranked,
            lfc_col="log2_fold_change",
            p_col="fdr",
            gene_col="feature",
            title=f"{shown}: predicted DE vs control",
        ),
        width="stretch",
        key="pred_fig_volcano",
    )
    st.subheader("Ranked predicted DE genes")
    st.dataframe(
        ranked[["feature", "log2_fold_change", "fdr", "p_value", "target_mean", "ref_mean"]].head(200),
        hide_index=True,
        width="stretch",
    )

st.subheader("UMAP")
real_mask = (obs["context"].astype(str).to_numpy() == context) & (
    obs["perturbation"].astype(str).to_numpy() == shown
)
blocks = [
    (f"predicted {shown}", pred_shown),
    (f"control ({context})", pred_ctrl),
]
if real_mask.any():
    real = adata[real_mask][:, genes].X  # the model's genes, in its order
    blocks.append((f"real {shown}", real))
else:
    st.caption(f"{shown} was never measured in {context}: no real cells to compare.")
coords = widgets.attempt(results.umap_frame, f"{pred_key}|{shown}", tuple(blocks), what="UMAP")
if not widgets.failed(coords):
    st.plotly_chart(
        figures.embedding_scatter(
            coords[["x", "y"]].to_numpy(),
            coords["cells"].to_numpy(),
            title="Predicted, control and real cells",
        ),
        width="stretch",
        key="pred_fig_umap",
    )

st.subheader("Downloads")
d1, d2 = st.columns(2)
payload = widgets.attempt(results.h5ad_bytes, pred_key, pred, what="Writing the predicted AnnData")
widgets.download(
    d1, "Predicted cells (.h5ad)", payload, f"pred-{run_dir.name}-{context}.h5ad", key="pred_dl_h5ad"
)
widgets.download(d2, "DE table (.csv)", de, f"de-{context}.csv", key="pred_dl_csv")
