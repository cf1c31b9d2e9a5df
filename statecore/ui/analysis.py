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
from statecore.data.io import split_combo
from statecore.data.pseudobulk import group_means


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


def hvg_explanation(report: dict, requested: int) -> str:
    """Where the prepared data's number of highly variable genes comes from, in plain words.

    ``report``: the prepared data's ``qc_report`` (genes_in, genes_removed_min_cells, min_cells_applied,
    n_hvg, hvg_flavor); ``requested``: the "Highly variable genes" setting."""
    genes_in, removed = int(report["genes_in"]), int(report.get("genes_removed_min_cells", 0))
    n_hvg, passed = int(report["n_hvg"]), genes_in - removed
    min_cells = int(report.get("min_cells_applied", 0))
    text = f"Highly variable genes: **{n_hvg:,}**. The data has {genes_in:,} genes; " + (
        f'{removed:,} of them are detected in fewer than {min_cells:,} cells ("Min cells per gene") and '
        f"were removed, so {passed:,} passed QC. "
        if removed
        else f"all {genes_in:,} passed QC. "
    )
    if n_hvg < requested:
        return text + (
            f"The highly variable genes are chosen among the genes that passed QC, so {n_hvg:,} is the most "
            f'there can be (you asked for {requested:,}): every gene left is used. Lower "Min cells per gene" '
            "to keep more."
        )
    return text + (
        f"Among those, the {n_hvg:,} whose expression varies most between cells (flavor "
        f"{report.get('hvg_flavor', '?')}) are the genes the model reads and predicts."
    )


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


def feature_genes(run, offered: list[str]) -> list[str]:
    """A gene-feature run's extra choices: every gene of its feature table not already offered."""
    vocab = getattr(run, "vocab", None)
    if vocab is None or vocab.features is None:
        return []
    have = set(offered) | {vocab.control}
    return [g for g in vocab.names if g not in have]


def nothing_to_show(values: pd.Series) -> str:
    """Why a bar chart of ``values`` would be empty ("" when there is something to draw)."""
    v = pd.to_numeric(values, errors="coerce")
    if v.isna().all():
        return "the metric is undefined (NaN) for every method; see the glossary for when that happens."
    if (v.fillna(0) == 0).all():
        return "the metric is 0 for every method, the ceiling included."
    return ""


def overlap_empty_reason(overlap: pd.Series, n_sig_real: pd.Series) -> str:
    """Why the per-perturbation DE-overlap chart would be empty ("" when it has bars to show)."""
    if overlap.empty:
        return "No DE overlap: no perturbation was scored."
    if (overlap.fillna(0) > 0).any():
        return ""
    if (n_sig_real.fillna(0) == 0).all():
        return (
            "No bars: the real test cells have no significant DE gene (FDR < 0.05) for any perturbation "
            "(too few cells or no effect), so every method, the ceiling included, overlaps 0 genes."
        )
    return (
        "No bars: the model's top predicted DE genes share none with the real significant genes for any "
        f"perturbation (the real cells have {int(n_sig_real.max())} significant genes at most)."
    )


# log2 of a ratio of geometric means with pseudocount 1 on normalised counts: since pdex's mean is
# expm1(mean log1p x), log2((m_t + 1) / (m_r + 1)) = (mean log1p t - mean log1p r) / ln 2, never infinite.
LOG2_PER_LN = 1.0 / np.log(2.0)


def readable_de(de: pd.DataFrame, target: str, combo_sep: str = "+") -> tuple[pd.DataFrame, str]:
    """One target's predicted DE as a biologist reads it, and a note on the knock-down check.

    Ranked by effect size: the predicted mean change in log space (mean log1p of the predicted
    cells minus that of the controls); log2 fold change with a pseudocount of 1 (never infinite);
    the perturbed gene(s) first when they are in the panel."""
    one = de[de["target"].astype(str) == target]
    pred_mean = np.log1p(one["target_mean"].to_numpy(float))
    ctrl_mean = np.log1p(one["ref_mean"].to_numpy(float))
    table = pd.DataFrame(
        {
            "gene": one["feature"].astype(str).to_numpy(),
            "mean change (log1p)": pred_mean - ctrl_mean,
            "log2 fold change": (pred_mean - ctrl_mean) * LOG2_PER_LN,
            "predicted mean (log1p)": pred_mean,
            "control mean (log1p)": ctrl_mean,
            "FDR": one["fdr"].to_numpy(float),
        }
    )
    parts = split_combo(str(target), combo_sep) if combo_sep else [str(target)]
    table["perturbed gene"] = table["gene"].isin(parts)
    table["order"] = -table["mean change (log1p)"].abs()
    table = table.sort_values(["perturbed gene", "order"], ascending=[False, True], kind="stable")
    table = table.drop(columns="order").reset_index(drop=True)
    inside = [p for p in parts if p in set(table["gene"])]
    if inside:
        note = (
            f"Knock-down check: {', '.join(inside)} (the perturbed gene) is at the top; a CRISPRi/knock-out "
            "should show a negative change there, CRISPRa a positive one."
        )
    else:
        note = (
            f"{' and '.join(parts)} is not among the model's {len(table):,} genes, so the perturbed gene's "
            "own change (the knock-down check) cannot be shown here; a drug or cytokine has no such gene."
        )
    return table, note


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


def confidence_text(
    verdict: dict | None,
    *,
    context: str,
    perts: list[str],
    test_perts: list[str],
    val_pearson: float | None = None,
) -> str:
    """ "Predictions like this one were right to this degree": the run's measured Pearson Δ on its
    held-out test perturbations, with the best baseline and the data ceiling ("" when not measured)."""
    lines = []
    if val_pearson is not None:
        lines.append(f"During training, the validation Pearson Δ reached {val_pearson:.3f}.")
    if verdict:
        pearson = next((v for v in verdict.get("verdicts", []) if v["metric"] == "pearson_delta"), None)
        if pearson and pearson.get("beats") is not None:
            lines.append(
                f"On its {verdict['n_test_perturbations']} held-out test perturbation(s) in "
                f"{verdict['context']}, this run's predictions reached **Pearson Δ {pearson['model']:.3f}** "
                f"(best baseline {pearson['baseline']:.3f}; two halves of the real cells agree to "
                f"{pearson['ceiling']:.3f}). {pearson['sentence']}"
            )
        comparable = context == verdict.get("context") and all(p in set(test_perts) for p in perts)
        if not comparable:
            lines.append(
                "These numbers were measured on held-out perturbations of "
                f"{verdict.get('context')}; the prediction shown here is "
                + (
                    "in another context, "
                    if context != verdict.get("context")
                    else "of perturbations outside that test set, "
                )
                + "so they are a guide, not a measurement of it."
            )
    return " ".join(lines)


def ensemble_agreement(changes: pd.DataFrame, *, min_change: float = 0.05) -> pd.DataFrame:
    """Agreement of k ensemble members (rows) on each gene's predicted change (columns, log1p).

    Per gene: the mean and spread (sd) of the members' changes, the share of members moving the
    gene in the mean's direction, and a flag where members disagree on the sign of a change that
    at least one of them predicts to be larger than ``min_change``. Largest mean change first."""
    if len(changes) < 2:
        raise ValueError("agreement needs at least two ensemble members")
    x = changes.to_numpy(dtype=float)  # [k, G]
    mean = x.mean(axis=0)
    signs = np.sign(x)
    same = (signs == np.sign(mean)[None, :]).mean(axis=0)
    disagree = (signs.max(axis=0) > 0) & (signs.min(axis=0) < 0) & (np.abs(x).max(axis=0) > min_change)
    table = pd.DataFrame(
        {
            "gene": list(map(str, changes.columns)),
            "mean change (log1p)": mean,
            "sd between members": x.std(axis=0, ddof=1),
            "members agreeing on direction": same,
            "direction disputed": disagree,
        }
    )
    order = np.argsort(-np.abs(mean), kind="stable")
    return table.iloc[order].reset_index(drop=True)
