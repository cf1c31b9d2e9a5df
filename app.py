"""statecore home: what is loaded, which runs exist, and the three-step quick start."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from statecore.evaluation.verdict import read_verdict
from statecore.runs import jobs
from statecore.ui import state

state.init_page("Home", "🧬")
st.title("statecore")
st.caption("Train Arc Institute's State model on Perturb-seq data, predict unseen perturbations, evaluate.")

st.subheader("Quick start")
st.markdown(
    "1. **Data**: press *Load* and check the column mapping. The preselected **Kang 2018** sample (PBMCs "
    "with and without IFN-β) shows learning within minutes on a CPU: the Train page preselects predicting "
    "the response of CD14+ monocytes, a cell type the model never sees treated. The **PerturBench** sample "
    "(one pick away) is the hard case: its glioma lines carry almost no signal, and Evaluate says so.\n"
    "2. **Preprocess** → *Apply*, then **Train** → *Start training* (the small preset trains in minutes on a CPU;"
    " the run continues in the background if you close the tab).\n"
    "3. **Evaluate** the run's test split: the model against every baseline and against the data's own ceiling, "
    "with a verdict in plain words. **Predict** any perturbation (also unmeasured combinations) in a context; "
    "each prediction shows how right this run was on its held-out perturbations."
)
cols = st.columns(5)
for col, key in zip(cols, ("data", "preprocess", "train", "predict", "evaluate")):
    with col:
        state.page_link(key, key.capitalize())

st.subheader("Loaded now")
data, prepared = st.session_state[state.DATA], st.session_state[state.PREPARED]
left, right = st.columns(2)
left.metric("Data", Path(data["path"]).name if data else "none")
right.metric(
    "Prepared", f"{prepared['n_obs']:,} cells × {prepared['n_vars']:,} genes" if prepared else "not yet"
)

st.subheader("Runs")
runs = jobs.list_runs(state.runs_dir())
if not runs:
    st.info(f"No runs yet in {state.runs_dir()}. Start one on **Train**.")
else:
    st.dataframe(
        [
            {
                "run": r.name,
                "state": r.state,
                "progress": f"{r.step}/{r.total}" if r.total else "–",
                "started": r.started or "–",
                "model": "yes" if r.has_model else "no",
                "verdict": (read_verdict(r.run_dir) or {}).get("overall", "not evaluated yet"),
            }
            for r in runs
        ],
        hide_index=True,
        width="stretch",
    )
