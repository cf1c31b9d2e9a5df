"""Evaluate: a run's test split, model vs every baseline vs the data ceiling, with a verdict."""

from __future__ import annotations

import streamlit as st

from statecore.ui import analysis, figures, results, scoring, state, widgets

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
        "Predicts the run's test split with the model and with every baseline, scores them all (cell-eval "
        "metrics) next to the data ceiling, and says what the scores mean. Takes up to a minute on the sample data."
    )
    if not st.button("Evaluate the test split", type="primary", key="eval_go"):
        st.stop()
ev = widgets.attempt(results.evaluate_cached, run_dir, what="Evaluation")
if widgets.failed(ev):
    st.stop()
if key not in done:
    done.append(key)
    st.rerun()  # redraw without the button (the result is cached)

from statecore.evaluation.metrics import METRICS  # noqa: E402
from statecore.evaluation.run import MODEL  # noqa: E402
from statecore.evaluation.verdict import CEILING_NOTE, GLOSSARY, HEADLINE  # noqa: E402

for name, msg in ev.errors.items():
    if name == MODEL:
        st.error(
            f"Scoring the model failed: {msg}. The baselines are shown below; retrain or resume the run "
            "and evaluate again."
        )
    else:
        st.warning(f"{name} skipped: {msg}")

st.subheader("Verdict")
wins = any(v.beats for v in ev.verdicts)
(st.success if wins else st.warning)(ev.overall)
st.markdown("\n".join(f"- {v.sentence}" for v in ev.verdicts))
st.caption(
    f"{ev.n_perturbations} test perturbation(s) in {ev.context}. {CEILING_NOTE} Saved to "
    f"`{run_name}/evaluation/` (the Predict page shows it with every prediction of this run)."
)
with st.expander("What the metrics mean (1, 0 and NaN)"):
    for m in HEADLINE:
        g = GLOSSARY[m]
        st.markdown(f"**{g.name}** (`{m}`): {g.plain}  \n{g.one} {g.zero} {g.nan}")

summary = ev.summary
st.subheader("Model vs baselines vs ceiling (mean over test perturbations)")
shown_cols = [m for m in HEADLINE if m in summary.columns]
st.dataframe(summary[["method", *shown_cols]], hide_index=True, width="stretch")
metric_names = [c for c in summary.columns if c != "method"]
metric = st.selectbox(
    "Metric",
    metric_names,
    index=metric_names.index("pearson_delta") if "pearson_delta" in metric_names else 0,
    key="eval_metric",
    help="Any cell-eval metric; the verdict above reads the five headline ones.",
)
info = METRICS.get(metric)
empty = analysis.nothing_to_show(summary[metric])
if empty:
    st.info(f"No bars for {metric}: {empty}")
else:
    better = None if info is None or info.best is None else ("higher" if info.best == 1.0 else "lower")
    st.plotly_chart(figures.metric_bars(summary, metric, better=better), width="stretch", key="eval_fig_bars")
if info is not None:
    st.caption(GLOSSARY[metric].plain if metric in GLOSSARY else info.description)

st.subheader("Scorer")
profile = st.radio(
    "Scorer profile",
    list(scoring.PROFILE_LABELS),
    format_func=scoring.PROFILE_LABELS.get,
    key="eval_profile",
    help="The same test prediction scored the way the 2025 challenge (cell-eval) or the 2026 challenge "
    "(cell-eval2, on sampled raw counts) scores it.",
)
prof = widgets.attempt(scoring.profile_scores, run_dir, profile, what=f"Scoring with the {profile} profile")
if not widgets.failed(prof):
    for m in prof.messages:
        st.caption(f"note: {m}")
    systema = scoring.systema_table(prof.agg)
    if systema is not None:
        st.markdown("**Control-referenced vs perturbation-specific (mean over test perturbations)**")
        st.dataframe(systema, hide_index=True, key="eval_systema")
        st.caption(scoring.SYSTEMA_NOTE)
    if prof.scaled is not None:
        st.markdown("**vcc2026 scaled score**")
        st.dataframe(prof.scaled, hide_index=True, key="eval_scaled")
        st.caption(scoring.SCALED_NOTE)
    with st.expander(f"Every {profile} metric (mean over test perturbations)"):
        st.dataframe(scoring.mean_row(prof.agg).rename("mean").to_frame(), key="eval_profile_agg")

members = scoring.ensemble_members(run_dir)
if len(members) > 1:
    st.subheader("Seed spread of the ensemble")
    st.caption(
        f"This run is one of {len(members)} ensemble members (training seeds differ). A difference smaller "
        "than the spread between seeds is not a difference."
    )
    if st.button(f"Evaluate all {len(members)} members", key="eval_members"):
        sums = widgets.attempt(
            lambda: [results.evaluate_cached(m).summary for m in members], what="Evaluating the members"
        )
        if not widgets.failed(sums):
            spread = scoring.seed_spread(sums, [m for m in HEADLINE if m in summary.columns])
            st.dataframe(spread, hide_index=True, key="eval_spread")

pred, real, control = ev.pred, ev.real, ev.control
model_eval = ev.results.get(MODEL)
model_res = model_eval.results if model_eval is not None else None
st.subheader("Perturbation discrimination (PDS)")
if ev.pds is None:
    st.info(
        "No PDS view: it needs the model's predictions of at least two test perturbations "
        f"(this split has {ev.n_perturbations})."
    )
else:
    left, right = st.columns([3, 1])
    left.plotly_chart(
        figures.distance_heatmap(
            ev.pds.distances, title="L1 distance: predicted Δ (rows) vs real Δ, ordered by rank"
        ),
        width="stretch",
        key="eval_fig_pds",
    )
    right.caption(
        "Rank of the true perturbation among the real changes (1 = closest), the same ranks the PDS "
        "score uses. *best*–*worst* bound the rank when other perturbations sit at exactly the same "
        "distance (*tied*); the score then follows the alphabetical order of the tied names, as in cell-eval."
    )
    right.dataframe(ev.pds.ranks, hide_index=True, width="stretch")
    if ev.pds.predictions_alike:
        st.warning(
            "The model predicts almost the same change for every perturbation (the distances vary "
            f"{1 / ev.pds.prediction_spread:.0f}× more between real perturbations than between predictions), "
            "so every prediction lands nearest the same real perturbation and the ranks mostly follow how large "
            "each real change is (small, noisy groups have large changes), not what the model learned."
        )

st.subheader("DE overlap per perturbation")
if model_res is not None and "overlap_at_N" in model_res.columns:
    overlap = model_res.groupby("perturbation")["overlap_at_N"].mean()
    n_sig = model_res.groupby("perturbation")["de_nsig_counts_real"].mean()
    empty = analysis.overlap_empty_reason(overlap, n_sig)
    if empty:
        st.info(empty)
    elif len(overlap) == 1:  # one test perturbation: a number says it better than a single bar
        st.metric(
            f"Overlap of top DE genes (model vs real), {overlap.index[0]}",
            f"{overlap.iloc[0]:.3f}",
            help="Share of the real top DE genes that the model's prediction also ranks among its top DE genes.",
        )
    else:
        st.plotly_chart(
            figures.per_perturbation_bars(
                overlap, title="Overlap of top DE genes (model vs real)", y_label="overlap_at_N"
            ),
            width="stretch",
            key="eval_fig_overlap",
        )
else:
    st.info("No DE overlap for the model: its scoring failed (see the message above).")

st.subheader("Pearson Δ for one perturbation")
deltas = widgets.attempt(
    lambda: (analysis.deltas(pred, control), analysis.deltas(real, control)), what="Computing deltas"
)
if widgets.failed(deltas):
    st.stop()
pred_delta, real_delta = deltas
common = [p for p in pred_delta.index if p in real_delta.index]
shown = st.selectbox(
    "Perturbation", common, key="eval_pert", help="A held-out perturbation of the test split to look at."
)
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
