"""A perturbed-cell classifier in the spirit of Mixscape (Papalexi et al., Nat Genet 53:322, 2021).

Many cells that carry a targeting guide are not perturbed (the cut was repaired in frame, or one allele
escaped), so the mean of a perturbation's cells dilutes its effect. Mixscape (Seurat's ``RunMixscape``;
pertpy's ``Mixscape``) separates the two populations; this module follows its steps, per context:

1. PCA of the context's log1p HVG expression (genes standardised, fixed seed);
2. each cell's *perturbation signature*: its expression minus the mean of its ``k`` nearest control cells of
   the same context in PC space, which removes the cell-state variation that perturbed and control cells
   share (a control cell's own signature leaves the cell itself out of its neighbours);
3. per targeting perturbation (a combination counts as one label): genes whose signatures differ from the
   controls' (Wilcoxon rank-sum, Benjamini-Hochberg adjusted p < ``de_pval``, mean difference at least
   ``de_min_diff``); with fewer than ``min_de_genes`` the perturbation has no detectable effect and all its
   cells are called NP, as Mixscape does;
4. each cell's signature projected on the unit vector from the controls' mean signature to the mean of the
   cells currently called KO, over those genes; a two-component 1-D Gaussian mixture whose NP component is
   FIXED to the controls' projections (mean, sd) and whose KO component (mean, sd, weight) is fitted by EM;
   a cell is KO when its posterior P(KO) exceeds ``threshold``. Direction, mixture and calls are iterated
   (at first every cell of the perturbation counts as KO) until the calls stop changing.

Differences from Seurat's implementation, on purpose: the mixture is fitted to the perturbation's own cells
(so the KO weight is the share of perturbed cells, and the posterior uses it) rather than to its cells
pooled with the controls with equal priors; the DE test runs on signatures as pertpy's does. scikit-learn's
GaussianMixture cannot hold one component fixed, hence the small EM below.

Memory stays bounded at a million cells: no dense cells x genes matrix of more than one row block is built,
except a perturbation's signatures over its DE genes and at most ``de_max_cells`` cells per side of the test.
Cells that cannot be classified (fewer than ``min_cells`` cells in the pair, or controls in the context) are
"unclassified", and training on classified cells keeps them (:func:`training_cells`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.config import MIN_TRAIN_CELLS, PerturbedCallConfig
from statecore.data.io import obs_labels
from statecore.errors import DataError

CONTROL, KO, NP, UNCLASSIFIED = "control", "KO", "NP", "unclassified"
CALLS = (CONTROL, KO, NP, UNCLASSIFIED)
CALL_COL, PROB_COL = "perturbed_call", "perturbed_prob"
SUMMARY_COLUMNS = ("context", "perturbation", "cells", "ko", "np", "unclassified", "de_genes", "status")
# status of a (context, perturbation) pair in the summary
CLASSIFIED, NO_EFFECT, FEW_CELLS, FEW_CONTROLS = (
    "classified",
    "no detectable effect",
    "too few cells",
    "too few controls",
)
_BLOCK_VALUES = 4_000_000  # values per dense row block


@dataclass(frozen=True)
class PerturbedCall:
    """The classifier's output: per cell a call (``CALLS``) and P(KO), and one summary row per pair."""

    call: np.ndarray  # [n_cells] str: control | KO | NP | unclassified
    prob: np.ndarray  # [n_cells] float32 posterior P(KO); NaN for controls and unclassified cells
    summary: pd.DataFrame  # SUMMARY_COLUMNS, one row per (context, targeting perturbation)
    config: PerturbedCallConfig

    def to_uns(self) -> dict:
        """JSON-safe record for ``uns["statecore"]["perturbed_call"]``."""
        s = self.summary
        return {
            "config": self.config.to_dict(),
            "summary": {c: s[c].astype(str if c in ("context", "perturbation", "status") else int).tolist()
                        for c in SUMMARY_COLUMNS},
            "targeting_cells": int(s["cells"].sum()),
            "ko_cells": int(s["ko"].sum()),
        }  # fmt: skip


def classify_perturbed(
    adata, *, control: str, cfg: PerturbedCallConfig = PerturbedCallConfig()
) -> PerturbedCall:
    """Call every targeting cell of a prepared AnnData (log1p ``X``, ``var["highly_variable"]``) KO or NP.

    Contexts are classified separately (``obs["context"]``); the input is not modified."""
    _check_config(cfg)
    pert, ctx, _ = obs_labels(adata)
    genes = _hvg_index(adata)
    call = np.where(pert == control, CONTROL, UNCLASSIFIED).astype(object)
    prob = np.full(adata.n_obs, np.nan, dtype=np.float32)
    X = adata.X if not sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    rows_out: list[dict] = []
    for i, context in enumerate(sorted(set(ctx))):
        rows = np.flatnonzero(ctx == context)
        rng = np.random.default_rng([cfg.seed, i])
        rows_out += _classify_context(X, rows, pert[rows], genes, control, cfg, rng, call, prob, context)
    summary = pd.DataFrame(rows_out, columns=list(SUMMARY_COLUMNS))
    return PerturbedCall(call=call.astype(str), prob=prob, summary=summary, config=cfg)


def annotate(adata, result: PerturbedCall) -> None:
    """Write the calls into ``adata`` (``obs["perturbed_call"]``, ``obs["perturbed_prob"]``, the summary under
    ``uns["statecore"]["perturbed_call"]``); no cell is removed."""
    adata.obs[CALL_COL] = pd.Categorical(result.call, categories=list(CALLS))
    adata.obs[PROB_COL] = result.prob
    adata.uns.setdefault("statecore", {})["perturbed_call"] = result.to_uns()


def call_summary(adata) -> pd.DataFrame | None:
    """The per-pair summary stored by :func:`annotate` (None when the data carry no calls)."""
    rec = (adata.uns.get("statecore", {}) or {}).get("perturbed_call")
    if not rec or "summary" not in rec:
        return None
    table = {c: np.asarray(rec["summary"][c]).tolist() for c in SUMMARY_COLUMNS if c in rec["summary"]}
    return pd.DataFrame(table, columns=list(SUMMARY_COLUMNS))


def context_totals(summary: pd.DataFrame) -> pd.DataFrame:
    """Per context and overall ("all"): targeting cells, cells called KO / NP / unclassified, the share of
    targeting cells called KO, perturbations classified and those with no detectable effect."""
    rows = []
    for name, part in [*summary.groupby("context", sort=True), ("all", summary)]:
        cells = int(part["cells"].sum())
        rows.append({
            "context": str(name), "targeting cells": cells, "KO": int(part["ko"].sum()),
            "NP": int(part["np"].sum()), "unclassified": int(part["unclassified"].sum()),
            "KO share": float(part["ko"].sum() / cells) if cells else float("nan"),
            "perturbations": int(len(part)),
            "no detectable effect": int((part["status"] == NO_EFFECT).sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def require_calls(adata) -> None:
    """DataError naming the fix when ``adata`` carries no perturbed-cell calls."""
    if CALL_COL not in adata.obs.columns:
        raise DataError(
            "the data carry no perturbed-cell calls (obs['perturbed_call']) to train on classified cells; "
            "prepare them with `python -m statecore prepare --classify-perturbed` (app: Preprocess, "
            "'Classify perturbed cells'), or train without --train-on-classified"
        )


def training_cells(
    adata, *, control: str, pairs, min_cells: int = MIN_TRAIN_CELLS
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Cells that training on classified cells draws from, and the pairs that keep all their cells.

    Every control cell, and every perturbed cell not called NP; a (context, perturbation) pair of ``pairs``
    with fewer than ``min_cells`` such cells keeps all its cells instead (returned second): the classifier
    found no perturbed population there to train on, and without cells the model would never see the
    perturbation, while its cells, mostly unperturbed, teach it that the effect is small."""
    require_calls(adata)
    pert, ctx, _ = obs_labels(adata)
    call = adata.obs[CALL_COL].astype(str).to_numpy()
    keep = (pert == control) | (call != NP)
    index = pd.DataFrame({"c": ctx, "p": pert}).groupby(["c", "p"], sort=True).indices
    whole: list[tuple[str, str]] = []
    for pair in sorted(set(pairs)):
        rows = index.get(pair)
        if rows is not None and pair[1] != control and int(keep[rows].sum()) < min_cells:
            keep[rows] = True
            whole.append(pair)
    return keep, whole


# --------------------------------------------------------------------------- one context


def _classify_context(X, rows, pert, genes, control, cfg, rng, call, prob, context) -> list[dict]:
    """Classify the targeting cells of one context (``rows``) into ``call`` / ``prob``; its summary rows."""
    is_ctrl = pert == control
    targets = sorted(set(pert[~is_ctrl]))
    counts = {p: int((pert == p).sum()) for p in targets}
    if int(is_ctrl.sum()) < max(cfg.min_cells, 3):
        return [_row(context, p, counts[p], 0, 0, FEW_CONTROLS) for p in targets]
    pcs = _context_pcs(X, rows, genes, cfg, rng)
    ctrl_rows = rows[is_ctrl]
    ref_pcs = pcs[is_ctrl]
    k = int(min(cfg.n_neighbors, len(ctrl_rows) - 1))
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(ref_pcs)
    Xc = _gather(X, ctrl_rows, genes, sparse_ok=True)  # the controls' expression, for neighbour means
    ref = _subsample(len(ctrl_rows), cfg.de_max_cells, rng)
    ref_nbrs = _without_self(nn.kneighbors(ref_pcs[ref], return_distance=False), ref)
    ref_sig = _signatures(X, ctrl_rows[ref], ref_nbrs, Xc, genes)
    out = []
    for p in targets:
        pos = np.flatnonzero(pert == p)
        if len(pos) < cfg.min_cells:
            out.append(_row(context, p, len(pos), 0, 0, FEW_CELLS))
            continue
        nbrs = nn.kneighbors(pcs[pos], n_neighbors=k, return_distance=False)
        ko, p_ko, n_de = _call_perturbation(X, rows[pos], nbrs, Xc, genes, ref_sig, cfg, rng)
        call[rows[pos]] = np.where(ko, KO, NP)
        prob[rows[pos]] = p_ko
        out.append(
            _row(
                context,
                p,
                len(pos),
                int(ko.sum()),
                n_de,
                CLASSIFIED if n_de >= cfg.min_de_genes else NO_EFFECT,
            )
        )
    return out  # fmt: skip


def _row(context: str, pert: str, cells: int, ko: int, n_de: int, status: str) -> dict:
    classified = status in (CLASSIFIED, NO_EFFECT)
    return {
        "context": str(context), "perturbation": str(pert), "cells": int(cells), "ko": int(ko),
        "np": int(cells - ko) if classified else 0, "unclassified": 0 if classified else int(cells),
        "de_genes": int(n_de), "status": status,
    }  # fmt: skip


def _call_perturbation(X, rows, nbrs, Xc, genes, ref_sig, cfg, rng) -> tuple[np.ndarray, np.ndarray, int]:
    """(KO mask, P(KO), number of DE genes) for the cells ``rows`` of one perturbation in one context."""
    sub = _subsample(len(rows), cfg.de_max_cells, rng)
    sig_sub = _signatures(X, rows[sub], nbrs[sub], Xc, genes)
    de = de_genes(sig_sub, ref_sig, pval=cfg.de_pval, min_diff=cfg.de_min_diff)
    if len(de) < cfg.min_de_genes:
        return np.zeros(len(rows), dtype=bool), np.zeros(len(rows), dtype=np.float32), int(len(de))
    sig = _signatures(X, rows, nbrs, Xc[:, de], genes[de])  # every cell, over the DE genes only
    ko, p_ko = mixscape_calls(sig, ref_sig[:, de], threshold=cfg.threshold, max_iter=cfg.max_iter)
    return ko, p_ko.astype(np.float32), int(len(de))


# --------------------------------------------------------------------------- the statistics


def de_genes(sig: np.ndarray, ref: np.ndarray, *, pval: float = 0.05, min_diff: float = 0.17) -> np.ndarray:
    """Columns where ``sig`` (a perturbation's signatures) differs from ``ref`` (the controls'): two-sided
    Wilcoxon rank-sum, Benjamini-Hochberg adjusted p < ``pval``, |mean difference| >= ``min_diff``."""
    from scipy.stats import false_discovery_control, mannwhitneyu

    diff = sig.mean(axis=0) - ref.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = mannwhitneyu(sig, ref, axis=0, method="asymptotic").pvalue
    p = np.where(np.isfinite(p), p, 1.0)  # a gene constant in both groups has no test
    padj = false_discovery_control(p, method="bh")
    return np.flatnonzero((padj < pval) & (np.abs(diff) >= min_diff))


def mixscape_calls(
    sig: np.ndarray, ref: np.ndarray, *, threshold: float = 0.5, max_iter: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """(KO mask, P(KO)) of the rows of ``sig`` against the control signatures ``ref`` (same columns).

    Each round projects every signature on the unit vector from the controls' mean to the mean of the cells
    currently called KO (at first all of them) and refits :func:`ko_posterior`; it stops when the calls
    stop changing, when no cell is left KO, or after ``max_iter`` rounds."""
    ko = np.ones(len(sig), dtype=bool)
    p_ko = np.zeros(len(sig))
    ref_mean = ref.mean(axis=0)
    for _ in range(max(1, int(max_iter))):
        direction = sig[ko].mean(axis=0) - ref_mean
        norm = float(np.linalg.norm(direction))
        if not norm > 0:
            break
        x, x0 = sig @ (direction / norm), ref @ (direction / norm)
        p_ko = ko_posterior(x, mu0=float(x0.mean()), sd0=float(x0.std(ddof=1)), init=x[ko])
        new = p_ko > threshold
        if np.array_equal(new, ko) or not new.any():
            break
        ko = new
    return p_ko > threshold, p_ko


def ko_posterior(
    x: np.ndarray, *, mu0: float, sd0: float, init: np.ndarray, max_iter: int = 1000, tol: float = 1e-10
) -> np.ndarray:
    """Posterior P(KO) of each value of ``x`` under a two-component 1-D Gaussian mixture whose NP component
    is fixed at ``(mu0, sd0)`` (the controls' projections) and whose KO component (mean, sd, weight) is fitted
    by EM, starting from the mean and sd of ``init`` and weight 0.5. The KO sd is kept above 1% of ``sd0`` so
    that the component cannot collapse onto one cell."""
    from scipy.stats import norm

    x = np.asarray(x, dtype=np.float64)
    sd0 = max(float(sd0), 1e-12) if np.isfinite(sd0) else 1e-12
    floor = 0.01 * sd0
    mu1 = float(np.mean(init)) if len(init) else float(x.mean())
    sd1 = max(float(np.std(init)) if len(init) > 1 else sd0, floor)
    w, prev = 0.5, -np.inf
    log0 = norm.logpdf(x, mu0, sd0)
    r = np.zeros_like(x)
    for _ in range(max_iter):
        a = np.log(w) + norm.logpdf(x, mu1, sd1)
        total = np.logaddexp(a, np.log1p(-w) + log0)
        r = np.exp(a - total)
        ll = float(total.sum())
        if ll - prev <= tol * max(1.0, abs(ll)):
            break
        prev, s = ll, float(r.sum())
        if s <= 1e-12:
            return np.zeros_like(x)
        w = float(np.clip(s / len(x), 1e-9, 1 - 1e-9))
        mu1 = float((r * x).sum() / s)
        sd1 = max(float(np.sqrt((r * (x - mu1) ** 2).sum() / s)), floor)
    return r


# --------------------------------------------------------------------------- arrays, in row blocks


def _check_config(cfg: PerturbedCallConfig) -> None:
    bad = [
        name
        for name, ok in (
            ("n_pcs", cfg.n_pcs >= 1), ("n_neighbors", cfg.n_neighbors >= 1), ("min_de_genes", cfg.min_de_genes >= 1),
            ("de_pval", 0 < cfg.de_pval <= 1), ("de_min_diff", cfg.de_min_diff >= 0),
            ("threshold", 0 < cfg.threshold < 1), ("max_iter", cfg.max_iter >= 1), ("min_cells", cfg.min_cells >= 2),
            ("de_max_cells", cfg.de_max_cells >= 2), ("pca_max_cells", cfg.pca_max_cells >= 2),
        )
        if not ok
    ]  # fmt: skip
    if bad:
        raise DataError(f"perturbed-cell classifier: invalid setting(s) {bad} in {cfg.to_dict()}")


def _hvg_index(adata) -> np.ndarray:
    if "highly_variable" in adata.var.columns:
        idx = np.flatnonzero(adata.var["highly_variable"].to_numpy().astype(bool))
        if len(idx):
            return idx
    return np.arange(adata.n_vars)


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def _block(n_cols: int, per_row: int = 1) -> int:
    return max(1, _BLOCK_VALUES // max(1, n_cols * per_row))


def _gather(X, rows: np.ndarray, genes: np.ndarray, *, sparse_ok: bool = False):
    """``X[rows][:, genes]`` as float32: dense, or CSR when ``X`` is sparse and ``sparse_ok``."""
    part = X[rows][:, genes]
    if sp.issparse(part):
        return sp.csr_matrix(part, dtype=np.float32) if sparse_ok else part.toarray().astype(np.float32)
    return np.asarray(part, dtype=np.float32)


def _context_pcs(X, rows: np.ndarray, genes: np.ndarray, cfg: PerturbedCallConfig, rng) -> np.ndarray:
    """``[len(rows), n]`` principal components of standardised expression, fitted on a seeded subsample."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit = rows[_subsample(len(rows), cfg.pca_max_cells, rng)]
    n_comps = int(min(cfg.n_pcs, len(genes) - 1, len(fit) - 1))
    if n_comps < 1:  # a single gene (or cell): the expression itself is the space
        return np.concatenate([_gather(X, rows[a : a + 4096], genes) for a in range(0, len(rows), 4096)])
    model = make_pipeline(StandardScaler(), PCA(n_components=n_comps, random_state=cfg.seed))
    model.fit(_gather(X, fit, genes))
    step = _block(len(genes))
    blocks = [model.transform(_gather(X, rows[a : a + step], genes)) for a in range(0, len(rows), step)]
    return np.concatenate(blocks).astype(np.float32)


def _without_self(nbrs: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Drop each control cell itself from its k + 1 neighbours (the last one if a duplicate came first)."""
    self_hit = nbrs == own[:, None]
    self_hit[~self_hit.any(axis=1), -1] = True
    return nbrs[~self_hit].reshape(len(nbrs), nbrs.shape[1] - 1)


def _signatures(X, rows: np.ndarray, nbrs: np.ndarray, Xc, genes: np.ndarray) -> np.ndarray:
    """``[len(rows), len(genes)]`` float32: each cell's expression minus the mean of its neighbour controls
    (``nbrs``: row positions in ``Xc``, the controls' expression over the same genes), block by block."""
    k = nbrs.shape[1]
    out = np.empty((len(rows), len(genes)), dtype=np.float32)
    step = _block(len(genes), 2)
    for a in range(0, len(rows), step):
        b = min(len(rows), a + step)
        weights = sp.csr_matrix(
            (np.full((b - a) * k, 1.0 / k, dtype=np.float32), nbrs[a:b].ravel(), np.arange(0, (b - a) * k + 1, k)),
            shape=(b - a, Xc.shape[0]),
        )  # fmt: skip
        mean = weights @ Xc
        mean = mean.toarray() if sp.issparse(mean) else np.asarray(mean)
        out[a:b] = _gather(X, rows[a:b], genes) - mean
    return out
