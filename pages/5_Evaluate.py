"""Evaluate: a run's test split scored beside every baseline, with per-perturbation views."""

from __future__ import annotations

import streamlit as st

from statecore.ui import analysis, figures, results, state, widgets

state.init_page("Evaluate", "📊")
st.title("Evaluate")

run_dir = widgets.pick_run(
    "eval_run", "No trained model yet. Start a run on **Train**, then come back to score its test split."
)
run_name = run_dir.name
key = results.run_key(run_dir)
done = st.session_state.setdefault("eval_done", [])
if key not in done:
    st.caption(
        "Predicts the run's test split with the model and with every baseline, then scores them all "
        "(cell-eval metrics). Takes up to a minute on the sample data."
    )
    if not st.button("Evaluate the test split", type="primary", key="eval_go"):
        st.stop()
out = widgets.attempt(results.evaluate_cached, run_dir, what="Evaluation")
if widgets.failed(out):
    st.stop()
if key not in done:
    done.append(key)
    st.rerun()  # redraw without the button (the result is cached)

from statecore.evaluation.metrics import CHALLENGE_METRICS, METRICS  # noqa: E402

for name, msg in out["errors"].items():
    if name == results.MODEL:
        st.error(
            f"Scoring the model failed: {msg}. The baselines are shown below; retrain or resume the run "
            "and evaluate again."
        )
    else:
        st.warning(f"{name} skipped: {msg}")
summary = results.summary_table(out["results"])
st.subheader("Model vs baselines (mean over test perturbations)")
headline = [m for m in (*CHALLENGE_METRICS, "pearson_delta", "mse", "mae_delta") if m in summary.columns]
st.dataframe(summary[["method", *headline]], hide_index=True, width="stretch")
metric_names = [c for c in summary.columns if c != "method"]
metric = st.selectbox(
    "Metric",
    metric_names,
    index=metric_names.index("pearson_delta") if "pearson_delta" in metric_names else 0,
    key="eval_metric",
)
info = METRICS.get(metric)
better = None if info is None or info.best is None else ("higher" if info.best == 1.0 else "lower")
st.plotly_chart(figures.metric_bars(summary, metric, better=better), width="stretch", key="eval_fig_bars")
if info is not None:
    st.caption(info.description)

pred, real, control = out["pred"], out["real"], out["control"]
model_eval = out["results"].get(results.MODEL)
model_res = model_eval.results if model_eval is not None else None
st.subheader("Perturbation discrimination (PDS)")
deltas = widgets.attempt(
    lambda: (analysis.deltas(pred, control), analysis.deltas(real, control)), what="Computing deltas"
)
if widgets.failed(deltas):
    st.stop()
pred_delta, real_delta = deltas
dist_ranks = widgets.attempt(analysis.pds_matrix, pred_delta, real_delta, what="PDS distance matrix")
if not widgets.failed(dist_ranks):
    dist, ranks = dist_ranks
    left, right = st.columns([3, 1])
    left.plotly_chart(
        figures.distance_heatmap(dist, title="Mean L1 distance: predicted Δ (rows) vs real Δ"),
        width="stretch",
        key="eval_fig_pds",
    )
    right.caption("Rank of the true perturbation (1 = best)")
    right.dataframe(ranks.sort_values().to_frame(), width="stretch")

st.subheader("DE overlap per perturbation")
if model_res is not None and "overlap_at_N" in model_res.columns:
    overlap = model_res.groupby("perturbation")["overlap_at_N"].mean()
    st.plotly_chart(
        figures.per_perturbation_bars(
            overlap, title="Overlap of top DE genes (model vs real)", y_label="overlap_at_N"
        ),
        width="stretch",
        key="eval_fig_overlap",
    )

st.subheader("Pearson Δ for one perturbation")
common = [p for p in pred_delta.index if p in real_delta.index]
shown = st.selectbox("Perturbation", common, key="eval_pert")
genes = [g for g in pred_delta.columns if g in set(real_delta.columns)]
real_d, pred_d = real_delta.loc[shown, genes].to_numpy(), pred_delta.loc[shown, genes].to_numpy()
r = analysis.pearson(real_d, pred_d)
st.plotly_chart(
    figures.delta_scatter(
        real_d,
        pred_d,
        genes,
        title=f"{shown}: predicted vs real Δ (Pearson r = {r:.3f})",
    ),
    width="stretch",
    key="eval_fig_delta",
)

st.subheader("UMAP of predicted and real cells")
p_lab = pred.obs["perturbation"].astype(str).to_numpy()
r_lab = real.obs["perturbation"].astype(str).to_numpy()
blocks = (
    (f"predicted {shown}", pred.X[p_lab == shown]),
    (f"real {shown}", real[r_lab == shown][:, genes].X),
    ("real control", real[r_lab == control][:, genes].X),
)
coords = widgets.attempt(results.umap_frame, f"{key}|eval|{shown}", blocks, what="UMAP")
if not widgets.failed(coords):
    st.plotly_chart(
        figures.embedding_scatter(
            coords[["x", "y"]].to_numpy(), coords["cells"].to_numpy(), title=f"{shown}: predicted vs real"
        ),
        width="stretch",
        key="eval_fig_umap",
    )

st.subheader("Downloads")
d1, d2, d3 = st.columns(3)
widgets.download(d1, "Summary (.csv)", summary, f"summary-{run_name}.csv", key="eval_dl_summary")
widgets.download(
    d2, "Per perturbation, model (.csv)", model_res, f"results-{run_name}.csv", key="eval_dl_results"
)
payload = widgets.attempt(results.h5ad_bytes, f"{key}|eval", pred, what="Writing the predictions")
widgets.download(d3, "Predicted test cells (.h5ad)", payload, f"pred-{run_name}.h5ad", key="eval_dl_h5ad")
