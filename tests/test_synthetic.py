import numpy as np
import pytest
import scipy.sparse as sp

from statecore.data.synthetic import make_perturbation_adata, planted_lfc


def test_shapes_labels_and_sparse_counts(synthetic_counts):
    a = synthetic_counts
    assert a.shape == (400, 120)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() > 0
    assert set(a.obs["context"]) == {"c0", "c1", "c2"} and set(a.obs["batch"]) == {"b0", "b1"}
    table = a.obs.groupby(["context", "perturbation"], observed=False).size().unstack()
    assert (table > 0).all().all()  # controls and every perturbation in every context
    syn = a.uns["synthetic"]
    assert syn["control"] == "ctrl" and len(syn["no_effect"]) == round(0.2 * 8)


def test_library_sizes_vary_log_normally():
    a = make_perturbation_adata(n_cells=300, n_genes=200, seed=1, library_sd=0.5)
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert 0.3 < np.std(np.log(lib)) < 0.8  # wide spread, like real libraries


def test_seed_determinism_and_dense_equals_sparse():
    a = make_perturbation_adata(n_cells=200, n_genes=50, n_perturbations=5, seed=3)
    b = make_perturbation_adata(n_cells=200, n_genes=50, n_perturbations=5, seed=3, sparse=False)
    c = make_perturbation_adata(n_cells=200, n_genes=50, n_perturbations=5, seed=4)
    assert isinstance(b.X, np.ndarray)
    np.testing.assert_array_equal(a.X.toarray(), b.X)
    assert (a.X != c.X).nnz > 0


def test_planted_effects_are_detectable():
    a = make_perturbation_adata(
        n_cells=3000,
        n_genes=100,
        n_perturbations=4,
        contexts=("c0", "c1"),
        frac_no_effect=0.25,
        seed=0,
        library_mean=20000,
        dispersion=50,
    )
    X = a.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    syn = a.uns["synthetic"]
    pert, ctx = a.obs["perturbation"].astype(str).to_numpy(), a.obs["context"].astype(str).to_numpy()
    for c in ("c0", "c1"):
        ctrl_mean = X[(pert == "ctrl") & (ctx == c)].mean(0)
        for p in [f"P{i:03d}" for i in range(4)]:
            delta = X[(pert == p) & (ctx == c)].mean(0) - ctrl_mean
            truth = planted_lfc(a, p, c)
            if p in set(syn["no_effect"]):
                assert not truth.any() and np.abs(delta).max() < 0.5
            else:
                hit = truth != 0
                assert np.corrcoef(delta[hit], truth[hit])[0, 1] > 0.8
                assert np.abs(delta[hit]).mean() > 3 * np.abs(delta[~hit]).mean()


def test_context_specific_modulation_and_combos():
    a = make_perturbation_adata(
        n_cells=200, n_genes=80, n_perturbations=6, frac_no_effect=0.0, n_combos=2, seed=2
    )
    syn = a.uns["synthetic"]
    eff = syn["effects"]["P000"]["contexts"]
    assert eff["c0"]["scale"] != eff["c1"]["scale"]
    assert not np.array_equal(planted_lfc(a, "P000", "c0"), planted_lfc(a, "P000", "c1"))
    assert len(syn["combos"]) == 2
    combo = str(syn["combos"][0])
    x, y = combo.split("+")
    additive = planted_lfc(a, x, "c0") + planted_lfc(a, y, "c0")
    diff = planted_lfc(a, combo, "c0") - additive
    assert 0 < np.count_nonzero(diff) <= 5  # additive plus a small interaction on few genes
    assert combo in set(a.obs["perturbation"])


def test_h5ad_roundtrip(tmp_path, synthetic_counts):
    import anndata as ad

    path = tmp_path / "s.h5ad"
    synthetic_counts.write_h5ad(path)
    b = ad.read_h5ad(path)
    for p in ("P000", "P001"):
        np.testing.assert_allclose(planted_lfc(b, p, "c1"), planted_lfc(synthetic_counts, p, "c1"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_combos"):
        make_perturbation_adata(n_cells=50, n_genes=20, n_perturbations=2, n_combos=5)
    with pytest.raises(ValueError, match="contexts"):
        make_perturbation_adata(n_cells=50, n_genes=20, contexts=("a", "a"))


def test_simulate_cli(tmp_path):
    from statecore.cli import main

    out = tmp_path / "sim.h5ad"
    assert (
        main(
            [
                "simulate",
                "-o",
                str(out),
                "--n-cells",
                "120",
                "--n-genes",
                "30",
                "--n-perturbations",
                "3",
                "--contexts",
                "2",
                "--n-batches",
                "2",
            ]
        )
        == 0
    )
    import anndata as ad

    b = ad.read_h5ad(out)
    assert b.shape == (120, 30) and set(b.obs["batch"]) == {"b0", "b1"}
