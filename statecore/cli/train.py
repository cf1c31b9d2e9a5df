"""``python -m statecore train``: train (or resume) a run; flags or ``--config`` build one RunConfig.

``--config PATH`` trains exactly the RunConfig in PATH (the app writes one into the run directory and
starts ``train --config <run>/config.json``); otherwise the flags build it. Either way the engine
(``statecore.training.engine.train_run``) gets the same object, whatever the track.
"""

from __future__ import annotations

import argparse
import sys

from statecore.config import LOSSES, PERTURBATION_TYPES, PRESETS, SPLIT_TASKS

RUN_FLAGS_HELP = (
    "Under `torchrun --nproc_per_node=N -m statecore train ...` every process trains on its share of each "
    "step's sets (DistributedDataParallel; NCCL on GPU, gloo on CPU); --batch-size counts the sets of all "
    "processes together. Default length: 2,000 steps (the app starts with 400 steps and a 3-minute budget)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or resume a model in a run directory", description=RUN_FLAGS_HELP
    )
    p.add_argument(
        "--config", default=None, help="a RunConfig JSON (e.g. <run>/config.json written by the app)"
    )
    p.add_argument("--data", default=None, help="prepared .h5ad (python -m statecore prepare)")
    p.add_argument("--run-dir", default=None, help="run directory (created, or resumed when it exists)")
    _register_split(p)
    p.add_argument("--gene-features", default=None,
                   help="encode perturbations by gene features: 'data' (computed from the training data's control "
                   "cells; the default for --task unseen), a table (.csv/.tsv/.parquet/.npz/.npy + .genes.txt), "
                   "or 'onehot' (measured perturbations only; the default for the other tasks)")  # fmt: skip
    p.add_argument("--feature-dim", type=int, default=None,
                   help="--gene-features data: number of principal components (default 32)")  # fmt: skip
    p.add_argument("--perturbation-type", default=None, choices=PERTURBATION_TYPES,
                   help="gene features: how a perturbation moves its target gene's own expression when the "
                   "gene is in the panel (default none)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small", choices=PRESETS)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--patience", type=int, default=None, help="stop after N validations without improvement")
    p.add_argument("--set-size", type=int, default=None, help="cells per set (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="sets per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--loss", default="energy", choices=LOSSES)
    p.add_argument("--decoder-residual", default=None, choices=["on", "off"], help="embedding track: predict "
                   "control expression + decode(pred) - decode(control) (default off)")  # fmt: skip
    p.add_argument("--shift-prior", default=None, choices=["on", "off"],
                   help="add each perturbation's mean training shift to the prediction (default: the preset's)")  # fmt: skip
    p.add_argument("--prior-singles", default=None, choices=["average", "leave_context_out"],
                   help="shift prior of a single in a context that measured it: the average over every "
                   "training context, or over the other contexts only (default: the preset's)")  # fmt: skip
    p.add_argument("--context-gain", default=None, choices=["on", "off"],
                   help="learn a per-context, per-gene gain on the shift prior (default: the preset's)")  # fmt: skip
    p.add_argument("--prior-shrink", default=None, choices=["off", "zero", "context", "auto"],
                   help="James-Stein shrinkage of the shift prior: a measured shift no larger than its sampling "
                   "noise moves toward 0 (zero) or toward the context's mean perturbed shift (context); auto: "
                   "the one that predicts the run's training pairs best, each left out in turn "
                   "(prior_choice.json); default: the preset's")  # fmt: skip
    p.add_argument("--disc-weight", type=float, default=None,
                   help="weight of the discriminative loss term (own perturbation's real shift nearer than "
                   "the other perturbations' in the context; default: the preset's)")  # fmt: skip
    p.add_argument("--prior-pairs", default=None, choices=["train_val", "train"],
                   help="pairs the shift prior's tables come from (train: validation pairs stay unseen)")  # fmt: skip
    p.add_argument("--residual", default=None, choices=["hidden", "expression", "none"],
                   help="residual path of the model (default: the preset's, expression)")  # fmt: skip
    p.add_argument("--basal-encoder", default=None, choices=["mlp", "linear"],
                   help="control-cell encoder: a two-layer MLP or one linear layer, as the reference State "
                   "(default: the preset's)")  # fmt: skip
    p.add_argument("--out-layers", type=int, default=None,
                   help="linear layers of the output MLP, hidden state -> genes (default: the preset's)")  # fmt: skip
    p.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    p.add_argument("--no-hvg", action="store_true", help="train on all genes, not var['highly_variable']")
    p.add_argument("--track", default=None, choices=["hvg", "embedding"],
                   help="hvg: ST on expression (default); embedding: ST on State Embedding cell embeddings "
                   "with a gene decoder (needs --embedding-run)")  # fmt: skip
    p.add_argument("--embedding-run", default=None,
                   help="SE run directory from `python -m statecore embed fit` (implies --track embedding)")  # fmt: skip
    p.add_argument("--decoder-weight", type=float, default=None,
                   help="embedding track: alpha in loss = loss_emb + alpha * loss_expr (default 0.1)")  # fmt: skip
    p.add_argument("--backed", action="store_true",
                   help="keep X on disk (h5ad backed='r') and read each batch's rows: data larger than RAM")  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (meant for GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (meant for GPUs)")
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="train K members with seeds seed..seed+K-1 on the same split: RUN_DIR, RUN_DIR-seed1, ... "
        "(Predict shows their agreement per gene)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _register_split(p: argparse.ArgumentParser) -> None:
    """The split's flags (SplitConfig)."""
    p.add_argument("--task", default="zeroshot", choices=SPLIT_TASKS)
    p.add_argument("--context", default=None, help="target context of the split")
    p.add_argument("--test-perts", default="",
                   help="explicit / unseen task: comma-separated test perturbations (unseen: held out of every context)")  # fmt: skip
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="unseen task: share of the target context's perturbed genes held out of every context")  # fmt: skip
    p.add_argument(
        "--keep-fraction", type=float, default=0.3, help="underrepresented: share kept in training"
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of training pairs")
    from statecore.config import MIN_TRAIN_CELLS

    p.add_argument("--train-on-classified", action="store_true",
                   help="training and validation pairs use only the perturbed cells that `prepare "
                   f"--classify-perturbed` called KO (a pair with fewer than {MIN_TRAIN_CELLS} keeps all its "
                   "cells); controls and the test cells that scoring reads are never filtered")  # fmt: skip


def _with_track(cfg, args: argparse.Namespace):
    """Apply --track / --embedding-run / --decoder-weight, failing early with the fix in the message."""
    from pathlib import Path

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
    from statecore.embedding.track import load_se_run

    load_se_run(args.embedding_run)  # a clear error naming `embed fit` before any training starts
    model = cfg.model
    if args.decoder_weight is not None:
        if not 0 <= args.decoder_weight < float("inf"):
            raise DataError(f"--decoder-weight must be a finite number >= 0; got {args.decoder_weight}")
        model = model.replace(decoder_weight=args.decoder_weight)
    return cfg.replace(track="embedding", embedding_run=str(Path(args.embedding_run).resolve()), model=model)


def _model_from_args(args: argparse.Namespace):
    from statecore.config import ST_PRESETS

    model = ST_PRESETS[args.preset].replace(loss=args.loss)
    if args.set_size:
        model = model.replace(set_size=args.set_size)
    if args.residual:
        model = model.replace(residual=args.residual)
    if args.basal_encoder:
        model = model.replace(basal_encoder=args.basal_encoder)
    if args.out_layers is not None:
        if not 1 <= args.out_layers <= 8:
            from statecore.errors import DataError

            raise DataError(f"--out-layers must be a whole number from 1 to 8; got {args.out_layers}")
        model = model.replace(out_layers=args.out_layers)
    if args.shift_prior:
        model = model.replace(shift_prior=args.shift_prior == "on")
    if args.decoder_residual:
        model = model.replace(decoder_residual=args.decoder_residual == "on")
    if args.prior_singles:
        model = model.replace(prior_singles=args.prior_singles)
    if args.context_gain:
        model = model.replace(context_gain=args.context_gain == "on")
    if args.prior_shrink:
        model = model.replace(prior_shrink=args.prior_shrink)
    if args.disc_weight is not None:
        if not 0 <= args.disc_weight < float("inf"):
            from statecore.errors import DataError

            raise DataError(f"--disc-weight must be a finite number >= 0; got {args.disc_weight}")
        model = model.replace(disc_weight=args.disc_weight)
    if args.prior_pairs:
        model = model.replace(prior_pairs=args.prior_pairs)
    return _with_features(model, args)


def _with_features(model, args: argparse.Namespace):
    """--gene-features / --feature-dim / --perturbation-type (DataError naming the flag on bad values)."""
    from pathlib import Path

    from statecore.errors import DataError

    source = args.gene_features or ("data" if args.task == "unseen" else "onehot")
    if source == "onehot":
        if args.task == "unseen":
            raise DataError(
                "--task unseen needs gene features: use --gene-features data or --gene-features PATH"
            )
        if args.perturbation_type not in (None, "none") or args.feature_dim is not None:
            raise DataError("--perturbation-type and --feature-dim need --gene-features data or PATH")
        return model
    if source != "data":
        if not Path(source).is_file():
            raise DataError(
                f"--gene-features {source!r}: no such file; give 'data', 'onehot' or a table's path"
            )
        source = str(Path(source).resolve())
    if args.feature_dim is not None and args.feature_dim < 1:
        raise DataError(f"--feature-dim must be at least 1; got {args.feature_dim}")
    return model.replace(
        pert_encoding="features",
        gene_features=source,
        gene_feature_dim=args.feature_dim or model.gene_feature_dim,
        perturbation_type=args.perturbation_type or "none",
    )


def config_from_args(args: argparse.Namespace, adata):
    """The RunConfig the flags describe (the data gives the column mapping and control label)."""
    from pathlib import Path

    from statecore.config import RunConfig, SplitConfig, TrainConfig
    from statecore.data.io import control_label

    train = TrainConfig(seed=args.seed, bf16=args.bf16, compile=args.compile)
    split = SplitConfig(
        task=args.task,
        context=args.context,
        keep_fraction=args.keep_fraction,
        test_perts=tuple(p for p in args.test_perts.split(",") if p),
        test_fraction=args.test_fraction,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    cfg = RunConfig(
        data_path=str(Path(args.data).resolve()), model=_model_from_args(args), train=train, split=split
    )
    spec_d = dict(adata.uns.get("statecore", {}).get("spec", {}) or {})
    if spec_d:
        cfg = cfg.replace(spec=cfg.spec.from_dict(spec_d))
    cfg = cfg.replace(spec=cfg.spec.replace(control=control_label(adata)))
    return _with_track(cfg, args)


def _overrides(cfg, args: argparse.Namespace):
    """Flags that apply on top of any config: length, device, threads."""
    train = cfg.train
    for name, value in (
        ("steps", args.steps),
        ("max_minutes", args.max_minutes),
        ("patience", args.patience),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("device", args.device),
        ("num_threads", args.threads),
    ):
        if value is not None:
            train = train.replace(**{name: value})
    cfg = cfg.replace(train=train)
    if getattr(args, "train_on_classified", False):
        cfg = cfg.replace(split=cfg.split.replace(train_on_classified=True))
    return cfg


def _load_config(path: str):
    from statecore.config import RunConfig
    from statecore.errors import DataError
    from statecore.runs.files import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"--config {path!r}: not a readable RunConfig JSON file")
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise DataError(f"--config {path!r} is not a valid RunConfig: {exc}") from exc


def _resolve(args: argparse.Namespace):
    """(RunConfig, run directory, prepared AnnData) from --config or the flags."""
    from pathlib import Path

    from statecore.cli._common import read_prepared
    from statecore.errors import DataError

    if args.config:
        cfg = _load_config(args.config)
        run_dir = Path(args.run_dir) if args.run_dir else Path(args.config).resolve().parent
        data_path = args.data or cfg.data_path
        if not data_path:
            raise DataError(f"--config {args.config!r} names no data file; pass --data")
        adata = read_prepared(data_path, backed=args.backed)
        cfg = _overrides(cfg.replace(data_path=str(Path(data_path).resolve())), args)
        return _checked(cfg, adata), run_dir, adata
    if not args.data or not args.run_dir:
        raise DataError("give --data and --run-dir (or --config <run>/config.json)")
    adata = read_prepared(args.data, backed=args.backed)
    if args.no_hvg and "highly_variable" in adata.var.columns:
        del adata.var["highly_variable"]
    return _checked(_overrides(config_from_args(args, adata), args), adata), Path(args.run_dir), adata


def _checked(cfg, adata):
    """``cfg`` after the checks that need the data, before any run directory is touched."""
    if cfg.split.train_on_classified:
        from statecore.data.mixscape import require_calls

        require_calls(adata)
    return cfg


def progress_printer(quiet: bool, total: int):
    """A progress hook: a bar on a terminal, one line per logged step otherwise (log files, clusters)."""
    if quiet:
        return None, lambda: None
    if sys.stdout.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)

        def hook(p) -> None:
            bar.total, bar.n = p.total, p.step
            post = {"loss": f"{p.loss:.4f}" if p.loss is not None else "-"}
            if p.best_val is not None:
                post["val"] = f"{p.best_val:.4f}"
            bar.set_postfix(post, refresh=False)
            bar.refresh()

        return hook, bar.close

    def line(p) -> None:
        if p.event in ("log", "val") and p.loss is not None:
            val = f" val {p.val_loss:.4f}" if p.val_loss is not None else ""
            speed = f" {p.cells_per_s:,.0f} cells/s" if p.cells_per_s else ""
            print(f"step {p.step}/{p.total} loss {p.loss:.4f}{val}{speed}", flush=True)

    return line, lambda: None


def run(args: argparse.Namespace) -> int:
    from statecore.errors import DataError

    if args.ensemble < 1:
        raise DataError(f"--ensemble must be at least 1; got {args.ensemble}")
    cfg, run_dir, adata = _resolve(args)
    code = 0
    for i in range(args.ensemble):
        member = cfg.replace(train=cfg.train.replace(seed=cfg.train.seed + i))  # the split keeps its seed
        where = run_dir if i == 0 else run_dir.with_name(f"{run_dir.name}-seed{i}")
        code = max(code, _train_one(args, member, where, adata))
    return code


def _train_one(args: argparse.Namespace, cfg, run_dir, adata) -> int:
    from statecore.runs.jobs import hold_run_lock
    from statecore.training import distributed, prior_choice
    from statecore.training.engine import resolve_device, train_run

    if not (run_dir / "job.json").exists():  # started from a shell: an old stop request is void (the app's
        (run_dir / "STOP").unlink(
            missing_ok=True
        )  # job manager clears it at launch; a later one is a cancel)
    main = distributed.env_info().is_main
    lock = hold_run_lock(run_dir) if main else None  # one worker per run: a second start is refused
    hook, close = progress_printer(args.quiet or not main, cfg.train.steps)
    try:
        with distributed.session(resolve_device(cfg.train.device)):
            result = train_run(adata, cfg, run_dir, hook=hook)
    finally:
        close()
        if lock is not None:
            lock.release()
    if not main:
        return 0 if result.state == "done" else 3
    last = f"{result.losses[-1][1]:.4f}" if result.losses else "n/a"
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    note = f" ({result.reason})" if result.reason else ""
    print(f"{result.state}: step {result.step}, loss {last}, best val {best}{note} -> {run_dir}")
    if cfg.model.prior_shrink == "auto" and (line := prior_choice.saved_line(run_dir)):
        print(line)
    return 0 if result.state == "done" else 3
