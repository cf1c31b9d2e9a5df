"""Raw-count cells from a prediction, for scorers that read counts only (cell-eval2, vcc2026).

A prediction holds log1p(normalised) expression ``x`` over the model's genes. Each predicted cell
is paired with a real control cell of its context (``obs['paired_control']`` when the prediction
records it, else drawn with the seed); that cell's library size ``L`` turns the prediction into
expected counts ``mu = expm1(x) * L / target_sum`` (the inverse of ``prepare``'s normalize_total),
and counts are drawn around ``mu``:

- negative binomial (default), ``Var = mu + alpha_g mu^2``, with a per-gene ``alpha_g`` estimated
  by the method of moments from training counts (``layers['counts']``): within each
  (perturbation, context) group, with size factors ``s_i = L_i / mean(L)``,
  ``alpha_g = sum_groups sum_i [(c_ig - s_i m_g)^2 - s_i m_g] / sum_groups sum_i s_i^2 m_g^2``
  (``m_g`` the group's size-factor-scaled mean), clipped at 0 (0 = Poisson);
- Poisson (``method='poisson'``).

Genes outside the model's panel are copied from the paired control cell (listed in
``uns['statecore']['counts']['carried_over_genes']``); the prediction's own control cells are the
real control cells, returned with their real counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.errors import DataError

METHODS = ("nb", "poisson")


@dataclass(frozen=True)
class CountSampling:
    method: str = "nb"
    seed: int = 0


def _counts(prepared):
    if "counts" not in prepared.layers:
        raise DataError(
            "the prepared data has no layers['counts']; raw-count predictions need the raw counts "
            "(prepare the data from counts)"
        )
    c = prepared.layers["counts"]
    return sp.csr_matrix(c) if sp.issparse(c) else np.asarray(c)


def _row_totals(x) -> np.ndarray:
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def estimate_dispersion(counts, groups: np.ndarray) -> np.ndarray:
    """Per-gene NB overdispersion ``alpha`` (Var = mu + alpha mu^2) by the pooled within-group
    method of moments with size factors (see the module docstring); 0 where the data are not
    overdispersed or carry no counts."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    lib = _row_totals(counts)
    s = lib / lib.mean() if lib.mean() > 0 else np.ones_like(lib)
    uniq, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    a = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))), shape=(len(uniq), codes.size))
    s1 = np.asarray((a @ counts).todense())  # (K, G) sum c
    sc = np.asarray((a @ sp.diags(s) @ counts).todense())  # sum s c
    c2 = np.asarray((a @ counts.multiply(counts)).todense())  # sum c^2
    ssum, s2sum = a @ s, a @ (s * s)
    m = np.divide(s1, ssum[:, None], out=np.zeros_like(s1), where=ssum[:, None] > 0)
    # sum_i (c - s m)^2 - s m, expanded over the group's cells
    num = (c2 - 2 * m * sc + m * m * s2sum[:, None] - m * ssum[:, None]).sum(axis=0)
    den = (m * m * s2sum[:, None]).sum(axis=0)
    return np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 0), 0.0, None)


def _pair_controls(pred, prepared, rng: np.random.Generator) -> np.ndarray:
    """Row in ``prepared`` of each prediction cell's paired control cell."""
    pos = pd.Index(prepared.obs_names.astype(str))
    if "paired_control" in pred.obs.columns:
        rows = pos.get_indexer(pred.obs["paired_control"].astype(str))
    else:
        rows = np.full(pred.n_obs, -1)
    own = pos.get_indexer(pred.obs_names.astype(str))  # the prediction's real control cells
    is_pred = pred.obs["predicted"].to_numpy(bool) if "predicted" in pred.obs else np.ones(pred.n_obs, bool)
    rows = np.where(~is_pred & (own >= 0), own, rows)
    control = str(pred.uns.get("statecore", {}).get("control", prepared.uns["statecore"]["control"]))
    pert = prepared.obs["perturbation"].astype(str).to_numpy()
    ctx = prepared.obs["context"].astype(str).to_numpy()
    pctx = pred.obs["context"].astype(str).to_numpy() if "context" in pred.obs else np.full(pred.n_obs, "")
    for c in np.unique(pctx[rows < 0]):
        need = np.flatnonzero((rows < 0) & (pctx == c))
        pool = np.flatnonzero((pert == control) & (ctx == c)) if c else np.flatnonzero(pert == control)
        if pool.size == 0:
            raise DataError(
                f"no control cells of context {c!r} in the prepared data to take library sizes from"
            )
        rows[need] = pool[rng.integers(0, pool.size, need.size)]
    return rows


def _draw(mu: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NB(mean mu, overdispersion alpha) as a gamma-Poisson mixture; alpha == 0 is Poisson."""
    lam = mu
    nb = alpha > 0
    if nb.any():
        shape = 1.0 / alpha[nb]
        lam = mu.copy()
        lam[:, nb] = rng.gamma(shape[None, :], mu[:, nb] / shape[None, :])
    return rng.poisson(lam)


def sample_counts(
    pred, prepared, *, train_mask=None, method: str = "nb", seed: int = 0, chunk: int = 4096
) -> ad.AnnData:
    """Integer count cells over all genes of ``prepared`` for the cells of ``pred`` (see the module
    docstring). ``train_mask`` selects the cells the dispersion is estimated from (default: the
    control cells)."""
    if method not in METHODS:
        raise DataError(f"unknown count model {method!r}; choose one of {', '.join(METHODS)}")
    counts = _counts(prepared)
    genes = prepared.var_names.astype(str)
    panel = pd.Index(genes).get_indexer(pred.var_names.astype(str))
    if (panel < 0).any():
        missing = list(pred.var_names[panel < 0][:5])
        raise DataError(f"predicted genes {missing} are not in the prepared data; pass the run's data")
    target_sum = float(prepared.uns.get("statecore", {}).get("qc", {}).get("target_sum", 1e4))
    rng = np.random.default_rng(seed)
    rows = _pair_controls(pred, prepared, rng)
    if method == "nb":
        pert = prepared.obs["perturbation"].astype(str).to_numpy()
        mask = (
            (pert == prepared.uns["statecore"]["control"]) if train_mask is None else np.asarray(train_mask)
        )
        groups = np.char.add(pert[mask], "\x1f" + prepared.obs["context"].astype(str).to_numpy()[mask])
        alpha = estimate_dispersion(counts[np.flatnonzero(mask)][:, panel], groups)
    else:
        alpha = np.zeros(panel.size)
    base = sp.csr_matrix(counts[rows], dtype=np.float32)  # paired controls, every gene
    lib = _row_totals(base)
    size_col = prepared.uns.get("statecore", {}).get("qc", {}).get("library_size_col")
    if size_col and size_col in prepared.obs.columns:  # prepare normalised by this column: invert that
        lib = prepared.obs[size_col].to_numpy(dtype=np.float64)[rows]
    is_pred = pred.obs["predicted"].to_numpy(bool) if "predicted" in pred.obs else np.ones(pred.n_obs, bool)
    drawn = base[:, panel].toarray()  # real control cells keep their real counts
    idx_all = np.flatnonzero(is_pred)
    for s0 in range(0, idx_all.size, chunk):
        idx = idx_all[s0 : s0 + chunk]
        xi = pred.X[idx]
        xi = xi.toarray() if sp.issparse(xi) else np.asarray(xi, dtype=np.float64)
        mu = np.expm1(np.clip(xi, 0, None)) * (lib[idx] / target_sum)[:, None]
        drawn[idx] = _draw(mu, alpha, rng)
    rest = np.setdiff1d(np.arange(len(genes)), panel)
    x = sp.hstack([sp.csr_matrix(drawn), base[:, rest]], format="csc")
    x = sp.csr_matrix(x[:, np.argsort(np.r_[panel, rest])])  # back to the prepared gene order
    obs = pred.obs.copy()
    obs["paired_control"] = prepared.obs_names.astype(str)[rows]
    obs["control_library_size"] = lib
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    out.uns["statecore"] = {
        **{k: v for k, v in pred.uns.get("statecore", {}).items()},
        "counts": {
            "method": method,
            "seed": int(seed),
            "target_sum": target_sum,
            "dispersion": "method of moments, within (perturbation, context) groups, size factors",
            "dispersion_cells": "controls" if train_mask is None else "training cells",
            "panel_genes": int(panel.size),
            "carried_over_genes": [str(g) for g in genes[rest]],
        },
    }
    return out


def real_counts(real, prepared) -> ad.AnnData:
    """The real cells of ``real`` (matched by obs name) as raw counts over every prepared gene."""
    counts = _counts(prepared)
    rows = pd.Index(prepared.obs_names.astype(str)).get_indexer(real.obs_names.astype(str))
    if (rows < 0).any():
        raise DataError(
            f"{int((rows < 0).sum())} real cells are not in the prepared data; pass the run's data"
        )
    x = sp.csr_matrix(counts[rows], dtype=np.float32)
    out = ad.AnnData(X=x, obs=real.obs.copy(), var=pd.DataFrame(index=prepared.var_names.astype(str)))
    out.uns["statecore"] = dict(real.uns.get("statecore", {}))
    return out
