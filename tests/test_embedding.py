"""State Embedding model: shapes, soft binning, token choice, gene features, training, transform, checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statecore.config import SEConfig, TrainConfig
from statecore.data.gene_features import (
    build_gene_features,
    file_gene_features,
    pca_gene_features,
    random_gene_features,
)
from statecore.embedding.se import ExpressionRows, embed_adata, fit_embedding, load_embedding, transform
from statecore.errors import CheckpointError, DataError
from statecore.models.embedding import SoftBinning, StateEmbeddingModel, sample_loss_genes, top_l_indices

TINY = SEConfig(
    gene_feature_dim=16,
    hidden_dim=32,
    L=24,
    heads=4,
    layers=1,
    n_bins=6,
    output_dim=16,
    n_loss_genes=32,
    decoder_hidden_dim=32,
    gene_features="pca",
    batch_cells=32,
)
# 200 steps: fewer leave the embeddings nearly collapsed (measured spread 0.01 at 60 steps, 0.2 at 200)
TRAIN = TrainConfig(steps=200, lr=3e-3, warmup_steps=5, val_every=20, log_every=20, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # two shared cores on the test machine


@pytest.fixture(scope="module")
def counts():
    from statecore.data.synthetic import make_perturbation_adata

    return make_perturbation_adata(n_cells=300, n_genes=80, n_perturbations=6, contexts=("c0", "c1"), seed=1)


@pytest.fixture(scope="module")
def fitted(counts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("se") / "run"
    rows: list[dict] = []
    run = fit_embedding(counts.copy(), TINY, TRAIN, run_dir, callback=rows.append)
    return run, run_dir, rows


# ------------------------------------------------------------------ model


def test_walkthrough_api_shapes_and_unit_norm():
    model = StateEmbeddingModel(gene_feature_dim=12, hidden_dim=32, L=10, output_dim=8)
    assert model.config.L == 10 and model.gene_table is None
    B, L, F, G, K = 5, 10, 12, 40, 7
    gf = torch.randn(B, L, F)
    z = model(gf, torch.rand(B, L))
    assert z.shape == (B, 8)
    assert torch.allclose(z.norm(dim=-1), torch.ones(B), atol=1e-5)
    table = torch.randn(G, F)
    idx = torch.randint(0, G, (B, K))
    loss = model.loss(z, table, torch.rand(B, K), idx, depth=torch.rand(B))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # the gathered form [B, K, F] without idx gives the same loss
    same = model.loss(z, table[idx], torch.ones(B, K))
    assert torch.allclose(same, model.loss(z, table, torch.ones(B, K), idx))
    with pytest.raises(ValueError, match=r"\[B, L, F\]"):
        model(torch.randn(B, F), torch.rand(B, L))
    with pytest.raises(ValueError, match="idx"):
        model.loss(z, table, torch.rand(B, K), idx[:, :3])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="divisible by heads"):
        StateEmbeddingModel(hidden_dim=30, heads=4)
    with pytest.raises(ValueError, match="SEConfig.L"):
        StateEmbeddingModel(L=0)


def test_soft_binning_weights_sum_to_one_and_are_differentiable():
    torch.manual_seed(0)
    binning = SoftBinning(n_bins=7, dim=16, hidden=8)
    values = torch.tensor([[0.0, 0.5, 3.0, 8.0]], requires_grad=True)
    w = binning.weights(values)
    assert w.shape == (1, 4, 7)
    assert torch.allclose(w.sum(-1), torch.ones(1, 4), atol=1e-6)
    assert (w > 0).all()
    assert not torch.allclose(w[0, 0], w[0, 3])  # different expression, different mix
    out = binning(values)
    assert out.shape == (1, 4, 16)
    out.pow(2).sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert binning.bins.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in binning.mlp.parameters())


def test_top_l_picks_highest_breaks_ties_by_key_and_pads_with_unexpressed():
    values = np.array([[0.0, 2.0, 2.0, 5.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    a = top_l_indices(values, 4, np.arange(6)[::-1].copy())  # higher index wins ties
    assert a[0].tolist() == [3, 2, 1, 5]
    assert a[1].tolist() == [2, 5, 4, 3]  # one expressed gene, padded with unexpressed ones
    b = top_l_indices(values, 4, np.arange(6))
    assert b[0].tolist() == [3, 1, 2, 0]
    assert top_l_indices(values, 50, np.arange(6)).shape == (2, 6)  # L larger than the gene count
    rng = np.random.default_rng(0)
    seen = {tuple(top_l_indices(values, 2, rng.random(values.shape))[0]) for _ in range(40)}
    assert seen == {(3, 1), (3, 2)}  # random ties reach both tied genes


def test_sample_loss_genes_mixes_expressed_and_unexpressed():
    rng = np.random.default_rng(0)
    values = np.zeros((3, 50))
    values[:, :20] = 1.0
    idx = sample_loss_genes(values, 10, rng, expressed_fraction=0.5)
    assert idx.shape == (3, 10)
    assert (idx[:, :5] < 20).all() and (idx[:, 5:] >= 20).all()
    assert all(len(set(row[:5])) == 5 for row in idx)


# ------------------------------------------------------------------ gene features


def test_random_features_are_seeded_by_gene_name():
    a = random_gene_features(["A", "B", "C"], 8, seed=3)
    b = random_gene_features(["C", "A"], 8, seed=3)
    assert a.shape == (3, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a[2], b[0])
    np.testing.assert_array_equal(a[0], b[1])
    assert not np.allclose(random_gene_features(["A"], 8, seed=4), a[:1])


def test_pca_features_put_covarying_genes_together():
    rng = np.random.default_rng(0)
    f1, f2 = rng.random(200), rng.random(200)
    X = np.column_stack([f1, f1 * 2, f2, f2 * 3, rng.random(200) * 0.01, np.zeros(200)])
    feats = pca_gene_features(X, 4, seed=0)
    assert feats.shape == (6, 4)
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    assert cos(feats[0], feats[1]) > 0.99 and cos(feats[2], feats[3]) > 0.99
    assert abs(cos(feats[0], feats[2])) < 0.5
    assert np.allclose(feats[5], 0)  # a constant gene carries no loading
    np.testing.assert_array_equal(feats, pca_gene_features(X, 4, seed=0))
    assert pca_gene_features(X[:3], 10).shape == (6, 10)  # fewer components than asked: zero columns


def test_feature_file_is_aligned_by_name_with_clear_errors(tmp_path):
    csv = tmp_path / "esm.csv"
    csv.write_text("gene,f0,f1\nB,1,2\nA,3,4\nZ,5,6\n")
    np.testing.assert_array_equal(file_gene_features(csv, ["A", "B"]), [[3, 4], [1, 2]])
    with pytest.raises(DataError, match=r"lacks 1 of the 3 genes .*'Q'"):
        file_gene_features(csv, ["A", "Q", "B"])
    npy = tmp_path / "feat.npy"
    np.save(npy, np.arange(6, dtype=np.float32).reshape(3, 2))
    with pytest.raises(DataError, match="genes.txt"):
        file_gene_features(npy, ["A"])
    (tmp_path / "feat.genes.txt").write_text("A\nB\nC\n")
    np.testing.assert_array_equal(file_gene_features(npy, ["C", "A"]), [[4, 5], [0, 1]])
    npz = tmp_path / "feat.npz"
    np.savez(npz, genes=np.array(["A", "B"]), features=np.ones((2, 3)))
    assert file_gene_features(npz, ["B"]).shape == (1, 3)
    (tmp_path / "x.pt").write_bytes(b"not read")
    with pytest.raises(DataError, match="unsupported"):
        build_gene_features("file", ["A"], 4, path=tmp_path / "x.pt")
    with pytest.raises(DataError, match="does not exist"):
        build_gene_features("file", ["A"], 4, path=tmp_path / "absent.csv")
    with pytest.raises(DataError, match="unknown gene feature kind"):
        build_gene_features("esm", ["A"], 4)


# ------------------------------------------------------------------ data access


def test_counts_and_log1p_inputs_give_the_same_rows(counts):
    import anndata as ad
    import scipy.sparse as sp

    X = counts.X.toarray() if sp.issparse(counts.X) else counts.X
    logged = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    a = ExpressionRows(counts)
    b = ExpressionRows(ad.AnnData(X=sp.csr_matrix(logged), var=counts.var.copy()))
    assert a.is_counts and not b.is_counts
    np.testing.assert_allclose(a.rows(np.arange(10)), b.rows(np.arange(10)), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="non-negative"):
        ExpressionRows(ad.AnnData(X=-np.ones((3, 4), dtype=np.float32)))


def test_gene_subsets_gather_the_same_values_and_missing_genes_read_zero(counts):
    full = ExpressionRows(counts)
    cells = np.array([4, 0, 9])
    want = full.rows(cells)
    names = list(full.genes)
    picked = [names[7], names[2], names[30]]
    sub = ExpressionRows(counts, picked)
    np.testing.assert_array_equal(sub.rows(cells), want[:, [7, 2, 30]])  # normalised over every gene
    holes = ExpressionRows(counts, [names[3], "absent", names[1]], allow_missing=True)
    got = holes.rows(cells)
    assert holes.n_missing == 1 and got.shape == (3, 3)
    np.testing.assert_array_equal(got[:, [0, 2]], want[:, [3, 1]])
    assert not got[:, 1].any()
    np.testing.assert_array_equal(sub.depth, full.depth)  # depth is the cell's, whatever the genes


# ------------------------------------------------------------------ training and transform


def test_loss_decreases_on_synthetic_data(fitted):
    _, run_dir, rows = fitted
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == TRAIN.steps // TRAIN.val_every
    assert val[-1] < 0.8 * val[0], val
    status = __import__("json").loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == TRAIN.steps
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(rows)


def test_fixed_gene_features_stay_fixed_learned_ones_train(counts):
    small = TrainConfig(steps=3, warmup_steps=1, seed=0)
    fixed = fit_embedding(counts.copy(), TINY.replace(gene_features="random", batch_cells=16), small)
    assert not fixed.model.gene_table.requires_grad
    np.testing.assert_array_equal(
        fixed.model.gene_table.numpy(), random_gene_features(fixed.genes, 16, seed=0)
    )
    learned = fit_embedding(counts.copy(), TINY.replace(gene_features="learned", batch_cells=16), small)
    assert learned.model.gene_table.requires_grad
    assert not np.allclose(
        learned.model.gene_table.detach().numpy(), random_gene_features(learned.genes, 16, seed=0)
    )


def test_transform_is_deterministic_and_order_independent(fitted, counts):
    run, run_dir, _ = fitted
    z1 = transform(run_dir, counts)
    z2 = transform(run_dir, counts, batch_size=7)
    assert z1.shape == (counts.n_obs, TINY.output_dim) and z1.dtype == np.float32
    np.testing.assert_allclose(z1, z2, atol=1e-5)
    np.testing.assert_array_equal(z1, transform(run_dir, counts))
    perm = np.random.default_rng(0).permutation(counts.n_obs)
    np.testing.assert_allclose(transform(run, counts[perm].copy()), z1[perm], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(z1, axis=1), 1.0, atol=1e-5)


def test_embedding_separates_cell_contexts(fitted, counts):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    z = transform(fitted[0], counts)
    assert np.linalg.norm(z - z.mean(0), axis=1).mean() > 0.1  # not collapsed to one point
    y = counts.obs["context"].astype(str).to_numpy()
    acc = cross_val_score(KNeighborsClassifier(10), z, y, cv=3).mean()
    assert acc > 0.8  # two balanced contexts: chance is 0.5 (measured 0.94)


def test_checkpoint_round_trip_gives_identical_embeddings(fitted, counts):
    run, run_dir, _ = fitted
    loaded = load_embedding(run_dir)
    assert loaded.config == run.config and loaded.genes == run.genes
    for (name, a), (_, b) in zip(run.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(transform(run, counts), transform(loaded, counts))


def test_embed_adata_writes_a_copy(fitted, counts):
    _, run_dir, _ = fitted
    original = counts.copy()
    out = embed_adata(run_dir, original)
    assert "X_state" in out.obsm and "X_state" not in original.obsm
    assert out.obsm["X_state"].shape == (counts.n_obs, TINY.output_dim)


def test_missing_genes_fail_clearly_unless_allowed(fitted, counts):
    _, run_dir, _ = fitted
    sub = counts[:, 5:].copy()
    with pytest.raises(DataError, match="lacks 5 of the model's 80 genes"):
        transform(run_dir, sub)
    assert transform(run_dir, sub, allow_missing_genes=True).shape == (counts.n_obs, TINY.output_dim)
    renamed = counts.copy()
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    with pytest.raises(DataError, match="none of the model's"):
        transform(run_dir, renamed, allow_missing_genes=True)


def test_load_rejects_incomplete_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a finished embedding run"):
        load_embedding(tmp_path)
