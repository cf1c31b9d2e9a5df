"""Track B decoder and the α-weighted combined loss."""

from __future__ import annotations

import pytest
import torch

from statecore.models.decoder import GeneDecoder, embedding_track_loss
from statecore.models.losses import energy_distance


@pytest.fixture
def sets():
    g = torch.Generator().manual_seed(0)
    pred_emb = torch.randn(3, 8, 16, generator=g, requires_grad=True)
    true_emb = torch.randn(3, 10, 16, generator=g)
    pred_expr = torch.rand(3, 8, 30, generator=g, requires_grad=True)
    true_expr = torch.rand(3, 10, 30, generator=g) * 2
    return pred_emb, true_emb, pred_expr, true_expr


def test_decoder_shapes_and_non_negative_output():
    dec = GeneDecoder(16, 30, hidden_dim=32)
    out = dec(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 30) and (out >= 0).all()
    assert GeneDecoder(16, 30, hidden_dim=32, relu_output=False)(torch.randn(4, 16) * 10).min() < 0
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        dec(torch.randn(2, 5, 15))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 2.5])
def test_alpha_is_applied(sets, alpha):
    pred_emb, true_emb, pred_expr, true_expr = sets
    res = embedding_track_loss(pred_emb, true_emb, pred_expr, true_expr, alpha=alpha, loss_fn=energy_distance)
    emb = energy_distance(pred_emb, true_emb).mean()
    expr = energy_distance(pred_expr, true_expr).mean()
    assert expr > 0 and emb > 0
    torch.testing.assert_close(res.emb, emb)
    torch.testing.assert_close(res.expr, expr)
    torch.testing.assert_close(res.total, emb + alpha * expr)


def test_alpha_scales_the_expression_gradient(sets):
    pred_emb, true_emb, pred_expr, true_expr = sets
    grads = []
    for alpha in (0.1, 0.3):
        pred_expr.grad = None
        embedding_track_loss(pred_emb, true_emb, pred_expr, true_expr, alpha=alpha).total.backward()
        grads.append(pred_expr.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], 3 * grads[0])
    pred_expr.grad = None
    embedding_track_loss(pred_emb, true_emb, pred_expr, true_expr, alpha=0.0).total.backward()
    assert pred_expr.grad is None or pred_expr.grad.abs().sum() == 0


def test_named_losses_and_bad_inputs(sets):
    pred_emb, true_emb, pred_expr, true_expr = sets
    assert torch.isfinite(embedding_track_loss(pred_emb, true_emb, pred_expr, true_expr, loss_fn="mmd").total)
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="alpha"):
            embedding_track_loss(pred_emb, true_emb, pred_expr, true_expr, alpha=bad)
    with pytest.raises(ValueError, match="same sets"):
        embedding_track_loss(pred_emb, true_emb, pred_expr[:, :5], true_expr)
    with pytest.raises(ValueError, match="unknown loss"):
        embedding_track_loss(pred_emb, true_emb, pred_expr, true_expr, loss_fn="l2")
