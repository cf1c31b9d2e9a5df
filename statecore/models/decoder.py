"""Track B pieces for ST on SE embeddings: a gene decoder and the combined, α-weighted loss.

On the embedding track ST predicts sets of cell embeddings; :class:`GeneDecoder` maps each predicted
embedding back to log1p expression so predictions keep Track A's gene-space contract, and
:func:`embedding_track_loss` trains both: ``loss = loss_emb + alpha * loss_expr``, with ``alpha``
(``STConfig.decoder_weight``, default 0.1) actually applied — the reference implementation accepts
such a weight and ignores it. Both terms use the same set loss (energy distance or MMD), because
predicted and observed cells are unpaired.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from statecore.models.layers import mlp
from statecore.models.losses import get_loss


class GeneDecoder(nn.Module):
    """MLP ``[..., in_dim] -> [..., n_genes]`` (log1p expression; ReLU output keeps it non-negative)."""

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        hidden_dim: int = 512,
        *,
        n_layers: int = 3,
        relu_output: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if in_dim < 1 or n_genes < 1 or hidden_dim < 1:
            raise ValueError(
                f"GeneDecoder needs positive sizes; got in_dim={in_dim}, n_genes={n_genes}, "
                f"hidden_dim={hidden_dim}"
            )
        self.in_dim, self.n_genes, self.relu_output = in_dim, n_genes, relu_output
        self.net = mlp(in_dim, hidden_dim, n_genes, n_layers=n_layers, dropout=dropout)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.shape[-1] != self.in_dim:
            raise ValueError(f"GeneDecoder expects [..., {self.in_dim}]; got {tuple(emb.shape)}")
        out = self.net(emb)  # [..., n_genes]
        return torch.relu(out) if self.relu_output else out


class EmbeddingTrackLoss(NamedTuple):
    """``total`` (scalar, to backpropagate) and its two terms (scalars, for logging)."""

    total: torch.Tensor
    emb: torch.Tensor
    expr: torch.Tensor


def embedding_track_loss(
    pred_emb: torch.Tensor,
    true_emb: torch.Tensor,
    pred_expr: torch.Tensor,
    true_expr: torch.Tensor,
    alpha: float = 0.1,
    loss_fn: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "energy",
) -> EmbeddingTrackLoss:
    """``loss_emb + alpha * loss_expr`` over batched sets.

    ``pred_emb [B, S, D]`` vs ``true_emb [B, S', D]`` (embeddings of the observed perturbed cells),
    ``pred_expr [B, S, G]`` (decoded) vs ``true_expr [B, S', G]`` (their log1p expression).
    ``loss_fn`` is a set loss name (``energy`` | ``mmd``) or a callable returning one value per set
    ``[B]`` (or a scalar); per-set values are averaged over the batch.
    """
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha (decoder_weight) must be a finite number >= 0; got {alpha!r}")
    if pred_emb.shape[:-2] != pred_expr.shape[:-2] or pred_emb.shape[-2] != pred_expr.shape[-2]:
        raise ValueError(
            f"pred_emb {tuple(pred_emb.shape)} and pred_expr {tuple(pred_expr.shape)} must describe "
            "the same sets of cells"
        )
    if true_emb.shape[:-1] != true_expr.shape[:-1]:
        raise ValueError(
            f"true_emb {tuple(true_emb.shape)} and true_expr {tuple(true_expr.shape)} must describe "
            "the same observed cells"
        )
    fn = get_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn
    loss_emb = fn(pred_emb, true_emb).mean()
    loss_expr = fn(pred_expr, true_expr).mean()
    return EmbeddingTrackLoss(total=loss_emb + alpha * loss_expr, emb=loss_emb, expr=loss_expr)
