"""Group means (pseudobulk): the one implementation that metrics, baselines, the app and the shift prior use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp


def group_means(x, labels, groups: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Mean row of ``x`` ``[n_cells, n_genes]`` per label -> ``(groups, means [n_groups, n_genes] float64)``.

    ``groups`` fixes which labels and in which order (a group without cells gets NaN); by default every
    label, sorted. One sparse indicator product, no loop over groups; ``x`` may be dense or sparse.
    """
    labels = np.asarray(labels).astype(str)
    names = sorted(set(labels.tolist())) if groups is None else [str(g) for g in groups]
    idx = pd.Index(names).get_indexer(labels)
    keep = np.flatnonzero(idx >= 0)
    ind = sp.csr_matrix((np.ones(keep.size), (idx[keep], keep)), shape=(len(names), labels.size))
    counts = np.asarray(ind.sum(axis=1)).ravel()
    sums = ind @ (x.astype(np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64))
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        return names, sums / counts[:, None]
