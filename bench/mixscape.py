"""The Mixscape-style perturbed-cell classifier (statecore.data.mixscape, issue 17): what it keeps on real data,
whether it recovers planted truth, and what it costs.

1. Papalexi et al. 2021 (replicates 1+2, 299 genes), prepared exactly as bench/quality.py's P1/P2 through the
   public CLI plus ``--classify-perturbed``: cells, cells called KO and DE genes per target and replicate; then
   the same calls at three DE-effect thresholds (``PerturbedCallConfig.de_min_diff``) to show how they move.
2. Synthetic screens (``make_perturbation_adata(frac_escape=0.5)``: half of every targeting cell carries no
   effect, the truth in ``obs["escaped"]``): accuracy of the KO/NP calls on perturbations with an effect, the
   classifier's wall time on one thread and the process's peak RSS before and after it (``resource``).

    nice python bench/mixscape.py [--cells 20000,100000] [--skip-papalexi]
    # JSON -> bench/results/mixscape.json, tables on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "results" / "mixscape.json"
THRESHOLDS = (0.10, 0.17, 0.25)


def papalexi(tmp: Path) -> dict:
    """Prepare P1/P2's data with --classify-perturbed (the CLI) and tabulate the calls."""
    import anndata as ad
    from quality import PAPALEXI_PREPARE, SHARED, TASKS
    from threadpoolctl import threadpool_limits

    from statecore.config import PerturbedCallConfig
    from statecore.data.mixscape import call_summary, classify_perturbed, context_totals

    src = SHARED / TASKS["P1"]["data"]
    out = tmp / "papalexi.h5ad"
    cmd = ["prepare", str(src), "-o", str(out), "--n-hvg", "299", "--no-umap", *PAPALEXI_PREPARE]
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "statecore", *cmd, "--classify-perturbed"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    seconds = time.perf_counter() - t0
    adata = ad.read_h5ad(out)
    summary = call_summary(adata)
    sweep = {}
    with threadpool_limits(1):
        for d in THRESHOLDS:
            s = classify_perturbed(adata, control="ctrl", cfg=PerturbedCallConfig(de_min_diff=d)).summary
            sweep[str(d)] = s.to_dict("records")
    return {
        "command": "python -m statecore " + " ".join([*cmd, "--classify-perturbed"]),
        "prepare_seconds": seconds,
        "cli_output": done.stdout.strip().splitlines()[1:],
        "summary": summary.to_dict("records"),
        "totals": context_totals(summary).to_dict("records"),
        "threshold_sweep": sweep,
    }


def synthetic(n_cells: int) -> dict:
    """Accuracy, time and peak RSS of the classifier on a screen where half the targeting cells escape."""
    import scanpy as sc
    from threadpoolctl import threadpool_limits

    from statecore.data.mixscape import classify_perturbed
    from statecore.data.synthetic import make_perturbation_adata

    adata = make_perturbation_adata(
        n_cells=n_cells, n_genes=1000, n_perturbations=100, contexts=("a", "b"), frac_escape=0.5,
        frac_control=0.1, seed=0,
    )  # fmt: skip
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.var["highly_variable"] = True
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with threadpool_limits(1):
        result = classify_perturbed(adata, control="ctrl")
    seconds = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    effective = (pert != "ctrl") & ~np.isin(pert, list(adata.uns["synthetic"]["no_effect"]))
    truth = ~adata.obs["escaped"].to_numpy(bool)
    no_effect = ~effective & (pert != "ctrl")
    return {
        "cells": n_cells,
        "genes": 1000,
        "perturbations_per_context": 100,
        "x_nnz": int(adata.X.nnz),
        "accuracy_effective": float(((result.call == "KO") == truth)[effective].mean()),
        "no_effect_called_np": float((result.call[no_effect] == "NP").mean()),
        "seconds_one_thread": seconds,
        "peak_rss_mib_before": rss_before,
        "peak_rss_mib_after": rss_after,
        "load_average": os.getloadavg()[0],
    }


def _tables(res: dict) -> str:
    lines = []
    if "papalexi" in res:
        p = res["papalexi"]
        rows = {(r["perturbation"], r["context"]): r for r in p["summary"]}
        targets = sorted({t for t, _ in rows})
        lines += ["| target | rep_1 cells | rep_1 KO | rep_1 DE genes | rep_2 cells | rep_2 KO | rep_2 DE genes |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in sorted(targets, key=lambda t: -sum(rows[(t, c)]["ko"] for c in ("rep_1", "rep_2"))):
            cells = [rows[(t, c)] for c in ("rep_1", "rep_2")]
            fmt = [
                f"{r['cells']} | {r['ko'] if r['status'] != 'too few cells' else 'n/a'} | {r['de_genes']}"
                for r in cells
            ]
            lines.append(f"| {t} | {' | '.join(fmt)} |")
        lines.append("")
        for r in p["totals"]:
            lines.append(f"{r['context']}: {r['KO']:,} of {r['targeting cells']:,} targeting cells called KO "
                         f"({100 * r['KO share']:.1f}%), {r['no detectable effect']} of {r['perturbations']} "
                         "perturbations with no detectable effect")  # fmt: skip
        lines += ["", "| de_min_diff | targets with KO cells (rep_1 / rep_2) | KO cells |", "|---|---|---|"]
        for d, recs in p["threshold_sweep"].items():
            ko = {
                c: sorted(r["perturbation"] for r in recs if r["context"] == c and r["ko"] > 0)
                for c in ("rep_1", "rep_2")
            }
            lines.append(
                f"| {d} | {', '.join(ko['rep_1'])} / {', '.join(ko['rep_2'])} | {sum(r['ko'] for r in recs):,} |"
            )
    for s in res.get("synthetic", []):
        lines.append(
            f"synthetic {s['cells']:,} cells x {s['genes']} genes, {s['perturbations_per_context']} perturbations x 2 "
            f"contexts: accuracy {s['accuracy_effective']:.3f}, no-effect cells called NP {s['no_effect_called_np']:.3f}, "
            f"{s['seconds_one_thread']:.1f} s on one thread, peak RSS {s['peak_rss_mib_before']:.0f} -> "
            f"{s['peak_rss_mib_after']:.0f} MiB (load {s['load_average']:.1f})"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="20000", help="comma-separated synthetic sizes (default 20000)")
    p.add_argument("--skip-papalexi", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    res: dict = {
        "meta": {
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }
    }
    if not args.skip_papalexi:
        with tempfile.TemporaryDirectory() as tmp:
            res["papalexi"] = papalexi(Path(tmp))
    res["synthetic"] = [synthetic(int(n)) for n in args.cells.split(",") if n]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    print(_tables(res))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
