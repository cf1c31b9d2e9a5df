"""Perturbation-shift prior for ST: each single perturbation's mean expression change, from training cells.

With ``STConfig.shift_prior`` the model predicts ``x_ctrl + z @ shift + f(set)``: the multi-hot
perturbation vector ``z`` picks the average log-expression shift of each of its single perturbations
(mean over the training contexts that measured it, perturbed mean minus that context's control mean),
and the set transformer only has to learn the context-specific correction and the cells' spread.

Why: the energy distance between sets of a few dozen noisy cells in a thousand genes is dominated by
cell-to-cell noise, so a small per-perturbation mean shift moves it little and ST alone learns each
context's average response while ignoring which perturbation it is (measured on the synthetic S1 and
combination C1 benchmarks, docs/RESULTS.md). The shift table is computed once, from training pairs only
(never validation or test cells), and stored in the checkpoint as a buffer of the model.
A combination is the sum of its singles' shifts (the additive prior); a single never measured alone
gets no prior (zeros) and relies on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from statecore.data.sets import PerturbationVocab, RowGatherer, gene_indices, obs_labels


def _labels(adata, cells: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(perturbation, context) labels; cells outside ``cells`` (a boolean mask: the cells training draws
    from, ``statecore.data.mixscape.training_cells``) get a label no pair has, so no group mean counts them."""
    pert, ctx, _ = obs_labels(adata)
    if cells is not None:
        pert = np.where(np.asarray(cells, dtype=bool), pert, "\x00excluded")
    return pert, ctx


def _group_mean(gather: RowGatherer, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    total = None
    for i in range(0, len(rows), block):
        part = gather(rows[i : i + block]).astype(np.float64).sum(axis=0)
        total = part if total is None else total + part
    return total / max(len(rows), 1)


def _group_noise(gather: RowGatherer, rows: np.ndarray, mean: np.ndarray, block: int = 4096) -> float:
    """Sampling variance of the group's mean, summed over genes: sum_g var_g / n."""
    sq = None
    for i in range(0, len(rows), block):
        part = np.square(gather(rows[i : i + block]).astype(np.float64) - mean).sum(axis=0)
        sq = part if sq is None else sq + part
    n = len(rows)
    return float(sq.sum() / max(n - 1, 1) / max(n, 1)) if sq is not None else 0.0


def shrinkage_factor(shift: np.ndarray, noise: float) -> float:
    """Positive-part James-Stein factor max(0, 1 - noise / |shift|^2) of a measured mean shift whose
    sampling noise (summed over genes) is ``noise``: a shift no larger than its noise shrinks to zero,
    a strong one stays nearly as measured (Efron & Morris 1973)."""
    power = float(np.square(shift).sum())
    return max(0.0, 1.0 - noise / power) if power > 0 else 0.0


def shrinkage_factors(shifts: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """:func:`shrinkage_factor` of every row of ``shifts [K, G]`` with its ``noise [K]`` at once."""
    power = np.square(shifts).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(power > 0, np.maximum(0.0, 1.0 - noise / power), 0.0)


@dataclass(frozen=True)
class PairStats:
    """Every measured (context, perturbation) group of some pairs, from ONE pass over the group means: what
    the shift prior's tables, its shrinkage and the automatic choice among them (``prior_choice``) share.

    Rows are ordered by context, then label (byte-stable sums downstream)."""

    contexts: tuple[str, ...]  # [K] context of each pair
    labels: tuple[str, ...]  # [K] perturbation label of each pair
    shift: np.ndarray  # [K, G] float64: the group's mean minus its context's control mean
    noise: np.ndarray  # [K] float64: sampling variance of that shift (both group means), summed over genes
    n_cells: np.ndarray  # [K] int64
    ctrl_mean: dict[str, np.ndarray]  # context -> its control mean [G] (contexts with pairs)

    def take(self, rows: np.ndarray) -> PairStats:
        rows = np.asarray(rows, dtype=np.int64)
        return PairStats(
            tuple(self.contexts[i] for i in rows), tuple(self.labels[i] for i in rows), self.shift[rows],
            self.noise[rows], self.n_cells[rows], self.ctrl_mean,
        )  # fmt: skip


def pair_stats(
    adata,
    *,
    genes: Sequence[str],
    control: str,
    train_pairs: Mapping[str, Sequence[str]],
    keep: Callable[[str], bool] = lambda label: True,
    noise: bool = False,
    cells: np.ndarray | None = None,
) -> PairStats:
    """:class:`PairStats` of the perturbations listed in ``train_pairs`` (context -> labels; pass TRAINING
    pairs) that ``keep`` accepts and that have cells, in contexts with control cells. ``noise``: also each
    shift's sampling noise (a second pass over each group's cells; zeros otherwise); ``cells``: the
    perturbed cells a group mean may use (a mask; None: all)."""
    pert, ctx = _labels(adata, cells)
    gather = RowGatherer(adata.X, gene_indices(adata, genes))
    keys: list[tuple[str, str]] = []
    shifts, noises, counts, ctrl_means = [], [], [], {}
    for context in sorted(train_pairs):
        labels = sorted({str(p) for p in train_pairs[context] if str(p) != control and keep(str(p))})
        in_ctx = ctx == context
        ctrl_rows = np.flatnonzero(in_ctx & (pert == control))
        if not labels or len(ctrl_rows) == 0:
            continue
        ctrl_means[context] = ctrl_mean = _group_mean(gather, ctrl_rows)
        ctrl_noise = _group_noise(gather, ctrl_rows, ctrl_mean) if noise else 0.0
        for p in labels:
            rows = np.flatnonzero(in_ctx & (pert == p))
            if len(rows):
                mean = _group_mean(gather, rows)
                keys.append((context, p))
                shifts.append(mean - ctrl_mean)
                noises.append(_group_noise(gather, rows, mean) + ctrl_noise if noise else 0.0)
                counts.append(len(rows))
    return PairStats(
        tuple(c for c, _ in keys), tuple(p for _, p in keys),
        np.stack(shifts) if shifts else np.zeros((0, len(genes))), np.asarray(noises, dtype=np.float64),
        np.asarray(counts, dtype=np.int64), ctrl_means,
    )  # fmt: skip


def vocab_pair_stats(
    adata,
    *,
    genes: Sequence[str],
    vocab: PerturbationVocab,
    train_pairs: Mapping[str, Sequence[str]],
    noise: bool = False,
    combinations: bool = False,
    cells: np.ndarray | None = None,
) -> PairStats:
    """:func:`pair_stats` of the one-hot vocabulary's single perturbations (and, with ``combinations``, of
    combinations whose every part is in the vocabulary)."""
    if vocab.features is not None:
        raise ValueError("the shift prior needs the one-hot perturbation vocabulary, not feature vectors")
    names = set(vocab.names[1:])

    def keep(label: str) -> bool:
        parts = label.split(vocab.combo_sep)
        return label in names or (combinations and len(parts) > 1 and all(p in names for p in parts))

    return pair_stats(
        adata,
        genes=genes,
        control=vocab.control,
        train_pairs=train_pairs,
        keep=keep,
        noise=noise,
        cells=cells,
    )


def _pair_shifts(
    stats: PairStats, vocab: PerturbationVocab, shrink: bool = False
) -> dict[tuple[str, int], np.ndarray]:
    """(context, vocabulary index of a single) -> that single's shift in the context, float64, for the
    singles of ``stats``; ``shrink``: each shift times its :func:`shrinkage_factor` (``stats`` with noise)."""
    index = {name: i for i, name in enumerate(vocab.names)}
    factors = shrinkage_factors(stats.shift, stats.noise) if shrink else np.ones(len(stats.labels))
    return {
        (c, index[p]): stats.shift[k] * factors[k] if shrink else stats.shift[k]
        for k, (c, p) in enumerate(zip(stats.contexts, stats.labels))
        if p in index and p != vocab.control
    }


SHRINK_MODES = ("off", "zero", "context")  # STConfig.prior_shrink, besides "auto" (training.prior_choice)


def _average(pairs: Mapping[tuple[str, int], np.ndarray], n_names: int, n_genes: int) -> np.ndarray:
    sums = np.zeros((n_names, n_genes), dtype=np.float64)
    counts = np.zeros(n_names, dtype=np.int64)
    for (_, i), shift in sorted(pairs.items(), key=lambda kv: kv[0]):  # byte-stable sums
        sums[i] += shift
        counts[i] += 1
    seen = counts > 0
    sums[seen] /= counts[seen, None]
    return sums.astype(np.float32)


def _index_pairs(
    pairs: Mapping[tuple[str, int], np.ndarray], contexts: Sequence[str], n_names: int, n_genes: int
) -> tuple[np.ndarray, np.ndarray]:
    cpos = {c: i for i, c in enumerate(map(str, contexts))}
    pair_index = np.full((len(cpos), n_names), -1, dtype=np.int64)
    rows_out: list[np.ndarray] = []
    for (context, i), shift in sorted(pairs.items(), key=lambda kv: kv[0]):  # byte-stable row order
        if context in cpos:
            pair_index[cpos[context], i] = len(rows_out)
            rows_out.append(shift)
    pair_shift = np.stack(rows_out) if rows_out else np.zeros((0, n_genes))
    return pair_index, pair_shift.astype(np.float32)


def perturbation_shifts(
    adata, *, genes: Sequence[str], vocab: PerturbationVocab, train_pairs: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """``[len(vocab.names), len(genes)]`` float32: row 0 (control) zeros; row i the mean over training
    contexts of (mean of the single perturbation's cells - mean of that context's controls).

    ``train_pairs``: context -> training perturbations (``Split.train``); only single perturbations that
    are listed there contribute, so held-out cells never enter the prior.
    """
    stats = vocab_pair_stats(adata, genes=genes, vocab=vocab, train_pairs=train_pairs)
    return _average(_pair_shifts(stats, vocab), len(vocab.names), len(genes))


def context_pair_shifts(
    adata,
    *,
    genes: Sequence[str],
    vocab: PerturbationVocab,
    train_pairs: Mapping[str, Sequence[str]],
    contexts: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Each single perturbation's own shift in each context where training measured it.

    Returns ``pair_index`` ``[len(contexts), len(vocab.names)]`` int64 (row of ``pair_shift``, -1 where the
    context did not measure that single) and ``pair_shift`` ``[K, len(genes)]`` float32. The model uses a
    context's own shift where it exists and the all-context average of :func:`perturbation_shifts`
    elsewhere: the same gene can act differently in different contexts (CRISPRa in K562, CRISPRi in the
    glioma lines of the sample data), so averaging across contexts would blur a combination's prior.
    """
    stats = vocab_pair_stats(adata, genes=genes, vocab=vocab, train_pairs=train_pairs)
    return _index_pairs(_pair_shifts(stats, vocab), contexts, len(vocab.names), len(genes))


@dataclass(frozen=True)
class ShiftPrior:
    """The shift prior's tables, as the model's buffers hold them."""

    shift: np.ndarray  # [P, G] all-context average shift of each single (perturbation_shifts)
    pair_index: np.ndarray  # [C, P] row of pair_shift for (context, single), -1 where not measured
    pair_shift: np.ndarray  # [K, G] a context's own shift of a single
    trust: np.ndarray | None = None  # [P] shrinkage toward the context mean (context_shrinkage)
    generic: np.ndarray | None = None  # [C + 1, G] each context's mean perturbed shift; last row: unknown

    @property
    def n_pairs(self) -> int:
        return int(len(self.pair_shift))


def shift_prior_tables(
    adata,
    *,
    genes: Sequence[str],
    vocab: PerturbationVocab,
    train_pairs: Mapping[str, Sequence[str]],
    contexts: Sequence[str],
    shrink: bool = False,
    cells: np.ndarray | None = None,
) -> ShiftPrior:
    """:func:`perturbation_shifts` and :func:`context_pair_shifts` from one pass over the group means
    (``shrink``: every measured shift shrunk by its James-Stein factor, :func:`shrinkage_factor`; ``cells``:
    the perturbed cells the means may use, None: all)."""
    stats = vocab_pair_stats(
        adata, genes=genes, vocab=vocab, train_pairs=train_pairs, noise=shrink, cells=cells
    )
    return prior_tables(stats, vocab=vocab, contexts=contexts, shrink="zero" if shrink else "off")


def prior_tables(
    stats: PairStats, *, vocab: PerturbationVocab, contexts: Sequence[str], shrink: str = "off"
) -> ShiftPrior:
    """The shift prior's tables from measured pairs (``stats`` of the training pairs, with noise unless
    ``shrink`` is "off"): "zero" shrinks every measured shift by its James-Stein factor first; "context" adds
    :func:`context_shrinkage`'s trust and generic rows to the unshrunk tables."""
    if shrink not in SHRINK_MODES:
        raise ValueError(f"prior shrinkage must be one of {SHRINK_MODES}; got {shrink!r}")
    n_names, n_genes = len(vocab.names), stats.shift.shape[1]
    pairs = _pair_shifts(stats, vocab, shrink=shrink == "zero")
    pair_index, pair_shift = _index_pairs(pairs, contexts, n_names, n_genes)
    prior = ShiftPrior(_average(pairs, n_names, n_genes), pair_index, pair_shift)
    if shrink != "context":
        return prior
    trust, generic = _context_shrinkage(stats, vocab, contexts)
    return ShiftPrior(prior.shift, pair_index, pair_shift, trust, generic)


# --------------------------------------------------------------------------- unseen genes (issue 14)
# A gene no training context perturbed has no measured shift. Its prior comes from a ridge map from the
# perturbed gene's features to the measured mean shifts of the TRAINING perturbations (never validation or
# test ones, so validation scores stay those of unseen genes), as the linear baseline of Ahlmann-Eltze, Huber
# & Anders (Nat Methods 2025). The map's intercept is the context's mean training shift (generic response).

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 4, 15))
MIN_CONTEXT_FIT = 5  # fewer training singles in a context: its map borrows the pooled coefficients


def single_shifts(
    adata,
    *,
    genes: Sequence[str],
    control: str,
    train_pairs: Mapping[str, Sequence[str]],
    combo_sep: str = "+",
    cells: np.ndarray | None = None,
) -> tuple[list[tuple[str, str]], np.ndarray, dict[str, np.ndarray]]:
    """Measured mean shifts of the single perturbations listed in ``train_pairs`` (from ``cells`` only, a
    mask of the perturbed cells the means may use; None: all).

    Returns ``(keys [(context, gene)], shifts [K, G] float64, control means {context: [G]})``; only contexts
    with control cells and perturbations with cells count."""
    stats = pair_stats(
        adata, genes=genes, control=control, train_pairs=train_pairs, keep=lambda p: combo_sep not in p,
        cells=cells,
    )  # fmt: skip
    return list(zip(stats.contexts, stats.labels)), stats.shift, stats.ctrl_mean


def fit_ridge(F: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge from features ``F [n, d]`` to shifts ``Y [n, G]`` with an unpenalised intercept; the penalty is
    chosen by leave-one-out (generalised) cross-validation over :data:`RIDGE_ALPHAS` among the same training
    rows. Below 3 rows only the intercept (the mean shift) is fitted. Returns ``(coef [d, G], intercept [G],
    alpha)``."""
    from sklearn.linear_model import RidgeCV

    F, Y = np.asarray(F, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if len(F) < 3:
        return np.zeros((F.shape[1], Y.shape[1])), Y.mean(axis=0) if len(Y) else np.zeros(Y.shape[1]), np.inf
    model = RidgeCV(alphas=RIDGE_ALPHAS, fit_intercept=True).fit(F, Y)
    return (
        np.asarray(model.coef_).T.reshape(F.shape[1], Y.shape[1]),
        np.asarray(model.intercept_),
        float(model.alpha_),
    )


@dataclass(frozen=True)
class FeatureRidge:
    """Per training context (and pooled, last) a linear map from a perturbation's features to its mean shift.

    ``maps [C+1, d+1, G]``: rows ``0..d-1`` the coefficients, row ``d`` the intercept; a perturbation's input
    is its genes' summed features plus their count (``PerturbationVocab.from_feature_table`` rows), so a
    combination gets the sum of its genes' predicted shifts."""

    contexts: tuple[str, ...]
    maps: np.ndarray
    alphas: tuple[float, ...]  # chosen penalty per context map (inf: intercept only), pooled last
    n_fit: tuple[int, ...]  # training singles behind each map, pooled last
    fitted: tuple[tuple[str, str], ...]  # the (context, gene) pairs the maps were fitted on

    def shift(self, z: np.ndarray, context: str | None) -> np.ndarray:
        """``z [N, d+1]`` (features + count) -> predicted shifts ``[N, G]`` in ``context`` (None/unknown: pooled)."""
        i = self.contexts.index(context) if context in self.contexts else len(self.contexts)
        return np.asarray(z, dtype=np.float64) @ self.maps[i]


def feature_ridge(
    adata,
    *,
    genes: Sequence[str],
    vocab: PerturbationVocab,
    train_pairs: Mapping[str, Sequence[str]],
    contexts: Sequence[str],
    cells: np.ndarray | None = None,
) -> FeatureRidge:
    """Fit :class:`FeatureRidge` on the single perturbations of ``train_pairs`` (pass the split's TRAINING
    pairs only) that have gene features in ``vocab`` (a feature vocabulary); ``cells``: as
    :func:`single_shifts`."""
    if vocab.features is None:
        raise ValueError("the feature ridge needs a gene-feature perturbation vocabulary")
    keys, shifts, _ = single_shifts(
        adata, genes=genes, control=vocab.control, train_pairs=train_pairs, combo_sep=vocab.combo_sep,
        cells=cells,
    )  # fmt: skip
    idx = vocab._index()
    keep = [i for i, (_, p) in enumerate(keys) if p in idx]
    keys, shifts = [keys[i] for i in keep], shifts[keep]
    width = vocab.features.shape[1] - 1  # the last column is the count
    feats = np.stack([vocab.features[idx[p], :width] for _, p in keys]) if keys else np.zeros((0, width))
    coef, intercept, alpha = (
        fit_ridge(feats, shifts) if keys else (np.zeros((width, len(genes))), np.zeros(len(genes)), np.inf)
    )
    pooled = np.vstack([coef, intercept[None]])
    maps, alphas, n_fit = [], [], []
    for c in map(str, contexts):
        rows = [i for i, (kc, _) in enumerate(keys) if kc == c]
        if len(rows) >= MIN_CONTEXT_FIT:
            cc, ci, ca = fit_ridge(feats[rows], shifts[rows])
            maps.append(np.vstack([cc, ci[None]]))
        else:  # too few of its own: the pooled coefficients, its own mean shift where it has any
            ca = alpha
            maps.append(np.vstack([coef, (shifts[rows].mean(axis=0) if rows else intercept)[None]]))
        alphas.append(ca)
        n_fit.append(len(rows))
    maps.append(pooled)
    alphas.append(alpha)
    n_fit.append(len(keys))
    return FeatureRidge(
        tuple(map(str, contexts)), np.stack(maps).astype(np.float32), tuple(alphas), tuple(n_fit), tuple(keys)
    )


SELF_EFFECT_TYPES = ("none", "knockdown", "knockout", "activation")
DEFAULT_SELF_EFFECT = {"knockdown": -0.7, "knockout": -1.0, "activation": 1.0}


def self_effect(
    adata,
    *,
    genes: Sequence[str],
    control: str,
    train_pairs: Mapping[str, Sequence[str]],
    kind: str,
    combo_sep: str = "+",
    cells: np.ndarray | None = None,
) -> float:
    """How a perturbation moves its target's own expression (log1p), for ``kind``:

    knockout: -1 (relative: the target's mean falls to 0); knockdown: the median relative change of the
    target's own mean among training singles whose target is in the panel and expressed (mean >= 0.05),
    clipped to [-1, 0] (-0.7 when fewer than 3 such); activation: the median absolute increase, >= 0
    (1.0 when fewer than 3). ``none``: 0 (not applied)."""
    if kind not in SELF_EFFECT_TYPES:
        raise ValueError(f"perturbation type must be one of {SELF_EFFECT_TYPES}; got {kind!r}")
    if kind in ("none", "knockout"):
        return 0.0 if kind == "none" else -1.0
    keys, shifts, ctrl = single_shifts(
        adata, genes=genes, control=control, train_pairs=train_pairs, combo_sep=combo_sep, cells=cells
    )
    pos = {g: i for i, g in enumerate(genes)}
    rel, absolute = [], []
    for (c, p), s in zip(keys, shifts):
        if p in pos:
            absolute.append(float(s[pos[p]]))
            if ctrl[c][pos[p]] >= 0.05:
                rel.append(float(s[pos[p]] / ctrl[c][pos[p]]))
    if kind == "knockdown":
        return float(np.clip(np.median(rel), -1.0, 0.0)) if len(rel) >= 3 else DEFAULT_SELF_EFFECT[kind]
    return float(max(np.median(absolute), 0.0)) if len(absolute) >= 3 else DEFAULT_SELF_EFFECT[kind]


def context_shrinkage(
    adata,
    *,
    genes: Sequence[str],
    vocab: PerturbationVocab,
    train_pairs: Mapping[str, Sequence[str]],
    contexts: Sequence[str],
    cells: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """What shrinking each single's average shift toward its context's mean perturbed shift needs
    (``cells``: the perturbed cells the means may use, None: all).

    Returns ``trust [P]`` float32, the James-Stein factor (:func:`shrinkage_factor`) of each single's
    all-context average shift against that average's sampling noise (sum over its contexts of both group
    means' noise, over n²; 0 for the control and for singles never measured), and ``generic [C + 1, G]``
    float32, each context's mean shift over the singles training measured there (the context_mean
    baseline's change); contexts without any, and the last row (a context unknown to training), hold the
    mean of the measured rows. A single's prior is then ``trust * average + (1 - trust) * generic[c]``:
    a knockout whose measured effect is no larger than its noise predicts what perturbed cells of that
    context share (an empirical-Bayes estimate, Efron & Morris 1973), a strong one keeps its own shift.
    """
    stats = vocab_pair_stats(
        adata, genes=genes, vocab=vocab, train_pairs=train_pairs, noise=True, cells=cells
    )
    return _context_shrinkage(stats, vocab, contexts)


def single_sums(stats: PairStats, vocab: PerturbationVocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vocabulary name, over the contexts that measured it as a single: ``(sum of shifts [P, G], sum of
    noise [P], count [P])``, accumulated in the rows' (context, label) order."""
    index = {name: i for i, name in enumerate(vocab.names)}
    sums, noise = np.zeros((len(vocab.names), stats.shift.shape[1])), np.zeros(len(vocab.names))
    counts = np.zeros(len(vocab.names), dtype=np.int64)
    for k, p in enumerate(stats.labels):
        if p in index and p != vocab.control:
            sums[index[p]] += stats.shift[k]
            noise[index[p]] += stats.noise[k]
            counts[index[p]] += 1
    return sums, noise, counts


def context_sums(
    stats: PairStats, vocab: PerturbationVocab, contexts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per context (``contexts`` order): ``(sum of its singles' shifts [C, G], how many [C])``."""
    cpos, names = {c: i for i, c in enumerate(map(str, contexts))}, set(vocab.names[1:])
    sums = np.zeros((len(cpos), stats.shift.shape[1]))
    counts = np.zeros(len(cpos), dtype=np.int64)
    for k, (c, p) in enumerate(zip(stats.contexts, stats.labels)):
        if p in names and c in cpos:
            sums[cpos[c]] += stats.shift[k]
            counts[cpos[c]] += 1
    return sums, counts


def _context_shrinkage(
    stats: PairStats, vocab: PerturbationVocab, contexts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    sums, noise, counts = single_sums(stats, vocab)
    csum, ccount = context_sums(stats, vocab, contexts)
    generic = np.zeros((len(ccount) + 1, sums.shape[1]))
    measured = np.append(ccount > 0, False)
    generic[:-1][ccount > 0] = csum[ccount > 0] / ccount[ccount > 0, None]
    trust = np.zeros(len(vocab.names))
    for i in np.flatnonzero(counts):
        trust[i] = shrinkage_factor(sums[i] / counts[i], noise[i] / counts[i] ** 2)
    if measured.any():
        generic[~measured] = generic[measured].mean(axis=0)
    return trust.astype(np.float32), generic.astype(np.float32)
