"""Time to quality on the Kang zero-shot task (K1): wall seconds from `prepare` to a checkpoint that scores
pearson delta >= 0.95 and DE overlap >= 0.6 on the held-out context (issue: faster than the reference).

Everything runs through the public CLI, as a user would, one process after the other:

1. ``python -m statecore prepare`` on the Kang file (the K1 settings of bench/quality.py), timed;
2. for each step budget (``--budgets``), a fresh ``python -m statecore train --steps N`` (its learning-rate
   schedule spans the N steps, so each budget is the run a user would start with that budget), timed, and
   scored on the test context with ``statecore.evaluation.run.evaluate_run`` (the app's Evaluate page);
3. one ``train --patience P`` run (stops when validation has not improved for P checks and keeps the best
   checkpoint: what a user gets without choosing a budget), timed and scored the same way.

Scoring happens after the timing and is not counted (the reference's figure is its training time too). The
time to quality of a budget is prepare + train seconds; the smallest budget that reaches the bar is reported
beside the reference's 1,000 steps in 201-307 s (issue 16; measured on this machine with
``../shared/peer/reference_throughput.sh``'s reference at K1 by the issue's author).

Usage:
  python bench/time_to_quality.py                      # budgets 100,200,400 + patience run, 2 threads
  python bench/time_to_quality.py --budgets 50 --no-patience --threads 1   # smoke
Writes bench/results/time_to_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: tasks, CLI runner and scoring)

BAR = {"pearson_delta": 0.95, "overlap_at_N": 0.6}
REFERENCE = {
    "steps": 1000,
    "seconds": [201, 307],
    "pearson_delta": [0.93, 0.96],
    "overlap_at_N": [0.31, 0.70],
}


def _score(args, prepared: Path, run_dir: Path, seed: int) -> dict:
    ns = argparse.Namespace(score_on="test", celleval=False)
    scored = quality.score_task(quality.TASKS["K1"], ns, seed, prepared, run_dir)
    st = scored["rows"]["ST"]
    return {
        "pearson_delta": st["pearson_delta"],
        "overlap_at_N": st["overlap_at_N"],
        "spread_ratio": st["spread_ratio"],
        "perturbation_mean_pearson_delta": scored["rows"].get("perturbation_mean", {}).get("pearson_delta"),
    }


def _train(prepared: Path, run_dir: Path, args, extra: list[str], log: Path) -> tuple[float, int]:
    cmd = ["train", "--data", str(prepared), "--run-dir", str(run_dir), "--task", "zeroshot"]
    cmd += ["--context", "CD14+Mono", "--preset", args.preset, "--seed", str(args.seed)]
    cmd += ["--threads", str(args.threads), *extra]
    seconds = quality.sh(cmd, log)
    status = json.loads((run_dir / "status.json").read_text())
    return seconds, int(status.get("step", 0))


def run(args) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")
    cfg = quality.TASKS["K1"]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    prepared = quality.prepare_task(cfg, work, args.seed, log)
    prepare_s = time.perf_counter() - t0
    rows = []
    plans = [(f"--steps {n}", ["--steps", str(n)]) for n in args.budgets]
    if args.patience:
        plans.append(
            (
                f"--patience {args.patience}",
                ["--steps", str(args.patience_steps), "--patience", str(args.patience)],
            )
        )
    for name, extra in plans:
        run_dir = work / ("run-" + name.strip("-").replace(" ", "-"))
        train_s, steps = _train(prepared, run_dir, args, extra, log)
        row = {"run": name, "steps": steps, "train_seconds": train_s, "load_average": os.getloadavg()[0]}
        row.update(_score(args, prepared, run_dir, args.seed))
        row["time_to_checkpoint_s"] = prepare_s + train_s
        row["meets_bar"] = all(row[k] >= v for k, v in BAR.items())
        rows.append(row)
        print(json.dumps(row), flush=True)
    reached = [r for r in rows if r["meets_bar"] and r["run"].startswith("--steps")]
    best = min(reached, key=lambda r: r["time_to_checkpoint_s"]) if reached else None
    return {
        "meta": {
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "threads": args.threads,
            "seed": args.seed,
            "preset": args.preset,
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["time_to_quality.py", *sys.argv[1:]]),
        },
        "bar": BAR,
        "reference": REFERENCE,
        "prepare_seconds": prepare_s,
        "rows": rows,
        "fastest_budget_meeting_bar": best,
        "speedup_vs_reference": (
            [
                REFERENCE["seconds"][0] / best["time_to_checkpoint_s"],
                REFERENCE["seconds"][1] / best["time_to_checkpoint_s"],
            ]
            if best
            else None
        ),
    }


def print_table(res: dict) -> None:
    print(f"\nprepare: {res['prepare_seconds']:.1f} s")
    print(
        f"{'run':>16} {'steps':>6} {'train s':>8} {'to ckpt s':>10} {'pearson d':>10} {'DE overlap':>11} {'bar':>4}"
    )
    for r in res["rows"]:
        print(
            f"{r['run']:>16} {r['steps']:>6} {r['train_seconds']:>8.1f} {r['time_to_checkpoint_s']:>10.1f} "
            f"{r['pearson_delta']:>10.3f} {r['overlap_at_N']:>11.3f} {'yes' if r['meets_bar'] else 'no':>4}"
        )
    ref = res["reference"]
    print(f"reference: {ref['steps']} steps in {ref['seconds'][0]}-{ref['seconds'][1]} s")
    if res["speedup_vs_reference"]:
        lo, hi = res["speedup_vs_reference"]
        print(f"time to quality: {lo:.1f}-{hi:.1f}x shorter than the reference")
    else:
        print("no step budget reached the bar")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",") if x], default=[100, 200, 400])
    p.add_argument("--patience", type=int, default=3, help="validations without improvement (0: skip)")
    p.add_argument("--no-patience", dest="patience", action="store_const", const=0)
    p.add_argument("--patience-steps", type=int, default=2000, help="step cap of the patience run")
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(ROOT / "bench" / "work" / "time_to_quality"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "time_to_quality.json"))
    args = p.parse_args(argv)
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
