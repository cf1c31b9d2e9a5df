"""Where one ST training step's time goes, against the machine's matmul rate measured in the same run.

    nice .venv/bin/python bench/profile_step.py                       # both shapes, every loop variant
    nice .venv/bin/python bench/profile_step.py --shapes reference --steps 3 --no-compile

Shapes: ``reference`` is the reference's (16 sets x 64 cells, hidden 256, 4 layers, 8 heads, FFN and MLPs
1024) on the PerturBench sample after ``prepare --n-hvg 500`` (500 HVGs: the sample has 500 genes); ``large`` is 4 sets x 256
cells on 2,000 synthetic genes, same model. The step runs in a minimal loop of its own (the engine is being
rewritten), with every phase timed on its own, so the variants below isolate one change each:

  before      nn.TransformerEncoder, the three-matmul energy loss, AdamW default (for-loop), clip, loss
              read on the host every step (what the engine did when this benchmark was written)
  models      + this branch's models: SDPA set transformer, one pooled Gram matrix in the loss
  foreach     + AdamW(foreach=True) and clip_grad_norm_(foreach=True)
  fused       + AdamW(fused=True)
  nosync      + the loss read on the host every 10th step only
  compile     + torch.compile of the model (CPU inductor)

A profiled step (torch.profiler) splits the step's wall time into matmul kernels (mm/addmm/bmm/baddbmm/
attention), other ATen kernels and time outside ATen kernels (Python, dispatch); FlopCounterMode counts the
step's matmul FLOPs. Timings are wall (perf_counter) and CPU (process_time, all threads): on a shared
machine the CPU time is the steadier of the two. Writes bench/results/profile_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from statecore.config import ST_PRESETS  # noqa: E402
from statecore.data.sets import PerturbationVocab, SetDataset, build_groups, select_genes  # noqa: E402
from statecore.data.synthetic import make_perturbation_adata  # noqa: E402
from statecore.models import losses  # noqa: E402
from statecore.models.layers import set_transformer  # noqa: E402
from statecore.models.transition import StateTransitionModel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "profile_step.json"
SAMPLE = ROOT / "sample_data" / "perturbench_devel.h5ad"
CACHE = ROOT / "bench" / "work" / "perturbench_hvg500.h5ad"
MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}


@dataclass(frozen=True)
class Shape:
    name: str
    genes: int | None  # None: the prepared PerturBench sample's HVGs
    set_size: int
    batch_size: int
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    ffn: int = 1024


SHAPES = {
    "reference": Shape("reference", None, 64, 16),
    "large": Shape("large", 2000, 256, 4),
}


@dataclass(frozen=True)
class Variant:
    name: str
    transformer: str = "sdpa"  # sdpa | torch
    loss: str = "pooled"  # pooled | before
    adamw: str = "default"  # default | foreach | fused
    sync_every: int = 1
    compile: bool = False


BEFORE = Variant("before", transformer="torch", loss="before")
MODELS = Variant("models")
FOREACH = replace(MODELS, name="foreach", adamw="foreach")
FUSED = replace(MODELS, name="fused", adamw="fused")
NOSYNC = replace(FUSED, name="nosync", sync_every=10)
COMPILED = replace(NOSYNC, name="compile", compile=True)
VARIANTS = (BEFORE, MODELS, FOREACH, FUSED, NOSYNC, COMPILED)


# --------------------------------------------------------------------------- the loss before this branch


def _dist_before(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One block of pairwise distances as statecore computed them before the pooled Gram matrix."""
    centre = torch.cat([a, b], dim=-2).mean(dim=-2, keepdim=True).detach()
    a, b = a - centre, b - centre
    a2, b2 = (a * a).sum(-1), (b * b).sum(-1)  # [B, S], [B, S']
    d2 = a2.unsqueeze(-1) + b2.unsqueeze(-2) - 2.0 * a @ b.transpose(-1, -2)  # [B, S, S']
    near = d2.detach() <= 1e-4 * (a2.unsqueeze(-1) + b2.unsqueeze(-2)).detach()
    d = torch.where(
        near, torch.zeros_like(d2), torch.where(near, torch.ones_like(d2), d2).clamp_min(1e-30).sqrt()
    )
    if bool(near.any()):
        bi, i, j = near.nonzero(as_tuple=True)
        d = d.index_put((bi, i, j), torch.linalg.vector_norm(a[bi, i] - b[bi, j], dim=-1))
    return d


def energy_before(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xy, xx, yy = (_dist_before(p, q).mean(dim=(1, 2)) for p, q in ((x, y), (x, x), (y, y)))
    return xy - 0.5 * xx - 0.5 * yy  # [B]


# --------------------------------------------------------------------------- data, model, machine


def prepared_sample(path: Path | None) -> Path:
    """The PerturBench sample after ``prepare --n-hvg 500`` (made once into bench/work/)."""
    if path is not None:
        return path
    if not CACHE.exists():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "statecore", "prepare", str(SAMPLE), "-o", str(CACHE), "--pert-col",
               "perturbation", "--context-col", "context", "--batch-col", "batch", "--control", "ctrl",
               "--min-genes", "0", "--min-cells", "0", "--n-hvg", "500", "--no-umap"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return CACHE


def make_dataset(shape: Shape, data_path: Path | None) -> SetDataset:
    """Training sets of every (context, perturbation) group, gathered from sparse CSR as in training."""
    if shape.genes is None:
        import anndata as ad

        adata = ad.read_h5ad(prepared_sample(data_path))
        control = adata.uns["statecore"]["control"]
    else:
        adata = make_perturbation_adata(n_cells=8000, n_genes=shape.genes, n_perturbations=32, seed=0)
        X = sp.csr_matrix(adata.X, dtype=np.float32)
        X.data = np.log1p(X.data)
        adata.X, control = X, "ctrl"
    genes = select_genes(adata, use_hvg=shape.genes is None)
    groups = build_groups(adata, control=control)
    vocab = PerturbationVocab.from_labels(adata.obs["perturbation"].astype(str), control)
    return SetDataset(adata, groups, genes=genes, vocab=vocab, set_size=shape.set_size, seed=0)


def make_model(shape: Shape, ds: SetDataset, transformer: str) -> StateTransitionModel:
    cfg = ST_PRESETS["small"].replace(
        mlp_hidden_dim=shape.ffn,
        hidden_dim=shape.hidden,
        num_genes=len(ds.genes),
        perturbation_dim=ds.vocab.dim,
        set_size=shape.set_size,
        transformer_layers=shape.layers,
        transformer_heads=shape.heads,
    )
    torch.manual_seed(0)
    model = StateTransitionModel(cfg)
    if transformer != "sdpa":
        old = set_transformer(shape.hidden, shape.heads, shape.layers, shape.ffn, impl=transformer)
        old.load_state_dict(model.transformer.state_dict())
        model.transformer = old
    return model


def matmul_rate(n: int = 2048, k: int = 2048, m: int = 2048, reps: int = 6) -> tuple[float, float]:
    """Best-of-``reps`` float32 FLOP/s of an [n, k] @ [k, m] matmul on the current threads: (per wall
    second, per CPU second of the process). Under contention the wall rate is whatever share of the cores
    this process got; the CPU rate is the kernels' own speed."""
    a, b = torch.randn(n, k), torch.randn(k, m)
    wall = cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return 2.0 * n * k * m / wall, 2.0 * n * k * m / max(cpu, 1e-9)


def step_flops(model, batch, loss_fn) -> float:
    """Matmul FLOPs of forward + loss + backward, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(batch.x_ctrl, batch.z_pert, batch.batch_idx), batch.x_target).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- the minimal loop


PHASES = ("data", "forward", "loss", "backward", "clip", "optimizer", "sync")


def make_optimizer(model, adamw: str) -> torch.optim.Optimizer:
    kw = {"foreach": True} if adamw == "foreach" else {"fused": True} if adamw == "fused" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, **kw)


class Loop:
    """One training step split into timed phases (the engine's step, minus run-directory bookkeeping)."""

    def __init__(self, model, ds: SetDataset, shape: Shape, variant: Variant) -> None:
        self.model, self.ds, self.shape, self.v = model.train(), ds, shape, variant
        self.opt = make_optimizer(model, variant.adamw)
        self.fn = torch.compile(model) if variant.compile else model
        self.loss_fn = energy_before if variant.loss == "before" else losses.energy_distance
        self.step = 0
        self.last_loss = float("nan")

    def run(self, mark=None) -> dict[str, tuple[float, float]]:
        """One step; ``mark(name)`` wraps each phase (a profiler label); returns phase -> (wall s, cpu s)."""
        out: dict[str, tuple[float, float]] = {}
        mark = mark or (lambda name: contextlib.nullcontext())

        @contextlib.contextmanager
        def phase(name):
            w, c = time.perf_counter(), time.process_time()
            with mark(name):
                yield
            out[name] = (time.perf_counter() - w, time.process_time() - c)

        with phase("data"):
            b = self.ds.batch(self.step, self.shape.batch_size)
        with phase("forward"):
            pred = self.fn(b.x_ctrl, b.z_pert, b.batch_idx)  # [B, S, G]
        with phase("loss"):
            loss = self.loss_fn(pred, b.x_target).mean()
        with phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase("clip"):
            foreach = self.v.adamw != "default" or None
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=foreach)
        with phase("optimizer"):
            self.opt.step()
        self.step += 1
        with phase("sync"):
            if self.step % self.v.sync_every == 0:
                self.last_loss = float(loss.detach())  # the engine's per-step .item(): finite check, metrics
        return out


def time_variant(loop: Loop, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        loop.run()
    runs = [loop.run() for _ in range(steps)]
    row = {}
    for k in PHASES:
        row[f"{k}_s"] = statistics.median(r[k][0] for r in runs)
        row[f"{k}_cpu_s"] = statistics.median(r[k][1] for r in runs)
    row["step_s"] = statistics.median(sum(v[0] for v in r.values()) for r in runs)
    row["step_cpu_s"] = statistics.median(sum(v[1] for v in r.values()) for r in runs)
    row["step_s_min"] = min(sum(v[0] for v in r.values()) for r in runs)
    return row


def profile_breakdown(loop: Loop) -> dict:
    """One step under torch.profiler: wall split into matmul kernels, other kernels and the rest."""
    from torch.profiler import ProfilerActivity, profile, record_function

    loop.run()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.run(mark=record_function)
    wall = time.perf_counter() - t
    ev = [
        e
        for e in prof.key_averages()
        if not e.key.startswith(("data", "forward", "loss", "backward", "clip"))
    ]
    ev = [e for e in ev if e.key not in ("optimizer", "sync")]
    self_us = {e.key: e.self_cpu_time_total for e in ev}
    matmul = sum(v for k, v in self_us.items() if k in MATMUL_OPS) / 1e6
    kernels = sum(v for k, v in self_us.items() if k.startswith("aten::")) / 1e6
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:10]
    return {
        "profiled_wall_s": wall,
        "matmul_kernels_s": matmul,
        "other_aten_s": kernels - matmul,
        "outside_aten_s": max(0.0, wall - kernels),
        "top_ops_ms": {k: v / 1e3 for k, v in top},
    }


def cadence_costs(loop: Loop) -> dict:
    """Seconds of one validation pass (256 sets, the engine's evaluate_loss) and one checkpoint write
    (weights + optimizer state, as the engine's ``save``) after the loop has trained."""
    from statecore.training import checkpoint as ckpt
    from statecore.training.engine import evaluate_loss

    t = time.perf_counter()
    evaluate_loss(loop.model, loop.ds, losses.energy_distance, torch.device("cpu"), loop.shape.batch_size)
    val_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        ckpt.save_weights(Path(d) / ckpt.LAST, loop.model, {"genes": list(loop.ds.genes)})
        ckpt.save_train_state(Path(d), loop.opt, {"step": loop.step, "best_val": None, "total": loop.step})
        ckpt_s = time.perf_counter() - t
    return {"val_pass_s": val_s, "val_sets": 256, "checkpoint_s": ckpt_s}


# --------------------------------------------------------------------------- driver


def measure_shape(shape: Shape, args) -> dict:
    ds = make_dataset(shape, args.data)
    torch.set_num_threads(1)
    cells = shape.batch_size * shape.set_size
    out: dict = {"shape": {**asdict(shape), "genes": len(ds.genes), "cells_per_step": cells}}
    flops = step_flops(make_model(shape, ds, "sdpa"), ds.batch(0, shape.batch_size), losses.energy_distance)
    out["gflop_per_step"] = flops / 1e9
    variants = [v for v in VARIANTS if (args.compile or not v.compile) and v.name in args.variants]
    rows, loops = [], {}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        rate, rate_cpu = matmul_rate()
        step_rate = matmul_rate(cells, shape.hidden, shape.ffn)[1]  # the step's FFN matmul, its own shape
        for v in variants if threads == 1 else [v for v in variants if v.name in ("before", "nosync")]:
            loop = Loop(make_model(shape, ds, v.transformer), ds, shape, v)
            row = {"variant": v.name, "threads": threads, **time_variant(loop, args.steps, args.warmup)}
            row["cells_per_s"] = cells / row["step_s"]
            row["achieved_gflops"] = flops / row["step_s_min"] / 1e9
            row["matmul_gflops"] = rate / 1e9
            row["matmul_gflops_per_cpu_s"] = rate_cpu / 1e9
            row["ffn_matmul_gflops_per_cpu_s"] = step_rate / 1e9
            row["pct_of_matmul_rate"] = 100.0 * flops / row["step_s_min"] / rate
            # per CPU second on both sides: the machine's load cancels out (threads spinning in OpenMP
            # barriers count as CPU time, so this is a lower bound with several threads)
            row["pct_of_matmul_rate_cpu"] = 100.0 * flops / row["step_cpu_s"] / rate_cpu
            rows.append(row)
            loops[(v.name, threads)] = loop
            print(
                f"  {shape.name} {v.name} threads={threads}: {row['step_s']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    out["rows"] = rows
    torch.set_num_threads(1)
    out["profile"] = {n: profile_breakdown(loops[(n, 1)]) for n in ("before", "nosync") if (n, 1) in loops}
    if args.cadence and ("nosync", 1) in loops:
        out["cadence"] = cadence_costs(loops[("nosync", 1)])
        step = next(r["step_s"] for r in rows if r["variant"] == "nosync" and r["threads"] == 1)
        for key in ("val_pass_s", "checkpoint_s"):
            out["cadence"][f"pct_of_run_every_100_steps_{key[:-2]}"] = (
                100.0 * out["cadence"][key] / (100 * step)
            )
    return out


def print_table(res: dict) -> None:
    for sh in res["shapes"]:
        s = sh["shape"]
        print(
            f"\n{s['name']}: {s['batch_size']} sets x {s['set_size']} cells, {s['genes']} genes, hidden {s['hidden']}, "
            f"{s['layers']} layers, FFN {s['ffn']}; {sh['gflop_per_step']:.1f} GFLOP/step (matmul)"
        )
        head = f"{'variant':9} {'thr':>3} {'step s':>7} {'cpu s':>7} {'cells/s':>8} " + " ".join(
            f"{p:>8}" for p in PHASES
        )
        print(head + f" {'GFLOP/s':>8} {'mm rate':>8} {'%rate':>6} {'%rate/cpu':>9}")
        for r in sh["rows"]:
            ph = " ".join(f"{r[p + '_s']:8.4f}" for p in PHASES)
            print(
                f"{r['variant']:9} {r['threads']:>3} {r['step_s']:7.3f} {r['step_cpu_s']:7.3f} {r['cells_per_s']:8.0f} "
                f"{ph} {r['achieved_gflops']:8.1f} {r['matmul_gflops']:8.1f} {r['pct_of_matmul_rate']:6.1f} "
                f"{r['pct_of_matmul_rate_cpu']:9.1f}"
            )
        for name, p in sh["profile"].items():
            print(
                f"profile {name}: wall {p['profiled_wall_s']:.3f} s = matmul kernels {p['matmul_kernels_s']:.3f} + "
                f"other ATen {p['other_aten_s']:.3f} + outside ATen {p['outside_aten_s']:.3f}"
            )
        c = sh.get("cadence")
        if not c:
            continue
        print(
            f"validation pass {c['val_pass_s']:.2f} s ({c['pct_of_run_every_100_steps_val_pass']:.1f}% of a run at "
            f"every 100 steps); checkpoint {c['checkpoint_s']:.3f} s "
            f"({c['pct_of_run_every_100_steps_checkpoint']:.2f}%)"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--data", type=Path, default=None, help="prepared PerturBench sample (else made once)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="second thread count")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    names = [v.name for v in VARIANTS]
    ap.add_argument("--variants", nargs="+", default=names, choices=names)
    ap.add_argument(
        "--no-cadence", dest="cadence", action="store_false", help="skip validation/checkpoint cost"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    load = os.getloadavg()
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_before": load,
        },  # fmt: skip
        "shapes": [measure_shape(SHAPES[n], args) for n in args.shapes],
    }
    res["machine"]["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print_table(res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
