"""``python -m statecore prepare INPUT -o OUT.h5ad``: QC, normalise, select HVGs, write canonical data."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="QC, normalise, select HVGs and write the canonical .h5ad")
    p.add_argument("input", help=".h5ad file, or an MTX bundle (folder or matrix.mtx[.gz])")
    p.add_argument("-o", "--output", required=True, help="output .h5ad path")
    p.add_argument(
        "--metadata", default=None, help="CSV of per-cell metadata joined on cell ids (MTX bundles)"
    )
    p.add_argument("--cell-id-col", default=None, help="metadata column holding the cell ids")
    p.add_argument("--pert-col", default=None, help="obs column of perturbation labels (default: detected)")
    p.add_argument(
        "--context-col",
        default=None,
        help="obs column of contexts / cell types (default: detected; 'none' for a single context)",
    )
    p.add_argument(
        "--batch-col", default=None, help="obs column of batches (default: detected; 'none' for one)"
    )
    p.add_argument(
        "--control", default=None, help="control label in the perturbation column (default: detected)"
    )
    p.add_argument(
        "--min-genes",
        type=int,
        default=None,
        help="min genes per cell (default 200, scaled down on gene panels; an explicit value is exact)",
    )
    p.add_argument("--min-cells", type=int, default=None, help="min cells per gene (default 50)")
    p.add_argument("--n-hvg", type=int, default=None, help="highly variable genes (default 2000)")
    p.add_argument("--hvg-flavor", default=None, choices=["auto", "seurat_v3", "seurat", "cell_ranger"])
    p.add_argument("--no-umap", action="store_true", help="skip the stored UMAP (faster)")
    p.add_argument(
        "--umap-max-cells",
        type=int,
        default=None,
        help="above this many cells the UMAP is fitted on a random subsample of this size; the other "
        "cells get no coordinates (default 100000)",
    )
    p.add_argument(
        "--library-size-col",
        default=None,
        help="obs column of each cell's library size for normalisation (e.g. whole-transcriptome UMIs "
        "of a gene panel); default: the cell's total counts",
    )
    p.add_argument(
        "--classify-perturbed",
        action="store_true",
        help="call each targeting cell perturbed (KO) or not (NP) with a Mixscape-style classifier, per "
        "context; writes obs['perturbed_call'] and obs['perturbed_prob'] and removes no cell (train with "
        "--train-on-classified to train on the perturbed cells)",
    )
    p.set_defaults(func=run)


def _column(value: str | None, detected: str | None) -> str | None:
    if value is None:
        return detected
    return None if value.lower() == "none" else value


def _qc_from_args(args: argparse.Namespace):
    from statecore.config import QCConfig
    from statecore.errors import DataError

    changes = {"umap": not args.no_umap, "classify_perturbed": bool(args.classify_perturbed)}
    if args.min_genes is not None:
        changes.update(min_genes=args.min_genes, scale_min_genes=False)
    if args.min_cells is not None:
        changes["min_cells"] = args.min_cells
    if args.n_hvg is not None:
        changes["n_hvg"] = args.n_hvg
    if args.umap_max_cells is not None:
        if args.umap_max_cells < 4:
            raise DataError(f"--umap-max-cells {args.umap_max_cells}: give at least 4 (or --no-umap)")
        changes["umap_max_cells"] = args.umap_max_cells
    if args.hvg_flavor is not None:
        changes["hvg_flavor"] = args.hvg_flavor
    if args.library_size_col is not None:
        changes["library_size_col"] = args.library_size_col
    return QCConfig().replace(**changes)


def print_calls(prepared) -> None:
    """The perturbed-cell classifier's counts: targeting cells kept (called KO) per context and overall."""
    from statecore.data.mixscape import call_summary, context_totals

    summary = call_summary(prepared)
    if summary is None or summary.empty:
        return
    rows = context_totals(summary).to_dict("records")
    if len(rows) == 2:  # one context: its line is the overall one
        rows = rows[:1]
    for r in rows:
        where = "overall" if r["context"] == "all" else f"context {r['context']!r}"
        extra = f", {r['unclassified']:,} unclassified (kept)" if r["unclassified"] else ""
        print(
            f"perturbed-cell calls, {where}: keeps {r['KO']:,} of {r['targeting cells']:,} targeting cells "
            f"as KO ({100 * r['KO share']:.1f}%), {r['NP']:,} NP{extra}; {r['no detectable effect']} of "
            f"{r['perturbations']} perturbations with no detectable effect"
        )


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings
    from pathlib import Path

    from statecore.cli._common import write_h5ad
    from statecore.data.io import detect, read_data, suggest_control
    from statecore.data.preprocess import prepare
    from statecore.errors import DataError

    out = Path(args.output)
    if out.suffix != ".h5ad":
        raise DataError(f"output {str(out)!r} must end in .h5ad; pass e.g. -o {out.with_suffix('.h5ad')}")
    src = Path(args.input)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise DataError("the output would overwrite the input; choose another -o path")
    adata = read_data(src, metadata=args.metadata, cell_id_col=args.cell_id_col)
    detection = detect(adata)
    found = detection.spec
    control = args.control or found.control
    if args.pert_col and args.pert_col != found.pert_col and not args.control:
        # The detected control belongs to the detected column: look again in the one asked for.
        column = adata.obs[args.pert_col] if args.pert_col in adata.obs.columns else None
        control = suggest_control(column) if column is not None else ""
    elif detection.control_found and not (args.pert_col or args.control):
        for note in detection.notes:
            print(f"warning: {note}", file=sys.stderr)
    spec = found.replace(
        pert_col=args.pert_col or found.pert_col,
        context_col=_column(args.context_col, found.context_col),
        batch_col=_column(args.batch_col, found.batch_col),
        control=control,
        cell_id_col=args.cell_id_col,
    )
    qc = _qc_from_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prepared = prepare(adata, spec=spec, qc=qc, source=str(src))
        except MemoryError:
            raise DataError(
                f"not enough memory to prepare {adata.n_obs:,} cells x {adata.n_vars:,} genes; use a "
                "machine with more memory, or skip the UMAP (--no-umap)"
            ) from None
    for w in caught:
        if issubclass(w.category, UserWarning) and "statecore" in str(w.filename):
            print(f"warning: {w.message}", file=sys.stderr)
    write_h5ad(prepared, out)
    r = prepared.uns["statecore"]["qc_report"]
    n_perts = prepared.obs["perturbation"].nunique() - 1
    print(
        f"wrote {out}: {r['cells_out']}/{r['cells_in']} cells ({r['cells_removed_min_genes']} removed by "
        f"min_genes={r['min_genes_applied']}), {r['genes_out']}/{r['genes_in']} genes "
        f"({r['genes_removed_min_cells']} removed by min_cells={r['min_cells_applied']}), "
        f"{r['n_hvg']} HVGs ({r['hvg_flavor']}), {n_perts} perturbations, "
        f"{prepared.obs['context'].nunique()} contexts, control {spec.control!r} "
        f"[pert_col={spec.pert_col}, context_col={spec.context_col}, batch_col={spec.batch_col}]"
    )
    print_calls(prepared)
    return 0
