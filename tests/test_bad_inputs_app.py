"""The bad-input corpus of tests/test_bad_inputs.py through the app: the Data page, "Path on the server".

Every bad file the CLI refuses is loaded in one AppTest session, one after the other, as a user trying
file after file would: the page never raises, always shows a message (an error, or a validation
problem that blocks Preprocess), and no input file changes. Cases that only differ by a CLI flag are
left to the CLI tests (the page has its own widgets for those choices)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.test_bad_inputs import BAD, _hashes

ROOT = Path(__file__).resolve().parents[1]


def _messages(at: AppTest) -> list[str]:
    return [str(e.value) for e in [*at.error, *at.warning]]


def test_every_bad_file_gets_a_message_on_the_data_page(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    built = []
    for case_id, build, _phrase in BAD:
        folder = inputs / case_id
        folder.mkdir()
        src, extra = build(folder)
        if extra:  # a flag makes the case: the page asks for those choices with its own widgets
            continue
        built.append((case_id, Path(src)))
    assert len(built) >= 40
    monkeypatch.setenv("STATECORE_DATA_ROOTS", str(inputs))
    monkeypatch.setenv("STATECORE_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("STATECORE_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(ROOT)
    before = _hashes(inputs)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/1_Data.py")
    at.run()
    at.radio(key="data_source").set_value("Path on the server").run()
    silent, previous = [], None
    for case_id, src in built:
        at.text_input(key="data_server_path").input(str(src)).run()
        at.button(key="data_load_path").click().run()
        assert not at.exception, (case_id, [e.value for e in at.exception])
        messages = _messages(at)
        # a message about THIS file comes first (not only what the previous file left on the page): a
        # read error (shown for the attempt just made) or a new validation problem
        fresh = messages and (messages[0].startswith("Reading the data failed") or messages[0] != previous)
        if not fresh:
            silent.append(case_id)
        assert "Traceback" not in " ".join(messages), case_id
        previous = messages[0] if messages else None
    assert not silent, f"no message for {silent}"
    assert _hashes(inputs) == before  # no input file modified
