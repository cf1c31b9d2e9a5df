"""Helpers shared by the commands."""

from __future__ import annotations

from pathlib import Path

from statecore.errors import DataError


def read_prepared(path: str, *, backed: bool = False):
    """A prepared .h5ad (canonical obs columns), with a one-line error when it is not.

    ``backed``: leave X on disk (anndata ``backed="r"``) for data larger than memory.
    """
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path!r} not found")
    try:
        adata = _read_backed(p) if backed else ad.read_h5ad(p)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for bad files
        raise DataError(f"cannot read {path!r} as .h5ad ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("perturbation", "context") if c not in adata.obs.columns]
    if missing:
        raise DataError(
            f"{path!r} lacks obs column(s) {missing}; run `python -m statecore prepare {path} -o "
            "prepared.h5ad` first"
        )
    return adata


def _read_backed(path: Path):
    """AnnData whose sparse X stays on disk; obs, var and uns in memory, layers/obsm not read at all.

    anndata's ``read_h5ad(backed="r")`` keeps only X on disk and loads every layer, and a prepared
    file's ``counts`` layer is as large as X; training needs X alone.
    """
    import anndata as ad
    import h5py
    from anndata.io import read_elem, sparse_dataset

    f = h5py.File(path, "r")
    if not isinstance(f["X"], h5py.Group):  # dense X: anndata's own backed mode (layers in memory)
        f.close()
        return ad.read_h5ad(path, backed="r")
    return ad.AnnData(
        X=sparse_dataset(f["X"]),
        obs=read_elem(f["obs"]),
        var=read_elem(f["var"]),
        uns=read_elem(f["uns"]) if "uns" in f else {},
    )


def write_h5ad(adata, path) -> None:
    """Write ``adata`` to ``path`` (.h5ad) atomically (``runs.files.atomic_output``): a reader never sees a
    half-written file, a full disk is refused up front, a failed write is one line naming the folder."""
    from statecore.runs.files import atomic_output

    out = Path(path)
    if out.suffix != ".h5ad":
        raise DataError(f"output {str(path)!r} must end in .h5ad")
    with atomic_output(out, _file_bytes(adata)) as tmp:
        adata.write_h5ad(tmp)


def _file_bytes(adata) -> int:
    """About what ``adata`` takes on disk uncompressed: matrices, layers, obsm, obs and var."""
    import numpy as np
    import scipy.sparse as sp

    def size(m) -> int:
        if sp.issparse(m):
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        return int(np.asarray(m).nbytes) if hasattr(m, "shape") else 0

    need = size(adata.X) if adata.X is not None else 0
    need += sum(size(v) for v in adata.layers.values()) + sum(size(v) for v in adata.obsm.values())
    return need + int(adata.obs.memory_usage(deep=True).sum() + adata.var.memory_usage(deep=True).sum())
