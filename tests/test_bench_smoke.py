"""The benchmarks still run against today's package (at toy sizes; their numbers are not checked here).

A benchmark that no longer runs is found when someone needs its figure, usually much later: the
architecture change turned the presets into dataclasses and broke three scripts silently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each script starts fresh processes: minutes on a loaded 2-core box


def _bench(script: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.mark.parametrize(
    "script,args",
    [
        ("predict_scale.py", ["--cells", "300", "--genes", "64", "--threads", "1", "--out"]),
        ("screen_speed.py", ["--perts", "3", "--cells", "16", "--genes", "64", "--controls", "64",
                             "--threads", "1", "-o"]),
        ("train_throughput.py", ["--presets", "small", "--genes", "64", "--set-sizes", "8", "--steps", "1",
                                 "--out"]),
    ],
)  # fmt: skip
def test_bench_runs_at_toy_size(script, args, tmp_path):
    out = tmp_path / "out.json"
    _bench(script, *args, str(out))
    assert json.loads(out.read_text())
