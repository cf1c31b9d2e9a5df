"""Training throughput of the ST model: cells/s, achieved FLOP/s and the machine's matmul rate.

    nice python bench/train_throughput.py                     # the default grid, CPU, 1 thread
    nice python bench/train_throughput.py --profile           # + torch.profiler table of one step
    python bench/train_throughput.py --device cuda --threads 4 --bf16   # on a GPU

For each (preset, genes, set size) it times ``statecore.training.engine.fit`` (the real loop: data gathers from
sparse CSR, forward, energy loss, backward, AdamW) over a few steps after one warm-up step, counts the
FLOPs of one step with torch's FlopCounterMode (matmuls and attention; elementwise work is not
counted) and compares FLOP/s against a large float32 torch.matmul timed in the same run on the same
threads. ``--before`` also times the loss as it was before this benchmark (torch.cdist's exact
O(S²·G) path) on a subset, so old and new are measured side by side. Writes
bench/results/train_throughput.json and prints a table.

Whole process, beside the reference (arc-state ST), in one run, one after the other:

    bash ../shared/peer/reference_throughput.sh /tmp/rt 300        # once: installs the reference, prepares its data
    python bench/train_throughput.py --whole-process /tmp/rt --steps 300 --threads 2

times three training processes on the PerturBench sample (U87MG underrepresented, 16 sets x 64 cells per
step): the reference (hidden 256, 4 layers, 8 heads, FFN 1024), ``python -m statecore train --preset small``
as the side-by-side script runs it (FFN 512), and statecore at the reference's exact shape (FFN 1024; the
CLI has no flag for it, so a child process runs the same CLI with the preset's width raised). Per step
figures come from each run's own log (statecore's metrics.jsonl). Writes
bench/results/train_throughput_whole.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from statecore.config import ST_PRESETS, TrainConfig  # noqa: E402
from statecore.data.sets import PerturbationVocab, SetDataset, build_groups  # noqa: E402
from statecore.data.synthetic import make_perturbation_adata  # noqa: E402
from statecore.models import losses  # noqa: E402
from statecore.models.transition import StateTransitionModel  # noqa: E402
from statecore.training.st_track import TrainData  # noqa: E402
from statecore.training.st_track import fit_model as fit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "train_throughput.json"


def _exact_cdist(a, b):
    """The energy loss's distance before the matmul form: cdist without the matmul path."""
    return torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def _energy_exact_cdist(x, y):
    """The energy distance as it was computed before the matmul form (three exact cdist blocks)."""
    xy, xx, yy = (_exact_cdist(p, q).mean(dim=(1, 2)) for p, q in ((x, y), (x, x), (y, y)))
    return xy - 0.5 * xx - 0.5 * yy


def matmul_rate(device: torch.device, n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    """Best-of-``reps`` FLOP/s of an n x n x n matmul (the machine's reachable peak for this dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_data(n_genes: int, set_size: int, n_cells: int, seed: int = 0) -> TrainData:
    """Synthetic log1p data as sparse CSR (the prepared format), every group a training group."""
    a = make_perturbation_adata(n_cells=n_cells, n_genes=n_genes, n_perturbations=16, seed=seed, sparse=True)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    X.data = np.log1p(X.data)
    a.X = X
    groups = build_groups(a, control="ctrl")
    vocab = PerturbationVocab.from_labels(a.obs["perturbation"].astype(str), "ctrl")
    genes = a.var_names.astype(str).tolist()
    ds = SetDataset(a, groups, genes=genes, vocab=vocab, set_size=set_size, seed=seed)
    return TrainData(
        train=ds, val=None, genes=genes, vocab=vocab, contexts=sorted(set(a.obs["context"])), batches=["all"]
    )


def step_flops(model, batch) -> float:
    """FLOPs of one forward + backward (matmul-like ops, as counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        pred = model(batch.x_ctrl, batch.z_pert, batch.batch_idx)
        losses.energy_distance(pred, batch.x_target).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(
    preset: str,
    n_genes: int,
    set_size: int,
    *,
    batch_size: int,
    steps: int,
    threads: int,
    device: str,
    bf16: bool = False,
    compile: bool = False,
    exact_loss: bool = False,
) -> dict:
    data = make_data(n_genes, set_size, n_cells=max(2000, 40 * set_size))
    cfg = ST_PRESETS[preset].replace(num_genes=n_genes, perturbation_dim=data.vocab.dim, set_size=set_size)
    torch.manual_seed(0)
    model = StateTransitionModel(cfg)
    tcfg = TrainConfig(
        steps=1,
        batch_size=batch_size,
        warmup_steps=0,
        val_every=0,
        log_every=10**9,
        ckpt_every_steps=10**9,
        ckpt_every_seconds=0,
        num_threads=threads,
        device=device,
        bf16=bf16,
        compile=compile,
    )
    saved = losses.energy_distance
    if exact_loss:
        losses.energy_distance = _energy_exact_cdist  # get_loss looks the name up per call
    try:
        fit(model, data, tcfg)  # warm-up: allocator, kernels, compilation
        t0 = time.perf_counter()
        fit(model, data, tcfg.replace(steps=steps))
        dt = (time.perf_counter() - t0) / steps
        dev = next(model.parameters()).device
        b = data.train.batch(0, batch_size)
        t1 = time.perf_counter()
        for s in range(3):
            data.train.batch(s + 1, batch_size)
        data_s = (time.perf_counter() - t1) / 3
        flops = step_flops(model, b.to(dev))
    finally:
        losses.energy_distance = saved
    cells = batch_size * set_size
    return {
        "preset": preset,
        "genes": n_genes,
        "set_size": set_size,
        "batch_size": batch_size,
        "steps": steps,
        "threads": threads,
        "device": str(device),
        "bf16": bf16,
        "compile": compile,
        "loss_path": "exact-cdist (before)" if exact_loss else "matmul (after)",
        "params": model.n_parameters(),
        "step_s": dt,
        "cells_per_s": cells / dt,
        "data_s_per_step": data_s,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / dt / 1e9,
    }


def profile_one(preset: str, n_genes: int, set_size: int, batch_size: int, threads: int, exact: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    data = make_data(n_genes, set_size, n_cells=max(2000, 40 * set_size))
    cfg = ST_PRESETS[preset].replace(num_genes=n_genes, perturbation_dim=data.vocab.dim, set_size=set_size)
    model = StateTransitionModel(cfg)
    torch.set_num_threads(threads)
    opt = torch.optim.AdamW(model.parameters())
    saved = losses.energy_distance
    if exact:
        losses.energy_distance = _energy_exact_cdist  # get_loss looks the name up per call
    try:
        for step in range(2):
            ctx = profile(activities=[ProfilerActivity.CPU]) if step == 1 else contextlib.nullcontext()
            with ctx as prof:
                b = data.train.batch(step, batch_size)
                pred = model(b.x_ctrl, b.z_pert, b.batch_idx)
                loss = losses.energy_distance(pred, b.x_target).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        losses.energy_distance = saved
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


REF_ARGS = (
    "data.kwargs.embed_key=X_hvg data.kwargs.output_space=gene data.kwargs.pert_col=perturbation "
    "data.kwargs.cell_type_key=context data.kwargs.batch_col=batch data.kwargs.control_pert=ctrl "
    "data.kwargs.num_workers=0 data.kwargs.pin_memory=false model=state_sm model.kwargs.hidden_dim=256 "
    "model.kwargs.cell_set_len=64 model.kwargs.transformer_backbone_kwargs.num_hidden_layers=4 "
    "model.kwargs.transformer_backbone_kwargs.num_attention_heads=8 "
    "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=8 model.kwargs.transformer_backbone_kwargs.head_dim=32 "
    "model.kwargs.transformer_backbone_kwargs.intermediate_size=1024 training.batch_size=16 training.lr=1e-4 "
    "training.train_seed=0 use_wandb=false name=st overwrite=true"
).split()
# The same CLI as a user runs, with the small preset's MLP/FFN width raised to the reference's 1024 (its
# control encoder is one linear layer, as the reference's with use_basal_projection false).
SAME_SHAPE_CHILD = (
    "import sys; from statecore.config import ST_PRESETS; "
    "ST_PRESETS['small'] = ST_PRESETS['small'].replace(mlp_hidden_dim=1024, basal_encoder='linear'); "
    "from statecore.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def _timed_run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall s, CPU s of the child and its threads): on a shared machine CPU time is the steadier figure."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t, cpu


def _ours_cmd(prefix: list[str], data: Path, run_dir: Path, steps: int, threads: int) -> list[str]:
    return [*prefix, "train", "--data", str(data), "--run-dir", str(run_dir), "--task", "underrepresented",
            "--context", "U87MG", "--keep-fraction", "0.3", "--seed", "0", "--preset", "small", "--set-size",
            "64", "--batch-size", "16", "--steps", str(steps), "--device", "cpu", "--threads", str(threads)]  # fmt: skip


def _per_step_ours(run_dir: Path) -> float | None:
    """Median logged cells/s of a statecore run after its first logged window (warm-up excluded)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = sorted(r["cells_per_s"] for r in rows[1:] if r.get("cells_per_s"))
    return vals[len(vals) // 2] if vals else None


def whole_process(ref_dir: Path, ref_venv: Path, steps: int, threads: int, out: Path) -> dict:
    """Reference, statecore (small preset) and statecore (reference shape), whole process, one after the other."""
    import shutil

    ours_data = ref_dir / "ours.h5ad"
    if (
        not (ref_dir / "T1.toml").exists()
        or not ours_data.exists()
        or not (ref_venv / "bin" / "state").exists()
    ):
        raise SystemExit(
            f"run reference_throughput.sh {ref_dir} first (it installs the reference and prepares data)"
        )
    work = ref_dir / "tt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled"}
    ref_cmd = [str(ref_venv / "bin" / "state"), "tx", "train", f"data.kwargs.toml_config_path={ref_dir / 'T1.toml'}",
               *REF_ARGS, f"training.max_steps={steps}", f"training.val_freq={steps}",
               f"training.ckpt_every_n_steps={steps}", f"output_dir={work / 'reference'}"]  # fmt: skip
    py = [sys.executable, "-m", "statecore"]
    same = [sys.executable, "-c", SAME_SHAPE_CHILD]
    load = os.getloadavg()
    timed = {
        "reference": _timed_run(ref_cmd, work / "reference.log", env),
        "ours_small": _timed_run(
            _ours_cmd(py, ours_data, work / "small", steps, threads), work / "small.log"
        ),
        "ours_same_shape": _timed_run(
            _ours_cmd(same, ours_data, work / "same", steps, threads), work / "same.log"
        ),
    }
    secs = {k: v[0] for k, v in timed.items()}
    cpu = {k: v[1] for k, v in timed.items()}
    cells = steps * 16 * 64
    res = {
        "steps": steps,
        "cells": cells,
        "threads_ours": threads,
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "seconds": secs,
        "cells_per_s": {k: cells / v for k, v in secs.items()},
        "ratio_vs_reference": {k: secs["reference"] / v for k, v in secs.items() if k != "reference"},
        "cpu_seconds": cpu,
        "cpu_ratio_vs_reference": {k: cpu["reference"] / v for k, v in cpu.items() if k != "reference"},
        "per_step_cells_per_s": {
            k: _per_step_ours(work / d) for k, d in (("ours_small", "small"), ("ours_same_shape", "same"))
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}; {steps} steps x 1,024 cells, whole process:"
    )
    for k, v in secs.items():
        ratio = res["ratio_vs_reference"].get(k, 1.0)
        step = res["per_step_cells_per_s"].get(k)
        print(
            f"  {k:16} {v:7.1f} s  {cells / v:7.0f} cells/s  ratio {ratio:.2f}  CPU {cpu[k]:7.1f} s"
            f" ratio {res['cpu_ratio_vs_reference'].get(k, 1.0):.2f}"
            + (f"  per step {step:.0f} cells/s" if step else "")
        )
    print(f"wrote {out}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"])
    ap.add_argument("--genes", nargs="+", type=int, default=[500, 2000])
    ap.add_argument("--set-sizes", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--batch-size", type=int, default=4, help="sets per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--before", action="store_true", help="also time the old exact-cdist loss (small, 2000 genes)"
    )
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--whole-process",
        type=Path,
        default=None,
        metavar="REF_DIR",
        help="time reference vs statecore whole processes (REF_DIR from reference_throughput.sh)",
    )
    ap.add_argument("--ref-venv", type=Path, default=Path.home() / ".cache" / "statecore-reference")
    args = ap.parse_args(argv)
    if args.whole_process is not None:
        whole_process(
            args.whole_process,
            args.ref_venv,
            args.steps,
            args.threads,
            RESULTS.with_name("train_throughput_whole.json"),
        )
        return 0

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    peak = matmul_rate(device)
    rows = []
    for preset in args.presets:
        for genes in args.genes:
            for s in args.set_sizes:
                kw = dict(
                    batch_size=args.batch_size,
                    steps=args.steps,
                    threads=args.threads,
                    device=args.device,
                    bf16=args.bf16,
                    compile=args.compile,
                )
                if args.before and preset == "small" and genes == max(args.genes):
                    rows.append(measure(preset, genes, s, exact_loss=True, **kw))
                rows.append(measure(preset, genes, s, **kw))
                print(f"  done {preset} G={genes} S={s}", file=sys.stderr, flush=True)
    peak_after = matmul_rate(device)
    for r in rows:
        r["pct_of_matmul_peak"] = 100.0 * r["achieved_gflops"] * 1e9 / max(peak, peak_after)
    profile_text = None
    if args.profile:
        profile_text = {
            "before": profile_one(
                "small", max(args.genes), max(args.set_sizes), args.batch_size, args.threads, exact=True
            ),
            "after": profile_one(
                "small", max(args.genes), max(args.set_sizes), args.batch_size, args.threads, exact=False
            ),
        }
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "device": str(device),
            "threads": args.threads,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "matmul_gflops_before": peak / 1e9,
            "matmul_gflops_after": peak_after / 1e9,
        },
        "rows": rows,
        "profile": profile_text,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    print(
        f"device {device}, {args.threads} thread(s), load avg {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"matmul {peak / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s (start / end)"
    )
    head = (
        f"{'preset':6} {'G':>5} {'S':>4} {'loss path':>20} {'step s':>7} {'cells/s':>8} {'data s':>7} "
        f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'%peak':>6}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['preset']:6} {r['genes']:>5} {r['set_size']:>4} {r['loss_path']:>20} {r['step_s']:7.3f} "
            f"{r['cells_per_s']:8.0f} {r['data_s_per_step']:7.4f} {r['gflop_per_step']:10.2f} "
            f"{r['achieved_gflops']:8.2f} {r['pct_of_matmul_peak']:6.1f}"
        )
    if profile_text:
        for k, v in profile_text.items():
            print(f"\n--- profile ({k}) ---\n{v}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
