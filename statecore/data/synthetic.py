"""Seeded simulator of Perturb-seq screens: tests, demos and scale benchmarks.

Counts follow a negative binomial (gamma-Poisson) around ``library_size * composition``, where the
composition is a per-gene baseline shifted by context (cell type), batch and the perturbation's
log-fold changes. Each perturbation has a sparse gene program shared by all contexts, scaled per
context and joined by a few context-specific genes, so a model has something to transfer across
contexts and something it cannot. Sparse output is generated block by block so that a million cells
never pass through a dense cells x genes matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from statecore.data.io import split_combo

CONTROL = "ctrl"

# Rows per generated block are chosen so one dense block holds at most this many values.
_BLOCK_VALUES = 4_000_000


def make_perturbation_adata(
    n_cells: int = 2000,
    n_genes: int = 200,
    n_perturbations: int = 20,
    contexts: Sequence[str] | int = ("c0", "c1", "c2", "c3"),
    n_batches: int = 1,
    seed: int = 0,
    frac_no_effect: float = 0.2,
    n_combos: int = 0,
    sparse: bool = True,
    *,
    frac_control: float = 0.1,
    program_size: int | None = None,
    n_context_genes: int | None = None,
    effect_size: float = 1.0,
    context_scale_sd: float = 0.3,
    context_effect: float = 0.5,
    batch_effect: float = 0.25,
    interaction_sd: float = 0.3,
    library_mean: float = 2000.0,
    library_sd: float = 0.4,
    dispersion: float = 5.0,
    gene_mean_sd: float = 2.0,
    modules: int = 0,
    module_structure: bool = True,
    module_sd: float = 0.6,
    self_lfc: float = -1.5,
    frac_escape: float = 0.0,
) -> ad.AnnData:
    """Simulate a perturbation screen with raw counts in ``X`` and the planted truth in ``uns``.

    Cells are spread evenly over contexts; within a context ``frac_control`` of them (at least one)
    are controls (``"ctrl"``) and the rest cycle through every perturbation (singles, then combos
    ``"A+B"``), so each (context, perturbation) pair appears once the context has enough cells.
    ``uns["synthetic"]`` holds per perturbation the shared program (``genes``, ``lfc``), per context
    its ``scale`` and extra ``genes``/``lfc``, the ``no_effect`` list and the ``combos``;
    :func:`planted_lfc` turns that into the full log-fold-change vector for a context.

    ``modules > 0`` (unseen-gene benchmarks, issue 14): genes fall into co-expression modules (a per-cell
    module activity moves all of a module's genes together, in controls too), each perturbation targets a
    module gene and is named after it, and its own gene changes by ``self_lfc``. With ``module_structure``
    a perturbation's program is its module's shared program (scaled, plus a few genes of its own), so knocking
    out genes of one module gives similar profiles, as for genes of one complex; without it every program is
    drawn independently (the no-structure control: gene features then carry no information on the response).

    ``frac_escape > 0`` (perturbed-cell classifier, issue 17): that share of the targeting cells, drawn at random
    from their own stream, carry their guide's label but no effect (expression as a control cell's), like cells
    whose cut was repaired in frame; ``obs["escaped"]`` marks them.
    """
    ctx_names = (
        [f"c{i}" for i in range(contexts)] if isinstance(contexts, int) else [str(c) for c in contexts]
    )
    _check_args(
        n_cells, n_genes, n_perturbations, ctx_names, n_batches, frac_no_effect, n_combos, frac_control,
        frac_escape,
    )  # fmt: skip
    rng = np.random.default_rng(seed)  # one stream, drawn in a fixed order: the same seed, the same data
    k = min(int(program_size) if program_size is not None else max(3, n_genes // 20), n_genes)
    k_ctx = min(int(n_context_genes) if n_context_genes is not None else max(1, k // 4), n_genes)
    genes = [f"G{i:05d}" for i in range(n_genes)]
    perts = [f"P{i:03d}" for i in range(n_perturbations)]
    module = None
    if modules > 0:
        module = _module_plan(
            seed, genes, n_perturbations, ctx_names, modules, k, k_ctx, effect_size, context_scale_sd,
            module_structure, self_lfc,
        )  # fmt: skip
        perts = module["perts"]

    # Baseline composition: log-normal gene means as in real data (few high, many low genes).
    base = rng.normal(0.0, gene_mean_sd, n_genes)
    ctx_shift = rng.normal(0.0, context_effect, (len(ctx_names), n_genes))
    batch_shift = (
        rng.normal(0.0, batch_effect, (n_batches, n_genes)) if n_batches > 1 else np.zeros((1, n_genes))
    )
    theta = np.exp(rng.normal(np.log(dispersion), 0.5, n_genes))  # per-gene NB size
    if module is None:
        effects, no_effect, combos = _plant_effects(
            rng, perts, ctx_names, n_genes, k, k_ctx, frac_no_effect, n_combos, effect_size, context_scale_sd,
            interaction_sd,
        )  # fmt: skip
    else:
        effects, no_effect, combos = module["effects"], [], []
    labels = perts + combos
    params = dict(
        n_cells=n_cells, n_genes=n_genes, n_perturbations=n_perturbations, n_batches=n_batches, seed=seed,
        frac_no_effect=frac_no_effect, n_combos=n_combos, frac_control=frac_control, program_size=k,
        n_context_genes=k_ctx, effect_size=effect_size, library_mean=library_mean, library_sd=library_sd,
        dispersion=dispersion, batch_effect=batch_effect, context_effect=context_effect,
        gene_mean_sd=gene_mean_sd, modules=modules, module_structure=module_structure, module_sd=module_sd,
        self_lfc=self_lfc, frac_escape=frac_escape,
    )  # fmt: skip
    uns = {"control": CONTROL, "no_effect": no_effect, "combos": combos, "effects": effects, "params": params}
    ctx_idx, pert_lab, batch_idx, lib = _design(
        rng, n_cells, len(ctx_names), labels, n_batches, frac_control, library_mean, library_sd
    )
    effective = pert_lab
    if frac_escape > 0:
        escaped = (np.random.default_rng([int(seed), 17]).random(n_cells) < frac_escape) & (
            pert_lab != CONTROL
        )
        effective = np.where(escaped, CONTROL, pert_lab)
    cell_term = None
    if module is not None:
        uns["module_of"] = module["module_of"]
        arng = np.random.default_rng([int(seed), 15])
        activity = arng.normal(0.0, module_sd, (n_cells, modules))  # [cells, modules]
        cell_term = lambda sl: activity[sl] @ module["loadings"]  # noqa: E731  [rows, G] log-scale
    means = _mean_counts(
        uns, labels, ctx_names, base, ctx_shift, batch_shift, (ctx_idx, effective, batch_idx, lib), cell_term
    )
    X = _sample_counts(rng, means, theta, n_cells, n_genes, sparse)
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(pert_lab.astype(str), categories=[CONTROL] + labels),
            "context": pd.Categorical(np.asarray(ctx_names, dtype=object)[ctx_idx], categories=ctx_names),
            "batch": pd.Categorical(
                [f"b{b}" for b in batch_idx], categories=[f"b{b}" for b in range(n_batches)]
            ),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]),
    )
    if frac_escape > 0:
        obs["escaped"] = effective != pert_lab
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.uns["synthetic"] = _h5ad_safe(uns)
    return adata


def _mean_counts(uns, labels, ctx_names, base, ctx_shift, batch_shift, cells, cell_term=None):
    """``means(rows) -> [rows, G]`` expected counts of a block of cells.

    Each (context, batch) control state has a composition; a perturbation multiplies gene means by
    exp(lfc) without renormalising, so the planted lfc is the true change in expected counts.
    """
    ctx_idx, pert_lab, batch_idx, lib = cells
    n_genes = len(base)
    # log-fold-change vector per (label, context), computed once: labels x contexts x genes is small.
    label_ids = {lab: i for i, lab in enumerate([CONTROL] + labels)}
    lfc_table = np.zeros((len(label_ids), len(ctx_names), n_genes), dtype=np.float64)
    for lab, li in label_ids.items():
        if lab != CONTROL:
            for ci, ctx in enumerate(ctx_names):
                lfc_table[li, ci] = _lfc_vector(uns, lab, ctx, n_genes)
    pert_id = np.fromiter((label_ids[x] for x in pert_lab), dtype=np.int64, count=len(pert_lab))
    logit = base[None, None, :] + ctx_shift[:, None, :] + batch_shift[None, :, :]  # [C, B, G]
    comp = np.exp(logit - logit.max(axis=-1, keepdims=True))
    comp /= comp.sum(axis=-1, keepdims=True)

    def means(sl: slice) -> np.ndarray:
        lfc = lfc_table[pert_id[sl], ctx_idx[sl]]
        if (
            cell_term is not None
        ):  # co-expression modules: a per-cell activity moves a module's genes together
            lfc = lfc + cell_term(sl)
        return comp[ctx_idx[sl], batch_idx[sl]] * np.exp(lfc) * lib[sl, None]

    return means


def _plant_effects(
    rng, perts, ctx_names, n_genes, k, k_ctx, frac_no_effect, n_combos, effect_size, context_scale_sd,
    interaction_sd,
) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:  # fmt: skip
    """(effects per label, no-effect perturbations, combinations): each perturbation's program, then the
    combinations' interaction terms ("additive-ish": singles add in log space plus a small interaction)."""
    n_none = int(round(frac_no_effect * len(perts)))
    no_effect = sorted(rng.choice(perts, size=n_none, replace=False).tolist()) if n_none else []
    effects: dict[str, dict[str, Any]] = {}
    for p in perts:
        effects[p] = _draw_program(
            rng, n_genes, k, k_ctx, ctx_names, effect_size, context_scale_sd, null=p in no_effect
        )
    combos = _draw_combos(rng, perts, no_effect, n_combos)
    for c in combos:
        n_int = max(1, k_ctx)
        idx = np.sort(rng.choice(n_genes, size=n_int, replace=False))
        effects[c] = {
            "genes": idx,
            "lfc": rng.normal(0.0, interaction_sd, n_int),
            "contexts": {
                ctx: {"scale": 1.0, "genes": np.zeros(0, np.int64), "lfc": np.zeros(0)} for ctx in ctx_names
            },
        }
    return effects, no_effect, combos


def _module_plan(
    seed, genes, n_perts, ctx_names, n_modules, k, k_ctx, effect_size, scale_sd, structured, self_lfc
) -> dict[str, Any]:
    """Modules, their control co-expression loadings, the targeted genes and their programs (own stream,
    so the plain simulator's draws are unchanged)."""
    rng = np.random.default_rng([int(seed), 14])
    n_genes = len(genes)
    module_of = np.where(rng.random(n_genes) < 0.6, rng.integers(0, n_modules, n_genes), -1)
    loadings = np.zeros((n_modules, n_genes))
    member = module_of >= 0
    loadings[module_of[member], np.flatnonzero(member)] = rng.uniform(0.5, 1.0, int(member.sum()))
    pools = [rng.permutation(np.flatnonzero(module_of == m)).tolist() for m in range(n_modules)]
    targets: list[int] = []
    while len(targets) < n_perts and any(pools):
        for pool in pools:  # round robin: every module gets targets
            if pool and len(targets) < n_perts:
                targets.append(pool.pop())
    if len(targets) < n_perts:
        raise ValueError(f"{n_perts} perturbations but only {len(targets)} module genes; use more genes")
    progs = [_draw_program(rng, n_genes, k, k_ctx, ctx_names, effect_size, scale_sd, null=False) for _ in range(n_modules)]  # fmt: skip
    effects: dict[str, dict[str, Any]] = {}
    for t in targets:
        if structured:
            base = progs[module_of[t]]
            own = rng.choice(n_genes, size=max(1, k // 4), replace=False)
            vec = np.zeros(n_genes)
            vec[base["genes"]] = base["lfc"] * rng.uniform(0.7, 1.3)
            vec[own] += rng.normal(0.0, 0.5 * effect_size, own.size)
            contexts = base["contexts"]
        else:
            prog = _draw_program(rng, n_genes, k, k_ctx, ctx_names, effect_size, scale_sd, null=False)
            vec = np.zeros(n_genes)
            vec[prog["genes"]] = prog["lfc"]
            contexts = prog["contexts"]
        vec[t] += self_lfc
        idx = np.flatnonzero(vec)
        effects[genes[t]] = {"genes": idx, "lfc": vec[idx], "contexts": contexts}
    perts = [genes[t] for t in targets]
    return {"perts": perts, "effects": effects, "module_of": module_of, "loadings": loadings}


def _design(rng, n_cells, n_ctx, labels, n_batches, frac_control, library_mean, library_sd):
    """(context index, label, batch index, library size) per cell: balanced over contexts, controls
    first within each context then the labels cycled, rows shuffled so nothing relies on the order."""
    ctx_idx = np.sort(np.arange(n_cells) % n_ctx)
    pert_lab = np.empty(n_cells, dtype=object)
    for ci in range(n_ctx):
        rows = np.flatnonzero(ctx_idx == ci)
        n_ctrl = max(1, int(round(frac_control * rows.size)))
        lab = np.array(
            [CONTROL] * n_ctrl + [labels[j % len(labels)] for j in range(rows.size - n_ctrl)], dtype=object
        )
        pert_lab[rows] = lab[rng.permutation(rows.size)]
    batch_idx = rng.integers(0, n_batches, n_cells)
    order = rng.permutation(n_cells)
    lib = np.exp(rng.normal(np.log(library_mean), library_sd, n_cells))
    return ctx_idx[order], pert_lab[order], batch_idx[order], lib


def _sample_counts(rng, means, theta, n_cells: int, n_genes: int, sparse: bool):
    """Gamma-Poisson counts around ``means(rows)``, block by block (never a dense cells x genes matrix
    when ``sparse``)."""
    block = max(1, _BLOCK_VALUES // n_genes)
    data_parts, index_parts, counts_per_row, dense_parts = [], [], [], []
    for start in range(0, n_cells, block):
        mu = means(slice(start, min(n_cells, start + block)))
        counts = rng.poisson(rng.gamma(theta[None, :], mu / theta[None, :])).astype(np.float32)
        if not sparse:
            dense_parts.append(counts)
            continue
        blk = sp.csr_matrix(counts)
        data_parts.append(blk.data)
        index_parts.append(blk.indices)
        counts_per_row.append(np.diff(blk.indptr))
    if not sparse:
        return np.concatenate(dense_parts, axis=0)
    nnz = int(sum(d.size for d in data_parts))
    idx_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_cells + 1, dtype=idx_dtype)
    np.cumsum(np.concatenate(counts_per_row), out=indptr[1:])
    indices = np.concatenate(index_parts).astype(idx_dtype, copy=False)
    return sp.csr_matrix((np.concatenate(data_parts), indices, indptr), shape=(n_cells, n_genes))


def planted_lfc(adata_or_uns: ad.AnnData | dict, perturbation: str, context: str) -> np.ndarray:
    """Full log-fold-change vector (genes) planted for ``perturbation`` in ``context``.

    Combinations ``"A+B"`` get the sum of their singles plus their interaction term; the control and
    no-effect perturbations get zeros.
    """
    uns = adata_or_uns.uns["synthetic"] if isinstance(adata_or_uns, ad.AnnData) else adata_or_uns
    n_genes = int(uns["params"]["n_genes"])
    if perturbation == uns["control"]:
        return np.zeros(n_genes)
    if perturbation not in uns["effects"]:
        raise KeyError(f"perturbation {perturbation!r} was not simulated")
    return _lfc_vector(uns, perturbation, context, n_genes)


def _lfc_vector(uns: dict, label: str, context: str, n_genes: int) -> np.ndarray:
    out = np.zeros(n_genes)
    parts = split_combo(label, "+") if label in set(uns["combos"]) else []
    for single in parts:
        out += _lfc_vector(uns, single, context, n_genes)
    eff = uns["effects"][label]
    ctx = eff["contexts"][context]
    out[np.asarray(eff["genes"], dtype=np.int64)] += float(ctx["scale"]) * np.asarray(eff["lfc"], dtype=float)
    out[np.asarray(ctx["genes"], dtype=np.int64)] += np.asarray(ctx["lfc"], dtype=float)
    return out


def _draw_program(rng, n_genes, k, k_ctx, ctx_names, effect_size, scale_sd, *, null) -> dict[str, Any]:
    if null:
        empty = {"scale": 0.0, "genes": np.zeros(0, np.int64), "lfc": np.zeros(0)}
        return {
            "genes": np.zeros(0, np.int64),
            "lfc": np.zeros(0),
            "contexts": {c: dict(empty) for c in ctx_names},
        }
    genes = np.sort(rng.choice(n_genes, size=k, replace=False))
    # Magnitudes bounded away from zero so every planted gene is a real, detectable effect.
    lfc = rng.choice([-1.0, 1.0], size=k) * rng.uniform(0.5, 1.5, size=k) * effect_size
    contexts = {}
    rest = np.setdiff1d(np.arange(n_genes), genes)
    for c in ctx_names:
        extra = np.sort(rng.choice(rest, size=min(k_ctx, rest.size), replace=False))
        contexts[c] = {
            "scale": float(np.exp(rng.normal(0.0, scale_sd))),
            "genes": extra,
            "lfc": rng.choice([-1.0, 1.0], size=extra.size)
            * rng.uniform(0.5, 1.5, size=extra.size)
            * effect_size,
        }
    return {"genes": genes, "lfc": lfc, "contexts": contexts}


def _draw_combos(rng, perts: list[str], no_effect: list[str], n_combos: int) -> list[str]:
    if n_combos <= 0:
        return []
    pool = [p for p in perts if p not in set(no_effect)] or perts
    pairs = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1 :]]
    if n_combos > len(pairs):
        raise ValueError(
            f"n_combos={n_combos} exceeds the {len(pairs)} pairs of distinct effective perturbations"
        )
    chosen = rng.choice(len(pairs), size=n_combos, replace=False)
    return [f"{pairs[i][0]}+{pairs[i][1]}" for i in sorted(chosen)]


def _check_args(
    n_cells, n_genes, n_perts, ctx_names, n_batches, frac_no_effect, n_combos, frac_control, frac_escape=0.0
) -> None:
    if n_cells < 1 or n_genes < 1:
        raise ValueError(f"n_cells and n_genes must be >= 1, got {n_cells} and {n_genes}")
    if n_perts < 1:
        raise ValueError(f"n_perturbations must be >= 1, got {n_perts}")
    if not ctx_names or len(set(ctx_names)) != len(ctx_names):
        raise ValueError(f"contexts must be distinct and non-empty, got {ctx_names}")
    if n_cells < len(ctx_names):
        raise ValueError(f"n_cells={n_cells} is smaller than the {len(ctx_names)} contexts")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    if not 0.0 <= frac_no_effect <= 1.0 or not 0.0 < frac_control < 1.0:
        raise ValueError(
            f"frac_no_effect must lie in [0, 1] and frac_control in (0, 1), got "
            f"{frac_no_effect} and {frac_control}"
        )
    if n_combos < 0:
        raise ValueError(f"n_combos must be >= 0, got {n_combos}")
    if not 0.0 <= frac_escape < 1.0:
        raise ValueError(f"frac_escape must lie in [0, 1), got {frac_escape}")


def _h5ad_safe(obj: Any) -> Any:
    """Lists of strings as numpy string arrays and numbers as arrays, so write_h5ad round-trips."""
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return np.asarray(obj, dtype=str) if all(isinstance(x, str) for x in obj) else np.asarray(obj)
    return obj
