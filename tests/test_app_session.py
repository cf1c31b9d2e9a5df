"""AppTest for the session's life across loads and refreshes: a second dataset replaces every trace
of the first, messages use the names on screen, and a browser refresh keeps data, prepared data and run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tests.app_helpers import open_page, prepared_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture()
def env(tmp_path, monkeypatch):
    work, runs = tmp_path / "work", tmp_path / "runs"
    monkeypatch.setenv("STATECORE_WORKDIR", str(work))
    monkeypatch.setenv("STATECORE_RUNS", str(runs))
    monkeypatch.setenv("STATECORE_DATA_ROOTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    return {"work": work, "runs": runs, "tmp": tmp_path}


@pytest.fixture()
def two_files(tmp_path, synthetic_counts) -> tuple[Path, Path]:
    """The same cells under two different column layouts (the second names nothing like the first)."""
    first = tmp_path / "first.h5ad"
    synthetic_counts.write_h5ad(first)
    other = synthetic_counts.copy()
    other.obs = other.obs.rename(columns={"perturbation": "guide", "context": "cell_type", "batch": "donor"})
    second = tmp_path / "second.h5ad"
    other.write_h5ad(second)
    return first, second


def _texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def _page(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.switch_page(f"pages/{page}")
    return at.run()


def _load_path(at: AppTest, path: Path) -> None:
    at.radio(key="data_source").set_value("Path on the server").run()
    at.text_input(key="data_server_path").input(str(path)).run()
    at.button(key="data_load_path").click().run()
    assert not at.exception, [e.value for e in at.exception]


def test_second_dataset_resets_mapping_and_sidebar(env, two_files):
    first, second = two_files
    at = _page("1_Data.py")
    _load_path(at, first)
    assert at.selectbox(key="data_pert_col").value == "perturbation"
    at.selectbox(key="data_batch_col").set_value("(none)").run()  # a user's own choice on the first data
    _load_path(at, second)
    assert not at.error, _texts(at.error)
    assert at.selectbox(key="data_pert_col").value == "guide"
    assert at.selectbox(key="data_context_col").value == "cell_type"
    assert at.selectbox(key="data_batch_col").value == "donor"
    assert "perturbation" not in at.selectbox(key="data_pert_col").options
    sidebar = _texts(at.sidebar.caption)
    assert "second" in sidebar and "first" not in sidebar
    spec = at.session_state["sc_data"]["spec"]
    assert (spec["pert_col"], spec["context_col"], spec["batch_col"]) == ("guide", "cell_type", "donor")


def _labels(at: AppTest) -> list[str]:
    kinds = ("selectbox", "number_input", "text_input", "checkbox", "radio")
    return [str(w.label) for kind in kinds for w in at.get(kind)]


def _data_info(path: Path) -> dict:
    from statecore.config import DataSpec

    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    return {
        "path": str(path),
        "metadata": None,
        "cell_id_col": None,
        "label": path.name,
        "spec": spec.to_dict(),
    }


def _app(page: str, **session) -> AppTest:
    return open_page(page, timeout=TIMEOUT, **session)


def test_messages_name_the_fields_on_screen_not_cli_flags(env, two_files):
    from statecore.ui.widgets import FIELD_LABELS

    at = _app("1_Data.py", sc_data=_data_info(two_files[0]))
    labels = _labels(at)
    at.selectbox(key="data_context_col").set_value("perturbation").run()  # contexts without controls
    shown = _texts(at.error)
    assert "no control cells" in shown and 'choose another "Context column"' in shown, shown
    assert "--" not in shown
    at.radio(key="data_source").set_value("Upload MTX bundle + metadata CSV").run()
    labels += _labels(at)

    at = _app("2_Preprocess.py", sc_data=_data_info(two_files[0]))
    labels += _labels(at)
    at.checkbox(key="prep_scale").uncheck()
    at.number_input(key="prep_min_genes").set_value(100_000).run()
    at.button(key="prep_apply").click().run()
    shown = _texts(at.error)
    assert 'lower "Min genes per cell"' in shown and "--" not in shown and "min_genes" not in shown, shown
    # Every name a message may use is the label of a field on Data or Preprocess.
    missing = {v for v in FIELD_LABELS.values() if not any(label.startswith(v) for label in labels)}
    assert not missing, (missing, labels)


def test_field_wording_keeps_values_and_unknown_flags():
    from statecore.ui.widgets import page_words

    assert (
        page_words("it looks like 'ctrl': pass --control ctrl")
        == "it looks like 'ctrl': set \"Control label\" to ctrl"
    )
    assert (
        page_words("choose the control label (--control LABEL)")
        == 'choose the control label ("Control label")'
    )
    assert (
        page_words("or choose --hvg-flavor seurat for log data")
        == 'or set "HVG flavor" to seurat for log data'
    )
    assert page_words("predict with --context/--perturbation") == "predict with --context/--perturbation"


def _refresh(sid: str | None, page: str | None = None) -> AppTest:
    """A browser refresh: a new Streamlit session (empty session state) at the same address."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    if sid is not None:
        at.query_params["session"] = sid
    at.run()
    if page:
        at.switch_page(f"pages/{page}")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_refresh_keeps_data_prepared_data_and_run(env, two_files):
    first, _ = two_files
    run_dir = env["runs"] / "my-run"
    run_dir.mkdir(parents=True)
    at = _page("1_Data.py")
    assert "session" not in at.query_params  # nothing loaded: a refresh simply starts afresh
    _load_path(at, first)
    at.selectbox(key="data_batch_col").set_value("(none)").run()  # the user's own mapping survives too
    sid = at.query_params["session"]
    assert len(sid) == 32 and (env["work"] / "sessions" / f"{sid}.json").exists()

    at = _refresh(sid, "2_Preprocess.py")
    assert at.session_state["sc_data"]["path"] == str(first)
    assert at.session_state["sc_data"]["spec"]["batch_col"] is None
    at.number_input(key="prep_min_genes").set_value(0)
    at.number_input(key="prep_min_cells").set_value(0)
    at.checkbox(key="prep_umap").uncheck()
    at.run()
    at.button(key="prep_apply").click().run()
    from statecore.ui.state import plain

    prepared_name = plain(Path(at.session_state["sc_prepared"]["path"]).name)
    assert "Prepared: " + prepared_name in _texts(at.sidebar.caption)  # the sidebar follows Apply at once
    assert "Highly variable genes: **" in _texts(at.markdown)
    at.session_state["sc_run"] = str(run_dir)
    at.run()
    new_sid = at.query_params["session"]
    assert new_sid != sid  # a restored session continues under a new id: an old link is a snapshot

    at = _refresh(new_sid)
    assert at.session_state["sc_prepared"]["path"].endswith(".h5ad")
    assert at.session_state["sc_run"] == str(run_dir)
    captions = _texts(at.sidebar.caption)
    assert "first" in captions and "my\\-run" in captions and "not yet" not in captions, captions
    assert not at.info or "session" not in _texts(at.info)  # nothing was dropped: no notice


def test_two_browsers_never_share_a_session(env, two_files):
    first, second = two_files
    a, b = _page("1_Data.py"), _page("1_Data.py")
    _load_path(a, first)
    _load_path(b, second)
    sid_a, sid_b = a.query_params["session"], b.query_params["session"]
    assert sid_a != sid_b
    assert _refresh(sid_a).session_state["sc_data"]["path"] == str(first)
    assert _refresh(sid_b).session_state["sc_data"]["path"] == str(second)


@pytest.mark.parametrize(
    "case",
    ["outside the roots", "deleted file", "not json", "bad spec", "run elsewhere", "unknown id", "bad id"],
)
def test_a_stale_or_tampered_record_is_ignored_with_a_message(env, two_files, tmp_path, case):

    from statecore.ui import session

    first, _ = two_files
    data = _data_info(first)
    data["source"] = "server"
    sid = session.new_id()
    folder = env["work"] / "sessions"
    record = session.snapshot(data, None, None)
    if case == "outside the roots":
        record["data"]["path"] = str(ROOT / "README.md")  # a real file, but not in STATECORE_DATA_ROOTS
    elif case == "deleted file":
        record["data"]["path"] = str(tmp_path / "gone.h5ad")
    elif case == "bad spec":
        record["data"]["spec"] = {"pert_col": ["x"], "rm -rf": 1}
    elif case == "run elsewhere":
        record["run"] = str(tmp_path)  # a folder, but not inside the runs folder
    if case == "unknown id":
        sid = session.new_id()  # never written (or cleaned after a week)
    elif case == "bad id":
        sid = "../../etc/passwd"
    else:
        session.save(folder, sid, record)
    if case == "not json":
        (folder / f"{sid}.json").write_text("{not json")
    at = _refresh(sid, "1_Data.py")
    notice = _texts(at.info)
    assert "session" in notice and "Data" in notice, notice
    if case == "run elsewhere":  # the valid part comes back, the rest is named
        assert at.session_state["sc_data"]["path"] == str(first) and at.session_state["sc_run"] is None
        assert "run no longer exists" in notice
    else:
        assert at.session_state["sc_data"] is None
    assert at.query_params.get("session") != sid


def test_hvg_count_is_explained():
    from statecore.ui.analysis import hvg_explanation

    report = {"genes_in": 500, "genes_removed_min_cells": 139, "min_cells_applied": 30, "n_hvg": 361}
    text = hvg_explanation({**report, "hvg_flavor": "seurat_v3"}, 500)
    assert "**361**" in text and "500 genes" in text and "139" in text and "fewer than 30 cells" in text
    assert "so 361 passed QC" in text and "you asked for 500" in text
    text = hvg_explanation({**report, "genes_in": 6998, "genes_removed_min_cells": 2108, "n_hvg": 2000}, 2000)
    assert "4,890 passed QC" in text and "the 2,000 whose expression varies most" in text


def test_every_control_on_data_preprocess_and_train_has_help(env, two_files, prepared_synthetic, tmp_path):
    kinds = ("selectbox", "number_input", "text_input", "checkbox", "radio", "multiselect", "slider")

    def without_help(at: AppTest) -> list[str]:
        assert not at.exception, [e.value for e in at.exception]
        return [f"{kind}:{w.label}" for kind in kinds for w in at.get(kind) if not (w.help or "").strip()]

    at = _app("1_Data.py", sc_data=_data_info(two_files[0]))
    missing = without_help(at)
    for source in ("Upload .h5ad", "Upload MTX bundle + metadata CSV", "Path on the server"):
        at.radio(key="data_source").set_value(source).run()
        missing += without_help(at)
    missing += without_help(_app("2_Preprocess.py", sc_data=_data_info(two_files[0])))
    info = prepared_info(prepared_synthetic, tmp_path / "prepared.h5ad")
    at = _app("3_Train.py", sc_prepared=info)
    assert at.number_input(key="train_steps").value > 0  # the new-run form is on the page
    missing += without_help(at)
    for task in ("underrepresented", "explicit"):
        at.selectbox(key="train_task").set_value(task).run()
        missing += without_help(at)
    assert not missing, sorted(set(missing))


def test_every_input_widget_on_every_page_has_help_in_the_source():
    """Static companion of the AppTest above, for the pages it cannot reach without a run (Predict,
    Evaluate, Screen): every input widget call in pages/ and statecore/ui/ passes ``help=``."""
    import ast

    kinds = {"selectbox", "number_input", "text_input", "checkbox", "radio", "multiselect", "slider",
             "select_slider", "toggle", "text_area", "file_uploader"}  # fmt: skip
    missing = []
    for path in sorted([*(ROOT / "pages").glob("*.py"), *(ROOT / "statecore" / "ui").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in kinds
            ):
                if not any(k.arg == "help" for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno} {node.func.attr}")
    assert not missing, missing
