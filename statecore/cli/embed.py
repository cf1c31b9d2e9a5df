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


def _fit(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from statecore.config import SEConfig
    from statecore.data.sets import select_genes
    from statecore.embedding.se import DEFAULT_SE_TRAIN, SE_PRESETS, fit_embedding
    from statecore.errors import CheckpointError, DataError
    from statecore.models.embedding import check_config

    run_dir = Path(args.run_dir)
    if (run_dir / "model.safetensors").exists() and not args.overwrite:
        raise CheckpointError(
            f"{run_dir} already holds a trained model; pass --overwrite or pick another --run-dir"
        )
    overrides = {
        k: getattr(args, a)
        for k, a in (
            ("L", "L"),
            ("hidden_dim", "hidden_dim"),
            ("heads", "heads"),
            ("layers", "layers"),
            ("output_dim", "output_dim"),
            ("n_bins", "n_bins"),
            ("n_loss_genes", "n_loss_genes"),
            ("gene_feature_dim", "gene_feature_dim"),
        )
        if getattr(args, a) is not None
    }
    try:
        cfg = SEConfig(**SE_PRESETS[args.preset]).replace(
            gene_features=args.gene_features, gene_features_path=args.gene_features_path, **overrides
        )
        train_cfg = DEFAULT_SE_TRAIN.replace(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            max_minutes=args.max_minutes,
            num_threads=args.num_threads,
        )
        check_config(cfg)
    except (TypeError, ValueError) as exc:
        raise DataError(str(exc)) from exc
    adata = _read(args.data)
    genes = None
    if args.hvg_only:
        if "highly_variable" not in adata.var:
            raise DataError(
                "--hvg-only: the data has no var['highly_variable']; run `python -m statecore prepare` first"
            )
        genes = select_genes(adata, use_hvg=True)  # DataError when the column selects no gene

    run_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (jobs.cancel) becomes the STOP file the training loop checks, so the model is saved.
    signal.signal(signal.SIGTERM, lambda *_: (run_dir / "STOP").touch())

    def show(row: dict) -> None:
        val = f" val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
        print(
            f"step {row['step']}/{train_cfg.steps} loss {row['loss']:.4f}{val} ({row['cells_per_s']:.0f} cells/s)",
            flush=True,
        )

    result = fit_embedding(
        adata, cfg, train_cfg, run_dir, genes=genes, data_path=str(args.data), callback=show
    )
    print(
        f"wrote {run_dir}: SE model on {len(result.genes)} genes, embedding width {result.config.output_dim}"
    )
    return 0


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
