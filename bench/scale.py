"""Time and peak memory of simulate -> prepare (no UMAP) -> a fixed number of training steps vs cells.

    nice python bench/scale.py --sizes 10000 30000 100000
    nice python bench/scale.py --sizes 10000 100000 300000 1000000   # 1M: prepare peaks at ~13 GB

Each stage runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own:

1. simulate: ``statecore.data.synthetic.make_perturbation_adata`` (sparse counts) and write raw .h5ad;
2. prepare: read, ``statecore.data.preprocess.prepare`` (QC, normalize, log1p, seurat_v3 HVGs, no UMAP), write;
3. train (memory): read the prepared file, split, build sets, ``fit`` for ``--steps`` steps (small preset);
4. train (backed): the same with X left on disk, read as ``train --backed`` reads it (obs/var/uns in
   memory, X on disk, layers not read).

Training cost per step does not depend on the number of cells (a step is B sets of S cells); what
grows with cells is reading, grouping and, in memory, holding X. Writes
bench/results/scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "scale.json"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def stage_simulate(n: int, genes: int, work: Path) -> dict:
    from statecore.data.synthetic import make_perturbation_adata

    t = time.perf_counter()
    a = make_perturbation_adata(n_cells=n, n_genes=genes, n_perturbations=50, contexts=4, seed=0, sparse=True)
    t_sim = time.perf_counter() - t
    del a.uns["synthetic"]  # planted truth: not needed here, and large nested dicts slow the writer
    t = time.perf_counter()
    a.write_h5ad(work / "raw.h5ad")
    return {
        "simulate_s": t_sim,
        "write_s": time.perf_counter() - t,
        "nnz": int(a.X.nnz),
        "density": float(a.X.nnz / (a.n_obs * a.n_vars)),
        "peak_mb": _peak_mb(),
    }


def stage_prepare(n_hvg: int, work: Path) -> dict:
    import anndata as ad

    from statecore.config import DataSpec, QCConfig
    from statecore.data.preprocess import prepare

    t = time.perf_counter()
    a = ad.read_h5ad(work / "raw.h5ad")
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    p = prepare(a, spec=DataSpec(), qc=QCConfig(umap=False, n_hvg=n_hvg))
    t_prep = time.perf_counter() - t
    del a
    t = time.perf_counter()
    p.write_h5ad(work / "prepared.h5ad")
    return {
        "read_s": t_read,
        "prepare_s": t_prep,
        "write_s": time.perf_counter() - t,
        "cells_out": int(p.n_obs),
        "hvg": int(p.var["highly_variable"].sum()),
        "peak_mb": _peak_mb(),
    }


def stage_train(backed: bool, steps: int, work: Path) -> dict:
    import anndata as ad
    import torch

    from statecore.cli._common import read_prepared
    from statecore.config import ST_PRESETS, SplitConfig, TrainConfig
    from statecore.data.splits import make_split
    from statecore.models.transition import StateTransitionModel
    from statecore.training.st_track import fit_model as fit
    from statecore.training.st_track import make_train_data

    t = time.perf_counter()
    a = (
        read_prepared(str(work / "prepared.h5ad"), backed=True)
        if backed
        else ad.read_h5ad(work / "prepared.h5ad")
    )
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    split = make_split(a, SplitConfig(task="zeroshot", context="c0"))
    data = make_train_data(a, split, set_size=64, seed=0)
    t_setup = time.perf_counter() - t
    cfg = ST_PRESETS["small"].replace(num_genes=len(data.genes), perturbation_dim=data.vocab.dim)
    torch.manual_seed(0)
    model = StateTransitionModel(cfg)
    tcfg = TrainConfig(
        steps=steps,
        batch_size=4,
        warmup_steps=0,
        val_every=0,
        log_every=10**9,
        num_threads=1,
        device="cpu",
        ckpt_every_steps=10**9,
        ckpt_every_seconds=0,
    )
    t = time.perf_counter()
    fit(model, data, tcfg)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(steps):
        data.train.batch(s, 4)
    t_data = time.perf_counter() - t
    return {
        "read_s": t_read,
        "setup_s": t_setup,
        "train_s": t_train,
        "data_s": t_data,
        "steps": steps,
        "peak_mb": _peak_mb(),
    }


def _run_stage(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 30_000, 100_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument(
        "--hvg", type=int, default=1000, help="HVGs selected by prepare (seurat_v3 runs when < genes)"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.stage:  # child process: one stage, JSON on the last stdout line
        work = Path(args.workdir)
        if args.stage == "simulate":
            res = stage_simulate(args.n, args.genes, work)
        elif args.stage == "prepare":
            res = stage_prepare(args.hvg, work)
        else:
            res = stage_train(args.stage == "train_backed", args.steps, work)
        print(json.dumps(res))
        return 0

    rows = []
    load = [os.getloadavg()]
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            common = [
                "--workdir",
                tmp,
                "--genes",
                str(args.genes),
                "--hvg",
                str(args.hvg),
                "--steps",
                str(args.steps),
                "--n",
                str(n),
            ]
            row = {"cells": n, "genes": args.genes}
            for stage in ("simulate", "prepare", "train_memory", "train_backed"):
                t = time.perf_counter()
                row[stage] = _run_stage(["--stage", stage, *common])
                row[stage]["wall_s"] = time.perf_counter() - t  # includes interpreter + import start-up
                if "error" in row[stage]:
                    print(f"{n} {stage} failed: {row[stage]['error']}", file=sys.stderr)
                    break
            row["file_mb"] = {
                name: os.path.getsize(Path(tmp) / f) / 2**20
                for name, f in (("raw", "raw.h5ad"), ("prepared", "prepared.h5ad"))
                if (Path(tmp) / f).exists()
            }
            rows.append(row)
            load.append(os.getloadavg())
            print(f"  done {n} cells", file=sys.stderr, flush=True)
    out = {
        "machine": {"cpu_count": os.cpu_count(), "loadavg": load},
        "rows": rows,
        "note": "peak_mb is each stage's own subprocess peak RSS; train_* run --steps steps of the small "
        "preset, 4 sets x 64 cells, 1 thread",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(
        f"{'cells':>9} {'sim s':>7} {'sim MB':>7} {'prep s':>7} {'prep MB':>8} {'train(mem) s':>12} "
        f"{'mem MB':>7} {'train(backed) s':>15} {'backed MB':>9} {'setup s':>7}"
    )

    def cell(row: dict, stage: str, key: str) -> float:
        v = row.get(stage, {}).get(key)
        return float("nan") if v is None else v

    for r in rows:

        def g(stage, key, r=r):
            return cell(r, stage, key)

        print(
            f"{r['cells']:>9} {g('simulate', 'simulate_s'):7.1f} {g('simulate', 'peak_mb'):7.0f} "
            f"{g('prepare', 'prepare_s'):7.1f} {g('prepare', 'peak_mb'):8.0f} {g('train_memory', 'train_s'):12.1f} "
            f"{g('train_memory', 'peak_mb'):7.0f} {g('train_backed', 'train_s'):15.1f} "
            f"{g('train_backed', 'peak_mb'):9.0f} {g('train_backed', 'setup_s'):7.1f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
