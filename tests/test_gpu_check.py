"""bench/gpu_check.py: a clean skip without CUDA, and its measurement path on the CPU at toy sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    mod = _module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    assert mod.main(["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["skipped"] is True and "no CUDA device" in res["reason"]
    assert "train" not in res and res["machine"]["torch"] == torch.__version__
    assert "skipped: no CUDA device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA process exit")
def test_script_exits_zero_without_cuda(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["skipped"] is True


def test_measurement_path_runs_on_cpu_at_toy_sizes(tmp_path):
    mod = _module()
    out = tmp_path / "g.json"
    torch.set_num_threads(1)
    assert (
        mod.main(["--out", str(out), "--allow-cpu", "--tiny", "--steps", "2", "--modes", "fp32", "bf16"]) == 0
    )
    res = json.loads(out.read_text())
    assert res["skipped"] is False and res["device"] == "cpu"
    assert [(r["shape"], r["mode"]) for r in res["train"]] == [
        ("reference", "fp32"),
        ("reference", "bf16"),
        ("large", "fp32"),
        ("large", "bf16"),
    ]
    for r in res["train"]:
        assert r["cells_per_s"] > 0 and r["gflop_per_step"] > 0 and 0 < r["pct_of_bf16_matmul_rate"]
        assert r["serial_cells_per_s"] <= r["cells_per_s"] and r["final_loss"] == r["final_loss"]  # not NaN
    assert [r["mode"] for r in res["predict"]] == ["fp32", "bf16"] and res["predict"][0]["cells"] == 2000
    assert res["ddp"]["ok"] is None  # fewer than 2 GPUs: not attempted, and says so
