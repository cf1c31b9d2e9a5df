"""``python -m statecore evaluate``: files written, table printed, errors as one line + exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from statecore.cli import main
from tests.celleval_data import make_pair

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, with_context=False):
    pred, real = make_pair(2, mix=0.5)
    base, _ = make_pair(3, mix=1.0)
    paths = {}
    for name, a in (("pred", pred), ("real", real), ("base", base)):
        if with_context:
            a.obs["context"] = "c0"
        paths[name] = tmp_path / f"{name}.h5ad"
        a.write_h5ad(paths[name])
    return paths


def test_evaluate_with_baseline(tmp_path, capsys):
    p = _write(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "evaluate",
            "--pred",
            str(p["pred"]),
            "--real",
            str(p["real"]),
            "--control",
            "ctrl",
            "--baseline",
            str(p["base"]),
            "-o",
            str(out),
            "--timings",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "overlap_at_N" in text and "avg_score" in text and "score vs baseline" in text
    timings = json.loads([ln for ln in text.splitlines() if ln.startswith("timings ")][0][8:])
    assert {"read", "de_real", "de_pred", "save"} <= set(timings)
    assert {f.name for f in out.iterdir()} == {
        "results.csv",
        "agg_results.csv",
        "real_de.csv",
        "pred_de.csv",
        "score.csv",
    }
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 6 and "discrimination_score_l1" in results.columns
    score = pd.read_csv(out / "score.csv").set_index("metric")["from_baseline"]
    assert 0.0 <= score["avg_score"] <= 1.0


def test_evaluate_contexts_and_no_contexts(tmp_path, capsys):
    p = _write(tmp_path, with_context=True)
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(p["pred"]),
                "--real",
                str(p["real"]),
                "--control",
                "ctrl",
                "-o",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert "context" in pd.read_csv(tmp_path / "a" / "results.csv").columns
    assert not (tmp_path / "a" / "score.csv").exists()
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(p["pred"]),
                "--real",
                str(p["real"]),
                "--control",
                "ctrl",
                "--no-contexts",
                "-o",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert "context" not in pd.read_csv(tmp_path / "b" / "results.csv").columns


def test_errors_exit_2(tmp_path):
    p = _write(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "statecore",
        "evaluate",
        "--pred",
        str(p["pred"]),
        "--real",
        str(p["real"]),
        "--control",
        "nope",
        "-o",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: control 'nope'")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "missing.h5ad"),
                "--real",
                str(p["real"]),
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
