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
context = c1.selectbox(
    "Context",
    contexts,
    index=contexts.index(default_ctx),
    key="pred_context",
    help="The cell type / cell line whose control cells are perturbed. The run's target context is preselected.",
)
options = trainable + combos
featured = analysis.feature_genes(run, options)  # gene-feature runs: any gene of the feature table
options = options + featured
test_perts = list(split.test.get(context, [])) if split is not None else []
default = [p for p in test_perts if p in options][:2] or options[:2]
default = [preselect["perturbation"]] if preselect.get("perturbation") in options else default
perts = c2.multiselect(
    f"Perturbations ({len(trainable)} measured, {len(combos)} unmeasured combinations of measured singles"
    + (f", {len(featured)} more genes of the feature table)" if featured else ")"),
    options,
    default=default,
    key="pred_perts",
    help="Measured perturbations, and pairs A+B of measured singles that the data never measured "
    "(the model predicts the combination). The run's held-out test perturbations are preselected. A run "
    "trained with gene features also predicts any gene of its feature table, measured or not.",
)
n_cells = c3.number_input(
    "Cells per perturbation",
    10,
    5000,
    200,
    key="pred_n_cells",
    help="How many cells to generate for each perturbation (control cells of the context are perturbed "
    "in silico). More cells give smoother means; they also make the DE p-values smaller.",
)
if not perts:
    st.info("Pick one or more perturbations.")
    st.stop()

pred = widgets.attempt(results.predict_cached, run_dir, context, perts, int(n_cells), what="Prediction")
if widgets.failed(pred):
    st.stop()
pred_key = f"{results.run_key(run_dir)}|{context}|{'|'.join(perts)}|{int(n_cells)}"
labels = pred.obs["perturbation"].astype(str).to_numpy()
shown = st.selectbox(
    "Show",
    [p for p in perts if p in set(labels)],
    key="pred_show",
    help="Which of the predicted perturbations the charts and the DE table below are about.",
)
genes = [str(g) for g in pred.var_names]
pred_ctrl, pred_shown = pred.X[labels == control], pred.X[labels == shown]
ctrl_mean = analysis.dense(pred_ctrl).mean(axis=0)
pert_mean = analysis.dense(pred_shown).mean(axis=0)
st.success(
    f"Predicted {int((labels != control).sum()):,} cells for {len(perts)} perturbation(s) in {context}."
)
unseen_info = pred.uns.get("statecore", {}).get("unseen") or {}
if len(unseen_info.get("perturbations", [])):
    st.warning(
        f"Unseen genes ({', '.join(map(str, unseen_info['perturbations']))}): {unseen_info['note']}.",
        icon="⚠️",
    )

with st.container(border=True):
    st.markdown("**How far to trust this prediction**")
    from statecore.evaluation.verdict import read_verdict
    from statecore.runs.files import read_metrics

    val_rows = [r["val_pearson_delta"] for r in read_metrics(run_dir) if "val_pearson_delta" in r]
    verdict = read_verdict(run_dir)
    trust = analysis.confidence_text(
        verdict,
        context=context,
        perts=perts,
        test_perts=test_perts,
        val_pearson=val_rows[-1] if val_rows else None,
    )
    if trust:
        st.markdown(trust)
    if verdict is None:
        st.info(
            "Not measured yet: evaluating the run predicts its held-out test perturbations and scores them "
            "against the real cells, the baselines and the data ceiling (about a minute on the sample data)."
        )
        if st.button("Measure now", key="pred_measure"):
            if not widgets.failed(widgets.attempt(results.evaluate_cached, run_dir, what="Evaluation")):
                st.rerun()
    members = widgets.attempt(results.ensemble_candidates, run_dir, what="Looking for ensemble members")
    members = [] if widgets.failed(members) else members
    by_name = {p.name: p for p in members}
    chosen = [
        by_name[n]
        for n in st.multiselect(
            "Ensemble: other runs of the same data and genes (e.g. other seeds)",
            list(by_name),
            key="pred_ensemble",
            help="Predict with these runs too and show, gene by gene, how much the models agree.",
        )
    ]
    if not chosen:
        st.caption(
            "Spread between models: not available. This prediction comes from a single model (k = 1), so "
            "there is no agreement between ensemble members to show"
            + (
                ": add runs above to see it."
                if members
                else " (train the same task with other seeds to get one)."
            )
        )

left, right = st.columns(2)
left.plotly_chart(
    figures.mean_scatter(ctrl_mean, pert_mean, genes, title=f"{shown}: predicted vs control mean"),
    width="stretch",
    key="pred_fig_means",
)
de = widgets.attempt(results.de_table, pred_key, pred, control, what="Differential expression")
if not widgets.failed(de):
    table, knockdown = analysis.readable_de(de, shown, run.config.spec.combo_sep)
    right.plotly_chart(
        figures.volcano(
            table,
            lfc_col="log2 fold change",
            p_col="FDR",
            gene_col="gene",
            title=f"{shown}: predicted change vs control",
        ),
        width="stretch",
        key="pred_fig_volcano",
    )
    st.subheader("Predicted DE genes, largest change first")
    st.caption(
        f"{knockdown} Ranked by the predicted mean change in log space (log1p); log2 fold change uses a "
        "pseudocount of 1 on normalised counts, so it is never infinite. The FDR (Wilcoxon test of the "
        f"generated cells vs the controls) depends on how many cells were generated ({int(n_cells)} here): "
        "more cells give smaller p-values for the same change, so read the change, not the FDR."
    )
    st.dataframe(
        table.head(200),
        hide_index=True,
        width="stretch",
        column_config={
            "mean change (log1p)": st.column_config.NumberColumn(format="%.3f"),
            "log2 fold change": st.column_config.NumberColumn(format="%.3f"),
            "predicted mean (log1p)": st.column_config.NumberColumn(format="%.3f"),
            "control mean (log1p)": st.column_config.NumberColumn(format="%.3f"),
            "FDR": st.column_config.NumberColumn(format="scientific"),
        },
        key="pred_de_table",
    )

if chosen:
    st.subheader(f"Agreement between {len(chosen) + 1} ensemble members")
    agreement = widgets.attempt(
        results.ensemble_changes, [run_dir, *chosen], context, shown, int(n_cells), what="Ensemble"
    )
    if not widgets.failed(agreement):
        disputed = int(agreement["direction disputed"].sum())
        st.caption(
            f"Each member's predicted change of {shown} (mean log1p of its generated cells minus the "
            f"controls'), largest mean change first. {disputed} gene(s) move up in some members and down in "
            "others (flagged): do not trust their direction."
        )
        st.dataframe(agreement.head(200), hide_index=True, width="stretch", key="pred_ensemble_table")

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
widgets.download(
    d2,
    "DE table (.csv)",
    None if widgets.failed(de) else table,
    f"de-{context}-{shown}.csv",
    key="pred_dl_csv",
)
