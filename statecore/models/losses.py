"""Distribution losses between sets of cells: energy distance (default) and RBF-MMD.

Both take batched sets ``x [B, S, G]`` and ``y [B, S', G]`` (or single sets ``[S, G]``) and return one
value per set ``[B]`` (a scalar for single sets). They are V-statistics (the diagonal of the
within-set distance matrices is included), which keeps them non-negative and zero exactly when the
two sets are the same multiset of cells. Control and perturbed cells are never paired one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SetDistances:
    """Euclidean distances within and between two batches of sets: ``xy [B, S, S']``, ``xx [B, S, S]``,
    ``yy [B, S', S']`` (the diagonals of xx and yy are exactly zero)."""

    xy: torch.Tensor
    xx: torch.Tensor
    yy: torch.Tensor


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float16, torch.bfloat16) else (1e-4 if dtype == torch.float32 else 1e-9)


def set_distances(x: torch.Tensor, y: torch.Tensor) -> SetDistances:
    """The x–y, x–x and y–y distance blocks that the energy distance and the MMD need, each pair's product
    computed once.

    torch.cdist's exact path is O(S²·G) scalar work and was half of a training step (docs/PERFORMANCE.md);
    the matmul form ‖a‖² + ‖b‖² − 2a·b is BLAS-fast but loses precision for nearly equal points, so (1) all
    cells are centred once on their pooled mean (distances are translation invariant and smaller norms mean
    less cancellation) and their squared norms are computed once for the three blocks, (2) the diagonals
    of the within-set blocks are exactly zero and (3) other pairs whose squared distance is within rounding
    of zero are recomputed exactly, which keeps identical sets at exactly zero loss and gives coincident
    points a zero (not NaN) gradient. Step (3) reads one boolean on the host (the loss's only sync).
    A single Gram matrix of the pooled cells would compute every x–y product twice (the x–y and y–x
    blocks): 4·S²·G instead of 3·S²·G multiply-adds, measured slower at S=256, 2,000 genes.
    """
    s = x.shape[-2]
    z = torch.cat([x, y], dim=-2)  # [B, S+S', G]
    z = z - z.mean(dim=-2, keepdim=True).detach()
    x, y = z[:, :s], z[:, s:]
    sq = (z * z).sum(-1)  # [B, S+S']
    sx, sy = sq[:, :s], sq[:, s:]
    tol = _tolerance(z.dtype)
    blocks, fixes = [], []
    for a, b, sa, sb, same in ((x, y, sx, sy, False), (x, x, sx, sx, True), (y, y, sy, sy, True)):
        pair = sa.unsqueeze(-1) + sb.unsqueeze(-2)  # [B, Sa, Sb]
        d2 = pair - 2.0 * torch.bmm(a, b.transpose(-1, -2))  # ‖a‖² + ‖b‖² − 2a·b, [B, Sa, Sb]
        near = d2.detach() <= tol * pair.detach()
        if same:
            diag = torch.eye(a.shape[-2], dtype=torch.bool, device=z.device)
            near, close = near | diag, near & ~diag
        else:
            close = near
        safe = torch.where(near, torch.ones_like(d2), d2.clamp_min(1e-30))  # no sqrt(0) in the graph
        blocks.append(torch.where(near, torch.zeros_like(d2), safe.sqrt()))
        fixes.append(close)
    if bool(torch.stack([c.any() for c in fixes]).any()):
        for k, ((a, b), close) in enumerate(zip(((x, y), (x, x), (y, y)), fixes)):
            bi, i, j = close.nonzero(as_tuple=True)
            if bi.numel():
                exact = torch.linalg.vector_norm(a[bi, i] - b[bi, j], dim=-1)  # few pairs: O(pairs·G)
                blocks[k] = blocks[k].index_put((bi, i, j), exact.to(blocks[k].dtype))
    return SetDistances(*blocks)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance 2·E‖x−y‖ − E‖x−x′‖ − E‖y−y′‖, halved: mean‖x−y‖ − ½mean‖x−x′‖ − ½mean‖y−y′‖."""
    x, y, single = _as_batched(x, y)
    d = set_distances(x, y)
    out = d.xy.mean(dim=(1, 2)) - 0.5 * d.xx.mean(dim=(1, 2)) - 0.5 * d.yy.mean(dim=(1, 2))  # [B]
    return out[0] if single else out


def _median_pooled(d: SetDistances) -> torch.Tensor:
    """Per set median of the pooled distance matrix's off-diagonal entries, detached; shape [B].

    The pooled matrix's off-diagonal holds x–y twice (x–y and y–x), and the within-set off-diagonals."""
    B = d.xy.shape[0]

    def offdiag(m: torch.Tensor) -> torch.Tensor:
        n = m.shape[-1]
        return m[:, ~torch.eye(n, dtype=torch.bool, device=m.device)]  # [B, n(n-1)]

    xy = d.xy.detach().reshape(B, -1)
    vals = torch.cat([xy, xy, offdiag(d.xx.detach()), offdiag(d.yy.detach())], dim=1)
    return vals.median(dim=1).values.clamp_min(1e-6)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per set median of the pooled pairwise distances (off-diagonal), detached; shape [B]."""
    x, y, _ = _as_batched(x, y)
    return _median_pooled(set_distances(x.detach(), y.detach()))


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
    d = set_distances(x, y)  # also the median heuristic's input
    if sigma is None:
        base = _median_pooled(d)  # [B]
    else:
        base = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    dxx, dyy, dxy = d.xx**2, d.yy**2, d.xy**2
    total = x.new_zeros(x.shape[0])
    for s in scales:
        g = (1.0 / (2.0 * (base * s) ** 2)).view(-1, 1, 1)  # [B, 1, 1]
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


def discrimination_loss(
    pred_shift: torch.Tensor,
    table: torch.Tensor,
    own: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Cross-entropy of picking each set's own perturbation among the real shifts of its context.

    ``pred_shift [B, G]``: each predicted set's mean minus its control cells' mean; ``table [K, G]``: real
    mean shifts of (context, perturbation) pairs; ``own [B]`` long: the row of each set's own pair (-1:
    no term for that set); ``candidates [B, K]`` bool: the rows of the set's context (its own included).
    Distances are mean absolute differences over genes, the L1 that the PDS ranks by; logits are
    ``-d / (temperature * mean candidate distance)`` so the term does not depend on the data's scale.
    Zero when no set has its own row and another candidate."""
    if table.shape[0] == 0:
        return pred_shift.sum() * 0.0
    own_ok = (own >= 0) & candidates[torch.arange(len(own)), own.clamp_min(0)]
    keep = own_ok & (candidates.sum(dim=1) >= 2)
    if not bool(keep.any()):
        return pred_shift.sum() * 0.0
    d = (pred_shift[keep, None, :] - table[None]).abs().mean(dim=-1)  # [B', K]
    cand = candidates[keep]
    scale = (d.detach() * cand).sum(dim=1) / cand.sum(dim=1)
    logits = (-d / (temperature * scale.clamp_min(1e-8))[:, None]).masked_fill(~cand, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, own[keep])


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss function by name (``energy`` | ``mmd``); returns per-set values [B]."""
    if name == "energy":
        return energy_distance
    if name == "mmd":
        return compute_mmd
    if name == "energy_mean":
        return energy_mean_distance
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
