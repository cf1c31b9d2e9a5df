"""Track B: the State Transition model on State Embedding (SE) cell embeddings, with a gene decoder.

Sets are built exactly as on the HVG track (same groups, pairing and step-addressed plans, see
``statecore.data.sets``) but the cells enter and leave ST as rows of ``X_state = embed.transform(SE run,
adata)`` ``[n_cells, D]``; the log1p HVG expression of the same target cells rides along so that the
gene decoder (``StateTransitionModel.gene_decoder``) is trained in the same step:

    loss = loss_emb(pred_emb, true_emb) + alpha * loss_expr(decode(pred_emb), true_expr)
           + loss_dec(decode(true_emb), true_expr)

with ``alpha = STConfig.decoder_weight`` applied (see ``statecore.models.decoder.embedding_track_loss``).
``loss_dec`` is a paired per-cell MSE on the *observed* target embeddings: it has no path into ST
(``true_emb`` is data), so ST's parameters still see exactly ``loss_emb + alpha * loss_expr`` and α keeps
its meaning; it only teaches the decoder what each embedding means. Without it the decoder learnt only
from the unpaired set loss on ST's (at first meaningless) predictions, and decoding the true embeddings
of control cells missed their mean expression by MAE 0.57-0.85 on the perturbench sample; with a
paired fit it is ~0.1 (docs/RESULTS.md). For the same reason a fresh run first fits the decoder alone
on the training cells' (embedding, expression) pairs (:func:`warm_up_decoder`), so that ``loss_expr``
sends ST a meaningful gradient from step one.
Predictions are decoded to the HVGs, so they keep Track A's AnnData contract.

The engine, checkpoints and prediction reach this module only through :class:`EmbeddingTrack`, the
``embedding`` entry of ``statecore.training.tracks.TRACKS``: its ``adapt`` is :func:`to_embedding_data`, its
loss :func:`step_loss_fn`, ``prepare_model`` warms up the decoder, ``load_extras`` loads the SE run and
``input_gatherer`` embeds the control cells that prediction perturbs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statecore.config import TRACKS
from statecore.data.sets import RowGatherer, SetBatch, SetDataset
from statecore.errors import CheckpointError, DataError
from statecore.models.decoder import embedding_track_loss
from statecore.training.st_track import ExpressionTrack

# --------------------------------------------------------------------------- data


@dataclass
class EmbeddingSetBatch(SetBatch):
    """A :class:`SetBatch` in embedding space plus the observed expression of its target cells."""

    expr_target: torch.Tensor | None = None  # [B, S, G] log1p expression of the x_target cells

    def to(self, device) -> EmbeddingSetBatch:
        return EmbeddingSetBatch(
            self.x_ctrl.to(device),
            self.z_pert.to(device),
            self.x_target.to(device),
            self.batch_idx.to(device),
            self.groups,
            None if self.expr_target is None else self.expr_target.to(device),
        )


class EmbeddingSetDataset(SetDataset):
    """The sets of a :class:`SetDataset`, with cells read from an embedding matrix ``[n_cells, D]``.

    ``x_ctrl``/``x_target`` are embedding rows; ``expr_target`` holds the same target cells' expression
    of the dataset's genes (the decoder's genes). Plans, grouping and pairing are the parent's.
    """

    def __init__(self, adata, groups, *, embedding: np.ndarray, **kwargs) -> None:
        super().__init__(adata, groups, **kwargs)
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[0] != adata.n_obs:
            raise DataError(f"the embedding must be [n_cells={adata.n_obs}, D]; got {embedding.shape}")
        self.expr_gather = self.gather  # HVG expression, for the decoder's targets
        self.gather = RowGatherer(embedding)  # the parent's _collate now reads embeddings

    @classmethod
    def from_dataset(cls, ds: SetDataset, adata, embedding: np.ndarray, batches) -> EmbeddingSetDataset:
        return cls(
            adata,
            ds.groups,
            embedding=embedding,
            genes=ds.genes,
            vocab=ds.vocab,
            batches=list(batches),
            set_size=ds.set_size,
            seed=ds.seed,
            shuffle=ds.shuffle,
        )

    def _collate(self, items) -> EmbeddingSetBatch:
        b = super()._collate(items)
        target_rows = np.stack([t for _, t, _ in items])  # [B, S], the rows the parent gathered
        expr = torch.from_numpy(self.expr_gather(target_rows))  # [B, S, G]
        return EmbeddingSetBatch(b.x_ctrl, b.z_pert, b.x_target, b.batch_idx, b.groups, expr)


def embed_cells(embedding_run, adata) -> np.ndarray:
    """What ST sees of each cell of ``adata``: its SE embedding times sqrt(D).

    SE embeddings have unit L2 norm, so each of the D coordinates is ~1/sqrt(D) (~0.1 for D=64): on that
    scale the energy distance between sets is tiny next to the decoder's expression term, and ST
    measured on the sample collapsed every prediction to one point (spread ratio 0.001). The fixed
    factor sqrt(D) gives coordinates of unit RMS (like log1p expression) without any fitted statistic,
    so training and prediction need nothing stored beyond the SE run.
    """
    from statecore.embedding.se import transform

    z = transform(embedding_run, adata)
    return z * np.float32(np.sqrt(z.shape[1]))


def to_embedding_data(adata, data, run_cfg, *, embedding: np.ndarray | None = None):
    """Turn HVG-track ``TrainData`` into embedding-track data and make ``run_cfg`` describe Track B.

    Returns ``(data, run_cfg)``: ST's width becomes the embedding width D, the decoder predicts the
    data's genes (the HVGs), and the ST output is linear (embeddings may be negative). Idempotent on a
    resumed run's saved config.
    """
    if run_cfg.track not in TRACKS:
        raise DataError(f"unknown track {run_cfg.track!r}; choose one of {TRACKS}")
    if not run_cfg.embedding_run:
        raise DataError(
            "the embedding track needs an SE run: pass --embedding-run DIR (train one with "
            "`python -m statecore embed fit --data P.h5ad --run-dir DIR`)"
        )
    se = load_se_run(run_cfg.embedding_run)
    if embedding is None:
        embedding = embed_cells(se, adata)
    train = EmbeddingSetDataset.from_dataset(data.train, adata, embedding, data.batches)
    val = (
        EmbeddingSetDataset.from_dataset(data.val, adata, embedding, data.batches)
        if data.val is not None
        else None
    )
    data.train, data.val = train, val
    model = run_cfg.model_config().replace(
        num_genes=int(embedding.shape[1]), decoder_dim=len(data.genes), relu_output=False
    )
    run_cfg = run_cfg.replace(embedding_run=str(Path(run_cfg.embedding_run).resolve()))
    return data, run_cfg.with_shapes(model)


def load_se_run(embedding_run: str | Path):
    """The SE run of an embedding-track ST run; CheckpointError naming ``embed fit`` when it is absent."""
    from statecore.embedding.se import load_embedding

    path = Path(embedding_run)
    if not (path / "model.safetensors").exists():
        raise CheckpointError(
            f"embedding run {str(path)!r} holds no trained SE model; create it with "
            f"`python -m statecore embed fit --data P.h5ad --run-dir {path}`"
        )
    return load_embedding(path)


# --------------------------------------------------------------------------- loss


def step_loss_fn(
    model: torch.nn.Module, loss_fn: Callable
) -> Callable[[torch.Tensor, SetBatch], tuple[torch.Tensor, dict[str, Any]]]:
    """``(pred, batch) -> (scalar loss, extra metrics)`` for ``model``'s track.

    HVG track: the mean set loss of ``pred`` against ``batch.x_target``, no extras. Embedding track
    (the model has a gene decoder): ``loss_emb + decoder_weight * loss_expr + loss_dec`` with the three
    terms as extras ``loss_emb`` / ``loss_expr`` / ``loss_dec`` (floats) for metrics.jsonl; ``loss_dec``
    (:func:`decoder_reconstruction_loss`) trains only the decoder.
    """
    decoder = getattr(model, "gene_decoder", None)
    if decoder is None:
        return lambda pred, batch: (loss_fn(pred, batch.x_target).mean(), {})
    alpha = float(model.cfg.decoder_weight)

    def step(pred: torch.Tensor, batch: SetBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        expr = getattr(batch, "expr_target", None)
        if expr is None:
            raise DataError(
                "the model has a gene decoder (embedding track) but the batch carries no target "
                "expression; build the data with statecore.embedding.track.to_embedding_data"
            )
        parts = embedding_track_loss(
            pred, batch.x_target, model.decode(pred), expr, alpha=alpha, loss_fn=loss_fn
        )
        dec = decoder_reconstruction_loss(model, batch.x_target, expr)
        return parts.total + dec, {
            "loss_emb": parts.emb.detach(),  # tensors: the engine reads them back only when it logs
            "loss_expr": parts.expr.detach(),
            "loss_dec": dec.detach(),
        }

    return step


def decoder_reconstruction_loss(
    model: torch.nn.Module, true_emb: torch.Tensor, true_expr: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of ``decode(true_emb) [..., G]`` against the same cells' ``true_expr [..., G]``.

    Paired (row i of both is one observed cell), so it pins the decoder per cell, which the unpaired
    set loss cannot. ``true_emb`` is detached: the term never moves ST, only the decoder.
    """
    if true_emb.shape[:-1] != true_expr.shape[:-1]:
        raise ValueError(
            f"true_emb {tuple(true_emb.shape)} and true_expr {tuple(true_expr.shape)} must describe "
            "the same cells"
        )
    return torch.nn.functional.mse_loss(model.decode(true_emb.detach()), true_expr)


DECODER_WARMUP_STEPS = (
    500  # ~4 CPU s for 256 cells x 353 genes; paired MSE has flattened by then (docs/RESULTS.md)
)


def warm_up_decoder(
    model: torch.nn.Module,
    ds: EmbeddingSetDataset,
    *,
    steps: int = DECODER_WARMUP_STEPS,
    batch_cells: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Fit ``model.gene_decoder`` alone on (embedding, expression) pairs of the cells of ``ds``.

    Uses every cell of the training groups (their perturbed cells and control pools); the rest of
    the model is untouched and its RNG use is seeded by ``seed``. Returns the loss of each step.
    """
    decoder = getattr(model, "gene_decoder", None)
    if decoder is None:
        raise DataError("warm_up_decoder needs an embedding-track ST model (STConfig.decoder_dim > 0)")
    if steps <= 0:
        return []
    cells = np.unique(
        np.concatenate([np.concatenate([g.cells, g.controls]) for g in ds.groups]).astype(np.int64)
    )
    rng = np.random.default_rng(seed)
    device = next(decoder.parameters()).device
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr)
    was_training = decoder.training
    decoder.train()
    losses = []
    for _ in range(int(steps)):
        rows = np.sort(rng.choice(cells, size=min(batch_cells, len(cells)), replace=False))
        emb = torch.from_numpy(np.asarray(ds.gather(rows), dtype=np.float32)).to(device)  # [n, D]
        expr = torch.from_numpy(np.asarray(ds.expr_gather(rows), dtype=np.float32)).to(device)  # [n, G]
        loss = decoder_reconstruction_loss(model, emb, expr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    decoder.train(was_training)
    return losses


# --------------------------------------------------------------------------- prediction


class _EmbeddedRows:
    """Row gatherer over the embeddings of a few cells, addressed by their row in the full data."""

    def __init__(self, rows: np.ndarray, emb: np.ndarray, n_obs: int) -> None:
        self.pos = np.full(n_obs, -1, dtype=np.int64)
        self.pos[rows] = np.arange(len(rows))
        self.emb = emb

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        pos = self.pos[rows]
        if (pos < 0).any():
            raise DataError("internal: a cell that was not embedded was asked for")
        return self.emb[pos]  # [*rows.shape, D]


def input_gatherer(run, adata, rows: np.ndarray, default: Callable) -> Callable[[np.ndarray], np.ndarray]:
    """What ``predict`` feeds ST for the control rows ``rows``: the HVG gatherer ``default``, or on the
    embedding track the SE embeddings of those cells (only they are embedded)."""
    if getattr(run.config, "track", "hvg") != "embedding":
        return default
    se = getattr(run, "extras", None) or load_se_run(run.config.embedding_run)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    emb = embed_cells(se, adata[rows])
    return _EmbeddedRows(rows, emb, adata.n_obs)


# --------------------------------------------------------------------------- the track


class EmbeddingTrack(ExpressionTrack):
    """Track B as the engine sees it (``RunConfig.track == "embedding"``)."""

    name = "embedding"
    step_loss_factory = staticmethod(step_loss_fn)

    def adapt(self, adata, data, config):
        return to_embedding_data(adata, data, config)

    def prepare_model(self, model, data, config, *, resuming: bool) -> None:
        if not resuming:  # a resumed run loads its decoder with the weights
            warm_up_decoder(model, data.train, seed=config.train.seed)

    def input_gatherer(self, run, adata, rows, default):
        return input_gatherer(run, adata, rows, default)

    def load_extras(self, config):
        return load_se_run(config.embedding_run or "")
