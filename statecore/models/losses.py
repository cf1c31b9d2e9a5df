"""Distribution losses between sets of cells: energy distance (default) and RBF-MMD.

Both take batched sets ``x [B, S, G]`` and ``y [B, S', G]`` (or single sets ``[S, G]``) and return one
value per set ``[B]`` (a scalar for single sets). They are V-statistics (the diagonal of the
within-set distance matrices is included), which keeps them non-negative and zero exactly when the
two sets are the same multiset of cells. Control and perturbed cells are never paired one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LOSSES = ("energy", "mmd", "energy_mean")


def _as_batched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if x.dim() != y.dim() or x.dim() not in (2, 3):
        raise ValueError(f"sets must both be [S, G] or [B, S, G]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"sets have different widths: {x.shape[-1]} vs {y.shape[-1]}")
    single = x.dim() == 2
    if single:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: {x.shape[0]} vs {y.shape[0]}")
    return x, y, single


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``[B, S, S']`` through one batched matmul.

    torch.cdist's exact path is O(S²·G) scalar work and was half of a training step (profiled in
    bench/train_throughput.py). The matmul form ‖a‖² + ‖b‖² − 2a·b is BLAS-fast but loses precision
    for nearly equal points, so (1) both sets are centred on their pooled mean (distances are
    translation invariant and smaller norms mean less cancellation) and (2) pairs whose squared
    distance is within rounding of zero are recomputed exactly, which keeps identical sets at
    exactly zero loss and gives coincident points a zero (not NaN) gradient.
    """
    centre = torch.cat([a, b], dim=-2).mean(dim=-2, keepdim=True).detach()
    a, b = a - centre, b - centre
    a2 = (a * a).sum(-1)  # [B, S]
    b2 = (b * b).sum(-1)  # [B, S']
    d2 = a2.unsqueeze(-1) + b2.unsqueeze(-2) - 2.0 * torch.matmul(a, b.transpose(-1, -2))  # [B, S, S']
    scale = (a2.unsqueeze(-1) + b2.unsqueeze(-2)).detach()
    tol = 1e-3 if a.dtype in (torch.float16, torch.bfloat16) else (1e-4 if a.dtype == torch.float32 else 1e-9)
    near = d2.detach() <= tol * scale
    safe = torch.where(near, torch.ones_like(d2), d2.clamp_min(1e-30))  # no sqrt(0) in the graph
    d = torch.where(near, torch.zeros_like(d2), safe.sqrt())
    if bool(near.any()):
        bi, i, j = near.nonzero(as_tuple=True)
        exact = torch.linalg.vector_norm(a[bi, i] - b[bi, j], dim=-1)  # few pairs: O(pairs·G)
        d = d.index_put((bi, i, j), exact.to(d.dtype))
    return d


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance 2·E‖x−y‖ − E‖x−x′‖ − E‖y−y′‖, halved: mean‖x−y‖ − ½mean‖x−x′‖ − ½mean‖y−y′‖."""
    x, y, single = _as_batched(x, y)
    xy = _dist(x, y).mean(dim=(1, 2))  # [B]
    xx = _dist(x, x).mean(dim=(1, 2))
    yy = _dist(y, y).mean(dim=(1, 2))
    out = xy - 0.5 * xx - 0.5 * yy
    return out[0] if single else out


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per set median of the pooled pairwise distances (off-diagonal), detached; shape [B]."""
    x, y, _ = _as_batched(x, y)
    z = torch.cat([x, y], dim=1).detach()  # [B, S+S', G]
    d = _dist(z, z)
    n = z.shape[1]
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    med = d[:, off].median(dim=1).values  # [B]
    return med.clamp_min(1e-6)


def compute_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float | torch.Tensor | None = None,
    scales: Sequence[float] = (0.5, 1.0, 2.0),
) -> torch.Tensor:
    """Squared RBF-MMD, averaged over bandwidths ``sigma * scale``.

    ``sigma=None`` uses the median heuristic per set (median pooled pairwise distance); the several
    scales keep a gradient when the sets are far apart or nearly equal.
    """
    x, y, single = _as_batched(x, y)
    if sigma is None:
        base = median_bandwidth(x, y)  # [B]
    else:
        base = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    dxx, dyy, dxy = _dist(x, x) ** 2, _dist(y, y) ** 2, _dist(x, y) ** 2
    total = x.new_zeros(x.shape[0])
    for s in scales:
        gamma = 1.0 / (2.0 * (base * s) ** 2)  # [B]
        g = gamma.view(-1, 1, 1)
        total = total + (
            torch.exp(-g * dxx).mean(dim=(1, 2))
            + torch.exp(-g * dyy).mean(dim=(1, 2))
            - 2.0 * torch.exp(-g * dxy).mean(dim=(1, 2))
        )
    out = total / len(scales)
    return out[0] if single else out


def energy_mean_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance plus the distance between the two set means, ``‖mean(x) − mean(y)‖``.

    With many perturbations of modest effect, a set's energy distance is dominated by cell-to-cell
    noise and a mean shift of a few genes barely moves it (it enters roughly as ‖Δμ‖² / typical
    distance); the mean term (same units, gradient that does not vanish for small shifts) makes the
    per-perturbation shift learnable in a few hundred steps. Zero for identical sets, like energy.
    """
    x, y, single = _as_batched(x, y)
    diff = x.mean(dim=1) - y.mean(dim=1)  # [B, G]
    # sqrt(‖d‖² + eps) - sqrt(eps): no NaN gradient at an exact match, still 0 there
    eps = 1e-12
    mean_term = (diff.pow(2).sum(-1) + eps).sqrt() - eps**0.5
    out = energy_distance(x, y) + mean_term
    return out[0] if single else out


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss function by name (``energy`` | ``mmd``); returns per-set values [B]."""
    if name == "energy":
        return energy_distance
    if name == "mmd":
        return compute_mmd
    if name == "energy_mean":
        return energy_mean_distance
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
