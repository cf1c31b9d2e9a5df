"""``python -m statecore train --data P.h5ad --run-dir DIR``: train (or resume) a State Transition model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train or resume an ST model in a run directory")
    p.add_argument("--data", required=True, help="prepared .h5ad (python -m statecore prepare)")
    p.add_argument("--run-dir", required=True, help="run directory (created, or resumed when it exists)")
    p.add_argument("--task", default="zeroshot", choices=["zeroshot", "underrepresented", "explicit"])
    p.add_argument("--context", default=None, help="target context of the split")
    p.add_argument("--test-perts", default="", help="explicit task: comma-separated test perturbations")
    p.add_argument("--keep-fraction", type=float, default=0.3, help="underrepresented: share kept in training")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of training pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small", choices=["small", "base"])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--set-size", type=int, default=None, help="cells per set (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="sets per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--loss", default="energy", choices=["energy", "mmd"])
    p.add_argument("--residual", default=None, choices=["hidden", "expression", "none"],
                   help="residual path of the model (default: hidden, as the reference ST)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores but one)")
    p.add_argument("--no-hvg", action="store_true", help="train on all genes, not var['highly_variable']")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statecore.commands._common import read_prepared
    from statecore.config import ST_PRESETS, RunConfig, SplitConfig, STConfig, TrainConfig
    from statecore.train import train_run

    adata = read_prepared(args.data)
    if args.no_hvg and "highly_variable" in adata.var.columns:
        del adata.var["highly_variable"]
    model = STConfig(**ST_PRESETS[args.preset], loss=args.loss)
    if args.set_size:
        model = model.replace(set_size=args.set_size)
    if args.residual:
        model = model.replace(residual=args.residual)
    train = TrainConfig(seed=args.seed, device=args.device, max_minutes=args.max_minutes, num_threads=args.threads)
    for name, value in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)):
        if value is not None:
            train = train.replace(**{name: value})
    split = SplitConfig(task=args.task, context=args.context, keep_fraction=args.keep_fraction,
                        test_perts=tuple(p for p in args.test_perts.split(",") if p), seed=args.seed,
                        val_fraction=args.val_fraction)
    from statecore.io import control_label

    spec_d = dict(adata.uns.get("statecore", {}).get("spec", {}) or {})
    cfg = RunConfig(data_path=str(Path(args.data).resolve()), model=model, train=train, split=split)
    if spec_d:
        cfg = cfg.replace(spec=cfg.spec.from_dict(spec_d))
    cfg = cfg.replace(spec=cfg.spec.replace(control=control_label(adata)))

    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.steps, desc="train", unit="step", dynamic_ncols=True)

    def hook(p) -> None:
        if bar is None:
            return
        bar.total = p.total
        bar.n = p.step
        post = {"loss": f"{p.loss:.4f}" if p.loss is not None else "-"}
        if p.best_val is not None:
            post["val"] = f"{p.best_val:.4f}"
        if p.cells_per_s:
            post["cells/s"] = f"{p.cells_per_s:,.0f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    try:
        result = train_run(adata, cfg, args.run_dir, hook=hook)
    finally:
        if bar is not None:
            bar.close()
    last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    note = f" ({result.reason})" if result.reason else ""
    print(f"{result.state}: step {result.step}, loss {last}, best val {best}{note} -> {args.run_dir}")
    return 0 if result.state == "done" else 3
