"""Real-browser screen on the sample data: a tiny run trained by the CLI, then the Screen page runs a
small screen (three singles and their pairs), shows the ranked table and figures, and one click opens a
hit on Predict."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from test_browser_e2e import CHROMIUM, LAUNCH_ARGS, ROOT, _goto, _idle, _no_exception, server  # noqa: F401

pytestmark = pytest.mark.browser


def _tiny_sample_run(runs_dir, tmp_path):
    prepared = tmp_path / "pb.h5ad"
    steps = [
        [
            "prepare",
            str(ROOT / "sample_data" / "perturbench_devel.h5ad"),
            "-o",
            str(prepared),
            "--n-hvg",
            "200",
        ],
        ["train", "--data", str(prepared), "--run-dir", str(runs_dir / "pb-tiny"), "--task", "zeroshot"],
    ]
    steps[0] += ["--no-umap"]
    steps[1] += [
        "--context",
        "U87MG",
        "--steps",
        "4",
        "--set-size",
        "16",
        "--batch-size",
        "2",
        "--threads",
        "1",
    ]
    for args in steps:
        done = subprocess.run(
            [sys.executable, "-m", "statecore", *args, *(["--quiet"] if args[0] == "train" else [])],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_small_screen_in_a_real_browser(server, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    _tiny_sample_run(server["runs"], tmp_path)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(server["url"], wait_until="domcontentloaded")
            page.wait_for_selector("h1:has-text('statecore')", timeout=60_000)
            _idle(page)
            _goto(page, "Screen")
            _idle(page, 240)  # the ranking check on the run's test split runs first
            _no_exception(page)
            assert "held-out perturbations of U87MG" in page.inner_text("body")
            pairs = (
                page.locator("[data-testid='stMultiSelect']").filter(has_text="every pair").locator("input")
            )
            for name in ("MAPK1", "SGK1", "TGFBR2"):
                pairs.click()
                pairs.fill(name)
                pairs.press("Enter")
                _idle(page)
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Run screen here").click()
            page.get_by_text("Ranked hits").wait_for(timeout=240_000)
            _idle(page, 240)
            _no_exception(page)
            page.locator(".js-plotly-plot").nth(2).wait_for(timeout=60_000)  # bars, heatmap, pair matrix
            hit = page.get_by_role("button", name=re.compile("^↗ ")).first
            name = hit.inner_text().removeprefix("↗ ").strip()
            hit.click()
            page.wait_for_selector("h1:has-text('Predict')", timeout=120_000)
            _idle(page, 240)
            _no_exception(page)
            page.locator("[data-testid='stMultiSelect']").first.get_by_text(name, exact=True).wait_for(
                timeout=60_000
            )
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print("page at failure:", page.inner_text("body")[:4000])
            print("server log:", server["log"].read_text()[-4000:])
            raise
        finally:
            browser.close()
