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
