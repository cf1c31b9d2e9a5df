"""Speed of ``statecore evaluate`` vs ``cell-eval run --profile full`` on the same files.

Data: 100 perturbations x 200 cells (+ 2,000 controls) x 2,000 genes. Real = log1p of Poisson counts
(sparse CSR, like real screens); pred = continuous model-like log1p values (dense). Both tools run
as separate processes on the same .h5ad files; cell-eval with ``--num-threads`` = all cores,
statecore single-threaded numpy. Phase times: statecore from ``--timings``; cell-eval from its
own log records (INFO, timestamped) emitted by the very same ``cell-eval run`` entry point.

    nice python bench/eval_speed.py [--quick]      # JSON -> bench/results/eval_speed[_quick].json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "eval_speed.json"

# Runs `cell-eval run ...` exactly as the console script does, with timestamped INFO logs.
CELL_EVAL_WRAPPER = (
    "import logging, sys, time; "
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr, "
    "format='@@%(created).3f %(name)s %(message)s'); "
    "print('@@%.3f start' % time.time(), file=sys.stderr); "
    "from cell_eval.__main__ import main; sys.argv = ['cell-eval'] + sys.argv[1:]; main()"
)


def make_data(tmp: Path, n_perts: int, n_cells: int, n_ctrl: int, n_genes: int, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, n_genes)
    labels = ["ctrl"] * n_ctrl + [f"p{i}" for i in range(n_perts) for _ in range(n_cells)]
    eff = np.ones((n_perts + 1, n_genes))
    for i in range(1, n_perts + 1):
        hit = rng.choice(n_genes, 40, replace=False)
        eff[i, hit] = rng.choice([0.3, 2.5], 40)
    rows = np.r_[np.zeros(n_ctrl, int), np.repeat(np.arange(1, n_perts + 1), n_cells)]
    mu = base[None, :] * eff[rows]
    real_x = np.log1p(rng.poisson(mu)).astype(np.float32)
    pred_mu = mu * rng.lognormal(0, 0.3, mu.shape)
    pred_x = np.log1p(rng.poisson(pred_mu) + rng.random(mu.shape) * 0.5).astype(np.float32)
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    genes = [f"g{j}" for j in range(n_genes)]
    real = ad.AnnData(sp.csr_matrix(real_x), obs=obs.copy())
    pred = ad.AnnData(pred_x, obs=obs.copy())
    real.var_names = genes
    pred.var_names = genes
    paths = tmp / "real.h5ad", tmp / "pred.h5ad"
    real.write_h5ad(paths[0])
    pred.write_h5ad(paths[1])
    return paths


def run_statecore(real: Path, pred: Path, outdir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "statecore",
        "evaluate",
        "--pred",
        str(pred),
        "--real",
        str(real),
        "--control",
        "ctrl",
        "-o",
        str(outdir),
        "--timings",
    ]
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("timings ")][-1]
    phases = json.loads(line[len("timings ") :])
    return {"wall_s": wall, "phases_s": phases}


def run_cell_eval(real: Path, pred: Path, outdir: Path, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CELL_EVAL_WRAPPER,
        "run",
        "-ap",
        str(pred),
        "-ar",
        str(real),
        "--control-pert",
        "ctrl",
        "--pert-col",
        "perturbation",
        "--profile",
        "full",
        "--num-threads",
        str(threads),
        "-o",
        str(outdir),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return {"wall_s": wall, "phases_s": _cell_eval_phases(proc.stderr)}


def _cell_eval_phases(log: str) -> dict:
    """Turn timestamped log records into seconds per phase (a phase lasts until the next one)."""
    marks = []
    for ln in log.splitlines():
        m = re.match(r"@@(\d+\.\d+) (\S+)(?: (.*))?", ln)
        if not m:
            continue
        ts, msg = float(m.group(1)), (m.group(3) or m.group(2))
        if msg == "start":
            marks.append((ts, "startup+read+normlog check"))
        elif msg.startswith("Computing DE for"):
            marks.append((ts, "de_" + msg.split()[-2]))
        elif msg.startswith("Computing metric"):
            marks.append((ts, "metric " + msg.split("'")[1]))
        elif msg.startswith("Writing perturbation level"):
            marks.append((ts, "write results"))
    phases: dict[str, float] = {}
    for (t0, name), (t1, _) in zip(marks, marks[1:] + [(marks[-1][0], "")]):
        phases[name] = phases.get(name, 0.0) + t1 - t0
    return phases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 perturbations x 500 genes (smoke run)")
    args = ap.parse_args()
    size = (10, 200, 2000, 500) if args.quick else (100, 200, 2000, 2000)
    threads = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]  # shared machine: record how busy it was
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        real, pred = make_data(tmp, *size)
        ours = run_statecore(real, pred, tmp / "ours")
        ref = run_cell_eval(real, pred, tmp / "cell_eval", threads)
        agree = _agreement(tmp / "ours" / "agg_results.csv", tmp / "cell_eval" / "agg_results.csv")
    not_ours = ("metric pearson_edistance", "metric clustering_agreement")
    ce_same = ref["wall_s"] - sum(ref["phases_s"].get(k, 0.0) for k in not_ours)
    result = {
        "data": dict(zip(("n_perturbations", "cells_per_perturbation", "n_control", "n_genes"), size)),
        "cpu_threads": threads,
        "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
        "statecore": ours,
        "cell_eval_full": ref,
        "cell_eval_same_metrics_s": ce_same,
        "speedup_vs_full": ref["wall_s"] / ours["wall_s"],
        "speedup_same_metrics": ce_same / ours["wall_s"],
        "max_abs_diff_agg_mean": agree,
    }
    out = OUT.with_name("eval_speed_quick.json") if args.quick else OUT  # a smoke run never overwrites
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print(result)
    return 0


def _agreement(ours: Path, ref: Path) -> dict:
    import pandas as pd

    a = pd.read_csv(ours).set_index("statistic").loc["mean"]
    b = pd.read_csv(ref).set_index("statistic").loc["mean"]
    common = [c for c in b.index if c in a.index]
    diff = {c: float(abs(a[c] - b[c])) for c in common if not (np.isnan(a[c]) and np.isnan(b[c]))}
    return {
        "n_metrics": len(common),
        "max": max(diff.values()) if diff else None,
        "worst": max(diff, key=diff.get) if diff else None,
    }


def _print(r: dict) -> None:
    print(
        f"data: {r['data']}  threads: {r['cpu_threads']}  "
        f"load avg before/after: {r['load_avg_1min_before_after']}"
    )
    print(f"{'tool':<34}{'wall s':>10}")
    print(f"{'statecore evaluate':<34}{r['statecore']['wall_s']:>10.1f}")
    print(f"{'cell-eval run --profile full':<34}{r['cell_eval_full']['wall_s']:>10.1f}")
    print(f"{'cell-eval, same metrics only':<34}{r['cell_eval_same_metrics_s']:>10.1f}")
    print(
        f"speedup: {r['speedup_vs_full']:.1f}x vs full profile, "
        f"{r['speedup_same_metrics']:.1f}x on the metrics both compute"
    )
    print(f"agg mean agreement: {r['max_abs_diff_agg_mean']}")
    for name in ("statecore", "cell_eval_full"):
        print(f"\nwhere the time goes ({name}):")
        for k, v in sorted(r[name]["phases_s"].items(), key=lambda kv: -kv[1]):
            if v >= 0.05:
                print(f"  {k:<40}{v:>8.2f} s")


if __name__ == "__main__":
    raise SystemExit(main())
