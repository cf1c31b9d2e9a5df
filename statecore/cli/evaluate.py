"""``python -m statecore evaluate``: score predictions, or a whole trained run.

``--pred P.h5ad --real R.h5ad [--profile celleval|vcc2026|all] -o OUT``: ``celleval`` (default) is cell-eval
0.8.2's metrics on log1p values plus Systema's perturbation-referenced ``pearson_delta_pert`` /
``discrimination_score_cosine_pert``; ``vcc2026`` cell-eval2 0.20.0's 2026-challenge metrics on raw
counts; ``all`` both, one table.

``--run-dir R [--data D] [-o OUT]``: the whole evaluation of a run (model vs every baseline vs the data
ceiling, with a verdict per headline metric), the same ``evaluate_run`` the app and ``bench/quality.py`` call.
"""

from __future__ import annotations

import argparse

SUMMARY = (
    "pds_cosine",
    "expr_mse_unbiased_capped_norm",
    "de_wilcoxon_sig_jaccard",
    "de_wilcoxon_lfc_nmae",
    "overlap_at_N",
    "discrimination_score_l1",
    "mae",
    "pearson_delta",
    "mse_delta",
    "de_direction_match",
    "de_sig_genes_recall",
    "pr_auc",
    "pearson_delta_pert",
    "discrimination_score_cosine_pert",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="score predicted vs real cells with cell-eval's metrics")
    p.add_argument("--pred", default=None, help="predicted cells (.h5ad, log1p X, controls included)")
    p.add_argument("--real", default=None, help="real cells (.h5ad, log1p X, controls included)")
    p.add_argument(
        "--run-dir",
        default=None,
        help="evaluate a trained run instead: its test split predicted by the model and every baseline, "
        "scored against the real cells and the data ceiling, with a verdict per metric",
    )
    p.add_argument("--data", default=None, help="with --run-dir: prepared .h5ad (default: the run's data)")
    p.add_argument("--seed", type=int, default=0, help="with --run-dir: seed of predictions and halves")
    p.add_argument(
        "--profile",
        choices=["celleval", "vcc2026", "all"],
        default="celleval",
        help="celleval: cell-eval 0.8.2 metrics on log1p (+ Systema deltas); vcc2026: cell-eval2 "
        "0.20.0 metrics on raw counts (predict --counts); all: both in one table",
    )
    p.add_argument(
        "--control", default=None, help="control label (default: the one recorded in the real data's uns)"
    )
    p.add_argument("--pert-col", default="perturbation", help="obs column of perturbation labels")
    p.add_argument("--baseline", default=None, help="a baseline prediction (.h5ad) to score against")
    p.add_argument(
        "--no-contexts",
        action="store_true",
        help="pool all contexts instead of one table per obs['context'] value",
    )
    p.add_argument(
        "--no-scale",
        action="store_true",
        help="vcc2026/all: skip cell-eval2's scaled score (generic baseline + 5 half-splits of the real "
        "cells, about 4x the metrics' time)",
    )
    p.add_argument("--timings", action="store_true", help="also print seconds per phase as JSON")
    p.add_argument(
        "-o",
        "--outdir",
        default=None,
        help="directory for results.csv, agg_results.csv, ... (with --run-dir: default <run>/evaluation)",
    )
    p.set_defaults(func=run)


def _read(path: str, what: str):
    from pathlib import Path

    from statecore.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"{what} file {path!r} not found")
    if not path.endswith(".h5ad"):
        raise DataError(f"{what} file {path!r} must be an .h5ad")
    import anndata as ad

    return ad.read_h5ad(path)


def run(args: argparse.Namespace) -> int:
    from statecore.errors import DataError

    if args.run_dir:
        if args.pred or args.real or args.baseline:
            raise DataError("give either --run-dir or --pred/--real/--baseline, not both")
        return run_dir_evaluation(args)
    if not (args.pred and args.real and args.outdir):
        raise DataError("give --pred, --real and -o (or --run-dir to evaluate a trained run)")
    return files_evaluation(args)


def run_dir_evaluation(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statecore.cli._common import read_prepared
    from statecore.errors import CheckpointError
    from statecore.evaluation.run import evaluate_run
    from statecore.evaluation.verdict import EVALUATION_DIR
    from statecore.training.checkpoint import load_run, read_config

    run_dir = Path(args.run_dir)
    data = args.data or read_config(run_dir).data_path
    if not data:
        raise CheckpointError(f"{str(run_dir)!r} has no config.json naming its data; pass --data")
    run = load_run(run_dir, device="cpu")
    adata = read_prepared(data)
    ev = evaluate_run(run, adata, seed=args.seed)
    outdir = Path(args.outdir) if args.outdir else run_dir / EVALUATION_DIR
    written = ev.save(outdir)
    print(ev.summary.to_string(index=False, float_format=lambda v: f"{v:.4f}", columns=_summary_cols(ev)))
    print(ev.text())
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _summary_cols(ev) -> list[str]:
    from statecore.evaluation.verdict import HEADLINE

    return ["method", *(m for m in HEADLINE if m in ev.summary.columns)]


def files_evaluation(args: argparse.Namespace) -> int:
    import json
    import time
    import warnings

    from statecore.data.io import control_label
    from statecore.evaluation.profiles import evaluate_profile

    t0 = time.perf_counter()
    real = _read(args.real, "--real")
    pred = _read(args.pred, "--pred")
    base = _read(args.baseline, "--baseline") if args.baseline else None
    control = args.control or control_label(real)
    t_read = time.perf_counter() - t0
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = evaluate_profile(
            pred,
            real,
            profile=args.profile,
            control=control,
            pert_col=args.pert_col,
            baseline=base,
            context_col=None if args.no_contexts else "context",
            scale=not args.no_scale,
        )
    t_eval = time.perf_counter() - t0 - t_read
    t1 = time.perf_counter()
    files = res.save(args.outdir)
    t_save = time.perf_counter() - t1
    for m in res.messages:
        print(f"note: {m}")
    print(_summary(res))
    print(f"wrote {args.outdir}/: {', '.join(files)}")
    if args.timings:
        phases = res.celleval.timings if res.celleval is not None else {}
        print("timings " + json.dumps({"read": t_read, **phases, "evaluate": t_eval, "save": t_save}))
    return 0


def _summary(res) -> str:
    agg = res.agg[res.agg["statistic"] == "mean"].dropna(axis=1, how="all")
    cols = [c for c in SUMMARY if c in agg.columns]
    table = agg[(["context"] if "context" in agg.columns else []) + cols].copy()
    n = res.results.groupby("context").size() if "context" in res.results.columns else None
    lines = [
        f"mean over {len(res.results)} perturbation(s)"
        + (f" in {len(n)} context(s)" if n is not None else "")
    ]
    lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if res.scaled is not None:
        lines.append("vcc2026 scaled score (0 = generic baseline, 1 = real half-split replicate):")
        keep = ["context"] if "context" in res.scaled.columns else []
        cols = [*keep, "metric", "prediction", "baseline", "replicate", "scaled"]
        lines.append(res.scaled[cols].to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4f}"))
    score = res.celleval.score if res.celleval is not None else None
    if score is not None:
        s = score[score["metric"].isin(["avg_score", "overlap_at_N", "discrimination_score_l1", "mae"])]
        lines.append("score vs baseline:")
        lines.append(s.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return "\n".join(lines)
