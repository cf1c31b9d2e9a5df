import itertools

import pytest
import torch

from statecore.models.losses import compute_mmd, energy_distance, get_loss

torch.set_num_threads(1)


def _energy_ref(x, y):
    def md(a, b):
        return sum(torch.linalg.norm(ai - bj) for ai, bj in itertools.product(a, b)) / (len(a) * len(b))

    return md(x, y) - 0.5 * md(x, x) - 0.5 * md(y, y)


def _mmd_ref(x, y, sigma, scales):
    def k(a, b, s):
        return sum(
            torch.exp(-torch.sum((ai - bj) ** 2) / (2 * s * s)) for ai, bj in itertools.product(a, b)
        ) / (len(a) * len(b))

    return sum(k(x, x, sigma * s) + k(y, y, sigma * s) - 2 * k(x, y, sigma * s) for s in scales) / len(scales)


def _median_ref(x, y):
    z = torch.cat([x, y])
    d = [torch.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(len(z)) if i != j]
    return torch.stack(d).median()


@pytest.fixture
def sets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 6, 4, generator=g, dtype=torch.float64), torch.randn(
        3, 5, 4, generator=g, dtype=torch.float64
    ) + 0.5


def test_energy_matches_loop_reference(sets):
    x, y = sets
    got = energy_distance(x, y)
    for b in range(3):
        assert got[b].item() == pytest.approx(_energy_ref(x[b], y[b]).item(), rel=1e-9)
    assert energy_distance(x[0], y[0]).dim() == 0


def test_mmd_matches_loop_reference_fixed_and_median(sets):
    x, y = sets
    got = compute_mmd(x, y, sigma=1.3, scales=(0.5, 1.0, 2.0))
    med = compute_mmd(x, y)
    for b in range(3):
        assert got[b].item() == pytest.approx(_mmd_ref(x[b], y[b], 1.3, (0.5, 1.0, 2.0)).item(), rel=1e-9)
        s = _median_ref(x[b], y[b]).item()
        assert med[b].item() == pytest.approx(_mmd_ref(x[b], y[b], s, (0.5, 1.0, 2.0)).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["energy", "mmd", "energy_mean"])
def test_properties_zero_positive_gradients(sets, name):
    fn = get_loss(name)
    x, y = sets
    assert torch.allclose(fn(x, x.clone()), torch.zeros(3, dtype=x.dtype), atol=1e-10)
    # a permutation of the same cells is the same set
    assert torch.allclose(fn(x, x[:, torch.randperm(6)]), torch.zeros(3, dtype=x.dtype), atol=1e-10)
    assert (fn(x, y) > 0).all()
    xr = x.clone().requires_grad_(True)
    fn(xr, y).sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    # identical sets: gradient finite (no NaN from the zero distances on the diagonal)
    xs = x.clone().requires_grad_(True)
    fn(xs, x).sum().backward()
    assert torch.isfinite(xs.grad).all()


def test_energy_mean_is_energy_plus_mean_distance(sets):
    x, y = sets
    got = get_loss("energy_mean")(x, y)
    for b in range(3):
        ref = _energy_ref(x[b], y[b]) + torch.linalg.norm(x[b].mean(0) - y[b].mean(0))
        assert got[b].item() == pytest.approx(ref.item(), rel=1e-6)


def test_energy_grows_with_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, 8, generator=g)
    vals = [energy_distance(x, x + s).item() for s in (0.1, 0.5, 2.0)]
    assert vals[0] < vals[1] < vals[2]


def test_bad_shapes():
    with pytest.raises(ValueError):
        energy_distance(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError):
        get_loss("l2")


# --------------------------------------------------------------------------- the one-Gram form vs before


def _dist_before(a, b):
    """Pairwise distances as the losses computed them before the pooled Gram matrix (one matmul per block)."""
    centre = torch.cat([a, b], dim=-2).mean(dim=-2, keepdim=True).detach()
    a, b = a - centre, b - centre
    a2, b2 = (a * a).sum(-1), (b * b).sum(-1)
    d2 = a2.unsqueeze(-1) + b2.unsqueeze(-2) - 2.0 * a @ b.transpose(-1, -2)
    scale = (a2.unsqueeze(-1) + b2.unsqueeze(-2)).detach()
    near = d2.detach() <= 1e-4 * scale
    d = torch.where(
        near, torch.zeros_like(d2), torch.where(near, torch.ones_like(d2), d2).clamp_min(1e-30).sqrt()
    )
    if bool(near.any()):
        bi, i, j = near.nonzero(as_tuple=True)
        d = d.index_put((bi, i, j), torch.linalg.vector_norm(a[bi, i] - b[bi, j], dim=-1))
    return d


def _energy_before(x, y):
    return (
        _dist_before(x, y).mean(dim=(1, 2))
        - 0.5 * _dist_before(x, x).mean(dim=(1, 2))
        - 0.5 * _dist_before(y, y).mean(dim=(1, 2))
    )


def _mmd_before(x, y, sigma, scales=(0.5, 1.0, 2.0)):
    dxx, dyy, dxy = _dist_before(x, x) ** 2, _dist_before(y, y) ** 2, _dist_before(x, y) ** 2
    g = [1.0 / (2.0 * (sigma * s) ** 2) for s in scales]
    return sum(
        torch.exp(-gi * dxx).mean(dim=(1, 2))
        + torch.exp(-gi * dyy).mean(dim=(1, 2))
        - 2.0 * torch.exp(-gi * dxy).mean(dim=(1, 2))
        for gi in g
    ) / len(scales)


@pytest.fixture
def cells():
    """Log1p-like sparse float32 sets of the training shape, with repeated cells (sets drawn with replacement)."""
    g = torch.Generator().manual_seed(3)
    x = torch.log1p(torch.poisson(torch.rand(4, 64, 300, generator=g) * 0.8, generator=g))
    y = torch.log1p(torch.poisson(torch.rand(4, 48, 300, generator=g) * 1.2, generator=g))
    x[:, 10] = x[:, 3]  # duplicates inside a set
    y[:, 5] = x[:, 7]  # and a cell shared by both sets
    return x, y


def test_pooled_energy_equals_before_float32(cells):
    x, y = cells
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    new, old = energy_distance(xa, y), _energy_before(xb, y)
    assert torch.allclose(new, old, rtol=1e-5, atol=1e-5)
    new.sum().backward()
    old.sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


def test_pooled_mmd_equals_before_float32(cells):
    x, y = cells
    new = compute_mmd(x, y, sigma=4.0)
    assert torch.allclose(new, _mmd_before(x, y, 4.0), rtol=1e-5, atol=1e-6)
