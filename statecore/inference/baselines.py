"""Baselines with the same prediction contract as the model (one code path scores everything).

All of them look only at training cells (the split's train + validation pairs and every control);
the number of predicted cells per perturbation is ``n_cells`` or the target context's control count.

- control: the context's control cells, unchanged.
- context_mean: the mean of the context's perturbed training cells (zero-shot, where the context has
  none: its control mean + the average perturbed-minus-control shift of the other contexts).
- perturbation_mean: the context's control mean + the perturbation's mean shift (perturbed mean minus
  control mean) in the other contexts where it was trained, averaged over those contexts.
- cell_mean: cell-eval's baseline, the mean of the perturbed training groups' means.
- additive: control mean + the sum of the parts' shifts (ΔA + ΔB for "A+B"); a part's shift is taken
  in the target context when trained there, else averaged over the other contexts.
- generic_response: control mean + the mean shift of all training perturbations in the context (averaged
  over the other contexts where the context has none): the same vector for every perturbation, the bar a
  prediction of an unseen gene must clear.
- linear_features: control mean + a ridge map from the perturbed genes' features to the training
  perturbations' mean shifts (``statecore.training.priors.feature_ridge``), used alone, as the linear model
  of Ahlmann-Eltze, Huber & Anders (Nat Methods 2025); features from the run's table or, by default,
  computed from the data's control cells.
Mean baselines repeat their vector for every cell (clipped at 0, as expression is non-negative).
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np

from statecore.config import BASELINE_KINDS  # the one list of baseline kinds
from statecore.data import pseudobulk
from statecore.data.io import split_combo
from statecore.data.sets import RowGatherer, gene_indices, obs_labels
from statecore.errors import DataError
from statecore.inference.predict import control_rows, make_prediction_adata, sample_rows

UNSEEN_BASELINES = ("generic_response", "linear_features")  # the baselines of an unseen-genes run


def group_means(adata, mask: np.ndarray, keys: np.ndarray, gene_idx: np.ndarray) -> dict[str, np.ndarray]:
    """Mean expression over ``gene_idx`` per key among masked cells."""
    rows = np.flatnonzero(mask)
    names, means = pseudobulk.group_means(adata.X[rows][:, gene_idx], keys[rows])
    return dict(zip(names, means))


def _key(c: str, p: str) -> str:
    return f"{c}\x1f{p}"


def predict_baseline(
    adata,
    split,
    kind: str,
    *,
    genes: Sequence[str],
    n_cells: int | None = None,
    seed: int = 0,
    combo_sep: str = "+",
    features=None,
) -> ad.AnnData:
    """Baseline prediction of every test perturbation of ``split`` (contract of ``predict``).

    ``features`` (linear_features only): a ``GeneFeatureTable``; None computes features from the data."""
    if kind not in BASELINE_KINDS:
        raise DataError(f"unknown baseline {kind!r}; use one of {', '.join(BASELINE_KINDS)}")
    genes = list(genes)
    gidx = gene_indices(adata, genes)
    pert, ctx, _ = obs_labels(adata)
    target, control = split.context, split.control
    perts = list(split.test.get(target, []))
    if not perts:
        raise DataError(f"the split has no test perturbation for context {target!r}")
    rows = control_rows(adata, target, control)
    n = int(n_cells) if n_cells is not None else len(rows)
    gather = RowGatherer(adata.X, gidx)
    ctrl_X = gather(rows)
    rng = np.random.default_rng(seed)

    if kind == "control":
        blocks = [gather(sample_rows(rows, n, rng)) for _ in perts]
    else:
        train_pairs = split.pairs("train") | split.pairs("val")
        train_mask = split.cell_mask(adata, "train") | split.cell_mask(adata, "val")
        keys = np.char.add(np.char.add(ctx.astype(str), "\x1f"), pert.astype(str))
        means = group_means(adata, train_mask, keys, gidx)
        ctrl_mean = {c: means[_key(c, control)] for c in set(ctx) if _key(c, control) in means}
        if target not in ctrl_mean:
            raise DataError(f"context {target!r} has no control cells in the data")

        def shift(c: str, p: str) -> np.ndarray:
            return means[_key(c, p)] - ctrl_mean[c]

        def pert_shift(p: str, *, allow_target: bool) -> np.ndarray | None:
            if allow_target and (target, p) in train_pairs and _key(target, p) in means:
                return shift(target, p)
            found = [
                shift(c, q)
                for c, q in train_pairs
                if q == p and c != target and c in ctrl_mean and _key(c, q) in means
            ]
            return np.mean(found, axis=0) if found else None

        vectors = []
        context_mean = None
        if kind == "context_mean":  # the same vector for every perturbation: computed once
            context_mean = _context_mean(adata, gidx, train_mask, train_pairs, ctrl_mean, target, control)
        if kind == "generic_response":
            context_mean = ctrl_mean[target] + _generic_shift(train_pairs, shift, ctrl_mean, target, control)
        if kind == "linear_features":
            ridge_shifts = _linear_shifts(adata, split, genes, perts, features, combo_sep)
        for j, p in enumerate(perts):
            if kind == "linear_features":
                vec = ctrl_mean[target] + ridge_shifts[j]
            elif kind in ("context_mean", "generic_response"):
                vec = context_mean
            elif kind == "cell_mean":
                vals = [means[_key(c, q)] for c, q in sorted(train_pairs) if _key(c, q) in means]
                if not vals:
                    raise DataError("no perturbed training cells for the cell_mean baseline")
                vec = np.mean(vals, axis=0)
            elif kind == "perturbation_mean":
                s = pert_shift(p, allow_target=False)
                if s is None:  # not trained elsewhere (e.g. a new combination): sum of its parts
                    s = _additive(p, combo_sep, pert_shift)
                vec = ctrl_mean[target] + s
            else:  # additive
                vec = ctrl_mean[target] + _additive(p, combo_sep, pert_shift)
            vectors.append(np.clip(vec, 0.0, None))
        blocks = [np.repeat(v[None, :].astype(np.float32), n, axis=0) for v in vectors]
    return make_prediction_adata(
        blocks,
        perts,
        ctrl_X,
        context=target,
        control=control,
        genes=genes,
        ctrl_names=adata.obs_names[rows].astype(str),
    )


def _generic_shift(train_pairs, shift, ctrl_mean, target: str, control: str) -> np.ndarray:
    """Mean shift over the training perturbations of ``target``; without any, the mean over the other
    contexts of their own mean shift."""

    def of(c: str) -> np.ndarray | None:
        vals = [shift(c, p) for cc, p in sorted(train_pairs) if cc == c and p != control]
        return np.mean(vals, axis=0) if vals else None

    own = of(target)
    if own is not None:
        return own
    others = [
        v
        for c in sorted({c for c, _ in train_pairs} - {target})
        if c in ctrl_mean
        for v in [of(c)]
        if v is not None
    ]
    if not others:
        raise DataError("no perturbed training cells for the generic_response baseline")
    return np.mean(others, axis=0)


def _linear_shifts(adata, split, genes, perts, features, combo_sep: str) -> np.ndarray:
    """``[len(perts), G]`` ridge-predicted shifts in the split's target context (fit on train + validation
    pairs, never test)."""
    from statecore.data.gene_features import perturbation_feature_table
    from statecore.data.sets import PerturbationVocab
    from statecore.training.priors import feature_ridge

    table = (
        features if features is not None else perturbation_feature_table("data", adata, control=split.control)
    )
    vocab = PerturbationVocab.from_feature_table(table, split.control, combo_sep)
    pairs: dict[str, list[str]] = {}
    for c, p in sorted(split.pairs("train") | split.pairs("val")):
        pairs.setdefault(c, []).append(p)
    contexts = sorted(pairs)
    ridge = feature_ridge(adata, genes=genes, vocab=vocab, train_pairs=pairs, contexts=contexts)
    return ridge.shift(vocab.encode(list(perts)), split.context)


def _context_mean(adata, gidx, train_mask, train_pairs, ctrl_mean, target: str, control: str) -> np.ndarray:
    """The target context's mean perturbed training cell; without any, its controls plus the other contexts'
    average perturbed-minus-control shift."""
    pert, ctx, _ = obs_labels(adata)
    one_key = np.zeros(len(ctx), dtype="<U1")
    if any(c == target for c, _ in train_pairs):
        return group_means(adata, train_mask & (ctx == target) & (pert != control), one_key, gidx)[""]
    shifts = [
        group_means(adata, train_mask & (ctx == c) & (pert != control), one_key, gidx)[""] - ctrl_mean[c]
        for c in sorted({c for c, _ in train_pairs if c != target and c in ctrl_mean})
    ]
    return ctrl_mean[target] + (np.mean(shifts, axis=0) if shifts else 0.0)


def _additive(p: str, sep: str, pert_shift) -> np.ndarray:
    parts = split_combo(p, sep)
    total = None
    for q in parts:
        s = pert_shift(q, allow_target=True)
        if s is None:
            raise DataError(
                f"perturbation {q!r} (part of {p!r}) has no training cells; the additive "
                "baseline needs every part measured"
            )
        total = s if total is None else total + s
    return total
