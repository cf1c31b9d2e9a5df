"""The AnnData side of the State Embedding model: fit it on a dataset, save/load it, embed cells.

``fit_embedding(adata, cfg, train_cfg, run_dir)`` trains :class:`StateEmbeddingModel` and writes
a run directory; ``transform(run_dir, adata) -> [n_cells, output_dim]`` embeds cells with it;
``embed_adata`` returns a copy of the data with ``obsm["X_state"]``.

Expression seen by the model is always log1p(normalize_total 1e4): raw counts in ``X`` (detected:
non-negative integers) are normalised row by row as batches are gathered, prepared data (already
log1p) is used as is. Rows are gathered lazily from sparse ``X``; only one batch is ever dense.

SE run directory: ``config.json`` ({"kind": "embedding", "se": SEConfig, "train": TrainConfig,
"expression": ..., "data_path", "tiebreak_seed"}), ``genes.txt``, ``model.safetensors`` (weights,
including the gene feature table and the read-depth statistics), ``status.json`` and
``metrics.jsonl`` in the shape docs/CONTRACTS.md gives for training runs, written atomically
through ``statecore.runs.files`` and ``statecore.training.checkpoint``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from statecore.config import SEConfig, TrainConfig
from statecore.data.gene_features import GENE_FEATURE_KINDS, build_gene_features
from statecore.data.sets import RowGatherer
from statecore.errors import CheckpointError, DataError
from statecore.models.embedding import StateEmbeddingModel, sample_loss_genes, top_l_indices
from statecore.runs import files as runs
from statecore.training import checkpoint
from statecore.training.engine import lr_at, resolve_device

TARGET_SUM = 1e4
OBSM_KEY = "X_state"

# SEConfig's defaults (L=256, width 128) follow the paper's shape; "small" trains on a laptop CPU in
# about half a minute on the 6k-cell sample (300 steps of 64 cells, measured ~590 cells/s on one
# thread), which the sparse sample data (~15 expressed genes per cell) does not outgrow.
SE_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(L=64, hidden_dim=64, gene_feature_dim=32, heads=4, layers=2, output_dim=64),
    "base": dict(L=256, hidden_dim=128, gene_feature_dim=64, heads=4, layers=2, output_dim=64),
}
# batch_size counts cells per step here (ST counts sets).
DEFAULT_SE_TRAIN = TrainConfig(steps=300, batch_size=64, lr=1e-3, warmup_steps=20, val_every=50, log_every=10)


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
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = np.asarray(data[:200_000], dtype=np.float64)
    if sample.size and (not np.all(np.isfinite(sample)) or sample.min() < 0):
        raise DataError(
            "expression must be finite and non-negative (raw counts or log1p-normalised values); "
            "scaled or centred data cannot be embedded"
        )
    return bool(sample.size) and bool(np.all(sample == np.round(sample)))


def _row_sums(M) -> np.ndarray:
    return np.asarray(M.sum(axis=1)).ravel().astype(np.float64)


def _row_nnz(M) -> np.ndarray:
    return (
        np.diff(M.indptr).astype(np.float64)
        if sp.isspmatrix_csr(M)
        else (np.asarray(M) > 0).sum(axis=1).astype(np.float64)
    )


# ---------------------------------------------------------------- run directory io


class _RunWriter:
    """status.json / metrics.jsonl through statecore.runs.files (atomic, contract keys only)."""

    def __init__(self, run_dir: Path, total: int):
        self.run_dir = run_dir
        runs.write_status(
            run_dir,
            state="running",
            step=0,
            total=total,
            started=runs.now_iso(),
            pid=os.getpid(),
            error=None,
            best_val=None,
            eta_s=None,
            cells_per_s=None,
        )

    def update(self, **fields: Any) -> None:
        runs.write_status(self.run_dir, **fields)

    def log(self, row: dict[str, Any]) -> None:
        runs.append_metrics(self.run_dir, row)


# ---------------------------------------------------------------- fit


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


def _batch_tensors(model, rows, values: np.ndarray, cells: np.ndarray, rng: np.random.Generator, device):
    """One batch: token features/values of the top-L genes, loss gene indices/targets, depth."""
    cfg = model.config
    top = top_l_indices(values, cfg.L, rng.random(values.shape))  # fresh random ties every step
    lidx = sample_loss_genes(values, cfg.n_loss_genes, rng, cfg.expressed_fraction)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return (
        t(top),
        t(np.take_along_axis(values, top, 1)),
        t(lidx),
        t(np.take_along_axis(values, lidx, 1)),
        t(rows.depth[cells]),
    )


def _step_loss(model, batch) -> torch.Tensor:
    top, top_vals, lidx, targets, depth = batch
    z = model(model.gene_table[top], top_vals)
    return model.loss(z, model.gene_table, targets, lidx, depth)


def fit_embedding(
    adata,
    cfg: SEConfig | None = None,
    train_cfg: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    *,
    genes: Sequence[str] | None = None,
    data_path: str = "",
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> EmbeddingRun:
    """Train an SE model on ``adata`` (cells x genes; raw counts or log1p) and save it in ``run_dir``.

    Defaults: ``SE_PRESETS["small"]`` and ``DEFAULT_SE_TRAIN``.
    ``train_cfg.batch_size`` counts cells per step. ``genes`` restricts the model to those genes
    (default: every gene of the data). Up to 10% of the cells (at most 256) are held out for a
    validation loss logged every ``val_every`` steps. ``run_dir=None`` trains without writing.
    The run stops early, saving what it has, when ``<run_dir>/STOP`` appears (state "cancelled")
    or ``max_minutes`` pass (state "done", as for ST). ``callback`` receives every logged metrics row.
    """
    cfg = cfg or SEConfig(**SE_PRESETS["small"])
    train_cfg = train_cfg or DEFAULT_SE_TRAIN
    if train_cfg.steps < 1 or train_cfg.batch_size < 1:
        raise DataError(
            f"steps and batch_size must be >= 1, got {train_cfg.steps} and {train_cfg.batch_size}"
        )
    if adata.n_obs < 2:
        raise DataError(f"an embedding needs at least 2 cells, got {adata.n_obs}")
    if cfg.gene_features not in GENE_FEATURE_KINDS:
        raise DataError(f"unknown gene features {cfg.gene_features!r}; choose learned, random, pca or file")
    rows = ExpressionRows(adata, genes)
    genes = rows.genes
    rng = np.random.default_rng(train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    device = resolve_device(train_cfg.device)

    order = rng.permutation(rows.n_cells)
    n_val = min(256, rows.n_cells // 10) if rows.n_cells >= 50 else 0
    val_cells, train_cells = np.sort(order[:n_val]), order[n_val:]

    if cfg.gene_features == "pca":
        sample = np.sort(rng.choice(train_cells, size=min(len(train_cells), 2000), replace=False))
        table = build_gene_features(
            "pca", genes, cfg.gene_feature_dim, X=rows.rows(sample), seed=train_cfg.seed
        )
    else:
        table = build_gene_features(
            cfg.gene_features, genes, cfg.gene_feature_dim, path=cfg.gene_features_path, seed=train_cfg.seed
        )
    cfg = cfg.replace(gene_feature_dim=int(table.shape[1]))  # a feature file sets its own width
    model = StateEmbeddingModel(cfg, gene_table=table)
    cfg = model.config
    train_depth = rows.depth[train_cells]
    model.set_depth_stats(float(train_depth.mean()), float(train_depth.std()))
    model.to(device)

    meta = {
        "kind": "embedding",
        "data_path": str(data_path),
        "se": cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "expression": {
            "input": "counts" if rows.is_counts else "log1p",
            "target_sum": TARGET_SUM,
            "depth": rows.depth_kind,
        },
        "tiebreak_seed": int(train_cfg.seed),
        "n_train_cells": int(len(train_cells)),
        "n_val_cells": int(n_val),
    }
    writer = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a refit starts a fresh curve
        (run_dir / "STOP").unlink(missing_ok=True)  # a stale stop request would end the new run at once
        runs.atomic_write_json(run_dir / "config.json", meta)
        runs.write_lines(run_dir / "genes.txt", list(genes))
        writer = _RunWriter(run_dir, train_cfg.steps)

    try:
        state = _train_loop(model, rows, train_cells, val_cells, train_cfg, rng, device, writer, callback)
    except Exception as exc:
        if writer is not None:
            writer.update(state="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    model.eval()
    if writer is not None:
        # The weights' header repeats config + genes so the file alone can rebuild the model.
        checkpoint.save_weights(run_dir / "model.safetensors", model, {**meta, "genes": list(genes)})
        writer.update(state=state, eta_s=0.0)
    return EmbeddingRun(model=model.cpu(), config=cfg, genes=list(genes), meta=meta, run_dir=run_dir)


def _train_loop(model, rows, train_cells, val_cells, tc: TrainConfig, rng, device, writer, callback) -> str:
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay
    )
    val_batch = None
    if len(val_cells):
        vals = rows.rows(val_cells)
        val_batch = _batch_tensors(model, rows, vals, val_cells, np.random.default_rng(tc.seed + 1), device)
    t0 = time.monotonic()
    best_val: float | None = None
    for step in range(tc.steps):
        model.train()
        cells = rng.choice(train_cells, size=tc.batch_size, replace=len(train_cells) < tc.batch_size)
        batch = _batch_tensors(model, rows, rows.rows(cells), cells, rng, device)
        lr = lr_at(step, tc, tc.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _step_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()

        done = step + 1
        last = done == tc.steps
        if done % tc.log_every == 0 or last or (val_batch is not None and done % tc.val_every == 0):
            elapsed = time.monotonic() - t0
            row = {
                "step": done,
                "loss": float(loss.detach()),
                "lr": lr,
                "cells_per_s": done * tc.batch_size / max(elapsed, 1e-9),
                "eta_s": elapsed / done * (tc.steps - done),
                "time": runs.now_iso(),
            }
            if val_batch is not None and (done % tc.val_every == 0 or last):
                model.eval()
                with torch.no_grad():
                    row["val_loss"] = float(_step_loss(model, val_batch))
                best_val = row["val_loss"] if best_val is None else min(best_val, row["val_loss"])
            if writer is not None:
                writer.log(row)
                writer.update(
                    step=done, best_val=best_val, eta_s=row["eta_s"], cells_per_s=row["cells_per_s"]
                )
            if callback is not None:
                callback(row)
        if writer is not None and (writer.run_dir / "STOP").exists():
            writer.update(step=done)
            return "cancelled"
        if tc.max_minutes is not None and time.monotonic() - t0 > 60 * tc.max_minutes:
            if writer is not None:
                writer.update(step=done)
            return "done"
    return "done"


# ---------------------------------------------------------------- load / transform


def load_embedding(run_dir: str | Path, device: str = "cpu") -> EmbeddingRun:
    """Load an SE run directory written by :func:`fit_embedding` (safetensors + JSON, no pickles)."""
    run_dir = Path(run_dir)
    needed = [run_dir / n for n in ("config.json", "genes.txt", "model.safetensors")]
    absent = [p.name for p in needed if not p.exists()]
    if absent:
        raise CheckpointError(
            f"{run_dir} is not a finished embedding run: missing {absent}; "
            "train one with `python -m statecore embed fit`"
        )
    meta = runs.read_json(run_dir / "config.json")
    if not isinstance(meta, dict) or meta.get("kind") != "embedding":
        kind = meta.get("kind", "transition") if isinstance(meta, dict) else "unreadable"
        raise CheckpointError(
            f"{run_dir} holds a {kind!r} run, not an embedding run (`python -m statecore embed fit`)"
        )
    try:
        cfg = SEConfig.from_dict(meta["se"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{run_dir}/config.json: bad SE config ({exc})") from exc
    genes = runs.read_lines(run_dir / "genes.txt")
    if len(genes) != cfg.n_genes:
        raise CheckpointError(
            f"{run_dir}: genes.txt lists {len(genes)} genes but the model has {cfg.n_genes}"
        )
    model = StateEmbeddingModel(cfg)
    checkpoint.load_model_weights(model, run_dir / "model.safetensors")
    model.to(device).eval()
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
