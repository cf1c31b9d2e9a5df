"""AppTest for the session's life across loads and refreshes: a second dataset replaces every trace
of the first, messages use the names on screen, and a browser refresh keeps data, prepared data and run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

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
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    for key, value in session.items():
        at.session_state[key] = value
    at.run()
    at.switch_page(f"pages/{page}")
    return at.run()


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
