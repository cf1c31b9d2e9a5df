"""Small building blocks shared by the models (AnnData-free)."""

from __future__ import annotations

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


def set_transformer(hidden_dim: int, heads: int, layers: int, ff_dim: int, dropout: float = 0.0) -> nn.Module:
    """Pre-LN bidirectional transformer encoder over the cells of a set.

    No positional encoding is added anywhere: a set is unordered, so the encoder must be permutation
    equivariant. Pre-LN (``norm_first``) trains stably without a long warmup.
    """
    if hidden_dim % heads:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by transformer_heads ({heads})")
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
