"""Small building blocks shared by the models (AnnData-free)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    n_layers: int = 2,
    dropout: float = 0.0,
    activation: type[nn.Module] = nn.GELU,
) -> nn.Sequential:
    """``n_layers`` linear layers with activations (and optional dropout) between them, none after the last."""
    if n_layers < 1:
        raise ValueError(f"an MLP needs at least one layer; got n_layers={n_layers}")
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SetAttentionLayer(nn.Module):
    """Pre-LN transformer block over the cells of a set, attention through ``F.scaled_dot_product_attention``.

    Same parameters, names and initialisation as ``nn.TransformerEncoderLayer(norm_first=True,
    activation="gelu", batch_first=True)`` (checkpoints load either way), but the forward pass calls the
    fused attention kernel directly: MultiheadAttention's Python path re-checks its arguments and reshapes
    on every call, which on the reference shape cost more than the attention itself (docs/PERFORMANCE.md).
    """

    def __init__(self, hidden_dim: int, heads: int, ff_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim % heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by transformer_heads ({heads})")
        # Built in nn.TransformerEncoderLayer's order so that a seed gives the same initial weights.
        self.self_attn = nn.MultiheadAttention(hidden_dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(hidden_dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.heads = heads
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, H]`` -> ``[B, S, H]``; bidirectional, no mask, no positional encoding."""
        B, S, H = x.shape
        p = self.dropout if self.training else 0.0
        attn = self.self_attn
        qkv = F.linear(self.norm1(x), attn.in_proj_weight, attn.in_proj_bias)  # [B, S, 3H]
        q, k, v = qkv.view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # [B, nh, S, hd] each
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, nh, S, hd]
        a = a.transpose(1, 2).reshape(B, S, H)  # [B, S, H]
        x = x + F.dropout(attn.out_proj(a), p, self.training)
        h = F.dropout(F.gelu(self.linear1(self.norm2(x))), p, self.training)  # [B, S, ff]
        return x + F.dropout(self.linear2(h), p, self.training)


class SetTransformer(nn.Module):
    """A stack of :class:`SetAttentionLayer` and a final LayerNorm; the state_dict of nn.TransformerEncoder."""

    def __init__(self, hidden_dim: int, heads: int, layers: int, ff_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        layer = SetAttentionLayer(hidden_dim, heads, ff_dim, dropout)
        # deep copies, as nn.TransformerEncoder makes: every layer starts from the same weights, so runs
        # seeded before this module existed still start from the same model
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)  # [B, S, H]
        return self.norm(x)


def set_transformer(
    hidden_dim: int, heads: int, layers: int, ff_dim: int, dropout: float = 0.0, *, impl: str = "sdpa"
) -> nn.Module:
    """Pre-LN bidirectional transformer encoder over the cells of a set.

    No positional encoding is added anywhere: a set is unordered, so the encoder must be permutation
    equivariant. Pre-LN (``norm_first``) trains stably without a long warmup. ``impl="sdpa"`` (default) is
    :class:`SetTransformer`; ``impl="torch"`` is ``nn.TransformerEncoder``, kept for comparison (same
    state_dict keys, same outputs).
    """
    if hidden_dim % heads:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by transformer_heads ({heads})")
    if impl == "sdpa":
        return SetTransformer(hidden_dim, heads, layers, ff_dim, dropout)
    if impl != "torch":
        raise ValueError(f"unknown transformer impl {impl!r}; use 'sdpa' or 'torch'")
    layer = nn.TransformerEncoderLayer(
        d_model=hidden_dim,
        nhead=heads,
        dim_feedforward=ff_dim,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    # enable_nested_tensor only helps with padding masks (we have none) and warns with norm_first.
    return nn.TransformerEncoder(
        layer, num_layers=layers, norm=nn.LayerNorm(hidden_dim), enable_nested_tensor=False
    )
