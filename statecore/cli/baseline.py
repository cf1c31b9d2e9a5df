"""``python -m statecore baseline --data P.h5ad --run-dir DIR --kind K -o PRED.h5ad`` (uses the run's split)."""

from __future__ import annotations

import argparse

from statecore.config import BASELINE_KINDS as KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("baseline", help="baseline predictions for a run's test split")
    p.add_argument("--data", default=None, help="prepared .h5ad (default: the run's data)")
    p.add_argument("--run-dir", required=True, help="run whose split.json and genes.txt are used")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--n-cells", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statecore.cli._common import read_prepared, write_h5ad
    from statecore.data.splits import Split
    from statecore.errors import CheckpointError, DataError
    from statecore.inference.baselines import predict_baseline
    from statecore.runs.files import read_lines
    from statecore.training.checkpoint import read_config

    run_dir = Path(args.run_dir)
    if not (run_dir / "split.json").exists() or not (run_dir / "genes.txt").exists():
        raise CheckpointError(
            f"{str(run_dir)!r} has no split.json/genes.txt; create the run with `train` first"
        )
    split = Split.load(run_dir / "split.json")
    genes = read_lines(run_dir / "genes.txt")
    data = args.data or read_config(run_dir).data_path
    if not data:
        raise DataError("pass --data (the run records no data path)")
    adata = read_prepared(data)
    features, sep = None, "+"
    if args.kind == "linear_features" and (run_dir / "vocab.json").exists():
        from statecore.training.checkpoint import read_vocab

        vocab = read_vocab(run_dir, read_config(run_dir))
        features, sep = vocab.feature_table(), vocab.combo_sep  # None for a one-hot run: from the data
    pred = predict_baseline(
        adata,
        split,
        args.kind,
        genes=genes,
        n_cells=args.n_cells,
        seed=args.seed,
        features=features,
        combo_sep=sep,
    )
    write_h5ad(pred, args.output)
    print(
        f"{args.kind}: {int(pred.obs['predicted'].sum())} cells for {len(split.test.get(split.context, []))} "
        f"test perturbation(s) x {pred.n_vars} genes -> {args.output}"
    )
    return 0
