import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
from statecore.data.sets import PerturbationVocab
from statecore.inference.predict import predict
from statecore.models.transition import StateTransitionModel
from statecore.training.checkpoint import load_run
from statecore.training.engine import train_run
from statecore.training.priors import perturbation_shifts


def _tiny():
    # 2 genes; context a: ctrl mean (1, 0), A mean (3, 0), B mean (1, 2); context b: ctrl (0, 0), A (1, 1)
    rows = [
        ("a", "ctrl", [1, 0]),
        ("a", "ctrl", [1, 0]),
        ("a", "A", [2, 0]),
        ("a", "A", [4, 0]),
        ("a", "B", [1, 2]),
        ("b", "ctrl", [0, 0]),
        ("b", "A", [1, 1]),
        ("b", "B", [5, 5]),  # a held-out pair: must not enter the prior
    ]
    X = np.array([r[2] for r in rows], dtype=np.float32)
    obs = pd.DataFrame(
        {"context": [r[0] for r in rows], "perturbation": [r[1] for r in rows]},
        index=[f"c{i}" for i in range(len(rows))],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["g0", "g1"]))


def test_shift_table_exact_and_training_pairs_only():
    adata = _tiny()
    vocab = PerturbationVocab.from_labels(["ctrl", "A", "B"], "ctrl")
    table = perturbation_shifts(
        adata, genes=["g0", "g1"], vocab=vocab, train_pairs={"a": ["A", "B"], "b": ["A"]}
    )
    assert vocab.names == ("ctrl", "A", "B")
    np.testing.assert_allclose(table[0], [0, 0])
    np.testing.assert_allclose(
        table[1], [(2 + 1) / 2, (0 + 1) / 2]
    )  # mean of a: (3-1, 0-0) and b: (1-0, 1-0)
    np.testing.assert_allclose(table[2], [0, 2])  # only context a; b's B cells are held out


def test_shift_prior_is_additive_for_combinations_at_init():
    torch.manual_seed(0)
    model = StateTransitionModel(
        num_genes=2,
        hidden_dim=8,
        transformer_heads=2,
        transformer_layers=1,
        mlp_hidden_dim=16,
        perturbation_dim=3,
        residual="expression",
        shift_prior=True,
        relu_output=False,
    )
    model.pert_shift.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.5], [0.0, 2.0]]))
    x = torch.rand(1, 4, 2)
    z = torch.tensor([[0.0, 1.0, 1.0]])  # "A+B"
    out = model(x, z)  # the last layer starts at zero: output = control + shift(A) + shift(B)
    torch.testing.assert_close(out, x + torch.tensor([1.0, 2.5]))
    assert "pert_shift" in model.state_dict()


def test_trained_run_stores_prior_and_round_trips(prepared_synthetic, tmp_path):
    model = STConfig(
        hidden_dim=16,
        transformer_heads=2,
        transformer_layers=1,
        mlp_hidden_dim=32,
        set_size=8,
        residual="expression",
        shift_prior=True,
    )
    cfg = RunConfig(
        split=SplitConfig(task="underrepresented", context="c0"),
        model=model,
        train=TrainConfig(steps=4, batch_size=2, num_threads=1, val_every=2, warmup_steps=1),
    )
    train_run(prepared_synthetic, cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")
    shift = run.model.pert_shift.numpy()
    assert shift.shape == (len(run.vocab.names), len(run.genes))
    assert np.abs(shift[1:]).sum() > 0 and np.all(shift[0] == 0)
    # the prior of a test perturbation of the target context comes from the other contexts only
    split = run.split
    test_pert = split.test[split.context][0]
    pairs = {c: [*split.train.get(c, []), *split.val.get(c, [])] for c in {*split.train, *split.val}}
    expected = perturbation_shifts(prepared_synthetic, genes=run.genes, vocab=run.vocab, train_pairs=pairs)
    np.testing.assert_allclose(shift, expected, rtol=1e-6, atol=1e-6)
    assert test_pert not in split.train.get(split.context, []) + split.val.get(split.context, [])
    a = predict(run, prepared_synthetic, context=split.context, perturbations=[test_pert], seed=1)
    b = predict(
        load_run(tmp_path / "run"),
        prepared_synthetic,
        context=split.context,
        perturbations=[test_pert],
        seed=1,
    )
    np.testing.assert_array_equal(a.X, b.X)


def test_shift_prior_rejects_feature_vocab():
    vocab = PerturbationVocab.from_labels(["ctrl", "A"], "ctrl", features={"A": [1.0, 0.0]})
    with pytest.raises(ValueError, match="one-hot"):
        perturbation_shifts(_tiny(), genes=["g0", "g1"], vocab=vocab, train_pairs={"a": ["A"]})


def test_prior_cells_match_the_shift_in_the_set_mean_and_stay_non_negative():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 16, 5))  # many exact zeros, like expression
    shift = torch.tensor([0.3, -0.1, -5.0, 0.0, 0.05]).expand(2, 16, 5)
    moved = StateTransitionModel.prior_cells(x, shift)
    m = x.mean(dim=1)
    target = (m + shift[:, 0]).clamp_min(0)
    torch.testing.assert_close(moved.mean(dim=1), target, rtol=1e-5, atol=1e-6)
    assert (moved >= 0).all()
    assert torch.equal(moved[..., 3], x[..., 3])


def test_context_pairs_override_the_average_for_measured_pairs():
    from statecore.training.priors import context_pair_shifts

    adata = _tiny()
    vocab = PerturbationVocab.from_labels(["ctrl", "A", "B"], "ctrl")
    pairs = {"a": ["A", "B"], "b": ["A"]}
    index, pair_shift = context_pair_shifts(
        adata, genes=["g0", "g1"], vocab=vocab, train_pairs=pairs, contexts=["a", "b"]
    )
    assert index.tolist() == [[-1, 0, 1], [-1, 2, -1]]
    np.testing.assert_allclose(pair_shift, [[2, 0], [0, 2], [1, 1]])
    model = StateTransitionModel(
        num_genes=2,
        hidden_dim=8,
        transformer_heads=2,
        transformer_layers=1,
        mlp_hidden_dim=16,
        perturbation_dim=3,
        residual="expression",
        shift_prior=True,
        prior_mode="add",
        relu_output=False,
        n_contexts=2,
        n_prior_pairs=3,
    )
    model.pert_shift.copy_(
        torch.from_numpy(perturbation_shifts(adata, genes=["g0", "g1"], vocab=vocab, train_pairs=pairs))
    )
    model.pair_index.copy_(torch.from_numpy(index))
    model.pair_shift.copy_(torch.from_numpy(pair_shift))
    x = torch.zeros(3, 2, 2)
    z = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # "A+B"
    out = model(x, z, context=torch.tensor([0, 1, -1]))
    # context a: its own A (2, 0) and B (0, 2); b: its own A (1, 1) + B's average (0, 2); unknown: averages
    torch.testing.assert_close(out[:, 0], torch.tensor([[2.0, 2.0], [1.0, 3.0], [1.5, 2.5]]))
    single = model(x[:1], torch.tensor([[0.0, 1.0, 0.0]]), context=torch.tensor([0]))
    torch.testing.assert_close(single[0, 0], torch.tensor([1.5, 0.5]))  # singles keep the average


def test_prior_cells_scale_mode_keeps_zeros_of_expressed_genes():
    x = torch.tensor(
        [[[0.0, 0.0], [2.0, 0.0], [1.0, 0.02]]]
    )  # gene 0 expressed (mean 1), gene 1 barely (0.0067)
    shift = torch.tensor([0.5, 0.3]).expand(1, 3, 2)
    moved = StateTransitionModel.prior_cells(x, shift, mode="scale")
    torch.testing.assert_close(moved.mean(dim=1), x.mean(dim=1) + torch.tensor([0.5, 0.3]))
    assert moved[0, 0, 0] == 0  # an expressed gene's zero stays zero when scaled
    assert torch.all(moved[0, :, 1] > 0)  # a barely expressed gene takes the shift additively
    torch.testing.assert_close(StateTransitionModel.prior_cells(x, shift, mode="add"), x + shift)


def _loo_model(**kw):
    return StateTransitionModel(
        num_genes=2,
        hidden_dim=8,
        transformer_heads=2,
        transformer_layers=1,
        mlp_hidden_dim=16,
        perturbation_dim=3,
        residual="expression",
        shift_prior=True,
        prior_mode="add",
        relu_output=False,
        n_contexts=3,
        n_prior_pairs=4,
        **kw,
    )


def _fill_loo(model):
    # A measured in a (2, 0), b (1, 1), c (0, 2): average (1, 1); B only in a (0, 2)
    model.pert_shift.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 2.0]]))
    model.pair_index.copy_(torch.tensor([[-1, 0, 3], [-1, 1, -1], [-1, 2, -1]]))
    model.pair_shift.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 2.0]]))


def test_leave_context_out_prior_averages_the_other_contexts_only():
    torch.manual_seed(0)
    model = _loo_model(prior_singles="leave_context_out")
    _fill_loo(model)
    x = torch.zeros(5, 2, 2)
    a, b = [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    z = torch.tensor([a, a, a, b, a])
    out = model(x, z, context=torch.tensor([0, 1, 2, 0, -1]))[:, 0]
    # A in a: mean of b and c = (0.5, 1.5); in b: (1, 1); in c: (1.5, 0.5); B, measured in a only: its own
    # shift (no other context); A in an unknown context: the average of all three
    expected = torch.tensor([[0.5, 1.5], [1.0, 1.0], [1.5, 0.5], [0.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(out, expected)
    plain = _loo_model()  # the default: a single keeps the all-context average in every context
    _fill_loo(plain)
    avg = torch.tensor([[1.0, 1.0]] * 3 + [[0.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(plain(x, z, context=torch.tensor([0, 1, 2, 0, -1]))[:, 0], avg)


def test_context_gain_scales_the_prior_per_context_and_trains():
    torch.manual_seed(0)
    model = _loo_model(context_gain=True)
    _fill_loo(model)
    assert model.context_gain.shape == (3, 2) and model.context_gain.requires_grad
    x = torch.zeros(2, 2, 2)
    z = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    ctx = torch.tensor([1, -1])
    torch.testing.assert_close(model(x, z, context=ctx)[:, 0], torch.ones(2, 2))  # gain starts at 1
    with torch.no_grad():
        model.context_gain[1] = torch.tensor([1.0, -0.5])
    # context b: (1, 1) * (2, 0.5); an unknown context keeps gain 1
    torch.testing.assert_close(model(x, z, context=ctx)[:, 0], torch.tensor([[2.0, 0.5], [1.0, 1.0]]))
    model(x, z, context=ctx).sum().backward()
    assert model.context_gain.grad[1].abs().sum() > 0 and model.context_gain.grad[0].abs().sum() == 0


def test_discrimination_loss_prefers_the_own_shift():
    from statecore.models.losses import discrimination_loss

    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    cand = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    own = torch.tensor([0, 1, -1])  # the third set has no own row: no term
    good = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], requires_grad=True)
    bad = torch.tensor([[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]])
    lg, lb = discrimination_loss(good, table, own, cand), discrimination_loss(bad, table, own, cand)
    assert lg < 0.01 < lb
    lg.backward()
    assert good.grad[2].abs().sum() == 0  # a set without its own row gets no gradient
    # no set with an own row and a rival: zero, still differentiable
    none = discrimination_loss(good, table, torch.tensor([-1, -1, -1]), cand)
    assert float(none) == 0.0 and none.requires_grad


def test_trained_run_with_discrimination_term_and_options(prepared_synthetic, tmp_path):
    model = STConfig(
        hidden_dim=16,
        transformer_heads=2,
        transformer_layers=1,
        mlp_hidden_dim=32,
        set_size=8,
        residual="expression",
        shift_prior=True,
        prior_singles="leave_context_out",
        context_gain=True,
        disc_weight=0.5,
        prior_pairs="train",
        prior_shrink="context",
    )
    cfg = RunConfig(
        split=SplitConfig(task="underrepresented", context="c0"),
        model=model,
        train=TrainConfig(steps=4, batch_size=4, num_threads=1, val_every=2, warmup_steps=1),
    )
    train_run(prepared_synthetic, cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.config.model.disc_weight == 0.5 and run.model.context_gain is not None
    assert run.model.context_generic.abs().sum() > 0 and (run.model.pert_trust[1:] > 0).any()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("disc_loss" in line for line in lines)
    split = run.split
    pairs = {c: list(split.train.get(c, [])) for c in split.train}  # validation pairs left out
    expected = perturbation_shifts(prepared_synthetic, genes=run.genes, vocab=run.vocab, train_pairs=pairs)
    np.testing.assert_allclose(run.model.pert_shift.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_shrinkage_keeps_strong_shifts_and_zeroes_noise():
    from statecore.training.priors import shift_prior_tables, shrinkage_factor

    assert shrinkage_factor(np.array([3.0, 4.0]), 1.0) == pytest.approx(1 - 1 / 25)
    assert shrinkage_factor(np.array([0.1, 0.0]), 1.0) == 0.0 and shrinkage_factor(np.zeros(2), 1.0) == 0.0
    rng = np.random.default_rng(0)
    n = 200
    X = rng.normal(5.0, 1.0, size=(3 * n, 4)).astype(np.float32)
    X[n : 2 * n, 0] += 2.0  # A: a strong shift of gene 0; B: noise only
    obs = pd.DataFrame(
        {"context": ["a"] * (3 * n), "perturbation": ["ctrl"] * n + ["A"] * n + ["B"] * n},
        index=[f"c{i}" for i in range(3 * n)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(4)]))
    vocab = PerturbationVocab.from_labels(["ctrl", "A", "B"], "ctrl")
    kw = dict(genes=list(adata.var_names), vocab=vocab, train_pairs={"a": ["A", "B"]}, contexts=["a"])
    raw, shrunk = shift_prior_tables(adata, **kw), shift_prior_tables(adata, **kw, shrink=True)
    assert shrunk.shift[1, 0] == pytest.approx(raw.shift[1, 0], rel=0.01)  # strong: barely shrunk
    assert np.abs(shrunk.shift[2]).sum() < 0.5 * np.abs(raw.shift[2]).sum()  # noise: shrunk hard


def test_context_shrinkage_moves_noisy_singles_toward_the_context_mean():
    from statecore.training.priors import context_shrinkage

    rng = np.random.default_rng(1)
    n = 200
    labels = ["ctrl"] * n + ["A"] * n + ["B"] * n
    X = rng.normal(5.0, 1.0, size=(3 * n, 4)).astype(np.float32)
    X[n : 2 * n, 0] += 3.0  # A: strong
    obs = pd.DataFrame(
        {"context": ["a"] * (3 * n), "perturbation": labels}, index=[f"c{i}" for i in range(3 * n)]
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(4)]))
    vocab = PerturbationVocab.from_labels(["ctrl", "A", "B"], "ctrl")
    kw = dict(genes=list(adata.var_names), vocab=vocab, train_pairs={"a": ["A", "B"]}, contexts=["a", "b"])
    trust, generic = context_shrinkage(adata, **kw)
    assert trust[0] == 0 and trust[1] > 0.95 and trust[2] < 0.5
    table = perturbation_shifts(adata, genes=kw["genes"], vocab=vocab, train_pairs=kw["train_pairs"])
    np.testing.assert_allclose(generic[0], table[1:].mean(axis=0), atol=1e-5)  # mean of A and B in a
    np.testing.assert_allclose(generic[1], generic[0])  # b measured nothing: the mean of measured rows
    np.testing.assert_allclose(generic[2], generic[0])  # unknown context
    model = _loo_model(prior_shrink="context")
    _fill_loo(model)
    model.pert_trust.copy_(torch.tensor([0.0, 0.25, 1.0]))
    model.context_generic.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0], [2.0, 2.0]]))
    x = torch.zeros(3, 2, 2)
    z = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    out = model(x, z, context=torch.tensor([0, -1, 0]))[:, 0]
    # A (average (1, 1), trust 0.25) in a: 0.25 (1, 1) + 0.75 (4, 0); unknown: + 0.75 (2, 2); A+B unchanged
    expected = torch.tensor([[3.25, 0.25], [1.75, 1.75], [2.0, 2.0]])
    torch.testing.assert_close(out, expected)
