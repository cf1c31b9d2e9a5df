"""Train: configure a run, start it in the background, follow it live; cancel, resume, past runs."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from statecore.config import APP_TRAIN, MIN_TRAIN_CELLS, ST_PRESETS, DataSpec, SplitConfig, TrainConfig
from statecore.data.mixscape import CALL_COL
from statecore.runs import jobs
from statecore.ui import figures, loaders, state, training, widgets

state.init_page("Train", "🏋️")
st.title("Train")
root = state.runs_dir()
FIRST_HOUR_CONTEXT = "CD14+Mono"
TASK_LABELS = {
    "zeroshot": "zero-shot (new context)",
    "underrepresented": "underrepresented context",
    "explicit": "explicit test perturbations",
    "unseen": "unseen genes (never perturbed in training)",
}


def _task_widgets(c1, contexts: list[str], default_ctx: str, perts: list[str]):
    """Task, target context and the task's own option: ``(task, context, test_perts, keep)``."""
    task = c1.selectbox(
        "Task",
        ("zeroshot", "underrepresented", "explicit", "unseen"),
        key="train_task",
        format_func=TASK_LABELS.get,
        help="What the model is tested on. Zero-shot: the target context's perturbed cells are all held "
        "out (predict a new cell type from its controls). Underrepresented: only a share of the target "
        "context's perturbations is seen in training. Explicit: you choose the test perturbations. Unseen "
        "genes: some perturbed genes are held out of every context, and the model predicts them from gene "
        "features (validation genes are held out the same way).",
    )
    context = c1.selectbox(
        "Target context",
        contexts,
        index=contexts.index(default_ctx),
        key="train_context",
        help="The cell type or cell line whose held-out perturbations the run is scored on.",
    )
    if FIRST_HOUR_CONTEXT not in contexts:
        c1.caption(
            "Whether any model can beat the baselines depends on the signal in the held-out cells; Evaluate "
            "measures it (the ceiling). On the PerturBench sample the glioma lines carry almost none; for a "
            f"first run that shows learning, load the Kang sample (zero-shot {FIRST_HOUR_CONTEXT})."
        )
    test_perts: list[str] = []
    keep = 0.3
    if task == "explicit":
        test_perts = c1.multiselect(
            "Test perturbations",
            perts,
            default=perts[: max(1, len(perts) // 5)],
            key="train_test_perts",
            help="Held out from training in the target context and scored on Evaluate.",
        )
    elif task == "underrepresented":
        keep = c1.slider(
            "Share of the target's perturbations kept in training",
            0.05,
            0.9,
            0.3,
            key="train_keep",
            help="The rest of the target context's perturbations are held out for testing.",
        )
    return task, context, test_perts, keep


def _unseen_widgets(c1, perts: list[str]) -> dict:
    """The unseen-genes task's options: held-out genes, gene feature source, perturbation type."""
    test = c1.multiselect(
        "Held-out genes (optional)",
        perts,
        key="train_unseen_perts",
        help="Held out of every context and scored on Evaluate; empty: a seeded share of the target's genes.",
    )
    fraction = c1.slider(
        "Share of genes held out",
        0.05,
        0.6,
        0.2,
        key="train_unseen_fraction",
        help="Used when no held-out genes are picked: this share of the target's perturbed genes.",
    )
    source = c1.radio(
        "Gene features",
        ("from the data (control cells)", "a table on the server"),
        key="train_features",
        help="From the data: each gene's loadings on the top principal components of control-cell expression "
        "(a co-expression profile; only measured genes get one). A table: .csv/.tsv/.parquet (gene names "
        "first or in the index), .npz (genes, features) or .npy with <name>.genes.txt, e.g. ESM-2 embeddings.",
    )
    path = ""
    if source == "a table on the server":
        path = c1.text_input(
            "Gene feature table path",
            key="train_features_path",
            help="A file on the server running this app; genes are matched by symbol.",
        )
    kind = c1.selectbox(
        "Perturbation type",
        ("none", "knockdown", "knockout", "activation"),
        key="train_pert_type",
        help="How a perturbation moves its own target gene when the gene is in the panel (CRISPRi: knockdown).",
    )
    table = source == "a table on the server"
    return {
        "test": tuple(test),
        "fraction": float(fraction),
        "path": path.strip(),
        "kind": kind,
        "table": table,
    }


def _model_widgets(c2):
    """What to train, preset and set size: ``(kind, embedding_run, preset, preset_config, set_size)``."""
    kinds = ["State Transition on expression", "State Embedding model (SE)"]
    se_runs = training.model_runs(root, "embedding")
    if se_runs:
        kinds.insert(1, "State Transition on SE embeddings")
    kind = c2.radio(
        "What to train",
        kinds,
        key="train_track",
        help="State Transition (ST) predicts perturbed cells from control cells. On expression it reads and "
        "predicts the highly variable genes; on SE embeddings it reads cell embeddings from a trained State "
        "Embedding run and decodes back to genes. The State Embedding model (SE) learns those embeddings: "
        "train one first to unlock the second option.",
    )
    emb_run = None
    if kind == "State Transition on SE embeddings":
        emb_run = str(
            c2.selectbox(
                "Embedding run",
                [r.run_dir for r in se_runs],
                format_func=lambda p: p.name,
                key="train_emb_run",
                help="The State Embedding run whose cell embeddings this model reads.",
            )
        )
    preset = c2.selectbox(
        "Model preset",
        list(ST_PRESETS),
        key="train_preset",
        help="Model size. small trains in minutes on a CPU; base is larger and wants a GPU.",
    )
    p = ST_PRESETS[preset]
    c2.caption(
        f"{preset}: hidden size {p.hidden_dim}, {p.transformer_layers} transformer layers, "
        f"{p.transformer_heads} heads, MLP {p.mlp_hidden_dim}"
    )
    set_size = c2.number_input(
        "Cells per set",
        4,
        1024,
        int(p.set_size),
        key="train_set_size",
        help="The model maps a group of control cells to a group of perturbed cells at once; this is the "
        "group size. Larger sets see more of the population's spread but cost more memory.",
    )
    return kind, emb_run, preset, p, set_size


def _budget_widgets(c3):
    """Steps, time budget, learning rate, sets per step and device."""
    steps = c3.number_input(
        "Training steps",
        1,
        1_000_000,
        APP_TRAIN.steps,
        key="train_steps",
        help="Optimizer updates. 400 shows learning on the Kang sample on a CPU; the learning-rate "
        "schedule spans all of them.",
    )
    minutes = c3.number_input(
        "Time budget (minutes, 0 = none)",
        0.0,
        10_000.0,
        float(APP_TRAIN.max_minutes or 0),
        key="train_minutes",
        help="The run stops after this long even if steps remain, keeping the best model so far.",
    )
    lr = c3.number_input(
        "Learning rate",
        1e-6,
        1.0,
        TrainConfig().lr,
        format="%.5f",
        key="train_lr",
        help="Peak step size of the optimizer; the default suits both presets.",
    )
    batch = c3.number_input(
        "Sets per step",
        1,
        256,
        TrainConfig().batch_size,
        key="train_batch",
        help="How many (control set, perturbed set) pairs each update averages over.",
    )
    device = c3.selectbox(
        "Device",
        ("auto", "cpu", "cuda", "mps"),
        key="train_device",
        help="auto uses a GPU when one is present, else the CPU.",
    )
    members = c3.number_input(
        "Ensemble members (seeds)",
        1,
        5,
        1,
        key="train_members",
        help="Train the same model this many times with different random seeds. Predict then shows how much "
        "the members agree on each gene's change, and flags genes whose direction they dispute. Each member "
        "costs a full run.",
    )
    return steps, minutes, lr, batch, device, members


def _run_name(context: str, task: str) -> str:
    """The run name widget; it follows context and task until the user edits it."""
    suggested = f"{context}-{task}"
    if st.session_state.get("train_name") in (None, st.session_state.get("train_name_suggested")):
        st.session_state["train_name"] = suggested  # follows context and task until the user edits it
    st.session_state["train_name_suggested"] = suggested
    name = st.text_input(
        "Run name",
        key="train_name",
        help="Folder name under checkpoints/; a number is added if it exists.",
    )
    return name


def _new_run_form(runs: list[jobs.RunStatus]) -> None:
    prepared = widgets.need_data("prepared")
    if not prepared:
        return
    adata = widgets.attempt(loaders.read_h5ad, prepared["path"], what="Reading the prepared data")
    if widgets.failed(adata):
        return
    obs = adata.obs
    from statecore.data.io import control_label

    control = widgets.attempt(control_label, adata, what="Reading the control label")
    if widgets.failed(control):
        return
    sizes = obs["context"].astype(str).value_counts()
    contexts = sorted(sizes.index)
    # Kang's monocytes: the shipped task where the default budget shows learning (docs/RESULTS.md);
    # elsewhere the smallest context is the natural held-out target
    default_ctx = FIRST_HOUR_CONTEXT if FIRST_HOUR_CONTEXT in contexts else sizes.index[-1]
    perts = sorted(p for p in obs["perturbation"].astype(str).unique() if p != control)

    c1, c2, c3 = st.columns(3)
    task, context, test_perts, keep = _task_widgets(c1, contexts, default_ctx, perts)
    unseen = _unseen_widgets(c1, perts) if task == "unseen" else None
    classified = CALL_COL in obs.columns and c1.checkbox(
        "Train on classified cells",
        value=False,
        key="train_classified",
        help="This data carries perturbed-cell calls (Preprocess, 'Classify perturbed cells'). When on, training "
        f"uses only the targeting cells called perturbed (KO); a perturbation with fewer than "
        f"{MIN_TRAIN_CELLS} such cells in a context keeps all its cells. Controls, and every test cell that Evaluate scores, are never filtered.",
    )
    kind, emb_run, preset, p, set_size = _model_widgets(c2)
    steps, minutes, lr, batch, device, members = _budget_widgets(c3)
    c3.caption(training.gpu_summary())
    name = _run_name(context, task)

    live = [r for r in runs if r.live]
    threads = jobs.worker_threads(len(live))
    st.caption(
        f"The run uses {threads} CPU thread(s), leaving one core to this app"
        + (f" and sharing with {len(live)} live run(s)." if live else ".")
    )
    if st.button("Start training", type="primary", key="train_start"):
        if task == "explicit" and not test_perts:
            st.error("Pick at least one test perturbation for the explicit task.")
            return
        problem = training.unseen_problem(unseen)
        if problem:
            st.error(problem)
            return
        train = dict(lr=float(lr), batch_size=int(batch), steps=int(steps), device=device)
        train["max_minutes"] = float(minutes) or None
        if kind == "State Embedding model (SE)":
            # SE keeps its own learning rate and cells per step (SE_TRAIN); length and device are the page's
            length = {k: train[k] for k in ("steps", "max_minutes", "device")}
            config = training.se_run_config(data_path=prepared["path"], **length)
        else:
            split = SplitConfig(
                task=task,
                context=context,
                test_perts=tuple(test_perts),
                keep_fraction=keep,
                train_on_classified=bool(classified),
            )
            if unseen is not None:
                split = split.replace(test_perts=unseen["test"], test_fraction=unseen["fraction"])
            spec = DataSpec.from_dict(adata.uns.get("statecore", {}).get("spec") or {}).replace(
                control=control
            )
            config = training.st_run_config(
                data_path=prepared["path"],
                spec=spec,
                split=split,
                preset=preset,
                set_size=int(set_size) if set_size != p.set_size else None,
                embedding_run=emb_run,
                features=training.unseen_features(unseen),
                **train,
            )
        run_dir = jobs.new_run_dir(root, name)
        for i, member in enumerate(training.ensemble_configs(config, int(members))):
            share = jobs.worker_threads(len(live) + i)
            where = training.member_dir(run_dir, i)
            started = widgets.attempt(training.launch, where, member, threads=share, what="Starting the run")
            if widgets.failed(started):
                break
        if not widgets.failed(started):
            st.session_state[state.RUN] = str(run_dir)
            st.session_state["train_run_pick"] = run_dir.name
            st.rerun()


def _status_panel(run_dir) -> None:
    """The live part: re-run by the fragment timer while the run is live."""
    status = jobs.poll(run_dir)
    st.progress(status.progress, text=f"{status.state} · step {status.step:,} / {status.total:,}")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Step", f"{status.step:,}")
    m2.metric("Cells / s", f"{status.cells_per_s:,.0f}" if status.cells_per_s else "–")
    m3.metric("ETA", widgets.format_seconds(status.eta_s) if status.live else "–")
    m4.metric(
        "Best validation loss",
        f"{status.best_val:.4f}" if status.best_val is not None else "–",
        help="Distance between predicted and real cell sets on held-out training-context pairs (lower is "
        "better). '–': no validation pairs (e.g. every pair is used for training) or none scored yet. Its "
        "size depends on the data, so read it only as a trend; Evaluate says whether the model beats the "
        "baselines.",
    )
    reason = training.stop_reason(run_dir) if status.state == "done" and status.step < status.total else None
    if reason:
        st.caption(
            f"Stopped at step {status.step:,} of {status.total:,}: {reason}; the model kept is the best one up to then."
        )
    rows = jobs.read_metrics(run_dir)
    if rows:
        st.plotly_chart(figures.training_curves(pd.DataFrame(rows)), width="stretch", key="train_fig_loss")
    if status.state == "failed":
        st.error(f"The run failed: {status.error}")
        with st.expander("Log (last lines)"):
            st.code(jobs.log_tail(run_dir, 40) or "(empty)")
    elif status.state == "interrupted":
        st.warning(
            "The worker stopped without finishing (machine restart or killed). Press **Resume** to continue."
        )
    elif status.state == "cancelled":
        st.info("Cancelled. The last checkpoint is kept: **Resume** continues from it.")
    last = st.session_state.get("train_last_state", {}).get(str(run_dir))
    if last in jobs.LIVE_STATES and last != status.state:  # queued -> running -> done: refresh the picker
        st.session_state["train_last_state"][str(run_dir)] = status.state
        st.rerun(scope="app")  # the run ended: stop polling, refresh the buttons
    st.session_state.setdefault("train_last_state", {})[str(run_dir)] = status.state


def _run_view(run_dir) -> None:
    status = jobs.poll(run_dir)
    st.fragment(run_every=1.5 if status.live else None)(_status_panel)(run_dir)
    b1, b2, b3, _ = st.columns([1, 1, 2, 3])
    if status.live and b1.button("Cancel", key="train_cancel"):
        widgets.attempt(jobs.cancel, run_dir, what="Cancelling")
        st.rerun()
    if status.resumable and b2.button("Resume", key="train_resume"):
        widgets.attempt(jobs.resume, run_dir, what="Resuming")
        st.session_state.setdefault("train_last_state", {})[str(run_dir)] = "queued"
        st.rerun()
    if status.has_model and training.run_kind(run_dir) == "transition":
        from statecore.evaluation.verdict import read_verdict

        verdict = read_verdict(run_dir)
        st.caption(
            f"Evaluation: {verdict['overall']}"
            if verdict
            else "Not evaluated yet: the loss only shows a trend; **Evaluate** says whether this model beats "
            "the baselines and how close it gets to what the data allow."
        )
        if b3.button("Use for Predict / Evaluate", key="train_use"):
            st.session_state[state.RUN] = str(run_dir)
            st.rerun()  # the sidebar and the session record show the chosen run
        if st.session_state[state.RUN] == str(run_dir):
            state.page_link("predict", "Go to Predict")


runs = jobs.list_runs(root)
with st.expander("New run", expanded=not runs):
    _new_run_form(runs)
st.subheader("Runs")
if not runs:
    st.info("No runs yet: configure one above and press **Start training**.")
else:
    names = [r.name for r in runs]
    if st.session_state.get("train_run_pick") not in names:
        st.session_state["train_run_pick"] = names[0]
    chosen = st.selectbox(
        "Run",
        names,
        key="train_run_pick",
        format_func=lambda n: f"{n} ({runs[names.index(n)].state})",
        help="Follow a run: its progress, loss curve and buttons to cancel or resume it.",
    )
    _run_view(runs[names.index(chosen)].run_dir)
    with st.expander("All runs", expanded=False):
        st.dataframe(
            [
                {
                    "run": r.name,
                    "state": r.state,
                    "step": f"{r.step}/{r.total}",
                    "started": r.started,
                    "kind": training.run_kind(r.run_dir),
                    "error": r.error or "",
                }
                for r in runs
            ],
            hide_index=True,
            width="stretch",
        )
