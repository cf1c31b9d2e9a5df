"""Seeded raw-count pred/real pairs for the cell-eval2 (vcc2026) equality tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "non-targeting"


def make_count_pair(
    seed: int,
    n_perts: int = 7,
    n_genes: int = 60,
    n_cells: int = 30,
    n_pred_cells: int | None = None,
    n_ctrl: int = 80,
    sparse: bool = False,
    tiled: bool = False,
    noise: float = 0.3,
):
    """Return (pred, real) AnnData of integer counts, ``obs['target']``.

    Edge cases built in: every value is an integer count (ties everywhere), an all-zero gene
    (col 5) and a near-empty one, perturbations ``g1``/``g2`` named like measured genes (their
    own gene is knocked down: target in the panel) and ``zz_out`` naming no gene (target out of
    the panel, no effect: typically no significant genes), and a perturbation with no effect.
    ``n_pred_cells`` < ``n_cells`` inflates the prediction's sampling noise (the jackknife cap
    binds); ``tiled`` repeats one predicted cell block for every perturbation (the
    across-perturbation budget binds)."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    perts = ["g1", "g2"] + [f"p{i}" for i in range(2, n_perts - 1)] + ["zz_out"]
    base = rng.gamma(1.0, 3.0, n_genes)
    base[6] = 0.01
    eff = {p: np.ones(n_genes) for p in perts}
    for p in perts[:-2]:
        hit = rng.choice(n_genes, 10, replace=False)
        eff[p][hit] = rng.choice([0.2, 3.0], 10)
    eff["g1"][1], eff["g2"][2] = 0.05, 0.1

    def cells(mean, n):
        depth = rng.gamma(20, 1 / 20, (n, 1))  # library-size variation
        return rng.poisson(mean[None, :] * depth, (n, n_genes))

    def build(noise_scale, n_per, tile):
        blocks, labels = [cells(base, n_ctrl)], [CONTROL] * n_ctrl
        shared = None
        for p in perts:
            m = base * eff[p] * np.clip(1 + rng.normal(0, noise_scale, n_genes), 0.05, None)
            if tile:
                shared = cells(m, n_per) if shared is None else shared
                block = shared
            else:
                block = cells(m, n_per)
            blocks.append(block)
            labels += [p] * n_per
        x = np.vstack(blocks).astype(np.float32)
        x[:, 5] = 0
        obs = pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))])
        a = ad.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs)
        a.var_names = genes
        return a

    real = build(0.0, n_cells, False)
    pred = build(noise, n_pred_cells or n_cells, tiled)
    return pred, real
