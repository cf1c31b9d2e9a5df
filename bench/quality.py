"""Quality benchmark: State Transition vs baselines vs the data ceiling, with cell-eval's metrics.

Preparing and training go through the public CLI (``python -m statecore prepare|train``) so the benchmark
measures exactly what a user runs; scoring is ``statecore.evaluation.run.evaluate_run``, the one
evaluation behind ``python -m statecore evaluate --run-dir`` and the app's Evaluate page (model, every
baseline of ``BASELINE_KINDS`` and the split-half ceiling, with a verdict per headline metric).

Tasks (see docs/RESULTS.md):
  K1  Kang 2018 PBMC IFN-beta, zero-shot context CD14+Mono, 2,000 HVGs
  S1  synthetic screen with planted effects (36 perturbations, 4 contexts), underrepresented context
  T1  perturbench sample, underrepresented context U87MG
  T2  perturbench sample, zero-shot context U87MG
  C1  perturbench K562: a third of the measured double perturbations held out (explicit split)
  P1  Papalexi 2021 THP-1 CRISPR knockouts (replicates 1+2, 299 genes), context = replicate (obs
      column `batch`), underrepresented rep_2 (30 % of its targets kept)
  P2  the same data, zero-shot rep_2
  T1B, T2B, K1B  the same tasks on Track B (ST on State Embedding embeddings with a gene decoder)

Usage:
  python bench/quality.py --tasks P1,P2,K1,S1,C1 --seeds 3   # docs/RESULTS.md: small preset, 400 steps each
  python bench/quality.py --tasks K1 --minutes 4             # 400 steps or 4 minutes, whichever ends first
  python bench/quality.py --tasks P1 --extra=--loss,mmd      # extra `train` flags for every task
  python bench/quality.py --tasks P1,P2 --classify --extra=--train-on-classified   # Mixscape-style calls (issue 17)
  python bench/quality.py --merge a.json b.json              # combine task subsets run in parallel
Writes bench/results/quality.json (and quality_<tasks>.json when a subset is run) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "sample_data"
# the shared real data sets (not shipped with the package): ../shared/data beside the checkout
SHARED = Path(os.environ.get("STATECORE_SHARED_DATA", ROOT.parent / "shared" / "data"))
METRICS = (
    "pearson_delta",
    "mae",
    "discrimination_score_l1",
    "overlap_at_N",
    "overlap_at_100",
    "precision_at_N",
)
CEILING_ROW = "ceiling (two halves)"


def sh(args: list[str], log: Path, *, env_extra: dict[str, str] | None = None) -> float:
    """Run a statecore CLI command, append its output to ``log``, return wall seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("\n$ " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "statecore", *args], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(args)}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def make_synthetic(path: Path, seed: int) -> None:
    from statecore.data.synthetic import make_perturbation_adata

    adata = make_perturbation_adata(
        n_cells=12000, n_genes=1000, n_perturbations=36, contexts=("c0", "c1", "c2", "c3"), seed=seed
    )
    adata.write_h5ad(path)


def combo_test_perts(prepared: Path, context: str, seed: int) -> list[str]:
    """A third of the doubles in ``context`` whose two singles are measured there."""
    import anndata as ad

    obs = ad.read_h5ad(prepared, backed="r").obs
    perts = set(obs.loc[obs["context"].astype(str) == context, "perturbation"].astype(str))
    doubles = sorted(p for p in perts if "+" in p and all(s in perts for s in p.split("+")))
    rng = np.random.default_rng(seed)
    n = max(1, len(doubles) // 3)
    return sorted(rng.choice(doubles, size=n, replace=False).tolist())


def summarise(result) -> dict[str, float]:
    res = result.results
    out = {}
    for m in METRICS:
        if m in res.columns:
            vals = res[m].to_numpy(dtype=float)
            out[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def celleval_diff(pred, real, control: str, ours: dict[str, float]) -> dict[str, float]:
    """|statecore.evaluation.metrics - cell-eval| per metric on the same files (they should agree)."""
    import logging
    import tempfile
    import warnings

    from cell_eval import MetricsEvaluator

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = MetricsEvaluator(
            pred.copy(), real.copy(), control_pert=control, pert_col="perturbation", num_threads=1, outdir=d
        )
        res, _ = ev.compute(profile="full")
    logging.disable(logging.NOTSET)
    ref = res.to_pandas()
    return {m: abs(float(ref[m].mean()) - v) for m, v in ours.items() if m in ref.columns and np.isfinite(v)}


def spread_ratio(pred, real, control: str) -> float:
    """Mean per-gene std of predicted perturbed cells over that of real ones (1 = realistic spread)."""

    def std(a):
        mask = a.obs["perturbation"].astype(str).to_numpy() != control
        x = a.X[mask]
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        return float(x.std(axis=0).mean())

    return std(pred) / max(std(real), 1e-12)


def prepare_task(cfg: dict, tdir: Path, seed: int, log: Path, *, classify: bool = False) -> Path:
    """The task's prepared data (``classify``: with ``prepare --classify-perturbed``, tasks that allow it)."""
    prepared = tdir / "prepared.h5ad"
    if cfg["data"] == "synthetic":
        src = tdir / "raw.h5ad"
        make_synthetic(src, seed)
    else:
        src = SHARED / cfg["data"] if cfg.get("shared") else SAMPLE / cfg["data"]
        if not src.exists():
            raise RuntimeError(
                f"data file {src} not found; set STATECORE_SHARED_DATA to the shared data folder"
            )
    n_hvg = str(cfg.get("n_hvg", 2000))
    extra = ["--classify-perturbed"] if classify and cfg.get("classify") else []
    sh(
        [
            "prepare",
            str(src),
            "-o",
            str(prepared),
            "--n-hvg",
            n_hvg,
            "--no-umap",
            *cfg.get("prepare", []),
            *extra,
        ],
        log,
    )
    return prepared


def perturbed_calls(prepared: Path) -> list[dict] | None:
    """Per context and overall: targeting cells and those the classifier called KO / NP (None: no calls)."""
    import anndata as ad

    from statecore.data.mixscape import call_summary, context_totals

    adata = ad.read_h5ad(prepared, backed="r")
    try:
        summary = call_summary(adata)
    finally:
        adata.file.close()
    return None if summary is None else context_totals(summary).to_dict("records")


def train_task(cfg: dict, args, seed: int, prepared: Path, tdir: Path, workdir: Path, log: Path) -> dict:
    """Train ST on the task through the CLI (Track B fits its SE model first); times and dirs."""
    run_dir = tdir / "run"
    train = ["train", "--data", str(prepared), "--run-dir", str(run_dir), "--task", cfg["task"]]
    train += ["--context", cfg["context"], "--preset", args.preset, "--seed", str(seed)]
    train += ["--max-minutes", str(args.minutes)] + (["--steps", str(args.steps)] if args.steps else [])
    if args.num_threads:
        train += ["--threads", str(args.num_threads)]
    if cfg["task"] == "underrepresented":
        train += ["--keep-fraction", str(cfg.get("keep_fraction", 0.3))]
    if cfg["task"] == "explicit":
        train += ["--test-perts", ",".join(combo_test_perts(prepared, cfg["context"], seed))]
    train += cfg.get("extra", []) + [a for a in (args.extra or "").split(",") if a]
    out: dict = {"run_dir": run_dir}
    if cfg.get("track") == "embedding":  # Track B: fit the State Embedding model on the prepared data first
        # tasks on the same prepared data share one SE model (T1B and T2B)
        se_dir = workdir / f"se-{Path(cfg['data']).stem}-{cfg.get('n_hvg', 2000)}-seed{seed}"
        out["se_run"], out["se_fit_seconds"] = str(se_dir), None
        if not (se_dir / "model.safetensors").exists():  # fitted by an earlier task otherwise
            fit = ["embed", "fit", "--data", str(prepared), "--run-dir", str(se_dir), "--overwrite"]
            out["se_fit_seconds"] = sh([*fit, "--seed", str(seed), *cfg.get("embed", [])], log)
        train += ["--track", "embedding", "--embedding-run", str(se_dir)]
    out["train_seconds"] = sh(train, log)
    out["load_average_after_training"] = os.getloadavg()[0]
    return out


def validation_as_test(split):
    """The run's split with its validation pairs of one context as the test (``--score-on val``): the
    context with the most validation pairs (first by name on ties); its other validation pairs, the
    training pairs and the real test pairs stay where they were, so nothing scored was trained on and
    no test cell is read. Settings are chosen on these scores, never on the test split's."""
    from dataclasses import replace

    sizes = {c: len(v) for c, v in split.val.items() if v}
    if not sizes:
        raise RuntimeError("the run has no validation pairs to score; raise --val-fraction")
    vctx = max(sorted(sizes), key=lambda c: sizes[c])
    val = {c: list(v) for c, v in split.val.items() if c != vctx}
    return replace(split, context=vctx, test={vctx: list(split.val[vctx])}, val=val)


def score_task(cfg: dict, args, seed: int, prepared: Path, run_dir: Path) -> dict:
    """``evaluate_run`` on the trained run: rows per method, the verdicts and (optionally) cell-eval."""
    import anndata as ad

    from statecore.evaluation.run import CEILING, MODEL, evaluate_run
    from statecore.training.checkpoint import load_run

    run = load_run(run_dir)
    if args.score_on == "val":
        run.split = validation_as_test(run.split)
    ev = evaluate_run(run, ad.read_h5ad(prepared), seed=seed)
    ev.save(run_dir.parent / ("evaluation" if args.score_on == "test" else "evaluation_val"))
    model = "ST (embedding)" if cfg.get("track") == "embedding" else "ST"
    names = {MODEL: model, CEILING: CEILING_ROW}
    rows, check = {}, {}
    for method, res in ev.results.items():
        row = names.get(method, method.removeprefix("baseline: "))
        rows[row] = summarise(res)
        rows[row]["spread_ratio"] = spread_ratio(ev.predictions[method], ev.real, ev.control)
        if args.celleval and method != CEILING:
            check[row] = celleval_diff(ev.predictions[method], ev.real, ev.control, rows[row])
    return {
        "rows": rows,
        "verdicts": [v.sentence for v in ev.verdicts],
        "overall": ev.overall,
        "skipped": dict(ev.errors),
        "n_test_cells": int((ev.real.obs["perturbation"].astype(str) != ev.control).sum()),
        "n_test_perturbations": ev.n_perturbations,
        "n_genes": int(ev.real.n_vars),
        **({"celleval_max_abs_diff": check} if check else {}),
    }


def run_task(name: str, cfg: dict, args, workdir: Path, seed: int) -> dict:
    tdir = workdir / name / f"seed{seed}"
    tdir.mkdir(parents=True, exist_ok=True)
    log = tdir / "log.txt"
    log.write_text("")
    classify = bool(getattr(args, "classify", False))
    prepared = prepare_task(cfg, tdir, seed, log, classify=classify)
    calls = perturbed_calls(prepared) if classify and cfg.get("classify") else None
    trained = train_task(cfg, args, seed, prepared, tdir, workdir, log)
    run_dir = trained.pop("run_dir")
    status = json.loads((run_dir / "status.json").read_text())
    scored = score_task(cfg, args, seed, prepared, run_dir)
    out = {"task": cfg, "seed": seed, **trained, "train_steps": int(status.get("step", 0)), **scored}
    return {**out, "perturbed_calls": calls} if calls is not None else out


def over_seeds(runs: list[dict]) -> dict:
    """One task's result over training seeds: every metric as mean (``rows``) and sd (``rows_sd``)."""
    if len(runs) == 1:
        return runs[0]
    out = {k: v for k, v in runs[0].items() if k not in ("rows", "verdicts", "overall", "seed")}
    out["seeds"] = runs
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    out["rows"], out["rows_sd"] = {}, {}
    for model in runs[0]["rows"]:
        per = [r["rows"].get(model, {}) for r in runs]
        metrics = sorted({m for p in per for m in p})
        vals = {m: np.array([p.get(m, np.nan) for p in per], dtype=float) for m in metrics}
        out["rows"][model] = {
            m: float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for m, v in vals.items()
        }
        out["rows_sd"][model] = {
            m: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else np.nan for m, v in vals.items()
        }
    out["verdicts"] = [f"seed {r['seed']}: {r['overall']}" for r in runs]
    return out


PAPALEXI_PREPARE = [
    *("--context-col", "batch", "--batch-col", "none", "--min-cells", "0"),
    *("--library-size-col", "total_umis_all_genes"),
]

TASKS = {
    # min_cells 0: the bar's 2,000 seurat_v3 HVGs are chosen on all 6,998 genes (the default min_cells=50
    # keeps 2,833 genes and shares only 829 of those 2,000 HVGs, a different and easier task)
    "K1": dict(
        data="kang2018_pbmc_ifnb.h5ad",
        task="zeroshot",
        context="CD14+Mono",
        n_hvg=2000,
        prepare=["--min-cells", "0"],
    ),
    "S1": dict(data="synthetic", task="underrepresented", context="c3", n_hvg=1000),
    "T1": dict(data="perturbench_devel.h5ad", task="underrepresented", context="U87MG", n_hvg=500),
    "T2": dict(data="perturbench_devel.h5ad", task="zeroshot", context="U87MG", n_hvg=500),
    "C1": dict(data="perturbench_devel.h5ad", task="explicit", context="k562", n_hvg=500),
    # Papalexi et al. 2021 (SOURCE.md beside the file): raw UMI counts of a 299-gene panel; the replicate
    # is the context. All 299 genes are kept (a panel: no HVG cut). The panel's own totals move with the
    # IFN-γ response that the knockouts blunt, so the cells are normalised by their whole-transcriptome
    # UMI count (`total_umis_all_genes`, computed by the sceptre authors on all genes).
    "P1": dict(
        data="papalexi2021_thp1_rep12/papalexi2021_thp1_rep12.h5ad",
        shared=True,
        task="underrepresented",
        context="rep_2",
        keep_fraction=0.3,
        n_hvg=299,
        prepare=PAPALEXI_PREPARE,
        classify=True,  # --classify: prepare --classify-perturbed (Mixscape-style calls, issue 17)
    ),
    "P2": dict(
        data="papalexi2021_thp1_rep12/papalexi2021_thp1_rep12.h5ad",
        shared=True,
        task="zeroshot",
        context="rep_2",
        n_hvg=299,
        prepare=PAPALEXI_PREPARE,
        classify=True,
    ),
}

# Track B (ST on State Embedding cell embeddings + gene decoder, scored in the same HVG space): the same
# tasks with an SE model fitted on the task's prepared data (`embed fit`, small preset)
# 150 steps of 32 cells on one thread: ~3 CPU minutes on the 6k-cell sample (a loaded 2-core box)
TASKS.update(
    {
        f"{k}B": dict(
            TASKS[k], track="embedding", embed=["--steps", "150", "--batch-size", "32", "--num-threads", "1"]
        )
        for k in ("T1", "T2", "K1")
    }
)
# Track B with the residual decode at prediction (`train --decoder-residual on`)
TASKS.update({f"{k}BR": dict(TASKS[f"{k}B"], extra=["--decoder-residual", "on"]) for k in ("T1", "K1")})


def fmt(v: float, sd: float | None = None) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    return f"{v:.3f} ± {sd:.3f}" if sd is not None and np.isfinite(sd) else f"{v:.3f}"


def table(results: dict) -> str:
    lines = []
    for name, res in results.items():
        if "error" in res:
            lines.append(f"### {name}: failed: {res['error']}")
            continue
        cols = (
            ["model"] + [m for m in METRICS if any(m in r for r in res["rows"].values())] + ["spread_ratio"]
        )
        lines.append(
            f"### {name} ({res['task']['task']} {res['task']['context']}; {res['n_test_perturbations']} test "
            f"perturbation(s), {res['n_genes']} genes; {len(res.get('seeds', [0]))} seed(s); ST trained "
            f"{res.get('train_steps', '?')} steps in "
            f"{res['train_seconds']:.0f} s, load average {res.get('load_average_after_training', 0):.1f})"
        )
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        sd = res.get("rows_sd", {})
        for model, row in res["rows"].items():
            cells = [fmt(row.get(c, float("nan")), sd.get(model, {}).get(c)) for c in cols[1:]]
            lines.append("| " + " | ".join([model, *cells]) + " |")
        lines += [f"- {v}" for v in res.get("verdicts", [])]
        lines += goal_lines(name, res)
        if res.get("celleval_max_abs_diff"):
            worst = max(
                (v, f"{m}/{k}") for m, d in res["celleval_max_abs_diff"].items() for k, v in d.items()
            )
            lines.append(f"cell-eval check: largest |statecore - cell-eval| = {worst[0]:.2g} ({worst[1]})")
        lines.append("")
    return "\n".join(lines)


# the goals of issue 17 (mean over seeds): P1 beats perturbation_mean by margins; K1 meets fixed bars on every
# axis at once; S1, C1, P2 lose to no baseline on any headline metric
HEADLINE_GOAL = (("pearson_delta", 1), ("discrimination_score_l1", 1), ("overlap_at_N", 1), ("mae", -1))


def goal_lines(name: str, res: dict) -> list[str]:
    """Each goal of the task as a line: met or not, with the numbers it compares."""
    rows = res.get("rows", {})
    st = rows.get("ST", {})
    if not st:
        return []
    pm = rows.get("perturbation_mean", {})
    if name == "P1":
        checks = [
            (
                "PDS ≥ perturbation_mean + 0.03",
                "discrimination_score_l1",
                pm.get("discrimination_score_l1", np.nan) + 0.03,
            ),
            ("pearson Δ ≥ perturbation_mean + 0.05", "pearson_delta", pm.get("pearson_delta", np.nan) + 0.05),
            ("DE overlap ≥ 1.5 × perturbation_mean's", "overlap_at_N", 1.5 * pm.get("overlap_at_N", np.nan)),
        ]
        return [
            f"- goal {text}: {'met' if st.get(m, np.nan) >= bar else 'NOT met'} ({st.get(m, np.nan):.3f} vs {bar:.3f})"
            for text, m, bar in checks
        ]
    if name == "K1":
        spread = st.get("spread_ratio", np.nan)
        out = [
            f"- goal pearson Δ ≥ 0.96: {'met' if st['pearson_delta'] >= 0.96 else 'NOT met'} ({st['pearson_delta']:.3f})",
            f"- goal DE overlap ≥ 0.70: {'met' if st['overlap_at_N'] >= 0.70 else 'NOT met'} ({st['overlap_at_N']:.3f})",
            f"- goal spread within 20 %: {'met' if abs(spread - 1) <= 0.2 else 'NOT met'} ({spread:.3f})",
        ]
        return out
    if name in ("S1", "C1", "P2"):
        out = []
        for m, sign in HEADLINE_GOAL:
            if not np.isfinite(st.get(m, np.nan)):
                continue
            bases = {
                b: r[m]
                for b, r in rows.items()
                if b not in ("ST", CEILING_ROW) and np.isfinite(r.get(m, np.nan))
            }
            if not bases:
                continue
            best = max(bases, key=lambda b: sign * bases[b])
            ok = sign * st[m] >= sign * bases[best]
            out.append(
                f"- goal no loss on {m}: {'met' if ok else 'NOT met'} (ST {st[m]:.4f}, best baseline {best} {bases[best]:.4f})"
            )
        return out
    return []


def merge(paths: list[str], out: Path) -> int:
    """Combine result files of disjoint task subsets into one (task order as in TASKS)."""
    metas, results = [], {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        metas.append(doc["meta"])
        results.update(doc["results"])
    results = {k: results[k] for k in TASKS if k in results}
    out.write_text(
        json.dumps(
            {"meta": metas[0] if len(metas) == 1 else {"parts": metas}, "results": results},
            indent=2,
            default=float,
        )
    )
    print(table(results))
    print(f"\nwrote {out}")
    return 0


def write_results(out: Path, args, argv, results: dict) -> None:
    meta = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(),
        "preset": args.preset,
        "minutes": args.minutes,
        "steps": args.steps,
        "num_threads": args.num_threads,
        "extra": args.extra,
        "classify": bool(getattr(args, "classify", False)),
        "score_on": args.score_on,
        "seed": args.seed,
        "seeds": args.seeds,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "load_average_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=float))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--preset", default="small")
    p.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="training wall-clock cap per task: a safety net only (the step budget --steps decides)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=400,
        help="optimizer steps (default 400, as in docs/RESULTS.md); the LR schedule spans them, so a "
        "fixed step count gives the same model on a loaded machine, only later",
    )
    p.add_argument(
        "--celleval",
        action="store_true",
        help="also score every prediction with cell-eval itself and report the largest differences",
    )
    p.add_argument(
        "--num-threads", type=int, default=1, help="torch CPU threads per training run (default 1)"
    )
    p.add_argument(
        "--extra", default="", help="comma-separated extra `train` flags for every task, e.g. --loss,mmd"
    )
    p.add_argument(
        "--classify",
        action="store_true",
        help="prepare P1/P2 with --classify-perturbed (Mixscape-style perturbed-cell calls; their counts go into "
        "the JSON); pair with --extra=--train-on-classified to train on the cells called perturbed",
    )
    p.add_argument(
        "--score-on",
        default="test",
        choices=("test", "val"),
        help="val: score the run's validation pairs of one context instead of the test (choosing settings)",
    )
    p.add_argument("--seed", type=int, default=0, help="first training seed")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each task with this many seeds (seed, seed+1, ...) and report mean ± sd",
    )
    p.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "quality"))
    p.add_argument("--out", default=None)
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only merge earlier result files (e.g. tasks run in parallel) into --out and print",
    )
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out or ROOT / "bench" / "results" / "quality.json"))
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    workdir = Path(args.workdir)
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "bench"
        / "results"
        / ("quality.json" if len(names) == len(TASKS) else f"quality_{'_'.join(names)}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in names:
        print(f"[quality] {name} ...", flush=True)
        runs: list[dict] = []
        try:
            for s in range(args.seed, args.seed + max(1, args.seeds)):
                runs.append(run_task(name, TASKS[name], args, workdir, s))
                results[name] = over_seeds(runs)
                write_results(out, args, argv, results)  # after every seed: a cut run keeps what finished
        except Exception as exc:  # report the failure in the table, keep going with the other tasks
            results[name] = {"task": TASKS[name], "error": str(exc)}
            if runs:
                results[name]["finished_seeds"] = over_seeds(runs)
        write_results(out, args, argv, results)
        print(table({name: results[name]}), flush=True)
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
