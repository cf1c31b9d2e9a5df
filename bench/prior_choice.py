"""What ``train --prior-shrink auto`` chooses on each quality task's split, and what the choice costs.

The choice (``statecore.training.prior_choice``) reads the split's TRAINING pairs only; this script makes the
split exactly as ``train`` does (same SplitConfig, seed and vocabulary), runs the choice, and trains nothing,
so it scores nothing held out. It shows which candidate each task gets, every candidate's cross-validated
PDS and pearson delta, how many pairs could be scored, and the seconds the choice takes.

Usage:
  python bench/prior_choice.py                                   # P1,P2,S1,C1,K1; val fractions 0.1 and 0.3
  python bench/prior_choice.py --tasks P1 --val-fractions 0.1 --workdir /tmp/q   # reuses prepared data there
Writes bench/results/prior_choice.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def task_split(name: str, prepared: Path, seed: int, val_fraction: float):
    """The split ``train`` makes for the task (``bench/quality.py``'s flags) and its vocabulary."""
    import anndata as ad
    from quality import TASKS, combo_test_perts

    from statecore.config import SplitConfig
    from statecore.data.sets import PerturbationVocab
    from statecore.data.splits import make_split

    cfg = TASKS[name]
    adata = ad.read_h5ad(prepared)
    test = tuple(combo_test_perts(prepared, cfg["context"], seed)) if cfg["task"] == "explicit" else ()
    split_cfg = SplitConfig(
        task=cfg["task"], context=cfg["context"], keep_fraction=cfg.get("keep_fraction", 0.3), test_perts=test,
        seed=seed, val_fraction=val_fraction,
    )  # fmt: skip
    split = make_split(adata, split_cfg)
    vocab = PerturbationVocab.from_labels(
        [p for _, p in split.pairs("train") | split.pairs("val")], split.control
    )
    return adata, split, vocab


def run_one(name: str, prepared: Path, seed: int, val_fraction: float) -> dict:
    from statecore.data.sets import select_genes
    from statecore.training.prior_choice import choose_for_run

    adata, split, vocab = task_split(name, prepared, seed, val_fraction)
    start = time.perf_counter()
    choice = choose_for_run(
        adata, train_pairs={c: list(v) for c, v in split.train.items()}, vocab=vocab,
        contexts=sorted(set(adata.obs["context"].astype(str))), genes=select_genes(adata, True),
        target=split.context,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return {**choice.to_dict(), "line": choice.line(), "seconds": seconds, "n_cells": int(adata.n_obs)}


def prepared_data(name: str, workdir: Path, seed: int) -> Path:
    from quality import TASKS, prepare_task

    cfg = TASKS[name]
    tdir = workdir / name / f"seed{seed}"
    if (tdir / "prepared.h5ad").exists():
        return tdir / "prepared.h5ad"
    tdir.mkdir(parents=True, exist_ok=True)
    return prepare_task(cfg, tdir, seed, tdir / "log.txt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="P1,P2,S1,C1,K1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fractions", default="0.1,0.3")
    ap.add_argument("--workdir", default="/tmp/statecore_prior_choice")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prior_choice.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = {}
    print("| task | val fraction | choice | scope | scored (combinations) / skipped | PDS off / zero / context "
          "| pearson Δ off / zero / context | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        prepared = prepared_data(name, Path(args.workdir), args.seed)
        for vf in map(float, args.val_fractions.split(",")):
            r = run_one(name, prepared, args.seed, vf)
            results[f"{name} val_fraction {vf}"] = r

            def three(key: str, r=r) -> str:
                vals = [r["scores"][c][key] for c in ("off", "zero", "context")]
                return " / ".join("n/a" if v is None or v != v else f"{v:.3f}" for v in vals)

            print(
                f"| {name} | {vf} | {r['choice']} | {r['scope']} | {r['n_scored']} ({r['n_combinations']}) / "
                f"{r['n_skipped']} | {three('pds')} | {three('pearson_delta')} | {r['seconds']:.2f} |"
            )
    meta = {"command": " ".join(["python bench/prior_choice.py", *(argv or sys.argv[1:])]), "seed": args.seed}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
