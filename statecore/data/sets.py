"""Cell sets and control pairing for set-to-set training, on row indices (never dense copies).

Cells are grouped by (context, perturbation, batch). Each group is cut into sets of ``S`` cells
(the last one padded by sampling with replacement) and every set is paired with ``S`` control cells
from the same context and, when that batch has controls, the same batch. Control groups are targets
too (perturbation = the control label), so the model learns the identity on controls.

The plan of an epoch is a pure function of ``(seed, epoch)``, so the batch at any step can be
rebuilt from the step number alone: resuming a run needs no sampler state beyond its step. Rows are
gathered only when a batch is built, from sparse CSR or dense ``X``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from statecore.data.io import obs_labels, split_combo  # noqa: F401  (obs_labels re-exported: sets.obs_labels is used across the package)
from statecore.errors import DataError

# --------------------------------------------------------------------------- perturbation encoding


@dataclass(frozen=True)
class PerturbationVocab:
    """Encodes perturbation labels as vectors.

    One-hot (``features`` None): index 0 is the control, then every single perturbation; a
    combination ``"A+B"`` is the multi-hot sum of its parts, so an unmeasured combination of measured
    singles can be predicted. With ``features`` (``[len(names), F]``, control row zeros) a label is
    the sum of its parts' feature rows, so a perturbation never trained on can be predicted.
    """

    control: str
    names: tuple[str, ...]
    combo_sep: str = "+"
    features: np.ndarray | None = field(default=None, compare=False)
    # Gene-feature vocabularies (issue 14, :meth:`from_feature_table`): the position of each name's gene in
    # the model's gene panel (-1: not measured), encoded as ``n_panel`` extra one-hot columns after the
    # features, so the model can move a perturbed gene's own expression; ``source`` names the feature table.
    self_index: np.ndarray | None = field(default=None, compare=False)
    n_panel: int = 0
    source: str = ""

    @classmethod
    def from_feature_table(
        cls, table, control: str, combo_sep: str = "+", panel: Sequence[str] = ()
    ) -> PerturbationVocab:
        """Every gene of ``table`` (a :class:`statecore.data.gene_features.GeneFeatureTable`) is a name; its
        row is the gene's features plus a constant 1 (a combination's sum then counts its genes); ``panel``
        (the model's genes) sets :attr:`self_index`."""
        names = (control, *[g for g in table.genes if g != control])
        mat = np.zeros((len(names), table.dim + 1), dtype=np.float32)
        mat[1:, :-1] = table.rows(names[1:])
        mat[1:, -1] = 1.0
        pos = {str(g): i for i, g in enumerate(panel)}
        self_index = np.asarray([pos.get(n, -1) for n in names], dtype=np.int64)
        self_index[0] = -1
        return cls(
            control=control, names=names, combo_sep=combo_sep, features=mat, self_index=self_index,
            n_panel=len(pos), source=table.source,
        )  # fmt: skip

    @classmethod
    def from_labels(
        cls,
        labels: Sequence[str],
        control: str,
        combo_sep: str = "+",
        features: Mapping[str, Sequence[float]] | pd.DataFrame | None = None,
    ) -> PerturbationVocab:
        singles = set()
        for label in set(map(str, labels)):
            if label != control:
                singles.update(split_combo(label, combo_sep))
        if features is None:
            return cls(control=control, names=(control, *sorted(singles)), combo_sep=combo_sep)
        table = (
            {str(k): np.asarray(v, dtype=np.float32) for k, v in features.iterrows()}
            if isinstance(features, pd.DataFrame)
            else {str(k): np.asarray(v, dtype=np.float32) for k, v in features.items()}
        )
        lacking = sorted(singles - set(table))
        if lacking:
            raise DataError(
                f"perturbation features lack {lacking[:10]}; give a feature row for every "
                "training perturbation"
            )
        names = (control, *sorted(set(table) - {control}))
        width = {v.shape for v in table.values()}
        if len(width) != 1:
            raise DataError(f"perturbation feature rows have different shapes: {sorted(width)}")
        mat = np.zeros((len(names), next(iter(width))[0]), dtype=np.float32)
        for i, name in enumerate(names[1:], start=1):
            mat[i] = table[name]
        return cls(control=control, names=names, combo_sep=combo_sep, features=mat)

    def feature_table(self):
        """The gene feature table behind a :meth:`from_feature_table` vocabulary (None for one-hot)."""
        if self.features is None or not self.source:
            return None
        from statecore.data.gene_features import GeneFeatureTable

        return GeneFeatureTable(tuple(self.names[1:]), self.features[1:, :-1], self.source)

    @property
    def dim(self) -> int:
        return len(self.names) if self.features is None else int(self.features.shape[1]) + self.n_panel

    def _unknown_message(self, label: str, unknown: list[str]) -> str:
        if self.source:
            from statecore.data.gene_features import GeneFeatureTable, missing_features_message

            genes = tuple(n for n in self.names if n != self.control)
            table = GeneFeatureTable(genes, np.zeros((len(genes), 0), np.float32), self.source)
            return f"perturbation {label!r}: " + missing_features_message(unknown, table)
        known = [n for n in self.names if n != self.control]
        return (
            f"perturbation {label!r} is unknown to the model (no {unknown}); known "
            f"perturbations: {known[:15]}{' ...' if len(known) > 15 else ''}"
        )

    def _index(self) -> dict[str, int]:
        cache = self.__dict__.get("_idx")
        if cache is None:
            cache = {n: i for i, n in enumerate(self.names)}
            object.__setattr__(self, "_idx", cache)
        return cache

    def parts(self, label: str) -> list[str]:
        label = str(label)
        return [self.control] if label == self.control else split_combo(label, self.combo_sep)

    def can_encode(self, label: str) -> bool:
        idx = self._index()
        return all(p in idx for p in self.parts(label))

    def encode(self, labels: Sequence[str]) -> np.ndarray:
        """``[len(labels), dim]`` float32; DataError naming the first unknown label."""
        idx = self._index()
        out = np.zeros((len(labels), self.dim), dtype=np.float32)
        for row, label in enumerate(labels):
            parts = self.parts(label)
            unknown = [p for p in parts if p not in idx]
            if unknown:
                raise DataError(self._unknown_message(label, unknown))
            for p in parts:
                if self.features is None:
                    out[row, idx[p]] = 1.0
                    continue
                out[row, : self.features.shape[1]] += self.features[idx[p]]
                if self.n_panel and p != self.control and self.self_index[idx[p]] >= 0:
                    out[row, self.features.shape[1] + self.self_index[idx[p]]] = 1.0
        return out


def select_genes(adata, use_hvg: bool = True) -> list[str]:
    """``var["highly_variable"]`` genes (all genes when the column is absent or ``use_hvg`` is False)."""
    if use_hvg and "highly_variable" in adata.var.columns:
        mask = adata.var["highly_variable"].to_numpy().astype(bool)
        if not mask.any():
            raise DataError("var['highly_variable'] selects no gene; re-run prepare or pass use_hvg=False")
        return adata.var_names[mask].astype(str).tolist()
    return adata.var_names.astype(str).tolist()


def gene_indices(adata, genes: Sequence[str]) -> np.ndarray:
    pos = pd.Index(adata.var_names.astype(str)).get_indexer(list(genes))
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos) if p < 0]
        raise DataError(
            f"{len(missing)} model gene(s) missing from the data (e.g. {missing[:5]}); use data "
            "prepared like the training data (same gene names)"
        )
    return pos


class RowGatherer:
    """Gathers ``X[rows][:, genes]`` as float32 for a few rows at a time.

    ``X`` may be CSR/CSC/dense in memory or on disk (anndata ``backed="r"``: an h5py dataset or a
    backed CSR dataset). Sparse rows are densified only after the gather, so memory per batch is
    O(rows x genes) whatever the size of ``X``. On-disk reads need unique rows in increasing order
    (h5py fancy indexing, and sequential disk access), so those gathers are sorted and de-duplicated
    first and put back in the asked order afterwards.
    """

    def __init__(self, X, gene_idx: np.ndarray | None = None) -> None:
        if sp.issparse(X) and not sp.isspmatrix_csr(X) and not isinstance(X, sp.csr_array):
            X = sp.csr_matrix(X)  # row gathers need CSR; converting keeps it sparse
        self.X = X
        self.backed = not (sp.issparse(X) or isinstance(X, np.ndarray))
        n_genes = X.shape[1]
        if gene_idx is not None and np.array_equal(gene_idx, np.arange(n_genes)):
            gene_idx = None  # all genes in order: skip the column gather
        self.gene_idx = gene_idx

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        flat = np.asarray(rows, dtype=np.int64).ravel()
        if self.backed:
            uniq, inverse = np.unique(flat, return_inverse=True)
            block = self._take(uniq)[inverse]
        else:
            block = self._take(flat)
        return block.reshape(*np.shape(rows), -1)

    def _take(self, flat: np.ndarray) -> np.ndarray:
        block = self.X[flat]
        if self.gene_idx is not None:
            block = block[:, self.gene_idx]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        return block.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- grouping and pairing


@dataclass(frozen=True)
class Group:
    context: str
    perturbation: str
    batch: str
    cells: np.ndarray  # row indices of the group's cells
    controls: np.ndarray  # row indices of the control pool it is paired with


def build_groups(
    adata,
    *,
    control: str,
    pairs: set[tuple[str, str]] | None = None,
    include_controls: bool = True,
    contexts: Sequence[str] | None = None,
    cells: np.ndarray | None = None,
) -> list[Group]:
    """Groups of cells by (context, perturbation, batch), each with its control pool.

    ``pairs``: the (context, perturbation) pairs to keep (None: all perturbed cells);
    ``include_controls``: add control groups (identity targets) of ``contexts`` (None: every context);
    ``cells``: a boolean mask of the perturbed cells a group may hold (None: all; controls always stay),
    e.g. those a perturbed-cell classifier called perturbed (``statecore.data.mixscape.training_cells``).
    """
    pert, ctx, batch = obs_labels(adata)
    df = pd.DataFrame({"c": ctx, "p": pert, "b": batch})
    table = df.groupby(["c", "p", "b"], sort=True).indices
    ctrl_by_cb: dict[tuple[str, str], np.ndarray] = {}
    ctrl_by_c: dict[str, list[np.ndarray]] = {}
    for (c, p, b), rows in table.items():
        if p == control:
            ctrl_by_cb[(c, b)] = np.asarray(rows, dtype=np.int64)
            ctrl_by_c.setdefault(c, []).append(np.asarray(rows, dtype=np.int64))
    pool_c = {c: np.sort(np.concatenate(v)) for c, v in ctrl_by_c.items()}
    groups = []
    wanted_ctx = None if contexts is None else set(map(str, contexts))
    for (c, p, b), rows in table.items():
        if p == control:
            if not include_controls or (wanted_ctx is not None and c not in wanted_ctx):
                continue
        elif pairs is not None and (c, p) not in pairs:
            continue
        elif cells is not None:
            rows = rows[np.asarray(cells, dtype=bool)[rows]]
            if len(rows) == 0:
                continue
        pool = ctrl_by_cb.get((c, b))
        if pool is None:
            pool = pool_c.get(c)
        if pool is None:
            raise DataError(
                f"context {c!r} has perturbed cells ({p!r}) but no control cells ({control!r}); "
                "drop the context or fix the control label"
            )
        groups.append(Group(c, p, b, np.asarray(rows, dtype=np.int64), pool))
    return groups


def _take(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows from ``pool``: without replacement when it is big enough, else with."""
    if len(pool) >= n:
        return pool[rng.choice(len(pool), size=n, replace=False)]
    return pool[rng.integers(0, len(pool), size=n)]


def plan_epoch(
    groups: Sequence[Group], set_size: int, rng: np.random.Generator, shuffle: bool = True
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Every group cut into sets of ``set_size``: ``(group id, target rows [S], control rows [S])``."""
    sets = []
    for gi, g in enumerate(groups):
        cells = rng.permutation(g.cells) if shuffle else g.cells
        n_sets = -(-len(cells) // set_size)
        for k in range(n_sets):
            chunk = cells[k * set_size : (k + 1) * set_size]
            if len(chunk) < set_size:  # pad the last set by resampling the group's own cells
                chunk = np.concatenate([chunk, g.cells[rng.integers(0, len(g.cells), set_size - len(chunk))]])
            sets.append((gi, chunk, _take(rng, g.controls, set_size)))
    if shuffle:
        sets = [sets[i] for i in rng.permutation(len(sets))]
    return sets


@dataclass
class SetBatch:
    x_ctrl: torch.Tensor  # [B, S, G]
    z_pert: torch.Tensor  # [B, P]
    x_target: torch.Tensor  # [B, S, G]
    batch_idx: torch.Tensor  # [B, S] long, batch of each control cell (-1 unknown)
    groups: list[int]

    def to(self, device) -> SetBatch:
        return SetBatch(
            self.x_ctrl.to(device),
            self.z_pert.to(device),
            self.x_target.to(device),
            self.batch_idx.to(device),
            self.groups,
        )

    @property
    def n_cells(self) -> int:
        return int(self.x_target.shape[0] * self.x_target.shape[1])


class SetDataset(torch.utils.data.Dataset):
    """Sets of one epoch as a torch Dataset (item i = one set pair), plus step-addressed batches.

    ``batch(step)`` returns sets ``[step*B, (step+1)*B)`` of the endless sequence epoch 0, epoch 1, ...,
    each epoch planned from ``(seed, epoch)``: the same step always gives the same batch.
    """

    def __init__(
        self,
        adata,
        groups: list[Group],
        *,
        genes: Sequence[str],
        vocab: PerturbationVocab,
        batches: Sequence[str] = (),
        set_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not groups:
            raise DataError(
                "no cell groups to train on: the split leaves no (context, perturbation) pair with cells"
            )
        self.groups = groups
        self.set_size = int(set_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.vocab = vocab
        self.genes = list(genes)
        self.gather = RowGatherer(adata.X, gene_indices(adata, self.genes))
        self._z = torch.from_numpy(vocab.encode([g.perturbation for g in groups]))  # [n_groups, P]
        _, _, batch_labels = obs_labels(adata)
        bmap = {b: i for i, b in enumerate(batches)}
        self._cell_batch = np.asarray([bmap.get(b, -1) for b in batch_labels], dtype=np.int64)
        self._plans: dict[int, list] = {}
        self.epoch = 0
        self.n_sets = len(self.plan(0))

    def context_index(self, gids: Sequence[int], contexts: Sequence[str]) -> torch.Tensor:
        """Long ``[len(gids)]``: position in ``contexts`` of each group's context (-1 if absent)."""
        key = tuple(map(str, contexts))
        if getattr(self, "_ctx_key", None) != key:  # per-group indices once, not at every training step
            pos = {c: i for i, c in enumerate(key)}
            self._ctx_key = key
            self._ctx_idx = torch.tensor([pos.get(str(g.context), -1) for g in self.groups], dtype=torch.long)
        return self._ctx_idx[torch.as_tensor(list(gids), dtype=torch.long)]

    def plan(self, epoch: int) -> list:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            rng = np.random.default_rng([self.seed, epoch])
            self._plans[epoch] = plan_epoch(self.groups, self.set_size, rng, shuffle=self.shuffle)
        return self._plans[epoch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_sets

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self._collate([self.plan(self.epoch)[i]])
        return {
            "x_ctrl": b.x_ctrl[0],
            "z_pert": b.z_pert[0],
            "x_target": b.x_target[0],
            "batch_idx": b.batch_idx[0],
        }

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> SetBatch:
        """The sets of global batch ``step`` (``batch_size`` sets over all ranks) that ``rank`` trains on.

        Rank r takes the r-th contiguous slice of ``batch_size // world_size`` sets, so the ranks'
        streams are disjoint and together are exactly the single-process batch of the same step.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if batch_size % world_size:
            raise DataError(
                f"batch size {batch_size} (sets per step, all ranks together) must be a multiple "
                f"of the number of processes ({world_size})"
            )
        per_rank = batch_size // world_size
        start = step * batch_size + rank * per_rank
        items = []
        for k in range(start, start + per_rank):
            epoch, off = divmod(k, self.n_sets)
            items.append(self.plan(epoch)[off])
        return self._collate(items)

    def iter_epoch(self, batch_size: int, epoch: int = 0, max_sets: int | None = None) -> Iterator[SetBatch]:
        plan = self.plan(epoch)[: max_sets or None]
        for i in range(0, len(plan), batch_size):
            yield self._collate(plan[i : i + batch_size])

    def _collate(self, items) -> SetBatch:
        gids = [gi for gi, _, _ in items]
        target_rows = np.stack([t for _, t, _ in items])  # [B, S]
        ctrl_rows = np.stack([c for _, _, c in items])  # [B, S]
        both = self.gather(np.concatenate([ctrl_rows, target_rows]))  # one gather: [2B, S, G]
        n = len(items)
        return SetBatch(
            x_ctrl=torch.from_numpy(both[:n]),
            z_pert=self._z[gids],
            x_target=torch.from_numpy(both[n:]),
            batch_idx=torch.from_numpy(self._cell_batch[ctrl_rows]),
            groups=gids,
        )


# --------------------------------------------------------------------------- walkthrough helper


@dataclass
class SetTensors:
    """One epoch of set pairs as dense tensors (small data only); unpacks as (X_ctrl, Z_pert, X_pert)."""

    X_ctrl: torch.Tensor  # [N, S, G]
    Z_pert: torch.Tensor  # [N, P]
    X_pert: torch.Tensor  # [N, S, G]
    perturbations: list[str]  # label of each set
    contexts: list[str]
    genes: list[str]
    vocab: PerturbationVocab

    def __iter__(self):
        return iter((self.X_ctrl, self.Z_pert, self.X_pert))

    def __len__(self) -> int:
        return int(self.X_ctrl.shape[0])


def build_sets(
    adata,
    S: int = 64,
    use_hvg: bool = True,
    *,
    control: str | None = None,
    split=None,
    role: str = "train",
    include_controls: bool = True,
    seed: int = 0,
    vocab: PerturbationVocab | None = None,
) -> SetTensors:
    """Dense set pairs for a quick start: ``X_ctrl, Z_pert, X_pert = build_sets(adata, S=64)``.

    ``split`` restricts to its ``role`` pairs (train also takes every context's controls). Training
    uses :class:`SetDataset`, which gathers rows lazily; this helper materialises one epoch.
    """
    if control is None:
        from statecore.data.io import control_label

        control = split.control if split is not None else control_label(adata)
    pairs = None if split is None else split.pairs(role)
    groups = build_groups(adata, control=control, pairs=pairs, include_controls=include_controls)
    pert, _, _ = obs_labels(adata)
    if vocab is None:
        labels = pert if split is None else [p for _, p in split.pairs("train")]
        vocab = PerturbationVocab.from_labels(labels, control)
    genes = select_genes(adata, use_hvg)
    ds = SetDataset(adata, groups, genes=genes, vocab=vocab, set_size=S, seed=seed)
    b = ds.batch(0, len(ds))
    return SetTensors(
        X_ctrl=b.x_ctrl,
        Z_pert=b.z_pert,
        X_pert=b.x_target,
        perturbations=[groups[g].perturbation for g in b.groups],
        contexts=[groups[g].context for g in b.groups],
        genes=genes,
        vocab=vocab,
    )
