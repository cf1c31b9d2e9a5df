"""GPU check: training step, prediction and a 2-GPU DDP smoke run on a CUDA machine, in under 5 minutes.

    python bench/gpu_check.py                       # writes bench/results/gpu_check.json, prints a table
    python bench/gpu_check.py --budget-s 240        # stop starting new sections after 240 s

Without CUDA it writes ``{"skipped": true, "reason": ...}`` and exits 0. With CUDA it measures:

- the bf16 and fp32 (TF32 off) matmul rates of the GPU (8192^3, best of 5), the physical limit;
- the ST training step (forward, energy loss, backward, fused AdamW) at the reference shape (16 x 64 cells,
  500 genes, hidden 256, 4 layers, 8 heads, FFN 1024) and at 16 x 256 cells / 2,000 genes, in fp32,
  bf16 autocast and bf16 autocast + torch.compile: cells/s and % of the bf16 matmul rate; batches are
  gathered on the CPU as in training and timed on their own, so the JSON also says what the engine's serial
  gather-then-step loop would reach (``serial_cells_per_s``) and what a prefetching loop would;
- prediction: the model in eval mode over 100,000 cells (2,000 genes) in chunks of 16 sets, fp32 and bf16;
- with 2 or more GPUs, ``torchrun --nproc_per_node 2 -m statecore train`` on a small synthetic dataset
  (NCCL), checking that the run finishes ``done``.

``--allow-cpu --tiny`` runs the same code on the CPU at toy sizes (the tests use it).
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "gpu_check.json"
# (name, genes, set size, sets per step); the model is the reference's: hidden 256, 4 x 8 heads, FFN 1024
SHAPES = (("reference", 500, 64, 16), ("large", 2000, 256, 16))
TINY = (("reference", 24, 8, 4), ("large", 40, 16, 2))
MODES = ("fp32", "bf16", "bf16+compile")


def skip_reason(allow_cpu: bool) -> str | None:
    if allow_cpu or torch.cuda.is_available():
        return None
    return f"no CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda or 'none'})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e12


def make_dataset(genes: int, set_size: int, seed: int = 0):
    """Synthetic log1p sets gathered from sparse CSR, as training gathers them."""
    import scipy.sparse as sp

    from statecore.data.sets import PerturbationVocab, SetDataset, build_groups
    from statecore.data.synthetic import make_perturbation_adata

    a = make_perturbation_adata(
        n_cells=max(2000, 20 * set_size), n_genes=genes, n_perturbations=16, seed=seed
    )
    X = sp.csr_matrix(a.X, dtype=np.float32)
    X.data = np.log1p(X.data)
    a.X = X
    vocab = PerturbationVocab.from_labels(a.obs["perturbation"].astype(str), "ctrl")
    groups = build_groups(a, control="ctrl")
    return SetDataset(a, groups, genes=list(a.var_names), vocab=vocab, set_size=set_size, seed=seed)


def make_model(genes: int, pert_dim: int, set_size: int, tiny: bool):
    from statecore.models.transition import StateTransitionModel

    h, ffn = (16, 32) if tiny else (256, 1024)
    torch.manual_seed(0)
    return StateTransitionModel(
        num_genes=genes,
        hidden_dim=h,
        transformer_heads=2 if tiny else 8,
        transformer_layers=1 if tiny else 4,
        mlp_hidden_dim=ffn,
        perturbation_dim=pert_dim,
        set_size=set_size,
        residual="expression",
    )


def step_flops(model, b) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from statecore.models.losses import energy_distance

    counter = FlopCounterMode(display=False)
    with counter:
        energy_distance(model(b.x_ctrl, b.z_pert), b.x_target).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train_mode(ds, device, mode: str, *, steps: int, tiny: bool, bf16_tflops: float) -> dict:
    """Step time of one precision mode, batches already on the device; CPU gather timed apart."""
    S, B = ds.set_size, 4 if tiny else 16
    B = min(B, ds.n_sets)
    model = make_model(len(ds.genes), ds.vocab.dim, S, tiny).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    fn = torch.compile(model) if mode.endswith("compile") else model
    t = time.perf_counter()
    host = [ds.batch(i, B) for i in range(4)]
    data_s = (time.perf_counter() - t) / len(host)
    t = time.perf_counter()
    batches = [b.to(device) for b in host]
    _sync(device)
    h2d_s = (time.perf_counter() - t) / len(host)
    flops = step_flops(model, batches[0])
    from statecore.models.losses import energy_distance

    def step(b) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
            pred = fn(b.x_ctrl, b.z_pert)  # [B, S, G]
        loss = energy_distance(pred.float(), b.x_target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    t = time.perf_counter()
    for i in range(3):  # warm-up (and compilation)
        step(batches[i % len(batches)])
    _sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        last = step(batches[i % len(batches)])
    _sync(device)
    step_s = (time.perf_counter() - t) / steps
    cells = B * S
    return {
        "mode": mode,
        "sets": B,
        "cells_per_step": cells,
        "step_s": step_s,
        "cells_per_s": cells / step_s,
        "gflop_per_step": flops / 1e9,
        "pct_of_bf16_matmul_rate": 100.0 * flops / step_s / (bf16_tflops * 1e12),
        "warmup_s": warm_s,
        "cpu_gather_s": data_s,
        "h2d_s": h2d_s,
        "serial_cells_per_s": cells / (step_s + data_s + h2d_s),  # the engine today: gather, copy, step
        "prefetch_cells_per_s": cells / max(step_s, data_s + h2d_s),  # gather overlapped with the step
        "final_loss": float(last),
    }


def predict_rate(device, *, tiny: bool) -> list[dict]:
    """Eval-mode forward over 100,000 cells (2,000 genes) in chunks of 16 sets of 64, host to host."""
    G, S, n = (40, 8, 2000) if tiny else (2000, 64, 100_000)
    model = make_model(G, 32, S, tiny).to(device).eval()
    x = torch.rand(16, S, G).pin_memory() if device.type == "cuda" else torch.rand(16, S, G)
    z = torch.zeros(16, 32)
    z[:, 3] = 1
    rows = []
    for mode in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            model(x.to(device), z.to(device))
            _sync(device)
            t = time.perf_counter()
            for _ in range(-(-n // (16 * S))):
                model(x.to(device, non_blocking=True), z.to(device)).float().cpu()
            dt = time.perf_counter() - t
        rows.append({"mode": mode, "cells": n, "genes": G, "seconds": dt, "cells_per_s": n / dt})
    return rows


def ddp_smoke(tmp: Path, timeout_s: float) -> dict:
    """``torchrun --nproc_per_node 2 -m statecore train`` on synthetic data; passes when status says done."""
    from statecore.config import DataSpec, QCConfig
    from statecore.data.preprocess import prepare
    from statecore.data.synthetic import make_perturbation_adata

    raw = make_perturbation_adata(n_cells=2000, n_genes=300, n_perturbations=12, seed=0)
    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    prepare(raw, spec=spec, qc=QCConfig(min_genes=0, min_cells=0, n_hvg=200, umap=False)).write_h5ad(
        tmp / "ddp.h5ad"
    )
    run_dir = tmp / "ddp-run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "statecore", "train", "--data", str(tmp / "ddp.h5ad"), "--run-dir", str(run_dir), "--task",
           "underrepresented", "--context", "c0", "--preset", "small", "--set-size", "32", "--batch-size", "8",
           "--steps", "30", "--device", "cuda"]  # fmt: skip
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    return {
        "ok": proc.returncode == 0 and status.get("state") == "done",
        "returncode": proc.returncode,
        "state": status.get("state"),
        "step": status.get("step"),
        "seconds": time.perf_counter() - t,
        "stderr_tail": proc.stderr[-1500:],
    }


def run_checks(args) -> dict:
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t0)

    n = 256 if args.tiny else 8192
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    out: dict = {
        "skipped": False,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    }
    out["n_gpus"] = torch.cuda.device_count()
    out["bf16_matmul_tflops"] = bf16 = matmul_tflops(device, torch.bfloat16, n)
    out["fp32_matmul_tflops"] = matmul_tflops(device, torch.float32, n)
    out["train"], out["not_run"] = [], []
    for name, genes, S, _ in TINY if args.tiny else SHAPES:
        ds = make_dataset(genes, S)
        for mode in args.modes:
            if left() < 30:
                out["not_run"].append(f"train {name} {mode}: time budget")
                continue
            row = train_mode(ds, device, mode, steps=args.steps, tiny=args.tiny, bf16_tflops=bf16)
            out["train"].append({"shape": name, "genes": genes, "set_size": S, **row})
            print(f"  {name} {mode}: {row['cells_per_s']:,.0f} cells/s", file=sys.stderr, flush=True)
    out["predict"] = predict_rate(device, tiny=args.tiny) if left() > 20 else []
    if out["n_gpus"] >= 2 and left() > 60:
        with tempfile.TemporaryDirectory() as d:
            out["ddp"] = ddp_smoke(Path(d), timeout_s=min(150.0, left() - 10))
    else:
        out["ddp"] = {"ok": None, "skipped": f"{out['n_gpus']} GPU(s) or no time left; needs 2"}
    out["seconds"] = time.perf_counter() - t0
    return out


def print_table(res: dict) -> None:
    if res.get("skipped"):
        print(f"gpu_check skipped: {res['reason']}")
        return
    print(
        f"{res['device']} x{res['n_gpus']}: bf16 matmul {res['bf16_matmul_tflops']:.1f} TFLOP/s, "
        f"fp32 {res['fp32_matmul_tflops']:.1f} TFLOP/s"
    )
    print(
        f"{'shape':10} {'mode':13} {'step ms':>8} {'cells/s':>10} {'%bf16':>6} {'serial c/s':>10} {'gather ms':>9}"
    )
    for r in res["train"]:
        print(
            f"{r['shape']:10} {r['mode']:13} {1e3 * r['step_s']:8.2f} {r['cells_per_s']:10,.0f} "
            f"{r['pct_of_bf16_matmul_rate']:6.1f} {r['serial_cells_per_s']:10,.0f} {1e3 * r['cpu_gather_s']:9.1f}"
        )
    for r in res["predict"]:
        print(
            f"predict {r['mode']}: {r['cells']:,} cells x {r['genes']} genes, {r['cells_per_s']:,.0f} cells/s"
        )
    print(f"ddp: {res['ddp']}")
    for line in res.get("not_run", []):
        print(f"not run: {line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no new section after this")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (tests)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (tests)")
    args = ap.parse_args(argv)
    meta = {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    reason = skip_reason(args.allow_cpu)
    res = {"skipped": True, "reason": reason} if reason else run_checks(args)
    res["machine"] = meta
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
