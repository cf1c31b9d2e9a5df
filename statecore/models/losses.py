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


def pooled_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all cells of both sets, ``[B, S+S', S+S']`` (x's cells first).

    One batched Gram matrix of the pooled cells gives the x–y, x–x and y–y blocks that the energy
    distance and the MMD need, so the squared norms, the centring and the launch overhead are paid once,
    not three times. torch.cdist's exact path is O(S²·G) scalar work and was half of a training step
    (docs/PERFORMANCE.md); the matmul form ‖a‖² + ‖b‖² − 2a·b is BLAS-fast but loses precision for nearly
    equal points, so (1) the cells are centred on their pooled mean (distances are translation invariant
    and smaller norms mean less cancellation), (2) the diagonal is exactly zero and (3) off-diagonal pairs
    whose squared distance is within rounding of zero are recomputed exactly, which keeps identical sets at
    exactly zero loss and gives coincident points a zero (not NaN) gradient. Step (3) reads one boolean on
    the host (the only sync of the loss); it is skipped when no pair is that close.
    """
    z = torch.cat([x, y], dim=-2)  # [B, N, G]
    z = z - z.mean(dim=-2, keepdim=True).detach()
    sq = (z * z).sum(-1)  # [B, N]
    pair = sq.unsqueeze(-1) + sq.unsqueeze(-2)  # [B, N, N]
    d2 = torch.baddbmm(pair, z, z.transpose(-1, -2), alpha=-2.0)  # ‖a‖² + ‖b‖² − 2a·b, [B, N, N]
    tol = 1e-3 if z.dtype in (torch.float16, torch.bfloat16) else (1e-4 if z.dtype == torch.float32 else 1e-9)
    n = z.shape[-2]
    diag = torch.eye(n, dtype=torch.bool, device=z.device)  # [N, N]
    near = (d2.detach() <= tol * pair.detach()) | diag  # [B, N, N]
    safe = torch.where(near, torch.ones_like(d2), d2.clamp_min(1e-30))  # no sqrt(0) in the graph
    d = torch.where(near, torch.zeros_like(d2), safe.sqrt())
    close = near & ~diag
    if bool(close.any()):
        bi, i, j = close.nonzero(as_tuple=True)
        exact = torch.linalg.vector_norm(z[bi, i] - z[bi, j], dim=-1)  # few pairs: O(pairs·G)
        d = d.index_put((bi, i, j), exact.to(d.dtype))
    return d


def _block_means(d: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means of the x–y, x–x and y–y blocks of a pooled ``[B, N, N]`` matrix whose first ``s`` rows are x."""
    return d[:, :s, s:].mean(dim=(1, 2)), d[:, :s, :s].mean(dim=(1, 2)), d[:, s:, s:].mean(dim=(1, 2))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance 2·E‖x−y‖ − E‖x−x′‖ − E‖y−y′‖, halved: mean‖x−y‖ − ½mean‖x−x′‖ − ½mean‖y−y′‖."""
    x, y, single = _as_batched(x, y)
    xy, xx, yy = _block_means(pooled_distances(x, y), x.shape[1])  # [B] each
    out = xy - 0.5 * xx - 0.5 * yy
    return out[0] if single else out


def _median_offdiag(d: torch.Tensor) -> torch.Tensor:
    """Per set median of a pooled distance matrix's off-diagonal entries, detached; shape [B]."""
    n = d.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    return d.detach()[:, off].median(dim=1).values.clamp_min(1e-6)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per set median of the pooled pairwise distances (off-diagonal), detached; shape [B]."""
    x, y, _ = _as_batched(x, y)
    return _median_offdiag(pooled_distances(x.detach(), y.detach()))


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
    d = pooled_distances(x, y)  # [B, N, N], also the median heuristic's input
    if sigma is None:
        base = _median_offdiag(d)  # [B]
    else:
        base = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    d2 = d**2
    total = x.new_zeros(x.shape[0])
    for s in scales:
        gamma = 1.0 / (2.0 * (base * s) ** 2)  # [B]
        kxy, kxx, kyy = _block_means(torch.exp(-gamma.view(-1, 1, 1) * d2), x.shape[1])
        total = total + kxx + kyy - 2.0 * kxy
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
