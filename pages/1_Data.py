"""Data: load the sample, an upload (.h5ad or MTX bundle + metadata CSV) or a server path; map columns; validate."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from statecore.config import DataSpec
from statecore.ui import analysis, loaders, state, widgets

state.init_page("Data", "📂")
st.title("Data")

SOURCES = ("Sample dataset", "Upload .h5ad", "Upload MTX bundle + metadata CSV", "Path on the server")
MAPPING_KEYS = ("data_pert_col", "data_control", "data_context_col", "data_batch_col", "data_combo_sep")


def _load(info: dict) -> None:
    """Read once (errors shown on the page); only a readable dataset replaces the current one.

    On success the page runs again from the top, so the sidebar and the column mapping show the new
    data only (the sidebar is drawn before this button's handler runs)."""
    adata = widgets.attempt(loaders.read_data, info, what="Reading the data")
    if widgets.failed(adata):
        return
    from statecore.data.io import detect_spec

    spec = widgets.attempt(detect_spec, adata, what="Detecting the columns")
    if widgets.failed(spec):
        return
    st.session_state[state.DATA] = {**info, "spec": spec.to_dict()}
    st.session_state[state.PREPARED] = None
    for key in MAPPING_KEYS:  # the new data brings its own suggestions (seeded from its spec below)
        st.session_state.pop(key, None)
    st.rerun()


def _seed(key: str, value: object, options: list | None) -> None:
    """Set a mapping widget's value from the data's spec when it has none or a stale one (not among
    ``options``). Values set here, before the widget is drawn, also reach the browser; a widget's own
    ``index`` would not replace what the browser still shows for the previous dataset."""
    if key not in st.session_state or (options is not None and st.session_state[key] not in options):
        st.session_state[key] = value


def _save_upload(uploaded, folder: Path) -> Path:
    """Write an uploaded file to disk at once (uploads otherwise live only in server memory).

    ``folder`` is new for every load (``state.upload_dir``), so a corrected file of the same name and
    size is read afresh and a second MTX bundle never mixes with the first."""
    target = folder / state.upload_name(uploaded.name)
    target.write_bytes(uploaded.getbuffer())
    return target


def _save_bundle(files, meta) -> dict:
    folder = state.upload_dir()
    bundle = folder / "mtx"
    bundle.mkdir()
    for f in files:
        _save_upload(f, bundle)
    meta_path = str(_save_upload(meta, folder)) if meta is not None else None
    return {"path": str(bundle), "metadata": meta_path}


source = st.radio(
    "Source",
    SOURCES,
    horizontal=True,
    key="data_source",
    help="Where the cells come from: a small dataset shipped with the app, a file from your computer, or a "
    "file already on this server (best for large files).",
)
if source == SOURCES[0]:
    name = st.selectbox(
        "Sample dataset",
        list(state.SAMPLES),
        key="data_sample",
        help="Kang 2018: blood cells with and without interferon-beta; the response is strong, so a first run "
        "shows learning. PerturBench: CRISPR screens in four cell lines; in the glioma lines the effects are "
        "too weak to learn, and Evaluate says so. Sources: sample_data/SOURCE.md.",
    )
    if st.button("Load", type="primary", key="data_load_sample"):
        _load({"path": str(state.SAMPLES[name]), "metadata": None, "cell_id_col": None, "label": name})
elif source == SOURCES[1]:
    up = st.file_uploader(
        "AnnData file (.h5ad)",
        type=["h5ad"],
        key="data_upload_h5ad",
        help="Raw counts (in X or a 'counts' layer) with one row per cell and the perturbation in a column of "
        "the cell metadata. The file is copied; your original is never changed.",
    )
    st.caption(
        "Upload limit: 2 GB (`server.maxUploadSize` in .streamlit/config.toml). For larger files use a server path."
    )
    if up is not None and st.button("Load", type="primary", key="data_load_upload"):
        path = widgets.attempt(_save_upload, up, state.upload_dir(), what="Saving the upload")
        if not widgets.failed(path):
            _load({"path": str(path), "metadata": None, "cell_id_col": None, "label": up.name})
elif source == SOURCES[2]:
    files = st.file_uploader(
        "matrix.mtx[.gz], barcodes.tsv[.gz], features.tsv[.gz] (or genes.tsv)",
        accept_multiple_files=True,
        key="data_upload_mtx",
        help="The three files of a 10x-style matrix, selected together (Cell Ranger's filtered output).",
    )
    meta = st.file_uploader(
        "Metadata CSV (one row per cell)",
        type=["csv", "tsv", "txt"],
        key="data_upload_meta",
        help="One row per cell: its barcode and at least the perturbation it received (and its cell type or "
        "line, if there are several).",
    )
    cell_id = st.text_input(
        "Cell id column in the CSV (empty: detect)",
        key="data_cell_id",
        help="The CSV column holding the cell barcodes of barcodes.tsv. Leave empty to use the column that "
        "matches them best.",
    )
    if files and st.button("Load", type="primary", key="data_load_mtx"):
        saved = widgets.attempt(_save_bundle, files, meta, what="Saving the upload")
        if not widgets.failed(saved):
            _load({**saved, "cell_id_col": cell_id or None, "label": "MTX bundle"})
else:
    path = st.text_input(
        "Path to an .h5ad file or an MTX bundle folder on the server",
        key="data_server_path",
        help="A full path on the machine running the app, inside the folders it may read "
        "(STATECORE_DATA_ROOTS; by default the samples and the app's own data folder).",
    )
    meta_path = st.text_input(
        "Metadata CSV path (MTX bundles; optional)",
        key="data_server_meta",
        help="For an MTX bundle: the CSV with one row per cell. Empty: a metadata.csv beside the matrix is used.",
    )
    if st.button("Load", type="primary", key="data_load_path", disabled=not path.strip()):
        # "server": reads stay inside the allowed data folders (STATECORE_DATA_ROOTS), see loaders.
        _load(
            {
                "path": path.strip(),
                "metadata": meta_path.strip() or None,
                "cell_id_col": None,
                "label": path.strip(),
                "source": "server",
            }
        )

info = st.session_state[state.DATA]
if not info:
    st.info("Nothing loaded yet: press **Load** to use the preselected sample dataset.")
    st.stop()

adata = widgets.attempt(loaders.read_data, info, what="Reading the data")
if widgets.failed(adata):
    st.stop()
st.success(f"Loaded **{state.plain(info['label'])}**: {adata.n_obs:,} cells × {adata.n_vars:,} genes")

st.subheader("Column mapping")
spec = DataSpec.from_dict(info["spec"])
columns = [str(c) for c in adata.obs.columns]
if not columns:
    st.error("The data has no cell metadata (obs) columns; add a metadata CSV with a perturbation column.")
    st.stop()
optional = ["(none)", *columns]
_seed("data_pert_col", spec.pert_col, columns)
c1, c2, c3, c4, c5 = st.columns(5)
pert_col = c1.selectbox(
    "Perturbation column",
    columns,
    key="data_pert_col",
    help="The obs column that names each cell's perturbation (gene knocked down, drug, ...).",
)
values = adata.obs[pert_col].astype(str).value_counts()
labels = list(values.index[:500])
if spec.control in values.index and spec.control not in labels:
    labels.append(spec.control)
# No recognised control label: the picker starts empty and validation blocks until one is chosen
# (the most frequent value is often the treated group, e.g. STIM).
_seed("data_control", spec.control if spec.control in labels else None, [*labels, None])
control = c2.selectbox(
    "Control label",
    labels,
    placeholder="Choose the control label",
    key="data_control",
    help="The value of the perturbation column that marks unperturbed (control) cells.",
)
_seed("data_context_col", spec.context_col or "(none)", optional)
context_col = c3.selectbox(
    "Context column (cell line / type)",
    optional,
    key="data_context_col",
    help="The obs column with the cell line or cell type; each context needs its own control cells.",
)
_seed("data_batch_col", spec.batch_col or "(none)", optional)
batch_col = c4.selectbox(
    "Batch column",
    optional,
    key="data_batch_col",
    help="Optional: the obs column with the batch (plate, donor, lane) the model should account for.",
)
_seed("data_combo_sep", spec.combo_sep, None)
combo_sep = c5.text_input(
    "Combination separator",
    key="data_combo_sep",
    help="The character between two perturbations given together, e.g. '+' in 'KRAS+TP53'.",
)
spec = spec.replace(
    pert_col=pert_col,
    control=control or "",
    context_col=None if context_col == "(none)" else context_col,
    batch_col=None if batch_col == "(none)" else batch_col,
    combo_sep=combo_sep or "+",
)
if spec.to_dict() != info["spec"]:
    st.session_state[state.DATA] = {**info, "spec": spec.to_dict()}
    st.session_state[state.PREPARED] = None  # prepared data no longer matches the mapping
    state.remember()  # a refresh keeps the mapping

st.subheader("Validation")
from statecore.data.io import check  # noqa: E402 - after the page shell renders

report = widgets.attempt(check, adata, spec, what="Validating the data")
if not widgets.failed(report):
    for msg in report.errors:
        st.error(state.plain(widgets.page_words(msg)))
    for msg in report.warnings:
        st.warning(state.plain(widgets.page_words(msg)))
    if report.ok:
        st.success("No blocking problems. Next: **Preprocess**.")
        state.page_link("preprocess", "Go to Preprocess")

st.subheader("Summary")
table = widgets.attempt(analysis.crosstab, adata.obs, spec.pert_col, spec.context_col, what="Counting cells")
if widgets.failed(table):
    st.stop()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Cells", f"{adata.n_obs:,}")
m2.metric("Genes", f"{adata.n_vars:,}")
m3.metric("Perturbations (incl. control)", f"{table.shape[0]:,}")
m4.metric("Contexts", f"{table.shape[1]:,}")
st.caption("Cells per perturbation (rows) and context (columns)")
st.dataframe(table, width="stretch", height=min(600, 36 + 35 * len(table)))
