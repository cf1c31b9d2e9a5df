"""Speed and memory of an in-silico screen: 1,000 perturbations x 128 cells x 2,000 genes.

Model: the ``small`` preset (STConfig + ST_PRESETS["small"]) over 2,000 genes with a one-hot
vocabulary of 1,000 perturbations (+ control), random weights (speed does not depend on training).
Data: 2,000 control cells of one context, log1p of Poisson counts, sparse CSR. Timed: the whole
``statecore.inference.screen.screen`` call (batched prediction, E-distances, table), after one
warm-up call on 8 perturbations. Peak memory: tracemalloc (Python/numpy allocations) and the
process's peak RSS (``resource.getrusage``, includes torch's allocator). The model's FLOPs are counted
with torch's FlopCounterMode and set beside a plain fp32 matmul's GFLOP/s measured just before and
after, so a slow result on a shared machine says how much is the machine.

    nice python bench/screen_speed.py [--perts 1000] [--chunk 32] [--threads 2] [--profile]
    # JSON -> bench/results/screen_speed.json, table on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "screen_speed.json"


def make_run(n_perts: int, n_genes: int, tmp: Path):
    """A LoadedRun with random weights: small preset, one-hot vocabulary of ``n_perts``."""
    import torch

    from statecore.config import ST_PRESETS, RunConfig
    from statecore.data.sets import PerturbationVocab
    from statecore.models.transition import StateTransitionModel
    from statecore.training.checkpoint import LoadedRun

    torch.manual_seed(0)
    names = [f"P{i:04d}" for i in range(n_perts)]
    vocab = PerturbationVocab.from_labels(["ctrl", *names], control="ctrl")
    cfg = ST_PRESETS["small"].replace(num_genes=n_genes, perturbation_dim=vocab.dim)
    model = StateTransitionModel(cfg).eval()
    if model.pert_shift is not None:  # a shift prior as training would leave it: small random shifts
        model.pert_shift.copy_(torch.randn_like(model.pert_shift) * 0.1)
    genes = [f"g{j}" for j in range(n_genes)]
    return LoadedRun(
        model=model,
        config=RunConfig(model=cfg),
        genes=genes,
        perturbations=list(vocab.names),
        contexts=["c0"],
        split=None,
        run_dir=tmp,
        vocab=vocab,
        batches=[],
    )


def make_controls(n_ctrl: int, n_genes: int, seed: int = 0):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.6, 1.0, n_genes)
    X = sp.csr_matrix(np.log1p(rng.poisson(mu, (n_ctrl, n_genes))).astype(np.float32))
    obs = pd.DataFrame(
        {"perturbation": ["ctrl"] * n_ctrl, "context": ["c0"] * n_ctrl, "batch": ["all"] * n_ctrl},
        index=[f"cell{i}" for i in range(n_ctrl)],
    )
    out = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    out.uns["statecore"] = {"control": "ctrl", "qc": {"target_sum": 1e4}}
    return out


def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    """What the CPU delivers right now on a plain fp32 matmul (same torch threads): the yardstick that
    says how much of a slow screen is the shared machine rather than the screen."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def model_flops(run, adata, args) -> float:
    """FLOPs of the screen's forward passes (torch's FlopCounterMode on one chunk, scaled to all)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from statecore.inference.predict import predict_shared

    labels = run.perturbations[1 : 1 + args.chunk]
    # The transformer's eval fast path is one fused op the counter does not see: count on the plain
    # path (same arithmetic), then restore it for the timed run.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            for _ in predict_shared(
                run, adata, context="c0", labels=labels, n_cells=args.cells, chunk=args.chunk
            ):
                pass
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    # top-level modules of the ST model: where the FLOPs go (the basal encoder sees the same controls
    # for every perturbation, so its share could be computed once per screen)
    share = {
        name.split(".")[-1]: round(sum(ops.values()) / total, 3)
        for name, ops in counts.items()
        if name.count(".") == 1
    }
    return total * args.perts / len(labels), share


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perts", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=128)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--controls", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler table of one 32-perturbation chunk"
    )
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()

    import tempfile

    import torch

    from statecore.inference.screen import screen

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    run = make_run(args.perts, args.genes, tmp)
    adata = make_controls(args.controls, args.genes)
    screen(run, adata, context="c0", perturbations=run.perturbations[1:9], n_cells=args.cells)  # warm-up
    flops, flop_share = model_flops(run, adata, args)
    gflops_before = matmul_gflops()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    result = screen(run, adata, context="c0", n_cells=args.cells, chunk=args.chunk)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gflops_after = matmul_gflops()
    load = os.getloadavg()[0]
    chunk_mb = args.chunk * args.cells * args.genes * 4 / 2**20
    record = {
        "perturbations": len(result.table),
        "cells_per_perturbation": args.cells,
        "genes": args.genes,
        "control_cells": args.controls,
        "chunk": args.chunk,
        "torch_threads": args.threads,
        "preset": "small",
        "seconds": round(seconds, 2),
        "perturbations_per_s": round(len(result.table) / seconds, 1),
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 1),
        "peak_rss_mb": round(rss_after / 1024, 1),
        "peak_rss_before_timed_call_mb": round(rss_before / 1024, 1),
        "one_chunk_of_cells_mb": round(chunk_mb, 1),
        "all_cells_would_be_mb": round(args.perts * args.cells * args.genes * 4 / 2**20, 1),
        "goal_s": 60,
        "model_tflop": round(flops / 1e12, 3),
        "flop_share_by_module": flop_share,
        "achieved_gflop_per_s": round(flops / seconds / 1e9, 1),
        "matmul_gflop_per_s_before_after": [round(gflops_before, 1), round(gflops_after, 1)],
        "seconds_at_matmul_rate": round(flops / (max(gflops_before, gflops_after) * 1e9), 1),
        "load_average_1min_after": round(load, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared 2-core VM",
        "torch": torch.__version__,
    }
    if args.profile:
        record["profile"] = _profile(run, adata, args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    width = max(len(k) for k in record if k != "profile")
    for key, value in record.items():
        if key != "profile":
            print(f"{key:<{width}}  {value}")
    if args.profile:
        print(record["profile"])
    return 0


def _profile(run, adata, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    from statecore.inference.screen import screen

    labels = run.perturbations[1 : 1 + args.chunk]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        screen(run, adata, context="c0", perturbations=labels, n_cells=args.cells, chunk=args.chunk)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


if __name__ == "__main__":
    sys.exit(main())
