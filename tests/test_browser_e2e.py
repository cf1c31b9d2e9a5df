"""Real-browser first hour: headless Debian chromium (Playwright) clicks sample data -> preprocess ->
(browser refresh) -> train (small budget) -> predict -> evaluate in the running app, on both samples, and
checks the verdict and the ceiling. Screenshots go to $STATECORE_SCREENSHOT_DIR when set
(docs/screenshots for the README)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("STATECORE_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
TRAIN_STEPS = int(os.environ.get("STATECORE_E2E_STEPS", "20"))  # screenshots: the default 400

pytestmark = pytest.mark.browser


def _require_browser():
    in_ci = os.environ.get("CI", "").lower() == "true"
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -r requirements-dev.txt)")
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        missing.append(f"chromium at {CHROMIUM} (apt-get install -y chromium, or `make browser`)")
    if missing:
        message = "real-browser test needs " + " and ".join(missing)
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    _require_browser()
    port = _free_port()
    env = dict(os.environ, STATECORE_WORKDIR=str(tmp_path / "work"), STATECORE_RUNS=str(tmp_path / "runs"))
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("streamlit did not become healthy: " + (tmp_path / "streamlit.log").read_text()[-2000:])
    yield {"url": url, "runs": tmp_path / "runs", "log": tmp_path / "streamlit.log"}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    from statecore.runs import jobs

    for run in jobs.list_runs(tmp_path / "runs"):  # never leave a worker behind
        if run.live:
            jobs.cancel(run.run_dir, kill_after_s=10)


def _idle(page, timeout_s: float = 120) -> None:
    page.wait_for_selector(IDLE, timeout=timeout_s * 1000)


def _goto(page, label: str) -> None:
    page.locator("[data-testid='stSidebar'] [data-testid='stPageLink-NavLink']", has_text=label).first.click()
    page.wait_for_selector(f"h1:has-text('{label}')", timeout=60_000)
    _idle(page)


VIEWPORT = {"width": 1400, "height": 1000}
SHOT_MAX_HEIGHT = 2600  # px: the top of a long page, not all of it


def _shot(page, name: str) -> None:
    """Screenshot of the page down to its end (at most ``SHOT_MAX_HEIGHT``). Streamlit scrolls its main
    area inside the window, so the window is made as tall as that area's content first."""
    folder = os.environ.get("STATECORE_SCREENSHOT_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)  # no hover toolbar on a chart
    height = page.evaluate(
        "Math.max(...[...document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer]')]"
        ".map(e => e.scrollHeight), 0)"
    )
    page.set_viewport_size(
        {"width": VIEWPORT["width"], "height": int(min(max(height, 1000), SHOT_MAX_HEIGHT))}
    )
    page.wait_for_timeout(1500)  # charts re-layout to the new size
    _idle(page)
    page.screenshot(path=str(Path(folder) / f"{name}.png"))
    page.set_viewport_size(VIEWPORT)


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.inner_text("body")[:3000]


def _sidebar_text(page) -> str:
    return page.locator("[data-testid='stSidebar']").inner_text()


def _load_sample(page, sample: str) -> None:
    """Data: pick ``sample`` (unless it is the preselected one), press Load; the sidebar names its file."""
    from statecore.ui.state import SAMPLES

    name = next(n for n in SAMPLES if n.startswith(sample))
    if name != next(iter(SAMPLES)):
        page.locator("[data-testid='stSelectbox']", has_text="Sample dataset").click()
        page.get_by_role("option", name=name).click()
        _idle(page)
    page.get_by_role("button", name="Load").click()
    page.get_by_text("Column mapping").first.wait_for(timeout=120_000)
    _idle(page)
    _no_exception(page)
    assert f"Data: {SAMPLES[name].name}" in _sidebar_text(page)


def _refresh_keeps_the_session(page) -> None:
    """A browser refresh (a new Streamlit session) still shows the loaded and prepared data."""
    before = _sidebar_text(page)
    assert "session=" in page.url and "Prepared: not yet" not in before, (page.url, before)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("h1:has-text('Preprocess')", timeout=60_000)
    _idle(page)
    after = _sidebar_text(page)
    assert "Data: none loaded" not in after and "Prepared: not yet" not in after, after
    assert [line for line in after.splitlines() if line.startswith(("Data:", "Prepared:"))] == [
        line for line in before.splitlines() if line.startswith(("Data:", "Prepared:"))
    ]
    page.get_by_text("saved to", exact=False).first.wait_for(timeout=60_000)  # the page sees it too


def _train(page) -> None:
    _goto(page, "Train")
    steps = page.get_by_role("spinbutton", name="Training steps")
    steps.fill(str(TRAIN_STEPS))
    steps.press("Enter")
    _idle(page)
    page.get_by_role("button", name="Start training").click()
    page.get_by_text("Best validation loss").first.wait_for(timeout=60_000)
    page.locator("[data-testid='stProgress']").get_by_text("done").first.wait_for(timeout=300_000)
    # The page follows the end of the run: no Cancel button, no "Training now" in the sidebar.
    page.get_by_role("button", name="Cancel").wait_for(state="detached", timeout=30_000)
    _idle(page)
    _no_exception(page)
    assert "Training now" not in _sidebar_text(page)


# The first hour on both samples: Kang (the preselected one) must show learning; on the PerturBench
# glioma lines the verdict must say that the data carry no signal to learn. Margin at the test's 20 steps
# (CLI, seeds 0-2): Kang Pearson Δ 0.890 ± 0.003 against 0.862 for the best baseline.
FIRST_HOUR = [
    pytest.param("Kang", "CD14+Mono", ("Pearson Δ: beats every baseline",), "", id="kang"),
    pytest.param(
        "PerturBench",
        "A172",
        ("Pearson Δ: does not beat", "this dataset carries almost no signal", "(the ceiling is 0."),
        "_perturbench",
        id="perturbench",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("sample, context, verdict, suffix", FIRST_HOUR)
def test_first_hour_in_a_real_browser(server, tmp_path, sample, context, verdict, suffix):
    """Load -> preprocess -> (refresh) -> train -> evaluate -> predict, as a first-time user clicks it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        try:
            page.goto(server["url"], wait_until="domcontentloaded")
            page.wait_for_selector("h1:has-text('statecore')", timeout=60_000)
            _idle(page)

            _goto(page, "Data")
            _load_sample(page, sample)
            _shot(page, "data" + suffix)

            _goto(page, "Preprocess")
            page.get_by_role("button", name="Apply").click()
            page.get_by_text("saved to", exact=False).first.wait_for(timeout=240_000)
            _idle(page)
            _no_exception(page)
            assert "Highly variable genes:" in page.inner_text("body")
            _shot(page, "preprocess" + suffix)
            _refresh_keeps_the_session(page)

            _train(page)
            assert f"Run: {context.replace('+', '-')}-zeroshot" in _sidebar_text(page)  # preselected task
            _shot(page, "train" + suffix)

            _goto(page, "Evaluate")
            page.get_by_role("button", name="Evaluate the test split").click()
            page.get_by_text("Model vs baselines", exact=False).wait_for(timeout=300_000)
            _idle(page, 240)
            _no_exception(page)
            body = page.inner_text("body")
            assert "Scoring the model failed" not in body, body[:3000]
            assert "State (this run)" in body and "baseline: control" in body
            assert "ceiling (two halves of the real cells)" in body  # the ceiling's row in the table
            for words in verdict:
                assert words in body, (words, body[body.find("Verdict") :][:2000])
            _shot(page, "evaluate" + suffix)

            _goto(page, "Predict")
            page.get_by_text("Predicted DE genes, largest change first").wait_for(timeout=120_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
            _idle(page, 240)
            _no_exception(page)
            assert page.locator(".js-plotly-plot").count() >= 3  # means, volcano, UMAP
            assert "Not measured yet" not in page.inner_text("body")  # the trust box shows the evaluation
            _shot(page, "predict" + suffix)

            page.locator(
                "[data-testid='stSidebar'] [data-testid='stPageLink-NavLink']", has_text="Home"
            ).click()
            page.wait_for_selector("h1:has-text('statecore')", timeout=60_000)
            _idle(page)
            _no_exception(page)
            page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=30_000)  # the runs table
            _shot(page, "home" + suffix)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print("page at failure:", page.inner_text("body")[:4000])
            print("server log:", server["log"].read_text()[-4000:])
            raise
        finally:
            browser.close()
