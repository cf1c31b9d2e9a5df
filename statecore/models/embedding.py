"""State Embedding (SE) model: a cell's top expressed genes -> an L2-normalised cell embedding.

AnnData-free; built from :class:`statecore.config.SEConfig`. Shapes (B cells, L tokens, K loss
genes, G genes, F = gene_feature_dim, H = hidden_dim, D = output_dim):

- ``forward(gene_features [B, L, F], values [B, L]) -> z [B, D]``: ``gene_features`` are the
  feature vectors of each cell's L selected genes (its top-L expressed genes, padded with
  unexpressed ones; see :func:`top_l_indices`), ``values`` their log1p expression (0 for padding).
  Token = gene projection + soft-binned expression embedding; a learned CLS token is prepended,
  a pre-LN transformer encoder runs over the unordered tokens (no positional encoding), and the
  CLS output becomes the cell embedding (unit L2 norm).
- ``loss(z [B, D], gene_features [G, F], values [B, K], idx [B, K], depth [B] | None) -> scalar``:
  the self-supervised objective. ``idx`` holds each cell's K sampled genes (expressed and
  unexpressed, see :func:`sample_loss_genes`) as rows of the gene table ``gene_features``;
  ``values`` their observed log1p expression. A decoder MLP predicts each value from
  [z ‖ gene embedding ‖ standardised read depth]; the loss is the mean squared error.
  ``gene_features`` may instead be ``[B, K, F]`` (already gathered) with ``idx=None``.

With ``config.n_genes > 0`` the module owns the gene table (``gene_table`` [G, F]): a trainable
parameter when ``config.gene_features == "learned"``, a fixed buffer otherwise; either way it is
saved with the weights, so a checkpoint carries its gene features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from statecore.config import SEConfig


class SoftBinning(nn.Module):
    """Expression-aware soft binning: a value -> a convex mix of ``n_bins`` learned embeddings.

    A small MLP maps the scalar expression to bin logits; their softmax weighs the bin table.
    Unlike hard binning this stays differentiable and lets nearby values share bins.
    """

    def __init__(self, n_bins: int, dim: int, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, n_bins))
        self.bins = nn.Parameter(torch.randn(n_bins, dim) * 0.02)

    def weights(self, values: Tensor) -> Tensor:
        return torch.softmax(self.mlp(values.unsqueeze(-1)), dim=-1)  # [..., n_bins], rows sum to 1

    def forward(self, values: Tensor) -> Tensor:
        return self.weights(values) @ self.bins  # [..., dim]


class StateEmbeddingModel(nn.Module):
    """SE encoder + expression decoder. ``StateEmbeddingModel(cfg)`` or keyword overrides of SEConfig.

    ``gene_table`` (optional, ``[G, F]``) gives the module its gene features and sets ``n_genes``.
    """

    def __init__(
        self, config: SEConfig | None = None, *, gene_table: Tensor | np.ndarray | None = None, **overrides
    ):
        super().__init__()
        cfg = config or SEConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        if gene_table is not None:
            gene_table = torch.as_tensor(np.asarray(gene_table), dtype=torch.float32)
            if gene_table.ndim != 2 or gene_table.shape[1] != cfg.gene_feature_dim:
                raise ValueError(
                    f"gene_table must be [n_genes, {cfg.gene_feature_dim}], got {tuple(gene_table.shape)}"
                )
            cfg = cfg.replace(n_genes=int(gene_table.shape[0]))
        check_config(cfg)
        self.cfg = cfg  # the name statecore.training.checkpoint.save_weights looks for
        H = cfg.hidden_dim

        if cfg.n_genes > 0:
            table = gene_table if gene_table is not None else torch.zeros(cfg.n_genes, cfg.gene_feature_dim)
            if cfg.gene_features == "learned":
                self.gene_table = nn.Parameter(table.clone())
            else:
                self.register_buffer("gene_table", table.clone())
        else:
            self.gene_table = None

        # Shared by encoder tokens and the decoder, as in the paper: one embedding per gene.
        self.gene_proj = nn.Sequential(nn.Linear(cfg.gene_feature_dim, H), nn.LayerNorm(H), nn.SiLU())
        self.binning = SoftBinning(cfg.n_bins, H, cfg.bin_hidden_dim)
        self.cls = nn.Parameter(torch.randn(1, 1, H) * 0.02)
        layer = nn.TransformerEncoderLayer(
            H,
            cfg.heads,
            dim_feedforward=2 * H,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-LN trains stably without warmup tricks
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, cfg.output_dim)
        self.decoder = nn.Sequential(
            nn.Linear(cfg.output_dim + H + 1, cfg.decoder_hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.decoder_hidden_dim, cfg.decoder_hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.decoder_hidden_dim, 1),
        )
        # Read depth enters the decoder standardised with the training data's statistics;
        # buffers so that they travel in the checkpoint with the weights.
        self.register_buffer("depth_center", torch.zeros(()))
        self.register_buffer("depth_scale", torch.ones(()))

    @property
    def config(self) -> SEConfig:
        return self.cfg

    def set_depth_stats(self, center: float, scale: float) -> None:
        self.depth_center.fill_(float(center))
        self.depth_scale.fill_(max(float(scale), 1e-6))

    def gene_embedding(self, gene_features: Tensor) -> Tensor:
        return self.gene_proj(gene_features)  # [..., F] -> [..., H]

    def forward(self, gene_features: Tensor, values: Tensor) -> Tensor:
        if gene_features.ndim != 3 or values.shape != gene_features.shape[:2]:
            raise ValueError(
                f"expected gene_features [B, L, F] and values [B, L]; got "
                f"{tuple(gene_features.shape)} and {tuple(values.shape)}"
            )
        tokens = self.gene_embedding(gene_features) + self.binning(values)  # [B, L, H]
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # [B, 1 + L, H]
        h = self.encoder(x)  # [B, 1 + L, H]
        z = self.head(self.final_norm(h[:, 0]))  # [B, D]
        return F.normalize(z, dim=-1)

    def predict_expression(self, z: Tensor, gene_features: Tensor, depth: Tensor | None = None) -> Tensor:
        """Decoded expression of genes ``gene_features [B, K, F]`` in cells ``z [B, D]`` -> [B, K]."""
        B, K = gene_features.shape[:2]
        g = self.gene_embedding(gene_features)  # [B, K, H]
        if depth is None:
            d = torch.zeros(B, device=z.device, dtype=z.dtype)
        else:
            d = (depth.to(z.dtype) - self.depth_center) / self.depth_scale
        inp = torch.cat([z.unsqueeze(1).expand(-1, K, -1), g, d.view(B, 1, 1).expand(-1, K, 1)], dim=-1)
        return self.decoder(inp).squeeze(-1)  # [B, K]

    def loss(
        self,
        z: Tensor,
        gene_features: Tensor,
        values: Tensor,
        idx: Tensor | None = None,
        depth: Tensor | None = None,
    ) -> Tensor:
        if idx is not None:
            if gene_features.ndim != 2 or idx.shape != values.shape:
                raise ValueError(
                    f"with idx, expected gene_features [G, F] and idx, values [B, K]; got "
                    f"{tuple(gene_features.shape)}, {tuple(idx.shape)}, {tuple(values.shape)}"
                )
            gene_features = gene_features[idx]  # [B, K, F]
        elif gene_features.ndim != 3 or gene_features.shape[:2] != values.shape:
            raise ValueError(
                f"without idx, expected gene_features [B, K, F] and values [B, K]; got "
                f"{tuple(gene_features.shape)} and {tuple(values.shape)}"
            )
        pred = self.predict_expression(z, gene_features, depth)
        return F.mse_loss(pred, values.to(pred.dtype))


def check_config(cfg: SEConfig) -> None:
    """Raise ValueError naming the first invalid SEConfig field."""
    for name in (
        "gene_feature_dim",
        "hidden_dim",
        "L",
        "heads",
        "layers",
        "n_bins",
        "output_dim",
        "n_loss_genes",
        "bin_hidden_dim",
        "decoder_hidden_dim",
    ):
        if getattr(cfg, name) < 1:
            raise ValueError(f"SEConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.hidden_dim % cfg.heads:
        raise ValueError(f"SEConfig.hidden_dim ({cfg.hidden_dim}) must be divisible by heads ({cfg.heads})")
    if not 0.0 <= cfg.expressed_fraction <= 1.0:
        raise ValueError(f"SEConfig.expressed_fraction must lie in [0, 1], got {cfg.expressed_fraction}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"SEConfig.dropout must lie in [0, 1), got {cfg.dropout}")


def top_l_indices(values: np.ndarray, L: int, tiebreak: np.ndarray) -> np.ndarray:
    """Each row's ``L`` highest-valued columns, ``[B, G] -> [B, min(L, G)]`` (int64).

    Equal values are ordered by ``tiebreak`` (``[B, G]`` or ``[G]``, smaller first); rows with fewer
    than L expressed genes are thereby padded with unexpressed genes in tiebreak order. A fresh
    random ``tiebreak`` per step gives random ties in training; a fixed seeded permutation of the
    genes gives a deterministic, batch-independent choice at transform time.
    """
    values = np.asarray(values)
    tb = np.broadcast_to(tiebreak, values.shape)
    order = np.lexsort((tb, -values), axis=-1)  # last key is primary: value descending, then tiebreak
    return order[:, : min(L, values.shape[1])].astype(np.int64)


def sample_loss_genes(
    values: np.ndarray, k: int, rng: np.random.Generator, expressed_fraction: float = 0.5
) -> np.ndarray:
    """Per cell, ``round(k * expressed_fraction)`` random expressed genes and the rest unexpressed -> [B, k].

    A cell with too few genes of one kind gets the other kind instead (sampling is without
    replacement within each half), so the result always has k distinct-per-half columns.
    """
    values = np.asarray(values)
    B, G = values.shape
    k = min(k, G)
    k_expr = int(round(k * expressed_fraction))
    u = rng.random((B, G))
    expressed = values > 0
    parts = []
    if k_expr > 0:
        key = np.where(expressed, u, 1.0 + u)  # expressed genes first, in random order
        parts.append(np.argpartition(key, k_expr - 1, axis=1)[:, :k_expr])
    if k - k_expr > 0:
        key = np.where(expressed, 1.0 + u, u)
        parts.append(np.argpartition(key, k - k_expr - 1, axis=1)[:, : k - k_expr])
    return np.concatenate(parts, axis=1).astype(np.int64)
