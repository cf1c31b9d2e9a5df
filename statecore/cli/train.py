"""``python -m statecore train --data P.h5ad --run-dir DIR``: train (or resume) a State Transition model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or resume an ST model in a run directory",
        description="Under `torchrun --nproc_per_node=N -m statecore train ...` every process trains on its "
        "share of each step's sets (DistributedDataParallel; NCCL on GPU, gloo on CPU); "
        "--batch-size counts the sets of all processes together.",
    )
    p.add_argument("--data", required=True, help="prepared .h5ad (python -m statecore prepare)")
    p.add_argument("--run-dir", required=True, help="run directory (created, or resumed when it exists)")
    p.add_argument("--task", default="zeroshot", choices=["zeroshot", "underrepresented", "explicit"])
    p.add_argument("--context", default=None, help="target context of the split")
    p.add_argument("--test-perts", default="", help="explicit task: comma-separated test perturbations")
    p.add_argument(
        "--keep-fraction", type=float, default=0.3, help="underrepresented: share kept in training"
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of training pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small", choices=["small", "base"])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--set-size", type=int, default=None, help="cells per set (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="sets per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--loss", default="energy", choices=["energy", "mmd", "energy_mean"])
    p.add_argument(
        "--decoder-residual",
        default=None,
        choices=["on", "off"],
        help="embedding track: predict control expression + decode(pred) - decode(control) (default off)",
    )
    p.add_argument(
        "--shift-prior",
        default=None,
        choices=["on", "off"],
        help="add each perturbation's mean training shift to the prediction (default: the preset's)",
    )
    p.add_argument(
        "--residual",
        default=None,
        choices=["hidden", "expression", "none"],
        help="residual path of the model (default: the preset's, expression)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores but one)")
    p.add_argument("--no-hvg", action="store_true", help="train on all genes, not var['highly_variable']")
    p.add_argument(
        "--track",
        default=None,
        choices=["hvg", "embedding"],
        help="hvg: ST on expression (default); embedding: ST on State Embedding cell embeddings "
        "with a gene decoder (needs --embedding-run)",
    )
    p.add_argument(
        "--embedding-run",
        default=None,
        help="SE run directory from `python -m statecore embed fit` (implies --track embedding)",
    )
    p.add_argument(
        "--decoder-weight",
        type=float,
        default=None,
        help="embedding track: alpha in loss = loss_emb + alpha * loss_expr (default 0.1)",
    )
    p.add_argument(
        "--backed",
        action="store_true",
        help="keep X on disk (h5ad backed='r') and read each batch's rows: data larger than RAM",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (meant for GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (meant for GPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _with_track(cfg, args: argparse.Namespace):
    """Apply --track / --embedding-run / --decoder-weight, failing early with the fix in the message."""
    from statecore.errors import DataError

    track = args.track or ("embedding" if args.embedding_run else "hvg")
    if track == "hvg":
        if args.embedding_run or args.decoder_weight is not None:
            raise DataError("--embedding-run and --decoder-weight are only used with --track embedding")
        return cfg
    if not args.embedding_run:
        raise DataError(
            "--track embedding needs --embedding-run DIR, an SE run made with "
            "`python -m statecore embed fit --data P.h5ad --run-dir DIR`"
        )
    if args.backed:
        raise DataError(
            "--backed is not supported on the embedding track (cells are embedded in memory); drop it"
        )
    from pathlib import Path

    from statecore.embedding.track import load_se_run

    load_se_run(args.embedding_run)  # a clear error naming `embed fit` before any training starts
    model = cfg.model
    if args.decoder_weight is not None:
        if not 0 <= args.decoder_weight < float("inf"):
            raise DataError(f"--decoder-weight must be a finite number >= 0; got {args.decoder_weight}")
        model = model.replace(decoder_weight=args.decoder_weight)
    return cfg.replace(track="embedding", embedding_run=str(Path(args.embedding_run).resolve()), model=model)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statecore.cli._common import read_prepared
    from statecore.config import ST_PRESETS, RunConfig, SplitConfig, STConfig, TrainConfig
    from statecore.training.engine import train_run

    adata = read_prepared(args.data, backed=args.backed)
    if args.no_hvg and "highly_variable" in adata.var.columns:
        del adata.var["highly_variable"]
    model = STConfig(**ST_PRESETS[args.preset], loss=args.loss)
    if args.set_size:
        model = model.replace(set_size=args.set_size)
    if args.residual:
        model = model.replace(residual=args.residual)
    if args.shift_prior:
        model = model.replace(shift_prior=args.shift_prior == "on")
    if args.decoder_residual:
        model = model.replace(decoder_residual=args.decoder_residual == "on")
    train = TrainConfig(
        seed=args.seed,
        device=args.device,
        max_minutes=args.max_minutes,
        num_threads=args.threads,
        bf16=args.bf16,
        compile=args.compile,
    )
    for name, value in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr)):
        if value is not None:
            train = train.replace(**{name: value})
    split = SplitConfig(
        task=args.task,
        context=args.context,
        keep_fraction=args.keep_fraction,
        test_perts=tuple(p for p in args.test_perts.split(",") if p),
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    from statecore.data.io import control_label

    spec_d = dict(adata.uns.get("statecore", {}).get("spec", {}) or {})
    cfg = RunConfig(data_path=str(Path(args.data).resolve()), model=model, train=train, split=split)
    if spec_d:
        cfg = cfg.replace(spec=cfg.spec.from_dict(spec_d))
    cfg = cfg.replace(spec=cfg.spec.replace(control=control_label(adata)))
    cfg = _with_track(cfg, args)

    from statecore.training import distributed
    from statecore.training.engine import resolve_device

    bar = None
    if not args.quiet and distributed.env_info().is_main:
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
        with distributed.session(resolve_device(args.device)):
            result = train_run(adata, cfg, args.run_dir, hook=hook)
    finally:
        if bar is not None:
            bar.close()
    if not distributed.env_info().is_main:
        return 0 if result.state == "done" else 3
    last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    note = f" ({result.reason})" if result.reason else ""
    print(f"{result.state}: step {result.step}, loss {last}, best val {best}{note} -> {args.run_dir}")
    return 0 if result.state == "done" else 3
