"""Unseen genes (issue 14): State vs the generic response vs the linear model on gene features vs the ceiling.

Every task holds a seeded share of the perturbed genes out of EVERY context (``train --task unseen``) and
scores the held-out genes in the target context with ``evaluate_run`` (pearson delta, PDS, DE overlap),
beside the baselines of an unseen-genes run (generic_response, linear_features, context_mean, control) and
the split-half ceiling. Preparing and training go through the public CLI; one thread per process.

Tasks:
  U1   synthetic screen whose perturbation programs follow gene co-expression modules (``modules=6``),
       ST with --perturbation-type knockdown (the simulator knocks each target down)
  U1N  the same screen but perturbation programs drawn independently of the modules (the no-structure
       control: gene features carry no information on the response, so nothing should beat the generic
       response; something that does reveals a leak). ST with --perturbation-type none, so the only thing
       it could use is the features
  U1N0 U1N without the targets' own knockdown (self_lfc=0): is what ST gains over the generic response in U1N
       the own-gene effect (a real, non-leaking signal) or something else?
  U1T  U1 with --perturbation-type none (what the own-gene setting adds)
  P1   Papalexi 2021 THP-1 CRISPR-KO (replicates as batches); features from the data reach the 9 targets
       in the 299-gene panel, 3 of which are held out per seed
  P1N  P1 with --perturbation-type none, P1K with knockdown (the own-gene change estimated from the training
       knockouts: Cas9 knockouts lower the target's mRNA only partly); the choice among P1, P1N and P1K is
       made on the validation score, never the test
  T1   perturbench sample: only 1 of its 32 perturbed genes is in the 500-gene panel, so features from the
       data cannot encode the others; the task reports that (it needs an external feature table)

Usage:
  python bench/unseen.py --tasks U1,U1N,U1T,P1 --seeds 0,1,2 --steps 600
Writes bench/results/unseen.json (unseen_<tasks>.json for a subset) and prints mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("pearson_delta", "discrimination_score_l1", "overlap_at_N", "mae")
PAPALEXI = Path("/work/shared/data/papalexi2021_thp1_rep12/papalexi2021_thp1_rep12.h5ad")
PERTURBENCH = ROOT / "sample_data" / "perturbench_devel.h5ad"
METHODS = {
    "State (this run)": "ST",
    "baseline: generic_response": "generic_response",
    "baseline: linear_features": "linear_features",
    "baseline: context_mean": "context_mean",
    "baseline: control": "control",
    "ceiling (two halves of the real cells)": "ceiling",
}


def cli(args: list[str], log: Path) -> float:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("\n$ " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "statecore", *args], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    if proc.returncode != 0:
        raise SystemExit(f"statecore {' '.join(args[:1])} failed; see {log}")
    return time.perf_counter() - t0


def synthetic(path: Path, seed: int, structured: bool, self_lfc: float = -1.5) -> None:
    from statecore.config import DataSpec, QCConfig
    from statecore.data.preprocess import prepare
    from statecore.data.synthetic import make_perturbation_adata

    raw = make_perturbation_adata(
        n_cells=6000, n_genes=200, n_perturbations=40, contexts=("c0", "c1"), modules=6,
        module_structure=structured, seed=seed, self_lfc=self_lfc,
    )  # fmt: skip
    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    prepare(raw, spec=spec, qc=QCConfig(min_genes=0, min_cells=0, n_hvg=2000, umap=False)).write_h5ad(path)


TASKS = {
    # name: (data maker or source, context, extra train flags)
    "U1": ("synthetic-structured", "c1", ["--perturbation-type", "knockdown", "--test-fraction", "0.25"]),
    "U1N": ("synthetic-none", "c1", ["--perturbation-type", "none", "--test-fraction", "0.25"]),
    "U1N0": ("synthetic-none-noself", "c1", ["--perturbation-type", "none", "--test-fraction", "0.25"]),
    "U1T": ("synthetic-structured", "c1", ["--perturbation-type", "none", "--test-fraction", "0.25"]),
    "P1": ("papalexi", "THP-1", ["--perturbation-type", "knockout", "--test-fraction", "0.34"]),
    "P1N": ("papalexi", "THP-1", ["--perturbation-type", "none", "--test-fraction", "0.34"]),
    "P1K": ("papalexi", "THP-1", ["--perturbation-type", "knockdown", "--test-fraction", "0.34"]),
}


def prepared(kind: str, seed: int, work: Path, log: Path) -> Path:
    path = work / f"{kind}-{seed if kind.startswith('synthetic') else 0}.h5ad"
    if path.exists():
        return path
    if kind.startswith("synthetic"):
        synthetic(
            path, seed, structured=kind == "synthetic-structured", self_lfc=0.0 if "noself" in kind else -1.5
        )
    elif kind == "papalexi":
        cli([
            "prepare", str(PAPALEXI), "-o", str(path), "--pert-col", "perturbation", "--control", "ctrl",
            "--context-col", "context", "--batch-col", "batch", "--min-cells", "0", "--no-umap",
        ], log)  # fmt: skip
    return path


def run_task(task: str, seed: int, steps: int, work: Path, log: Path) -> dict:
    import anndata as ad

    from statecore.evaluation.run import evaluate_run
    from statecore.inference.predict import validation_score
    from statecore.training.checkpoint import load_run

    kind, context, extra = TASKS[task]
    data = prepared(kind, seed, work, log)
    run_dir = work / f"{task}-s{seed}"
    flags = ["--data", str(data), "--run-dir", str(run_dir), "--task", "unseen", "--context", context]
    flags += ["--seed", str(seed), "--steps", str(steps), "--set-size", "32", "--batch-size", "8"]
    flags += ["--val-fraction", "0.15", "--threads", "1", "--quiet", *extra]
    seconds = cli(["train", *flags], log)
    run = load_run(run_dir)
    ev = evaluate_run(run, ad.read_h5ad(data), seed=seed)
    rows = {
        METHODS.get(r["method"], r["method"]): {m: r.get(m) for m in METRICS}
        for r in ev.summary.to_dict("records")
    }
    return {
        "task": task,
        "seed": seed,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "test_genes": run.split.test[run.split.context],
        "val_genes": sorted({p for ps in run.split.val.values() for p in ps}),
        "validation_pearson_delta": validation_score(run_dir),
        "methods": rows,
        "errors": dict(ev.errors),
        "overall": ev.overall,
    }


def perturbench_note() -> dict:
    import anndata as ad

    a = ad.read_h5ad(PERTURBENCH)
    genes = {g for p in a.obs["perturbation"].astype(str).unique() for g in p.split("+")} - {"ctrl"}
    inside = sorted(genes & set(a.var_names))
    return {
        "task": "T1",
        "perturbed_genes": len(genes),
        "in_panel": inside,
        "note": f"{len(inside)} of {len(genes)} perturbed genes are in the {a.n_vars}-gene panel: gene features from "
        "the data cannot encode the others, so the unseen-genes task needs an external feature table here",
    }


def table(results: list[dict]) -> list[str]:
    lines = [f"{'task':5} {'method':17} " + " ".join(f"{m:>24}" for m in METRICS)]
    for task in dict.fromkeys(r["task"] for r in results if "methods" in r):
        runs = [r for r in results if r.get("task") == task and "methods" in r]
        for method in METHODS.values():
            cells = []
            for m in METRICS:
                vals = [r["methods"][method][m] for r in runs if method in r["methods"]]
                vals = [v for v in vals if v is not None and np.isfinite(v)]
                cells.append(
                    f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f} (n={len(vals)})"
                    if vals
                    else "n/a"
                )
            lines.append(f"{task:5} {method:17} " + " ".join(f"{c:>24}" for c in cells))
        val = [r["validation_pearson_delta"] for r in runs if r["validation_pearson_delta"] is not None]
        if val:
            lines.append(
                f"{task:5} ST validation pearson delta (unseen val genes): {np.mean(val):.3f} ± {np.std(val, ddof=1) if len(val) > 1 else 0:.3f}"
            )
    return lines


def merge(paths: list[str]) -> None:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    results = [r for d in docs for r in d["results"]]
    payload = {
        "command": " ; ".join(d["command"] for d in docs),
        "machine": docs[0]["machine"],
        "results": results,
        "table": table(results),
    }
    out = ROOT / "bench" / "results" / "unseen.json"
    out.write_text(json.dumps(payload, indent=1, default=float))
    print("\n".join(payload["table"]))
    print(f"-> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="U1,U1N,U1T,P1,T1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--merge", nargs="+", default=None, help="combine result files of task subsets")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge)
    import torch

    torch.set_num_threads(1)
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    work = Path(args.work or tempfile.mkdtemp(prefix="unseen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    results = []
    for task in tasks:
        if task == "T1":
            results.append(perturbench_note())
            continue
        for seed in seeds:
            results.append(run_task(task, seed, args.steps, work, log))
            print(f"{task} seed {seed}: done ({results[-1]['train_seconds']} s training)", flush=True)
    out = (
        ROOT
        / "bench"
        / "results"
        / ("unseen.json" if args.tasks == ap.get_default("tasks") else f"unseen_{'_'.join(tasks)}.json")
    )
    payload = {
        "command": "python bench/unseen.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, 1 thread per process; other jobs shared the CPU",
        "results": results,
        "table": table(results),
    }
    out.write_text(json.dumps(payload, indent=1, default=float))
    print("\n".join(payload["table"]))
    for r in results:
        if "note" in r:
            print(f"{r['task']}: {r['note']}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
