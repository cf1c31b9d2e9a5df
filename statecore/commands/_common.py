"""Helpers shared by the train / predict / baseline commands."""

from __future__ import annotations

from pathlib import Path

from statecore.errors import DataError


def read_prepared(path: str):
    """A prepared .h5ad (canonical obs columns), with a one-line error when it is not."""
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path!r} not found")
    try:
        adata = ad.read_h5ad(p)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for bad files
        raise DataError(f"cannot read {path!r} as .h5ad ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("perturbation", "context") if c not in adata.obs.columns]
    if missing:
        raise DataError(f"{path!r} lacks obs column(s) {missing}; run `python -m statecore prepare {path} -o "
                        "prepared.h5ad` first")
    return adata


def write_h5ad(adata, path: str) -> None:
    out = Path(path)
    if out.suffix != ".h5ad":
        raise DataError(f"output {path!r} must end in .h5ad")
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
