"""The AnnData side of the State Embedding model: fit it on a dataset, save/load it, embed cells.

:class:`SETrack` is the ``se`` track of the training engine (``statecore.training.tracks``):
``fit_embedding(adata, cfg, train_cfg, run_dir)`` trains :class:`StateEmbeddingModel` through it and
writes a run directory like any other run; ``transform(run_dir, adata) -> [n_cells, output_dim]`` embeds cells with it;
``embed_adata`` returns a copy of the data with ``obsm["X_state"]``.

Expression seen by the model is always log1p(normalize_total 1e4): raw counts in ``X`` (detected:
non-negative integers) are normalised row by row as batches are gathered, prepared data (already
log1p) is used as is. Rows are gathered lazily from sparse ``X``; only one batch is ever dense.

SE run directory: the files of every run (docs/CONTRACTS.md): ``config.json`` is a RunConfig with
``track="se"`` and ``se`` = the SEConfig, ``genes.txt``, ``model.safetensors`` (weights, including the gene
feature table and the read-depth statistics; its header repeats the expression settings and the
tie-break seed), ``last.safetensors`` + train state while training, ``status.json``, ``metrics.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from statecore.config import SE_PRESETS, SE_TRAIN, RunConfig, SEConfig, TrainConfig
from statecore.data.gene_features import GENE_FEATURE_KINDS, build_gene_features
from statecore.data.io import looks_like_counts, looks_log_normalized
from statecore.data.sets import RowGatherer, select_genes
from statecore.errors import CheckpointError, DataError
from statecore.models.embedding import StateEmbeddingModel, sample_loss_genes, top_l_indices
from statecore.runs import files as runs
from statecore.training import checkpoint
from statecore.training import distributed as dist_utils
from statecore.training.engine import fit, train_run
from statecore.training.tracks import BuiltTask

TARGET_SUM = 1e4
OBSM_KEY = "X_state"

# ---------------------------------------------------------------- expression access


class ExpressionRows:
    """Lazy row access to log1p-normalised expression of a fixed gene list (missing genes read 0)."""

    def __init__(self, adata, genes: Sequence[str] | None = None, *, allow_missing: bool = False):
        X = adata.X
        if X is None:
            raise DataError("the data has no expression matrix X")
        self.X = X.tocsr() if sp.issparse(X) and not sp.isspmatrix_csr(X) else X
        self.is_counts = _looks_like_counts(self.X)
        var = [str(g) for g in adata.var_names]
        self.genes = list(var) if genes is None else [str(g) for g in genes]
        lookup = {g: i for i, g in enumerate(var)}
        self.pos = np.array([lookup.get(g, -1) for g in self.genes], dtype=np.int64)
        missing = [g for g, p in zip(self.genes, self.pos) if p < 0]
        if len(missing) == len(self.genes):
            raise DataError(
                f"none of the model's {len(self.genes)} genes is in the data (e.g. {self.genes[:3]} "
                f"vs data {var[:3]}); was the model fitted on another gene naming?"
            )
        if missing and not allow_missing:
            raise DataError(
                f"the data lacks {len(missing)} of the model's {len(self.genes)} genes (e.g. {missing[:5]}); "
                "pass allow_missing_genes=True (CLI --allow-missing-genes) to treat them as unexpressed"
            )
        self.n_missing = len(missing)
        self._present = self.pos >= 0
        # Only the model's genes are gathered (and densified); row totals cover every gene of X.
        self._gather = RowGatherer(self.X, self.pos[self._present])
        self.totals = _row_sums(self.X) if self.is_counts else None
        # Read depth for the decoder: total counts when known; otherwise the number of expressed
        # genes, the depth proxy that survives normalisation.
        if "counts" in adata.layers:
            self.depth = np.log1p(_row_sums(adata.layers["counts"])).astype(np.float32)
            self.depth_kind = "counts"
        elif self.is_counts:
            self.depth = np.log1p(self.totals).astype(np.float32)  # X is the counts: reuse its totals
            self.depth_kind = "counts"
        else:
            self.depth = np.log1p(_row_nnz(self.X)).astype(np.float32)
            self.depth_kind = "n_expressed"

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """``[len(idx), n_genes]`` float32 log1p-normalised expression of the chosen cells."""
        idx = np.asarray(idx)
        block = self._gather(idx)  # [len(idx), n present genes] float32
        if self.is_counts:
            tot = self.totals[idx].astype(np.float32)
            scale = np.divide(TARGET_SUM, tot, out=np.zeros_like(tot), where=tot > 0)
            block = np.log1p(block * scale[:, None])
        if self._present.all():
            return block
        out = np.zeros((len(idx), len(self.genes)), dtype=np.float32)
        out[:, self._present] = block
        return out


def _looks_like_counts(X) -> bool:
    """Raw counts (non-negative integers) or log1p values; anything else cannot be embedded."""
    if not looks_like_counts(X) and not looks_log_normalized(X):
        data = X.data if sp.issparse(X) else np.asarray(X)
        if data.size and (not np.all(np.isfinite(data[:200_000])) or data[:200_000].min() < 0):
            raise DataError(
                "expression must be finite and non-negative (raw counts or log1p-normalised values); "
                "scaled or centred data cannot be embedded"
            )
    return looks_like_counts(X)


def _row_sums(M) -> np.ndarray:
    return np.asarray(M.sum(axis=1)).ravel().astype(np.float64)


def _row_nnz(M) -> np.ndarray:
    return (
        np.diff(M.indptr).astype(np.float64)
        if sp.isspmatrix_csr(M)
        else (np.asarray(M) > 0).sum(axis=1).astype(np.float64)
    )


# ---------------------------------------------------------------- the SE track


@dataclass
class EmbeddingRun:
    """A trained SE model with what is needed to use it on new data."""

    model: StateEmbeddingModel
    config: SEConfig
    genes: list[str]
    meta: dict[str, Any]
    run_dir: Path | None = None

    @property
    def tiebreak_seed(self) -> int:
        return int(self.meta.get("tiebreak_seed", 0))


@dataclass
class SEBatch:
    """One SE step: the top-L genes of each cell (tokens), the sampled loss genes and the read depth."""

    top: torch.Tensor  # [N, L] gene indices
    top_vals: torch.Tensor  # [N, L] their expression
    loss_idx: torch.Tensor  # [N, K] genes whose expression the loss predicts
    targets: torch.Tensor  # [N, K]
    depth: torch.Tensor  # [N]

    def to(self, device) -> SEBatch:
        return SEBatch(
            *(x.to(device) for x in (self.top, self.top_vals, self.loss_idx, self.targets, self.depth))
        )

    @property
    def n_cells(self) -> int:
        return int(self.top.shape[0])


def _se_batch(model, rows: ExpressionRows, cells: np.ndarray, rng: np.random.Generator) -> SEBatch:
    cfg = model.config
    values = rows.rows(cells)
    top = top_l_indices(values, cfg.L, rng.random(values.shape))  # fresh random ties every step
    lidx = sample_loss_genes(values, cfg.n_loss_genes, rng, cfg.expressed_fraction)
    return SEBatch(
        *(
            torch.as_tensor(a)
            for a in (
                top,
                np.take_along_axis(values, top, 1),
                lidx,
                np.take_along_axis(values, lidx, 1),
                rows.depth[cells],
            )
        )
    )


class SETask:
    """The SE model and its cells, as the training engine trains it (``statecore.training.tracks``).

    A step's cells and token ties are a function of (seed, step), so a resumed run replays the same
    batches; ``SEConfig.batch_cells`` cells per step over all ranks, rank r taking its r-th slice.
    """

    def __init__(self, model, rows: ExpressionRows, train_cells, val_cells, *, seed: int, meta) -> None:
        self.model, self.rows, self.train_cells, self.seed = model, rows, train_cells, seed
        self.meta = meta
        self.has_val = len(val_cells) > 0
        self._val = (
            _se_batch(model, rows, val_cells, np.random.default_rng(seed + 1)) if self.has_val else None
        )

    def batch(self, step: int, batch_size: int, *, rank: int, world_size: int) -> SEBatch:
        del batch_size  # SE counts cells (SEConfig.batch_cells), not sets
        n = self.model.config.batch_cells
        if n % world_size:
            raise DataError(
                f"SE cells per step ({n}) must be a multiple of the number of processes ({world_size})"
            )
        rng = np.random.default_rng([self.seed, step])
        cells = rng.choice(self.train_cells, size=n, replace=len(self.train_cells) < n)
        per = n // world_size
        return _se_batch(self.model, self.rows, cells[rank * per : (rank + 1) * per], rng)

    def forward(self, module, b: SEBatch) -> torch.Tensor:
        return module(self.model.gene_table[b.top], b.top_vals)  # [N, output_dim]

    def loss(self, z: torch.Tensor, b: SEBatch):
        return self.model.loss(z, self.model.gene_table, b.targets, b.loss_idx, b.depth), {}

    @torch.no_grad()
    def val_loss(self, device, batch_size: int) -> float:
        del batch_size
        was_training = self.model.training
        self.model.eval()
        b = self._val.to(device)
        value = float(self.loss(self.forward(self.model, b), b)[0])
        self.model.train(was_training)
        return value


def _split_cells(n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, training) cells: up to 10% of the cells, at most 256, held out (none under 50 cells)."""
    order = np.random.default_rng(seed).permutation(n_cells)
    n_val = min(256, n_cells // 10) if n_cells >= 50 else 0
    return np.sort(order[:n_val]), order[n_val:]


def _gene_table(cfg: SEConfig, rows: ExpressionRows, train_cells: np.ndarray, seed: int) -> np.ndarray:
    if cfg.gene_features == "pca":
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(train_cells, size=min(len(train_cells), 2000), replace=False))
        return build_gene_features("pca", rows.genes, cfg.gene_feature_dim, X=rows.rows(sample), seed=seed)
    return build_gene_features(
        cfg.gene_features, rows.genes, cfg.gene_feature_dim, path=cfg.gene_features_path, seed=seed
    )


class SETrack:
    """The State Embedding model (``RunConfig.track == "se"``)."""

    name = "se"

    def build(self, adata, config: RunConfig, run_dir: Path, *, resuming: bool) -> BuiltTask:
        cfg = config.se or SE_PRESETS["small"]
        check_se_config(cfg, adata)
        genes = runs.read_lines(run_dir / "genes.txt") if resuming else None
        if genes is None and cfg.hvg_only:
            genes = select_genes(adata, use_hvg=True)  # DataError when the column selects no gene
        rows = ExpressionRows(adata, genes)
        seed = config.train.seed
        val_cells, train_cells = _split_cells(rows.n_cells, seed)
        torch.manual_seed(seed)  # initial weights from the seed, not from the process's RNG history
        if resuming:  # the gene table and depth statistics come back with the weights
            model = StateEmbeddingModel(cfg)
        else:
            table = _gene_table(cfg, rows, train_cells, seed)
            model = StateEmbeddingModel(cfg.replace(gene_feature_dim=int(table.shape[1])), gene_table=table)
            depth = rows.depth[train_cells]
            model.set_depth_stats(float(depth.mean()), float(depth.std()))
            if dist_utils.current().is_main:
                runs.write_lines(run_dir / "genes.txt", list(rows.genes))
        meta = {
            "kind": "embedding",
            "genes": list(rows.genes),
            "expression": {"input": "counts" if rows.is_counts else "log1p", "target_sum": TARGET_SUM},
            "depth": rows.depth_kind,
            "tiebreak_seed": int(seed),
            "n_train_cells": int(len(train_cells)),
            "n_val_cells": int(len(val_cells)),
        }
        task = SETask(model, rows, train_cells, val_cells, seed=seed, meta=meta)
        return BuiltTask(task=task, config=config.replace(se=model.config))

    def input_gatherer(self, run, adata, rows, default):
        raise CheckpointError("an SE run embeds cells; it does not predict perturbations")

    def load_extras(self, config: RunConfig) -> Any:
        return None


def check_se_config(cfg: SEConfig, adata) -> None:
    """A DataError naming the field for settings SE cannot train with."""
    if cfg.batch_cells < 1:
        raise DataError(f"cells per step must be >= 1, got {cfg.batch_cells}")
    if adata.n_obs < 2:
        raise DataError(f"an embedding needs at least 2 cells, got {adata.n_obs}")
    if cfg.gene_features not in GENE_FEATURE_KINDS:
        raise DataError(f"unknown gene features {cfg.gene_features!r}; choose learned, random, pca or file")


def fit_embedding(
    adata,
    cfg: SEConfig | None = None,
    train_cfg: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    data_path: str = "",
    hook: Callable | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> EmbeddingRun:
    """Train an SE model on ``adata`` (cells x genes; raw counts or log1p) with the training engine.

    Defaults: ``SE_PRESETS["small"]`` and ``SE_TRAIN``. ``cfg.batch_cells`` cells per step; up to 10% of
    the cells (at most 256) are held out for a validation loss every ``val_every`` steps. With ``run_dir``
    the run directory is written (and resumed, like any run); ``run_dir=None`` trains in memory.
    ``hook`` gets the engine's Progress; ``callback`` a dict per logged step (step, loss, val_loss, cells_per_s).
    """
    if callback is not None:
        hook = _rows_hook(callback, hook)
    config = RunConfig(
        data_path=str(data_path), track="se", se=cfg or SE_PRESETS["small"], train=train_cfg or SE_TRAIN
    )
    if train_cfg is not None and train_cfg.steps < 1:
        raise DataError(f"steps must be >= 1, got {train_cfg.steps}")
    if run_dir is not None:
        train_run(adata, config, run_dir, hook=hook)
        return load_embedding(run_dir)
    built = SETrack().build(adata, config, Path("."), resuming=False)
    fit(built.task, config.train, hook=hook)
    model = built.task.model.eval().cpu()
    return EmbeddingRun(
        model=model, config=model.config, genes=built.task.meta["genes"], meta=built.task.meta
    )


def _rows_hook(callback: Callable[[dict[str, Any]], None], hook: Callable | None) -> Callable:
    def both(p) -> None:
        if hook is not None:
            hook(p)
        if p.event in ("log", "val"):
            row = {"step": p.step, "loss": p.loss, "cells_per_s": p.cells_per_s}
            if p.val_loss is not None:
                row["val_loss"] = p.val_loss
            callback(row)

    return both


# ---------------------------------------------------------------- load / transform


def load_embedding(run_dir: str | Path, device: str = "cpu") -> EmbeddingRun:
    """Load an SE run directory (safetensors + JSON, no pickles); older SE run directories load too."""
    run_dir = Path(run_dir)
    needed = [run_dir / n for n in ("config.json", "genes.txt", "model.safetensors")]
    absent = [p.name for p in needed if not p.exists()]
    if absent:
        raise CheckpointError(
            f"{run_dir} is not a finished embedding run: missing {absent}; "
            "train one with `python -m statecore embed fit`"
        )
    config = checkpoint.read_config(run_dir)
    if config.track != "se" or config.se is None:
        raise CheckpointError(
            f"{run_dir} holds a {config.track!r} State Transition run, not an embedding run "
            "(`python -m statecore embed fit`)"
        )
    cfg = config.se
    genes = runs.read_lines(run_dir / "genes.txt")
    if len(genes) != cfg.n_genes:
        raise CheckpointError(
            f"{run_dir}: genes.txt lists {len(genes)} genes but the model has {cfg.n_genes}"
        )
    model = StateEmbeddingModel(cfg)
    header = checkpoint.load_model_weights(model, run_dir / "model.safetensors")
    model.to(device).eval()
    meta = header.get("meta") or {}
    meta.setdefault("tiebreak_seed", config.train.seed)
    return EmbeddingRun(model=model, config=cfg, genes=genes, meta=meta, run_dir=run_dir)


def transform(
    run: str | Path | EmbeddingRun,
    adata,
    *,
    batch_size: int = 256,
    allow_missing_genes: bool = False,
    device: str | None = None,
) -> np.ndarray:
    """Embed every cell of ``adata`` -> float32 ``[n_cells, output_dim]``, rows of unit norm.

    Deterministic and independent of batch composition and cell order: ties among a cell's top-L
    genes are broken by a fixed seeded permutation of the model's genes.
    """
    if not isinstance(run, EmbeddingRun):
        run = load_embedding(run)
    model = run.model.eval()
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    rows = ExpressionRows(adata, run.genes, allow_missing=allow_missing_genes)
    priority = np.random.default_rng(run.tiebreak_seed).permutation(len(run.genes))
    out = np.empty((rows.n_cells, run.config.output_dim), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, rows.n_cells, batch_size):
            cells = np.arange(start, min(start + batch_size, rows.n_cells))
            values = rows.rows(cells)
            top = top_l_indices(values, run.config.L, priority)
            feats = model.gene_table[torch.as_tensor(top, device=dev)]
            z = model(feats, torch.as_tensor(np.take_along_axis(values, top, 1), device=dev))
            out[start : start + len(cells)] = z.cpu().numpy()
    return out


def embed_adata(run: str | Path | EmbeddingRun, adata, *, key: str = OBSM_KEY, **kwargs):
    """A copy of ``adata`` with the cell embeddings in ``obsm[key]``; the caller's object is untouched."""
    z = transform(run, adata, **kwargs)
    out = adata.copy()
    out.obsm[key] = z
    return out
