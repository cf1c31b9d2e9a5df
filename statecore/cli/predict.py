"""``python -m statecore predict --run-dir DIR (--split test | --context C --perturbation P) -o PRED.h5ad``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="predict perturbed cells with a trained run")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--data", default=None, help="prepared .h5ad with the controls (default: the run's data)")
    p.add_argument(
        "--split", choices=["test"], default=None, help="predict every test perturbation of the run"
    )
    p.add_argument("--context", default=None)
    p.add_argument(
        "--perturbation", default=None, help="one label or comma-separated labels (A+B for combos)"
    )
    p.add_argument(
        "--n-cells", type=int, default=None, help="cells per perturbation (default: the controls used)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output", required=True, help="predicted cells (.h5ad)")
    p.add_argument("--real-out", default=None, help="with --split test: also write the real test cells here")
    p.add_argument(
        "--counts",
        action="store_true",
        help="write integer count cells (for cell-eval2 / vcc2026): sampled around the prediction with "
        "the paired control's library size; --real-out then holds raw counts from layers['counts']",
    )
    p.add_argument(
        "--count-model",
        choices=["nb", "poisson"],
        default="nb",
        help="with --counts: negative binomial with per-gene dispersion from the training counts, or Poisson",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from statecore.cli._common import read_prepared, write_h5ad
    from statecore.errors import DataError
    from statecore.inference.predict import predict, predict_split, write_prediction
    from statecore.training.checkpoint import load_run
    from statecore.training.engine import resolve_device

    run_ = load_run(args.run_dir, device=str(resolve_device(args.device)))
    data = args.data or run_.config.data_path
    if not data:
        raise DataError("the run records no data path; pass --data")
    adata = read_prepared(data)
    if args.split:
        pred, real = predict_split(run_, adata, seed=args.seed)
        if args.real_out:
            write_h5ad(_real_counts(real, adata) if args.counts else real, args.real_out)
    else:
        if not (args.context and args.perturbation):
            raise DataError("give --split test, or both --context and --perturbation")
        perts = [p for p in args.perturbation.split(",") if p]
        kw = dict(context=args.context, perturbations=perts, n_cells=args.n_cells, seed=args.seed)
        if not args.counts:  # streamed to the file: memory bounded by one forward chunk, not the output
            n_pert = write_prediction(args.output, run_, adata, **kw)
            _unseen_note(run_, perts)
            print(
                f"predicted {n_pert} cells for {len(perts)} perturbation(s) x {len(run_.genes)} genes -> {args.output}"
            )
            return 0
        pred = predict(run_, adata, **kw)
    if args.counts:
        pred = _counts(pred, adata, run_, args)
    write_h5ad(pred, args.output)
    _unseen_note(run_, sorted(set(pred.obs.loc[pred.obs["predicted"], "perturbation"].astype(str))))
    n_pert = int(pred.obs["predicted"].sum())
    print(
        f"predicted {n_pert} cells for {pred.obs.loc[pred.obs['predicted'], 'perturbation'].nunique()} "
        f"perturbation(s) (+{pred.n_obs - n_pert} controls) x {pred.n_vars} genes -> {args.output}"
    )
    return 0


def _unseen_note(run_, labels) -> None:
    """Gene-feature runs: say which predictions are of genes no training context perturbed."""
    from statecore.inference.predict import unseen_labels, unseen_note, validation_score

    if run_.vocab.features is None:
        return
    unseen = unseen_labels(run_, labels)
    if unseen:
        note = unseen_note(len(unseen), validation_score(run_.run_dir))
        print(f"note: {note} (obs['unseen_gene'] marks their cells)")


def _counts(pred, adata, run_, args):
    """Sampled raw counts; dispersion from the run's training cells (all controls if no split)."""
    from statecore.inference.counts import sample_counts

    train = run_.split.cell_mask(adata, "train") if run_.split is not None else None
    out = sample_counts(pred, adata, train_mask=train, method=args.count_model, seed=args.seed)
    n = len(out.uns["statecore"]["counts"]["carried_over_genes"])
    print(f"counts: {args.count_model} sampling, {n} gene(s) outside the model's panel carried over")
    return out


def _real_counts(real, adata):
    from statecore.inference.counts import real_counts

    return real_counts(real, adata)
