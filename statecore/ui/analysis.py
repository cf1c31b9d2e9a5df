"""Array and table helpers behind the pages (no streamlit here, so they are unit-testable).

Pure functions over arrays/AnnData: summaries, QC suggestions, candidate combinations,
pseudobulk deltas and the PDS distance matrix shown on the Evaluate page.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.config import QCConfig


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def crosstab(obs: pd.DataFrame, pert_col: str, context_col: str | None) -> pd.DataFrame:
    """Cells per perturbation (rows) and context (columns); one "all" column without contexts."""
    contexts = obs[context_col].astype(str) if context_col else pd.Series("all", index=obs.index)
    table = pd.crosstab(obs[pert_col].astype(str), contexts)
    table.index.name, table.columns.name = "perturbation", "context"
    return table.loc[table.sum(axis=1).sort_values(ascending=False).index]


def genes_per_cell(x) -> np.ndarray:
    return np.asarray((x > 0).sum(axis=1)).ravel()


def cells_per_gene(x) -> np.ndarray:
    return np.asarray((x > 0).sum(axis=0)).ravel()


def suggest_qc(adata) -> QCConfig:
    """The defaults, loosened where they would drop much of a small dataset.

    ``min_genes`` is already scaled down on gene panels by ``preprocess`` (``scale_min_genes``);
    ``min_cells`` is capped at 0.5% of the cells so a few-thousand-cell screen keeps its genes.
    """
    base = QCConfig()
    min_cells = int(min(base.min_cells, max(1, round(0.005 * adata.n_obs))))
    return base.replace(min_cells=min_cells, n_hvg=int(min(base.n_hvg, adata.n_vars)))


def qc_removal(
    n_genes: np.ndarray, gene_cells: np.ndarray, *, min_genes: int, min_cells: int
) -> pd.DataFrame:
    """What each filter would remove at these thresholds (genes counted on all cells)."""
    cells_out = int((n_genes < min_genes).sum())
    genes_out = int((gene_cells < min_cells).sum())
    return pd.DataFrame(
        {
            "filter": [f"cells with < {min_genes} genes", f"genes in < {min_cells} cells"],
            "removed": [cells_out, genes_out],
            "kept": [int(n_genes.size - cells_out), int(gene_cells.size - genes_out)],
        }
    )


def split_combo(pert: str, sep: str) -> list[str]:
    return [p for p in pert.split(sep) if p]


def unmeasured_combos(measured: list[str], control: str, sep: str = "+", limit: int = 500) -> list[str]:
    """Pairs "A+B" of measured single perturbations that the data never measured (both orders)."""
    singles = sorted({p for p in measured if p != control and sep not in p})
    seen = {frozenset(split_combo(p, sep)) for p in measured if sep in p}
    out = [f"{a}{sep}{b}" for a, b in combinations(singles, 2) if frozenset((a, b)) not in seen]
    return out[:limit]


def prediction_choices(
    obs: pd.DataFrame, control: str, run_contexts, vocab, sep: str = "+"
) -> tuple[list[str], list[str], list[str]]:
    """What the Predict page offers: ``(contexts, measured, combos)``.

    Contexts are those with control cells (the ones the run knows, if any); perturbations are the
    measured ones and the unmeasured pairs of measured singles whose every part is in the run's
    perturbation ``vocab``."""
    perts = obs["perturbation"].astype(str)
    has_ctrl = obs.loc[perts == control, "context"].astype(str).unique()
    contexts = sorted(set(map(str, run_contexts)) & set(has_ctrl)) or sorted(has_ctrl)
    known = {str(p) for p in vocab if str(p) != control}

    def encodable(pert: str) -> bool:
        return all(part in known for part in split_combo(pert, sep))

    measured = sorted(p for p in perts.unique() if p != control)
    combos = unmeasured_combos(measured, control, sep)
    return contexts, [p for p in measured if encodable(p)], [c for c in combos if encodable(c)]


def ranked_de(de: pd.DataFrame, target: str) -> pd.DataFrame:
    """One target's rows of a ``compute_de`` table, most significant first (ties: larger |log2 FC|)."""
    one = de[de["target"].astype(str) == target].copy()
    one["abs_lfc"] = one["log2_fold_change"].abs()
    return one.sort_values(["fdr", "abs_lfc"], ascending=[True, False]).drop(columns="abs_lfc")


def group_means(x, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Mean expression per label (pseudobulk): ``(labels, means [n_labels, n_genes])``."""
    labels = np.asarray(labels).astype(str)
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    codes = np.array([index[v] for v in labels])
    onehot = sp.csr_matrix(
        (np.ones(codes.size), (codes, np.arange(codes.size))), shape=(len(names), codes.size)
    )
    counts = np.asarray(onehot.sum(axis=1)).ravel()
    sums = onehot @ (x if sp.issparse(x) else np.asarray(x, dtype=np.float64))
    return names, dense(sums) / counts[:, None]


def deltas(adata, control: str, pert_col: str = "perturbation") -> pd.DataFrame:
    """Mean of each perturbation minus mean of the controls, per gene (rows: perturbations)."""
    names, means = group_means(adata.X, adata.obs[pert_col].to_numpy())
    if control not in names:
        raise ValueError(f"no control cells labelled {control!r} in {pert_col!r}")
    ctrl = means[names.index(control)]
    keep = [i for i, n in enumerate(names) if n != control]
    return pd.DataFrame(
        means[keep] - ctrl, index=[names[i] for i in keep], columns=list(map(str, adata.var_names))
    )


def pds_matrix(pred_delta: pd.DataFrame, real_delta: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Mean-L1 distance between every predicted and every real delta, and the true one's rank.

    Rows: predicted perturbations, columns: real ones. Rank 1 means the prediction is closer to
    its own real perturbation than to any other (cell-eval's discrimination score, unnormalised).
    """
    perts = [p for p in pred_delta.index if p in real_delta.index]
    genes = [g for g in pred_delta.columns if g in set(real_delta.columns)]
    if not perts or not genes:
        raise ValueError("predicted and real data share no perturbations or genes")
    p = pred_delta.loc[perts, genes].to_numpy()
    r = real_delta.loc[perts, genes].to_numpy()
    dist = np.abs(p[:, None, :] - r[None, :, :]).mean(axis=2)
    own = np.diag(dist)
    ranks = 1 + (dist < own[:, None]).sum(axis=1)
    return pd.DataFrame(dist, index=perts, columns=perts), pd.Series(ranks, index=perts, name="rank")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def subsample_index(n: int, k: int, seed: int = 0) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def umap_coords(x, seed: int = 0, n_pcs: int = 30) -> np.ndarray:
    """2-D UMAP of a (small) matrix: PCA first, then umap-learn with a fixed seed."""
    from sklearn.decomposition import PCA
    from umap import UMAP

    arr = dense(x)
    n_pcs = max(2, min(n_pcs, arr.shape[0] - 1, arr.shape[1]))
    pcs = PCA(n_components=n_pcs, random_state=seed).fit_transform(arr)
    neighbours = max(2, min(15, arr.shape[0] - 1))
    return UMAP(n_neighbors=neighbours, random_state=seed, n_jobs=1).fit_transform(pcs)
