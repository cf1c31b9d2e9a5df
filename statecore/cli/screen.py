"""``python -m statecore screen --run-dir R --context C [--perturbations all|A,B] [--pairs-of A,B,C]
[--genes G1,G2] -o screen.csv [--h5ad-out pseudobulk.h5ad]``: rank every perturbation in a context.

With ``--job-dir DIR`` (how the app runs long screens in the background) the command also keeps
``DIR/status.json`` up to date (state, step = perturbations done, total), stops at the next chunk
when ``DIR/STOP`` appears, and writes its outputs into DIR unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _csv_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "screen", help="in-silico screen: rank every perturbation's effect in one context"
    )
    p.add_argument("--run-dir", required=True, help="trained run directory")
    p.add_argument(
        "--data", default=None, help="prepared .h5ad with the context's controls (default: the run's)"
    )
    p.add_argument("--context", default=None, help="the cell context (cell line / type) to screen in")
    p.add_argument(
        "--perturbations", default="all", help="'all' (every single the run knows) or comma-separated labels"
    )
    p.add_argument("--pairs-of", default=None, help="comma-separated singles: also screen every pair of them")
    p.add_argument("--genes", default=None, help="comma-separated genes: predicted change and rank per gene")
    p.add_argument("--n-cells", type=int, default=128, help="predicted cells per perturbation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.25, help="|mean log1p change| counted as up/down")
    p.add_argument("--chunk", type=int, default=32, help="perturbations per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "-o", "--output", default=None, help="ranked table (.csv); default DIR/screen.csv with --job-dir"
    )
    p.add_argument("--h5ad-out", default=None, help="pseudobulk change per perturbation (.h5ad)")
    p.add_argument(
        "--cells-out",
        default=None,
        help="also write the predicted cells of the top hits (.h5ad, cell-eval format)",
    )
    p.add_argument(
        "--cells-top", type=int, default=20, help="with --cells-out: how many top hits (default 20)"
    )
    p.add_argument("--job-dir", default=None, help="write status.json here and stop when DIR/STOP appears")
    p.add_argument(
        "--ranking-check",
        action="store_true",
        help="instead of a screen: on the run's test split, Spearman rho and top-k precision of the predicted "
        "effect ranking vs the real one, beside the perturbation-mean baseline and a split-half ceiling "
        "(-o: per-perturbation E-distances as .csv)",
    )
    p.set_defaults(func=run)


class _Stopped(Exception):
    """The STOP file appeared: the worker leaves between two chunks."""


def _stop_on_signal(signum, frame) -> None:
    raise _Stopped


def _reporter(job_dir: Path | None, total_hint: list[int]):
    """progress(done, total): a line per ~10 % when stdout is not a terminal, a live line when it is,
    and status.json with --job-dir."""
    from statecore.runs.files import write_status

    tty = sys.stdout.isatty()
    last = [-1.0]
    t0 = time.monotonic()

    def progress(done: int, total: int) -> None:
        total_hint[0] = total
        elapsed = time.monotonic() - t0
        eta = elapsed / done * (total - done) if done else None
        if job_dir is not None:
            write_status(job_dir, state="running", step=done, total=total, pid=os.getpid(), eta_s=eta)
            if (job_dir / "STOP").exists():
                raise _Stopped
        frac = done / total
        if tty:
            print(f"\rscreened {done}/{total} ({frac:.0%}, {elapsed:.0f} s)", end="", flush=True)
        elif frac - last[0] >= 0.1 or done == total:
            last[0] = frac
            print(f"screened {done}/{total} ({frac:.0%}, {elapsed:.0f} s)", flush=True)

    return progress


def run(args: argparse.Namespace) -> int:
    import torch

    from statecore.cli._common import read_prepared
    from statecore.errors import DataError
    from statecore.inference.screen import screen
    from statecore.runs.files import now_iso, write_status
    from statecore.training.checkpoint import load_run
    from statecore.training.engine import resolve_device

    if args.ranking_check:
        return _ranking_check(args)
    if not args.context:
        raise DataError("give --context (the context to screen in), or --ranking-check")
    job_dir = Path(args.job_dir) if args.job_dir else None
    output = args.output or (str(job_dir / "screen.csv") if job_dir else None)
    if not output:
        raise DataError("give -o screen.csv (where to write the ranked table)")
    if not output.endswith(".csv"):
        raise DataError(f"output {output!r} must end in .csv")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    if job_dir is not None:
        job_dir.mkdir(parents=True, exist_ok=True)
        write_status(
            job_dir, state="running", step=0, total=0, pid=os.getpid(), started=now_iso(), error=None
        )
    total = [0]
    # The app's cancel sends SIGTERM besides writing STOP; restored after, for in-process callers.
    previous = signal.signal(signal.SIGTERM, _stop_on_signal) if job_dir is not None else None
    try:
        run_ = load_run(args.run_dir, device=str(resolve_device(args.device)))
        data = args.data or run_.config.data_path
        if not data:
            raise DataError("the run records no data path; pass --data")
        adata = read_prepared(data)
        result = screen(
            run_,
            adata,
            context=args.context,
            perturbations="all" if args.perturbations.strip() == "all" else _csv_list(args.perturbations),
            pairs_of=_csv_list(args.pairs_of) or None,
            genes=_csv_list(args.genes),
            n_cells=args.n_cells,
            seed=args.seed,
            threshold=args.threshold,
            chunk=args.chunk,
            progress=_reporter(job_dir, total),
        )
    except _Stopped:
        write_status(job_dir, state="cancelled")
        print("stopped on request", flush=True)
        return 0
    except Exception as exc:
        if job_dir is not None:
            write_status(job_dir, state="failed", error=str(exc))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _write_outputs(args, run_, adata, result, output, job_dir)
    if job_dir is not None:
        write_status(job_dir, state="done", step=total[0], total=total[0])
    return 0


def _write_outputs(args, run_, adata, result, output: str, job_dir: Path | None) -> None:
    """The ranked table, the pseudobulk .h5ad and (on request) the top hits' predicted cells."""
    from statecore.cli._common import write_h5ad
    from statecore.runs.files import atomic_write_text

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, result.table.to_csv(index=False))
    h5ad_out = args.h5ad_out or (str(job_dir / "pseudobulk.h5ad") if job_dir else None)
    if h5ad_out:
        write_h5ad(result.to_anndata(), h5ad_out)
    if args.cells_out:  # re-predicted for the top hits only: the screen itself never keeps cells
        from statecore.inference.predict import predict

        hits = result.table["perturbation"].head(max(1, args.cells_top)).tolist()
        cells = predict(
            run_, adata, context=args.context, perturbations=hits, n_cells=args.n_cells, seed=args.seed
        )
        write_h5ad(cells, args.cells_out)
    top = result.table.head(5)
    print(
        f"screened {len(result.table)} perturbation(s) in {result.context} "
        f"(model's control-vs-control E-distance {result.control_edist:.3g}); top: "
        + ", ".join(f"{p} ({e:.3g})" for p, e in zip(top["perturbation"], top["edist"]))
        + f" -> {output}"
    )
    if result.options.get("unseen_note") and result.table.get("unseen_gene", []).any():
        print(f"note: {result.options['unseen_note']} (column unseen_gene)")


def _ranking_check(args: argparse.Namespace) -> int:
    import torch

    from statecore.cli._common import read_prepared
    from statecore.errors import DataError
    from statecore.inference.screen import screen_ranking_check
    from statecore.runs.files import atomic_write_text
    from statecore.training.checkpoint import load_run

    if args.threads:
        torch.set_num_threads(int(args.threads))
    run_ = load_run(args.run_dir)
    data = args.data or run_.config.data_path
    if not data:
        raise DataError("the run records no data path; pass --data")
    check = screen_ranking_check(
        run_, read_prepared(data), n_cells=args.n_cells, seed=args.seed, chunk=args.chunk
    )
    print(check.summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(check.sentence())
    if args.output:
        atomic_write_text(args.output, check.per_perturbation.to_csv(index=False))
    return 0
