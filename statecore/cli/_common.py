"""Helpers shared by the commands."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from statecore.errors import DataError, StatecoreError


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
    """Write ``adata`` to ``path`` (.h5ad) atomically: a reader never sees a half-written file.

    The temporary file has a unique name (two writers of one target, e.g. two sessions pressing
    Apply, never share it) and is removed whatever happens; a failed write (full disk, no
    permission) is one line naming the folder.
    """
    out = Path(path)
    if out.suffix != ".h5ad":
        raise DataError(f"output {str(path)!r} must end in .h5ad")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(adata, out.parent)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        adata.write_h5ad(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; others on the server must read it
        tmp.replace(out)
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise StatecoreError(
            f"cannot write {str(out)!r}: {reason}; free disk space or choose a folder you can write to"
        ) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _check_free_space(adata, folder: Path) -> None:
    """Refuse before writing when the folder cannot hold the file: HDF5 fails badly on a full disk
    (errors from its destructors, then a crash at exit), so the common case is caught up front."""
    import shutil

    import numpy as np
    import scipy.sparse as sp

    def size(m) -> int:
        if sp.issparse(m):
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        return int(np.asarray(m).nbytes) if hasattr(m, "shape") else 0

    need = size(adata.X) if adata.X is not None else 0
    need += sum(size(v) for v in adata.layers.values()) + sum(size(v) for v in adata.obsm.values())
    need += int(adata.obs.memory_usage(deep=True).sum() + adata.var.memory_usage(deep=True).sum())
    free = shutil.disk_usage(folder).free
    if need * 1.05 + 1_000_000 > free:
        raise StatecoreError(
            f"not enough disk space in {str(folder)!r}: the file needs about {need / 1e6:,.1f} MB and "
            f"{free / 1e6:,.1f} MB are free; free disk space or choose another output folder"
        )
