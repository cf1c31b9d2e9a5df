"""Screen: rank every perturbation's predicted effect in one context; which ones move my gene."""

from __future__ import annotations

import streamlit as st

from statecore.ui import analysis, loaders, state, widgets
from statecore.ui import screen as ui

state.init_page("Screen", "🎯")
st.title("Screen")
st.caption(
    "Predicts every perturbation the model knows (and pairs of the singles you pick) on the same control "
    "cells of one context, and ranks them by E-distance to the real controls (scPerturb's definition). "
    "No p-values: on generated cells they only grow with the number of cells generated."
)

run_dir = widgets.pick_run(
    "scr_run", "No trained model yet. Start a run on **Train** (the defaults train in a few minutes)."
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
sep = run.config.spec.combo_sep
contexts, _, _ = analysis.prediction_choices(
    adata.obs, run.vocab.control, run.contexts, run.perturbations, sep
)
singles = [p for p in run.perturbations if p != run.vocab.control]
from statecore.inference.screen import all_singles  # noqa: E402

n_all = len(all_singles(run))  # a gene-feature run: its split's genes (any other gene of the table by name)

if run.split is not None and run.split.test.get(run.split.context):
    check = widgets.attempt(ui.ranking_check_cached, run_dir, what="Ranking check")
    if not widgets.failed(check):
        st.info(check[0])

split_ctx = run.split.context if run.split is not None else None
c1, c2, c3, c4 = st.columns([1, 3, 1, 1])
context = c1.selectbox(
    "Context",
    contexts,
    index=contexts.index(split_ctx) if split_ctx in contexts else 0,
    key="scr_context",
    help="The cell line, donor or cell type whose control cells every perturbation is applied to.",
)
perts = c2.multiselect(
    f"Perturbations (empty = all {n_all} the model knows"
    + (f"; any of the {len(singles)} genes of its feature table)" if run.vocab.features is not None else ")"),
    singles,
    key="scr_perts",
    help="Leave empty to rank every perturbation the model can predict; pick some to screen only those.",
)
n_cells = int(
    c3.number_input(
        "Cells per perturbation",
        8,
        2000,
        128,
        key="scr_n_cells",
        help="Predicted cells per perturbation. More cells give steadier scores and take longer; every "
        "perturbation starts from the same control cells, so differences are the model's, not chance.",
    )
)
seed = int(
    c4.number_input(
        "Seed",
        0,
        10_000,
        0,
        key="scr_seed",
        help="Which control cells are drawn. The same seed gives the same screen again.",
    )
)
c5, c6 = st.columns(2)
pairs = c5.multiselect(
    "Also screen every pair of these singles",
    singles,
    key="scr_pairs",
    help="Adds every double perturbation of the picked genes (n picked give n(n-1)/2 pairs), each "
    "compared with the sum of its two singles.",
)
genes = c6.multiselect(
    "Genes to follow (which perturbations move them)",
    run.genes,
    key="scr_genes",
    help="Adds a column per gene with its predicted change: answers 'which knockouts lower CD274?'.",
)
n_screen = (len(perts) or n_all) + len(pairs) * (len(pairs) - 1) // 2
args = ui.cli_args(context=context, perts=perts, pairs=pairs, genes=genes, n_cells=n_cells, seed=seed)
st.caption(
    f"{n_screen:,} predictions × {n_cells} cells. Same as: `python -m statecore screen --run-dir "
    f"{run_dir} {' '.join(args)} -o screen.csv`"
)

b1, b2 = st.columns(2)
go_now = b1.button(
    "Run screen here",
    key="scr_go",
    type="primary",
    disabled=n_screen > ui.IN_PAGE_MAX,
    help=f"Up to {ui.IN_PAGE_MAX} predictions in the page; larger screens run in the background.",
)
go_bg = b2.button(
    "Run in the background (survives closing the tab)",
    key="scr_bg",
    help="Starts a worker process; its progress and result are listed below, also after a refresh.",
)

if go_now:
    from statecore.inference.screen import screen

    bar = st.progress(0.0, text="Screening…")
    result = widgets.attempt(
        screen,
        run,
        adata,
        context=context,
        perturbations=perts or "all",
        pairs_of=pairs or None,
        genes=genes,
        n_cells=n_cells,
        seed=seed,
        progress=lambda done, total: bar.progress(done / total, text=f"Screened {done}/{total}"),
        what="Screen",
    )
    bar.empty()
    if not widgets.failed(result):
        st.session_state[ui.RESULT] = ui.view_of_result(result, f"{run_dir.name} · {context} (this page)")
if go_bg:
    started = widgets.attempt(ui.start_job, run_dir, data_path, args, context, what="Starting the screen")
    if not widgets.failed(started):
        st.success(f"Started {started.name}; it is listed below.")

jobs_now = ui.screen_jobs(run_dir)
if jobs_now:
    st.subheader("Background screens of this run")

    @st.fragment(run_every=2 if any(j.live for j in jobs_now) else None)
    def job_list() -> None:
        for job in ui.screen_jobs(run_dir):
            cols = st.columns([3, 2, 1])
            cols[0].write(f"**{job.name}**: {job.state}" + (f" ({job.error})" if job.error else ""))
            if job.live:
                cols[1].progress(job.progress, text=f"{job.step}/{job.total or '?'}")
                if cols[2].button("Cancel", key=f"scr_cancel_{job.name}"):
                    ui.cancel_job(job.run_dir)
            elif job.state == "done" and cols[2].button("Show", key=f"scr_show_{job.name}"):
                view = widgets.attempt(ui.view_of_job, job.run_dir, what="Reading the screen")
                if not widgets.failed(view):
                    st.session_state[ui.RESULT] = view
                    st.rerun()

    job_list()

view = st.session_state.get(ui.RESULT)
if view is not None and view.run_dir != str(run_dir):
    view = None  # a screen of another run: not this model's
if view is None:
    st.info("Pick a context and press **Run screen here** (or run it in the background).")
    st.stop()

st.subheader(f"Ranked hits: {view.label}")
st.caption(
    f"edist: predicted cells vs the context's real controls; the model's own prediction for the control "
    f"scores {view.control_edist:.3g} (a perturbation near it moves the cells no more than the model moves the "
    "controls themselves). source says whether "
    "the data hold real cells of that perturbation here (measured_edist)."
)
f1, f2, f3 = st.columns([2, 1, 1])
text = f1.text_input(
    "Filter perturbations", key="scr_filter", help="Shows only perturbations whose name contains this text."
)
kinds = f2.multiselect(
    "Kind",
    ["single", "pair"],
    default=["single", "pair"],
    key="scr_kinds",
    help="single: one gene; pair: a double perturbation.",
)
sources = f3.multiselect(
    "Source",
    ["measured", "predicted"],
    default=["measured", "predicted"],
    key="scr_sources",
    help="measured: the data hold real cells of this perturbation in this context (see measured_edist); "
    "predicted: only the model's prediction.",
)
table = view.table
if "unseen_gene" in table.columns and table["unseen_gene"].astype(bool).any():
    from statecore.inference.predict import unseen_note, validation_score

    st.warning(
        unseen_note(int(table["unseen_gene"].astype(bool).sum()), validation_score(run_dir))
        + " (column unseen_gene).",
        icon="⚠️",
    )
shown = table[
    table["perturbation"].astype(str).str.contains(text, case=False, regex=False)
    & table["kind"].isin(kinds)
    & table["source"].isin(sources)
]
st.dataframe(shown, hide_index=True, width="stretch")

top_n = len(table)
if len(table) > 5:
    top_n = int(
        st.slider(
            "Top N",
            5,
            min(100, len(table)),
            min(20, len(table)),
            key="scr_top_n",
            help="How many of the strongest hits the charts show.",
        )
    )
st.plotly_chart(ui.top_bars(table, top_n, view.control_edist), width="stretch", key="scr_fig_bars")
st.plotly_chart(ui.hit_heatmap(view, top_n), width="stretch", key="scr_fig_heat")
followed = [c.split(":", 1)[1] for c in table.columns if c.startswith("delta:")]
if followed:
    gene = st.selectbox(
        "Gene", followed, key="scr_gene_show", help="One of the followed genes: its predicted change per hit."
    )
    st.plotly_chart(ui.gene_scatter(table, gene), width="stretch", key="scr_fig_gene")
mat = ui.interaction_matrix(table, sep)
if len(mat):
    st.plotly_chart(ui.interaction_heatmap(mat), width="stretch", key="scr_fig_pairs")

st.subheader("Open a hit in Predict")
hits = table["perturbation"].head(10).tolist()
for i, col in enumerate(st.columns(5) * 2):
    if i < len(hits) and col.button(f"↗ {hits[i]}", key=f"scr_open_{i}"):
        st.session_state[ui.PRESELECT] = {
            "run": str(run_dir),
            "context": view.context,
            "perturbation": hits[i],
        }
        st.switch_page("pages/4_Predict.py")

st.subheader("Downloads")
d1, d2 = st.columns(2)
widgets.download(d1, "Ranked table (.csv)", table, f"screen-{view.context}.csv", key="scr_dl_csv")
payload = widgets.attempt(ui.pseudobulk_bytes, view, what="Writing the pseudobulk AnnData")
widgets.download(d2, "Pseudobulk Δ (.h5ad)", payload, f"screen-{view.context}.h5ad", key="scr_dl_h5ad")
