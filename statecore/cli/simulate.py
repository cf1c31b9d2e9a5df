"""``python -m statecore simulate -o OUT.h5ad``: write a synthetic perturbation screen (raw counts)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="write a synthetic Perturb-seq screen (raw counts) to .h5ad")
    p.add_argument("-o", "--output", required=True, help="output .h5ad path")
    p.add_argument("--n-cells", type=int, default=2000)
    p.add_argument("--n-genes", type=int, default=200)
    p.add_argument("--n-perturbations", type=int, default=20)
    p.add_argument("--contexts", type=int, default=4, help="number of contexts (named c0, c1, ...)")
    p.add_argument("--n-batches", type=int, default=1)
    p.add_argument("--n-combos", type=int, default=0, help="number of two-perturbation combinations 'A+B'")
    p.add_argument("--frac-no-effect", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="store X dense instead of sparse CSR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statecore.cli._common import write_h5ad
    from statecore.data.synthetic import make_perturbation_adata
    from statecore.errors import DataError

    out = Path(args.output)
    if out.suffix != ".h5ad":
        raise DataError(f"output {str(out)!r} must end in .h5ad; pass e.g. -o {out.with_suffix('.h5ad')}")
    try:
        adata = make_perturbation_adata(
            n_cells=args.n_cells,
            n_genes=args.n_genes,
            n_perturbations=args.n_perturbations,
            contexts=args.contexts,
            n_batches=args.n_batches,
            seed=args.seed,
            frac_no_effect=args.frac_no_effect,
            n_combos=args.n_combos,
            sparse=not args.dense,
        )
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    write_h5ad(adata, out)
    n_labels = adata.obs["perturbation"].nunique()
    print(
        f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes, {n_labels - 1} perturbations "
        f"(+ control 'ctrl'), {adata.obs['context'].nunique()} contexts, "
        f"{adata.obs['batch'].nunique()} batches"
    )
    return 0
