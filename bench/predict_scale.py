"""Prediction at scale: cells/s and peak memory of ``statecore.inference.predict.predict``.

    python bench/predict_scale.py                           # small preset, 2,000 genes, 10k and 100k cells
    python bench/predict_scale.py --cells 100000 --threads 2

The run is the small preset built for 2,000 genes (weights from the seed, untrained: the arithmetic is the
same as a trained model's), the data 5,000 synthetic control cells as sparse CSR. Each size runs in a fresh
child process so that its peak resident memory (VmHWM) is its own. The JSON also holds the physical limit:
the forward pass's FLOPs per cell against a float32 matmul timed in the same child.
Writes bench/results/predict_scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "predict_scale.json"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _make_run_and_data(genes: int, n_ctrl: int):
    import scipy.sparse as sp

    from statecore.config import ST_PRESETS, RunConfig, STConfig
    from statecore.data.sets import PerturbationVocab
    from statecore.data.synthetic import make_perturbation_adata
    from statecore.models.transition import StateTransitionModel
    from statecore.training.checkpoint import LoadedRun

    a = make_perturbation_adata(
        n_cells=n_ctrl * 2, n_genes=genes, n_perturbations=10, contexts=("c0",), seed=0, frac_control=0.5
    )
    X = sp.csr_matrix(a.X, dtype=np.float32)
    X.data = np.log1p(X.data)
    a.X = X
    a.uns["statecore"] = {"control": "ctrl"}
    names = sorted(set(a.obs["perturbation"].astype(str)) - {"ctrl"})
    vocab = PerturbationVocab.from_labels(names, "ctrl")
    cfg = STConfig(**ST_PRESETS["small"]).replace(num_genes=genes, perturbation_dim=vocab.dim)
    torch.manual_seed(0)
    model = StateTransitionModel(cfg).eval()
    run = LoadedRun(
        model=model,
        config=RunConfig(model=cfg),
        genes=list(a.var_names),
        perturbations=list(vocab.names),
        contexts=["c0"],
        split=None,
        run_dir=Path("."),
        vocab=vocab,
        batches=[],
    )
    return run, a, names


def _child(n_cells: int, genes: int, threads: int, mode: str, q) -> None:
    import tempfile

    from statecore.inference.predict import predict, write_prediction

    torch.set_num_threads(threads)
    run, adata, names = _make_run_and_data(genes, 5000)
    rss0 = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    t, c = time.perf_counter(), time.process_time()
    kw = dict(context="c0", perturbations=names[:1], n_cells=n_cells)
    if mode == "file":  # streamed to an .h5ad (the CLI's path): memory bounded by a forward chunk
        with tempfile.TemporaryDirectory() as tmp:
            write_prediction(Path(tmp) / "pred.h5ad", run, adata, **kw)
            out_mb = (Path(tmp) / "pred.h5ad").stat().st_size / 2**20
    else:  # an AnnData in memory (the app's path)
        out_mb = predict(run, adata, **kw).X.nbytes / 2**20
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    peak = _rss_mb("VmHWM")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = min(_timed(torch.mm, a, b) for _ in range(5))  # CPU seconds, see _timed
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run.model(torch.rand(16, 64, genes), torch.zeros(16, run.vocab.dim))
    q.put(
        {
            "cells": n_cells,
            "mode": mode,
            "genes": genes,
            "threads": threads,
            "seconds": dt,
            "cells_per_s": n_cells / dt,
            "cpu_s": cpu,  # on a shared machine the steadier figure: cells per CPU second
            "cells_per_cpu_s": n_cells / cpu,
            "rss_before_mb": rss0,
            "peak_rss_mb": peak,
            "peak_over_start_mb": peak - rss0,
            "output_mb": out_mb,
            "gflop_per_cell": counter.get_total_flops() / (16 * 64) / 1e9,
            "matmul_gflops_per_cpu_s": 2 * 2048**3 / best / 1e9,
        }
    )


def _timed(fn, *args) -> float:
    """CPU seconds of the process (the kernels' own speed, whatever the machine's load)."""
    t = time.process_time()
    fn(*args)
    return time.process_time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", type=int, default=[10_000, 100_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--modes", nargs="+", default=["memory", "file"], choices=["memory", "file"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    load = os.getloadavg()
    for n in args.cells:
        for mode in args.modes:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(n, args.genes, args.threads, mode, q))
            p.start()
            rows.append(q.get())
            p.join()
    for r in rows:
        # the physical limit: every thread's core running the forward pass at the matmul rate
        r["limit_cells_per_s"] = r["matmul_gflops_per_cpu_s"] * r["threads"] / r["gflop_per_cell"]
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_before": load,
            "loadavg_after": os.getloadavg(),
        },  # fmt: skip
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(
        f"{'cells':>8} {'mode':>6} {'genes':>5} {'thr':>3} {'s':>7} {'cells/s':>8} {'peak MB':>8} {'+MB':>7} {'out MB':>7} {'c/CPU s':>8} {'limit':>7}"
    )
    for r in rows:
        print(
            f"{r['cells']:8d} {r['mode']:>6} {r['genes']:5d} {r['threads']:3d} {r['seconds']:7.1f} {r['cells_per_s']:8.0f} "
            f"{r['peak_rss_mb']:8.0f} {r['peak_over_start_mb']:7.0f} {r['output_mb']:7.0f} {r['cells_per_cpu_s']:8.0f} {r['limit_cells_per_s']:7.0f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
