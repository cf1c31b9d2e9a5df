"""``python -m statecore embed {fit,transform}``: train the State Embedding model, embed cells with it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="State Embedding model: fit on cells, or write obsm['X_state']")
    sub = p.add_subparsers(dest="embed_command", required=True, metavar="{fit,transform}")

    f = sub.add_parser("fit", help="train an SE model on an .h5ad and save it in a run directory")
    f.add_argument("--data", required=True, help="input .h5ad (raw counts or log1p-normalised X)")
    f.add_argument(
        "--run-dir", required=True, help="run directory to create (config.json, model.safetensors, ...)"
    )
    f.add_argument(
        "--preset",
        choices=("small", "base"),
        default="small",
        help="model size: small trains in ~1 min on CPU; base is the paper-like L=256, width 128",
    )
    f.add_argument("--L", type=int, help="top expressed genes per cell (tokens)")
    f.add_argument("--hidden-dim", type=int)
    f.add_argument("--heads", type=int)
    f.add_argument("--layers", type=int)
    f.add_argument("--output-dim", type=int, help="cell embedding width")
    f.add_argument("--n-bins", type=int)
    f.add_argument("--n-loss-genes", type=int, help="genes per cell in the self-supervised loss")
    f.add_argument("--gene-features", choices=("pca", "random", "learned", "file"), default="pca")
    f.add_argument(
        "--gene-features-path", help="with --gene-features file: .csv/.tsv/.npz/.npy (+ .genes.txt)"
    )
    f.add_argument("--gene-feature-dim", type=int, help="width of pca/random/learned gene features")
    f.add_argument("--hvg-only", action="store_true", help="use only var['highly_variable'] genes")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch-size", type=int, default=64, help="cells per step")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    f.add_argument("--max-minutes", type=float)
    f.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's choice)")
    f.add_argument("--overwrite", action="store_true", help="replace a finished model in --run-dir")
    f.set_defaults(func=run)

    t = sub.add_parser("transform", help="embed cells: write a copy of the data with obsm['X_state']")
    t.add_argument("--run-dir", required=True, help="an SE run directory from `embed fit`")
    t.add_argument("--data", required=True, help="input .h5ad")
    t.add_argument("-o", "--output", required=True, help="output .h5ad")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument(
        "--allow-missing-genes",
        action="store_true",
        help="treat model genes absent from the data as unexpressed instead of failing",
    )
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    t.set_defaults(func=run)


def _read(path: str):
    from pathlib import Path

    from statecore.data.io import read_data
    from statecore.errors import DataError

    p = Path(path)
    if p.suffix != ".h5ad":
        raise DataError(
            f"{path!r}: embed reads .h5ad files; convert other formats with `python -m statecore prepare`"
        )
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist")
    return read_data(p)  # one-line DataError for a damaged or non-HDF5 file


def run(args: argparse.Namespace) -> int:
    return _fit(args) if args.embed_command == "fit" else _transform(args)


def _se_config(args: argparse.Namespace):
    from statecore.config import SE_PRESETS, SE_TRAIN, RunConfig
    from statecore.errors import DataError
    from statecore.models.embedding import check_config

    fields = (
        "L",
        "hidden_dim",
        "heads",
        "layers",
        "output_dim",
        "n_bins",
        "n_loss_genes",
        "gene_feature_dim",
    )
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    try:
        se = SE_PRESETS[args.preset].replace(
            gene_features=args.gene_features,
            gene_features_path=args.gene_features_path,
            hvg_only=args.hvg_only,
            batch_cells=args.batch_size,
            **overrides,
        )
        train = SE_TRAIN.replace(
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            max_minutes=args.max_minutes,
            num_threads=args.num_threads,
        )
        check_config(se)
    except (TypeError, ValueError) as exc:
        raise DataError(str(exc)) from exc
    return RunConfig(data_path=str(args.data), track="se", se=se, train=train)


def _fit(args: argparse.Namespace) -> int:
    """An SE run is a run like any other: the training engine trains, stops, resumes it."""
    from pathlib import Path

    from statecore.cli.train import progress_printer
    from statecore.embedding.se import load_embedding
    from statecore.errors import CheckpointError, DataError
    from statecore.runs.files import read_status
    from statecore.runs.jobs import hold_run_lock
    from statecore.training import checkpoint
    from statecore.training.engine import train_run

    run_dir = Path(args.run_dir)
    done = (read_status(run_dir) or {}).get("state") == "done" and (run_dir / "model.safetensors").exists()
    if done and not args.overwrite:
        raise CheckpointError(
            f"{run_dir} already holds a trained model; pass --overwrite or pick another --run-dir"
        )
    config = _se_config(args)
    adata = _read(args.data)
    if args.hvg_only and "highly_variable" not in adata.var:
        raise DataError(
            "--hvg-only: the data has no var['highly_variable']; run `python -m statecore prepare` first"
        )
    if args.overwrite:
        checkpoint.clear_training_state(run_dir)  # a refit starts a fresh run and curve
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "job.json").exists():  # see cli/train.py: the app's job manager owns STOP for its runs
        (run_dir / "STOP").unlink(missing_ok=True)
    lock = hold_run_lock(run_dir)  # one worker per run: a second start is refused
    hook, close = progress_printer(False, config.train.steps)
    try:
        result = train_run(adata, config, run_dir, hook=hook)
    finally:
        close()
        lock.release()
    run = load_embedding(run_dir)
    print(
        f"{result.state}: wrote {run_dir}: SE model on {len(run.genes)} genes, embedding width "
        f"{run.config.output_dim}"
    )
    return 0 if result.state == "done" else 3


def _transform(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statecore.cli._common import write_h5ad
    from statecore.embedding.se import embed_adata, load_embedding
    from statecore.errors import DataError

    out = Path(args.output)
    if out.suffix != ".h5ad":  # before the work, not only when writing
        raise DataError(f"output {str(out)!r} must end in .h5ad")
    run = load_embedding(args.run_dir, device=args.device)
    adata = _read(args.data)
    result = embed_adata(run, adata, batch_size=args.batch_size, allow_missing_genes=args.allow_missing_genes)
    write_h5ad(result, out)  # atomic: a reader never sees a half-written file
    print(
        f"wrote {out}: obsm['X_state'] {result.obsm['X_state'].shape[0]} cells x {result.obsm['X_state'].shape[1]}"
    )
    return 0
