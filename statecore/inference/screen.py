"""In-silico screen: predict every perturbation a run can express in one context and rank them.

Effect size is the E-distance between the predicted perturbed set and the context's real control
set, as scPerturb defines it (Peidli et al. 2024, ``scperturb.edist_to_control``):
``E = 2·δ(X, Y) − σ(X) − σ(Y)`` with ``δ`` the mean pairwise **squared** Euclidean distance
between the two sets and ``σ`` the mean pairwise squared distance within a set over distinct pairs
(scPerturb's default ``dist="sqeuclidean"``, ``sample_correct=True``: divide by N(N−1)). We compute
it on the model's genes (log1p), where scPerturb uses a PCA of the data; with squared distances
every mean pairwise term has a closed form in each set's mean vector and mean squared norm
(||x−y||² = ||x||² + ||y||² − 2x·y), so a set reduces to ``SetStats`` once, the control set's term is
computed once per context, and no [n, m] distance matrix is ever built. Because the distances are
squared, ``E = 2||x̄ − ȳ||² − 2·tr Σx/(N−1) − 2·tr Σy/(M−1)`` (Σ the biased covariances): the
squared shift of the means, corrected for the sampling noise of each mean.

No p-values: on generated cells they only grow with the number of cells generated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from statecore.data.io import split_combo
from statecore.data.sets import RowGatherer, gene_indices, obs_labels
from statecore.errors import DataError
from statecore.inference.predict import (
    control_rows,
    predict_shared,
    unseen_labels,
    unseen_note,
    validation_score,
)

ROW_BLOCK = 4096  # real cells gathered at a time when reducing a large group to its statistics


@dataclass(frozen=True)
class SetStats:
    """What the squared-distance E-distance needs from a set of cells ``X [n, G]``."""

    mean: np.ndarray  # [G] float64
    sq_norm: float  # mean over cells of ||x||²
    n: int

    @classmethod
    def of(cls, X: np.ndarray) -> SetStats:
        X = np.asarray(X, dtype=np.float64)
        return cls(mean=X.mean(axis=0), sq_norm=float(np.einsum("ij,ij->", X, X) / len(X)), n=len(X))

    @property
    def within(self) -> float:
        """σ: mean squared distance over the n(n−1) ordered pairs of distinct cells (0 for one cell)."""
        if self.n < 2:
            return 0.0
        spread = self.sq_norm - float(self.mean @ self.mean)  # tr Σ (biased): mean ||x − x̄||²
        return 2.0 * spread * self.n / (self.n - 1)


def cross_sq(a: SetStats, b: SetStats) -> float:
    """δ: mean squared Euclidean distance over all pairs (x in a, y in b)."""
    return a.sq_norm + b.sq_norm - 2.0 * float(a.mean @ b.mean)


def edistance(a: SetStats, b: SetStats) -> float:
    """scPerturb's E-distance (squared Euclidean, sample-corrected) between two sets."""
    return 2.0 * cross_sq(a, b) - a.within - b.within


def gathered_stats(gather: RowGatherer, rows: np.ndarray) -> SetStats:
    """``SetStats`` of real cells ``rows``, gathered ``ROW_BLOCK`` rows at a time (never all densified)."""
    total = np.zeros(len(gather.gene_idx) if gather.gene_idx is not None else gather.X.shape[1])
    sq = 0.0
    for i in range(0, len(rows), ROW_BLOCK):
        block = gather(rows[i : i + ROW_BLOCK]).astype(np.float64)  # [b, G]
        total += block.sum(axis=0)
        sq += float(np.einsum("ij,ij->", block, block))
    return SetStats(mean=total / len(rows), sq_norm=sq / len(rows), n=len(rows))


@dataclass(frozen=True)
class ScreenResult:
    """One screen: the ranked table and the pseudobulk change of every screened perturbation.

    ``table``: one row per perturbation, best effect first (columns in ``screen``'s docstring).
    ``delta [len(perturbations), len(genes)]``: predicted mean log1p minus the context's real control
    mean, rows in ``perturbations`` order (the table's order).
    """

    table: pd.DataFrame
    delta: np.ndarray
    perturbations: tuple[str, ...]
    genes: tuple[str, ...]
    context: str
    control: str
    control_edist: float  # the model's prediction for the control itself vs the real controls
    options: dict = field(default_factory=dict)

    def to_anndata(self) -> ad.AnnData:
        """Pseudobulk Δ per perturbation (X) with the table as obs: the h5ad download."""
        obs = self.table.set_index("perturbation").loc[list(self.perturbations)]
        obs.index = obs.index.astype(str)
        obs.columns = [str(c) for c in obs.columns]
        out = ad.AnnData(
            X=self.delta.astype(np.float32),
            obs=obs,
            var=pd.DataFrame(index=pd.Index(list(self.genes), dtype=str)),
        )
        out.uns["statecore_screen"] = {
            "context": self.context,
            "control": self.control,
            "control_edist": float(self.control_edist),
            "X": "predicted mean log1p expression minus the context's real control mean",
            **{k: v for k, v in self.options.items() if isinstance(v, str | int | float)},
        }
        return out


def _choose(what: str, asked: Sequence[str], valid: Sequence[str], ok: Callable[[str], bool]) -> list[str]:
    bad = [a for a in asked if not ok(a)]
    if bad:
        more = " ..." if len(valid) > 20 else ""
        raise DataError(f"unknown {what} {bad[:5]}; valid {what}s include: {list(valid)[:20]}{more}")
    return list(dict.fromkeys(asked))


def all_singles(run) -> list[str]:
    """What ``perturbations="all"`` screens: every single of a one-hot run; for a gene-feature run the genes of
    its split (trained, validation, held out), not the whole feature table (any other gene of the table can
    still be asked for by name)."""
    split, vocab = run.split, run.vocab
    if split is None or vocab.features is None:
        return [n for n in vocab.names if n != vocab.control]
    pairs = split.pairs("train") | split.pairs("val") | split.pairs("test")
    return sorted({p for _, p in pairs if vocab.can_encode(p) and len(vocab.parts(p)) == 1})


def screen_labels(run, perturbations, pairs_of) -> tuple[list[str], list[str]]:
    """(singles and asked labels, pair labels) to screen; DataError naming any the run cannot encode."""
    vocab = run.vocab
    known = [n for n in vocab.names if n != vocab.control]
    if isinstance(perturbations, str):
        if perturbations != "all":
            raise DataError(f"perturbations must be 'all' or a list of labels; got {perturbations!r}")
        labels = all_singles(run)
    else:
        labels = _choose("perturbation", list(perturbations or []), known, vocab.can_encode)
    singles = _choose("perturbation", list(pairs_of or []), known, lambda p: p in set(known))
    if pairs_of is not None and len(singles) < 2:
        raise DataError("pairs_of needs at least two single perturbations")
    pairs = [f"{a}{vocab.combo_sep}{b}" for a, b in itertools.combinations(singles, 2)]
    labels += [s for s in singles if s not in labels]
    labels = [lab for lab in labels if lab not in set(pairs)]
    if not labels and not pairs:
        raise DataError("nothing to screen: give perturbations or pairs_of")
    return labels, pairs


def screen(
    run,
    adata,
    *,
    context: str,
    perturbations: str | Sequence[str] = "all",
    pairs_of: Sequence[str] | None = None,
    genes: Sequence[str] = (),
    n_cells: int = 128,
    seed: int = 0,
    threshold: float = 0.25,
    chunk: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> ScreenResult:
    """Predict and rank every perturbation (``"all"``: every single the run knows) in ``context``.

    Table columns: ``rank`` (by predicted E-distance), ``perturbation``, ``kind`` (single | pair),
    ``edist`` (predicted vs the context's real controls), ``n_up`` / ``n_down`` (genes whose
    predicted mean log1p change exceeds ``threshold`` up / down), ``non_additivity`` (pairs:
    ||Δ_AB − (Δ_A + Δ_B)||, NaN for singles) and ``interaction_rank`` (pairs, 1 = most non-additive),
    ``source`` ("measured" where the data hold real cells of that perturbation in ``context``, else
    "predicted"), ``n_measured_cells``, ``measured_edist`` (real cells vs controls; NaN when not
    measured), and per user gene g: ``delta:g`` (predicted change) and ``rank_lower:g`` (1 = the
    perturbation that lowers g the most). ``progress(done, total)`` is called after each chunk.
    """
    singles, pairs = screen_labels(run, perturbations, pairs_of)
    genes = _choose("gene", list(genes), run.genes, set(run.genes).__contains__)
    control = run.vocab.control
    ctrl_rows = control_rows(adata, context, control)  # DataError listing contexts with controls
    gather = RowGatherer(adata.X, gene_indices(adata, run.genes))
    ctrl = gathered_stats(gather, ctrl_rows)  # the control term, once per context
    labels = [*singles, *pairs, control]  # the control last: the model's own floor
    edist = np.empty(len(labels))
    delta = np.empty((len(labels), len(run.genes)), dtype=np.float32)
    done = 0
    for part, cells in predict_shared(
        run, adata, context=context, labels=labels, n_cells=n_cells, seed=seed, chunk=chunk
    ):
        for j, block in enumerate(cells):  # block [n_cells, G]; the chunk is dropped after this loop
            stats = SetStats.of(block)
            edist[done + j] = edistance(stats, ctrl)
            delta[done + j] = stats.mean - ctrl.mean
        done += len(part)
        if progress is not None:
            progress(done, len(labels))
    labels, control_edist = labels[:-1], float(edist[-1])
    table = pd.DataFrame(
        {
            "perturbation": labels,
            "kind": ["pair" if len(run.vocab.parts(lab)) > 1 else "single" for lab in labels],
            "edist": edist[:-1],
            "n_up": (delta[:-1] > threshold).sum(axis=1),
            "n_down": (delta[:-1] < -threshold).sum(axis=1),
            "non_additivity": _non_additivity(labels, delta[:-1], run.vocab.combo_sep),
        }
    )
    if (
        run.vocab.features is not None
    ):  # gene-feature runs: which rows are genes no training context perturbed
        table["unseen_gene"] = np.isin(labels, unseen_labels(run, labels))
    table = _add_measured(table, adata, gather, context=context, sep=run.vocab.combo_sep, ctrl=ctrl)
    table = _add_genes(table, delta[:-1], genes, run.genes)
    order = np.argsort(-table["edist"].to_numpy(), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    options = dict(n_cells=n_cells, seed=seed, threshold=threshold, run_dir=str(run.run_dir))
    if "unseen_gene" in table.columns:
        score = validation_score(run.run_dir)
        options["unseen_note"] = unseen_note(int(table["unseen_gene"].sum()), score)
        options["validation_pearson_delta"] = float("nan") if score is None else score
    return ScreenResult(
        table=table,
        delta=delta[:-1][order],
        perturbations=tuple(table["perturbation"]),
        genes=tuple(run.genes),
        context=str(context),
        control=control,
        control_edist=control_edist,
        options=options,
    )


def _non_additivity(labels: list[str], delta: np.ndarray, sep: str) -> np.ndarray:
    """||Δ_AB − (Δ_A + Δ_B)|| for each pair label whose singles were screened; NaN otherwise."""
    pos = {lab: i for i, lab in enumerate(labels)}
    out = np.full(len(labels), np.nan)
    for i, lab in enumerate(labels):
        parts = split_combo(lab, sep)
        if len(parts) > 1 and all(p in pos for p in parts):
            expected = sum(delta[pos[p]].astype(np.float64) for p in parts)
            out[i] = float(np.linalg.norm(delta[i] - expected))
    return out


def _canonical(label: str, sep: str) -> str:
    return sep.join(sorted(split_combo(label, sep))) if sep else str(label)


def _add_measured(table: pd.DataFrame, adata, gather, *, context: str, sep: str, ctrl: SetStats):
    """Columns saying which hits are measurements: real cells of the perturbation in ``context``."""
    pert, ctx, _ = obs_labels(adata)
    in_ctx = np.flatnonzero(ctx == str(context))
    canon = np.array([_canonical(p, sep) for p in pert[in_ctx]], dtype=object)  # "B+A" is "A+B"
    groups = pd.Series(in_ctx).groupby(canon).apply(np.asarray).to_dict()
    n_real, real_e = [], []
    for lab in table["perturbation"]:
        rows = groups.get(_canonical(lab, sep))
        n_real.append(0 if rows is None else len(rows))
        real_e.append(
            np.nan if rows is None or len(rows) < 2 else edistance(gathered_stats(gather, rows), ctrl)
        )
    out = table.copy()
    out["source"] = np.where(np.asarray(n_real) > 0, "measured", "predicted")
    out["n_measured_cells"] = n_real
    out["measured_edist"] = real_e
    pairs = out["non_additivity"].notna().to_numpy()
    out["interaction_rank"] = np.nan
    out.loc[pairs, "interaction_rank"] = out.loc[pairs, "non_additivity"].rank(ascending=False, method="min")
    return out


def _add_genes(table: pd.DataFrame, delta: np.ndarray, genes: list[str], run_genes: list[str]):
    out = table.copy()
    pos = {g: i for i, g in enumerate(run_genes)}
    for g in genes:
        change = delta[:, pos[g]].astype(np.float64)
        out[f"delta:{g}"] = change
        out[f"rank_lower:{g}"] = pd.Series(change).rank(method="min").astype(int).to_numpy()
    return out


# --------------------------------------------------------------------------- is the ranking right?


@dataclass(frozen=True)
class RankingCheck:
    """Predicted vs real effect ranking on a run's held-out test perturbations.

    ``summary``: one row per method (model, perturbation_mean baseline, split_half ceiling) with
    ``spearman`` (ρ between its E-distances and the real ones; for split_half, between the two
    halves) and ``precision_at_k`` (shared members of the two top-k lists / k).
    ``per_perturbation``: the E-distances behind it.
    """

    context: str
    n: int
    k: int
    summary: pd.DataFrame
    per_perturbation: pd.DataFrame
    baseline: str = (
        "perturbation_mean"  # linear_features on an unseen-genes run (nothing measured to average)
    )

    def sentence(self) -> str:
        row = self.summary.set_index("method")
        model, base, half = (row.loc[m] for m in ("model", self.baseline, "split_half"))
        return (
            f"On the {self.n} held-out perturbations of {self.context}, this model ranked effects with "
            f"ρ = {model.spearman:.2f} (top-{self.k} precision {model.precision_at_k:.2f}); the "
            f"{self.baseline.replace('_', '-')} baseline ρ = {base.spearman:.2f} ({base.precision_at_k:.2f}); two random "
            f"halves of the real cells agree with ρ = {half.spearman:.2f} ({half.precision_at_k:.2f})."
        )


def rank_agreement(score: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """(Spearman ρ, precision of the top k) of ``score`` against ``truth`` (larger = stronger)."""
    rho = float(spearmanr(score, truth).statistic)
    top = set(np.argsort(-np.asarray(score), kind="stable")[:k])
    return rho, len(top & set(np.argsort(-np.asarray(truth), kind="stable")[:k])) / k


def screen_ranking_check(
    run, adata, *, n_cells: int = 128, seed: int = 0, k: int | None = None, chunk: int = 32
) -> RankingCheck:
    """Spearman ρ and top-k precision of the screen's effect ranking on the run's test split, beside
    the perturbation-mean baseline and the data's split-half ceiling."""
    from statecore.inference.baselines import predict_baseline

    split = run.split
    if split is None:
        raise DataError(f"run {str(run.run_dir)!r} has no split.json: nothing held out to check against")
    context, control = split.context, split.control
    pert, ctx, _ = obs_labels(adata)
    in_ctx = ctx == str(context)
    tests = [  # held-out perturbations the model can encode, with enough real cells to halve
        p
        for p in split.test.get(context, [])
        if run.vocab.can_encode(p) and ((pert == p) & in_ctx).sum() >= 4
    ]
    if len(tests) < 3:
        raise DataError(
            f"the split holds {len(tests)} test perturbation(s) with cells in {context!r}; need 3"
        )
    k = max(1, min(len(tests) - 1, k or max(3, len(tests) // 5)))
    gather = RowGatherer(adata.X, gene_indices(adata, run.genes))
    ctrl_rows = control_rows(adata, context, control)
    ctrl = gathered_stats(gather, ctrl_rows)
    real = [edistance(gathered_stats(gather, np.flatnonzero((pert == p) & in_ctx)), ctrl) for p in tests]
    model = screen(run, adata, context=context, perturbations=tests, n_cells=n_cells, seed=seed, chunk=chunk)
    model_e = model.table.set_index("perturbation").loc[tests, "edist"].to_numpy()
    kind = "linear_features" if split.task == "unseen" else "perturbation_mean"
    base = predict_baseline(
        adata, split, kind, genes=run.genes, n_cells=n_cells, seed=seed, features=run.vocab.feature_table(),
        combo_sep=run.vocab.combo_sep,
    )  # fmt: skip
    base_labels = base.obs["perturbation"].astype(str).to_numpy()
    base_e = [edistance(SetStats.of(base.X[base_labels == p]), ctrl) for p in tests]
    half_a, half_b = _split_half(gather, pert, in_ctx, tests, ctrl_rows, np.random.default_rng(seed))
    frame = pd.DataFrame(
        {
            "perturbation": tests,
            "real": real,
            "model": model_e,
            kind: base_e,
            "half_a": half_a,
            "half_b": half_b,
        }
    )
    rows = []
    for method, score, truth in (
        ("model", model_e, real),
        (kind, base_e, real),
        ("split_half", half_a, half_b),
    ):
        rho, prec = rank_agreement(np.asarray(score), np.asarray(truth), k)
        rows.append({"method": method, "spearman": rho, "precision_at_k": prec, "k": k})
    return RankingCheck(
        context=str(context),
        n=len(tests),
        k=k,
        summary=pd.DataFrame(rows),
        per_perturbation=frame,
        baseline=kind,
    )


def _split_half(gather, pert, in_ctx, tests, ctrl_rows, rng) -> tuple[list[float], list[float]]:
    """E-distances of two random halves of each perturbation's real cells, each against its own half
    of the controls: how well the data agree with themselves."""
    ctrl_perm = rng.permutation(ctrl_rows)
    ctrl_a = gathered_stats(gather, ctrl_perm[: len(ctrl_perm) // 2])
    ctrl_b = gathered_stats(gather, ctrl_perm[len(ctrl_perm) // 2 :])
    a, b = [], []
    for p in tests:
        rows = rng.permutation(np.flatnonzero((pert == p) & in_ctx))
        a.append(edistance(gathered_stats(gather, rows[: len(rows) // 2]), ctrl_a))
        b.append(edistance(gathered_stats(gather, rows[len(rows) // 2 :]), ctrl_b))
    return a, b
