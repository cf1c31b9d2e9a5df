import pytest
import torch

from statecore.config import STConfig
from statecore.models.transition import StateTransitionModel

torch.set_num_threads(1)
SMALL = dict(
    num_genes=20,
    hidden_dim=16,
    transformer_heads=2,
    transformer_layers=2,
    mlp_hidden_dim=32,
    perturbation_dim=5,
)


def test_walkthrough_keywords_and_config_give_same_shapes():
    m1 = StateTransitionModel(**SMALL)
    m2 = StateTransitionModel(STConfig(**SMALL))
    assert m1.cfg == m2.cfg and m1.cfg.dropout == 0.0
    x, z = torch.rand(3, 7, 20), torch.rand(3, 7, 5)
    assert m1(x, z).shape == (3, 7, 20)
    assert m2(x, z[:, 0]).shape == (3, 7, 20)  # [B, P] broadcasts over the set
    assert (m1(x, z) >= 0).all()  # ReLU output


@pytest.mark.parametrize("residual", ["hidden", "expression", "none"])
def test_permutation_equivariance(residual):
    torch.manual_seed(0)
    m = StateTransitionModel(**SMALL, residual=residual, n_batches=2).eval()
    torch.nn.init.normal_(m.project_out[-1].weight)  # the expression residual starts at exact identity
    x, z = torch.rand(2, 9, 20), torch.rand(2, 5)
    b = torch.randint(0, 2, (2, 9))
    perm = torch.randperm(9)
    out = m(x, z, b)
    out_p = m(x[:, perm], z, b[:, perm])
    assert torch.allclose(out[:, perm], out_p, atol=1e-5)
    # the set matters: changing one cell changes the others' predictions (attention across cells)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert not torch.allclose(m(x2, z, b)[:, 1:], out[:, 1:])


def test_expression_residual_starts_as_identity():
    m = StateTransitionModel(**SMALL, residual="expression")
    x = torch.rand(2, 4, 20)
    assert torch.allclose(m(x, torch.rand(2, 5)), x)


def test_perturbation_changes_output_and_gradients_flow():
    torch.manual_seed(0)
    m = StateTransitionModel(**SMALL)
    x = torch.rand(2, 4, 20)
    z1, z2 = torch.eye(5)[[0, 0]], torch.eye(5)[[1, 1]]
    assert not torch.allclose(m(x, z1), m(x, z2))
    m(x, z1).sum().backward()
    assert all(p.grad is not None for p in m.pert_encoder.parameters())


def test_noise_input_and_bad_shapes():
    m = StateTransitionModel(**SMALL, noise_dim=4).eval()
    x = torch.rand(1, 4, 20)
    assert not torch.allclose(m(x, torch.rand(1, 5)), m(x, torch.rand(1, 5)))
    with pytest.raises(ValueError):
        m(torch.rand(1, 4, 19), torch.rand(1, 5))
    with pytest.raises(ValueError):
        StateTransitionModel(**SMALL, residual="bogus")


@pytest.mark.parametrize("train", [True, False])
def test_sdpa_transformer_equals_torch_encoder_and_loads_its_weights(train):
    from statecore.models.layers import set_transformer

    torch.manual_seed(0)
    new = set_transformer(16, 4, 2, 32, impl="sdpa").double().train(train)
    torch.manual_seed(0)
    old = set_transformer(16, 4, 2, 32, impl="torch").double().train(train)
    # same keys and, from the same seed, the same initial weights (seeded runs keep their starting model)
    assert list(new.state_dict()) == list(old.state_dict())
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())
    with torch.no_grad():  # different weights per layer, so a layer mix-up cannot pass
        for p in old.parameters():
            p.add_(0.1 * torch.randn_like(p))
    new.load_state_dict(old.state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = new(x), old(x2)
    assert torch.allclose(a, b, atol=1e-12)
    if train:
        a.square().sum().backward()
        b.square().sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-10)
        for (k, p), q in zip(new.named_parameters(), old.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-10), k


def test_checkpoint_keys_unchanged():
    keys = set(StateTransitionModel(**SMALL).state_dict())
    for k in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.bias", "norm2.weight"):
        assert f"transformer.layers.1.{k}" in keys
    assert "transformer.norm.weight" in keys
