"""Seeded synthetic pred/real pairs for the cell-eval equality tests (small, with edge cases)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def make_pair(
    seed: int,
    n_perts: int = 6,
    n_genes: int = 50,
    n_cells: int = 30,
    n_ctrl: int = 60,
    control: str = "ctrl",
    mix: float = 0.0,
    ties: bool = False,
):
    """Return (pred, real) AnnData with log1p X. Edge cases built in: integer-valued (tied) counts,
    a zero-variance gene and a constant non-zero gene, one perturbation with no effect (usually no
    significant genes), and perturbation ``g1`` named like a gene (target-gene exclusion in PDS).
    ``mix`` blends each predicted effect with the next perturbation's, so that PDS falls below 1.
    ``ties`` appends 12 genes: exact copies of genes 6-11 (tied fold changes and p-values) and
    copies whose cells are shuffled within every perturbation (fold changes equal in exact
    arithmetic but not in float32 sums: near-ties that only the pseudobulk's float32 summation
    order decides)."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    perts = ["g1"] + [f"p{i}" for i in range(1, n_perts)]
    base = rng.gamma(1.0, 1.0, n_genes)
    effects = {p: np.zeros(n_genes) for p in perts}
    for j, p in enumerate(perts):
        if j == n_perts - 1:
            continue  # no effect -> (typically) no significant genes
        hit = rng.choice(n_genes, 8, replace=False)
        effects[p][hit] = rng.choice([-0.9, 2.5], 8)
    effects["g1"][1] = -0.95  # knock-down of its own target gene

    def counts(mean, n):
        return rng.poisson(np.clip(mean, 0, None)[None, :] * np.ones((n, 1)))

    def build(noise_scale: float, continuous: bool, mix: float):
        blocks, labels = [counts(base, n_ctrl)], [control] * n_ctrl
        for j, p in enumerate(perts):
            eff = (1 - mix) * effects[p] + mix * effects[perts[(j + 1) % n_perts]]
            mult = 1 + eff + (rng.normal(0, noise_scale, n_genes) if noise_scale else 0)
            blocks.append(counts(base * mult, n_cells))
            labels += [p] * n_cells
        x = np.log1p(np.vstack(blocks).astype(np.float64))
        x[:, 3] = 0.0  # zero-variance gene (all zero)
        x[:, 4] = np.log1p(2.0)  # constant non-zero gene
        if continuous:  # model-like predictions: continuous values, still some exact zeros
            x = np.clip(x + rng.normal(0, 0.05, x.shape), 0, None)
            x[:, 3] = 0.0
        obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
        if ties:
            lab = np.asarray(labels)
            shuffled = x[:, 6:12].copy()
            for g in np.unique(lab):
                rows = np.flatnonzero(lab == g)
                shuffled[rows] = shuffled[rng.permutation(rows)]
            x = np.hstack([x, x[:, 6:12], shuffled])
        a = ad.AnnData(x.astype(np.float32), obs=obs)
        a.var_names = genes + ([f"t{i}" for i in range(12)] if ties else [])
        return a

    real = build(0.0, continuous=False, mix=0.0)
    pred = build(0.3, continuous=bool(seed % 2), mix=mix)
    return pred, real
