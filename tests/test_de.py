"""statecore.evaluation.de: the vectorised rank-sum DE against scipy, per gene and group."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pdex._math import _expm1_vec  # pdex's own back-transform (numba, i.e. the C library)
from scipy.stats import false_discovery_control, mannwhitneyu

from statecore.errors import DataError
from statecore.evaluation.de import DE_COLUMNS, benjamini_hochberg, compute_de, rank_sum_arrays, rank_sum_de


def _data(seed=0, n_genes=40, float64=False):
    rng = np.random.default_rng(seed)
    labels = np.array(["ctrl"] * 50 + ["a"] * 20 + ["b"] * 7 + ["c"] * 1 + ["d"] * 30)
    x = np.log1p(rng.poisson(0.8, (labels.size, n_genes))).astype(np.float32)  # many ties, zeros
    x[labels == "a", :5] += 1.0
    x[:, 6] = 0.0  # zero everywhere
    x[:, 7] = 2.0  # constant non-zero
    x[:, 8] = rng.normal(0, 1, labels.size)  # negative values
    x[:5, 8] = -0.0  # -0.0 must tie with 0.0
    x[5:10, 8] = 0.0
    if float64:
        x = x.astype(np.float64) + rng.normal(0, 1e-9, x.shape)  # not representable in float32
    return x, labels


@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_scipy_mannwhitneyu(sparse, float64):
    x, labels = _data(float64=float64)
    xx = sp.csr_matrix(x) if sparse else x
    de = rank_sum_arrays(xx, labels, "ctrl", block_size=16)  # several gene blocks
    assert list(de.groups) == ["a", "b", "c", "d"]
    ref = x[labels == "ctrl"].astype(np.float64)
    for k, g in enumerate(de.groups):
        grp = x[labels == g].astype(np.float64)
        res = mannwhitneyu(grp, ref, axis=0, method="asymptotic", use_continuity=True)
        p = np.where(np.isnan(res.pvalue), 1.0, res.pvalue)  # constant genes: no evidence
        np.testing.assert_allclose(de.p_value[k], p, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(de.statistic[k], res.statistic, rtol=0, atol=1e-9)
        np.testing.assert_allclose(de.fdr[k], false_discovery_control(p), rtol=1e-10, atol=1e-14)
        # averaged in the input's dtype and back-transformed by the C library's expm1, as pdex does
        tm = _expm1_vec(np.asarray(x[labels == g].mean(axis=0)))
        np.testing.assert_allclose(de.target_mean[k], tm, rtol=1e-6 if sparse else 0)
    if not float64:  # (the float64 variant jitters every gene)
        assert (de.p_value[:, 6] == 1.0).all() and (de.p_value[:, 7] == 1.0).all()
    assert de.p_value[0, :5].max() < 1e-3  # the planted effect is found


def test_fold_change_conventions():
    x = np.zeros((6, 3), np.float32)
    labels = np.array(["ctrl"] * 3 + ["a"] * 3)
    x[3:, 0] = 1.0  # zero in control only -> +inf
    x[:3, 1] = 1.0  # zero in group only -> -inf; gene 2 zero in both -> 0
    de = rank_sum_arrays(x, labels, "ctrl")
    assert de.lfc[0, 0] == np.inf and de.lfc[0, 1] == -np.inf and de.lfc[0, 2] == 0.0
    frame = de.to_frame()
    assert frame["percent_change"].iloc[2] == 0.0


def test_benjamini_hochberg_matches_scipy():
    p = np.random.default_rng(1).random((3, 200)) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), false_discovery_control(p, axis=-1), rtol=1e-12)


def test_frame_columns_and_order():
    x, labels = _data()
    df = rank_sum_de(x, labels, "ctrl", genes=[f"g{i}" for i in range(x.shape[1])])
    assert tuple(df.columns) == DE_COLUMNS
    assert len(df) == 4 * x.shape[1]
    assert list(df["feature"].iloc[:3]) == ["g0", "g1", "g2"]
    assert set(df.loc[df.target == "b", "target_membership"]) == {7}


def test_compute_de_on_anndata_ignores_missing_labels():
    x, labels = _data()
    obs = pd.DataFrame({"perturbation": labels}, index=[str(i) for i in range(labels.size)])
    obs.loc[obs.index[-3:], "perturbation"] = None  # unlabeled cells are ignored (pdex)
    a = ad.AnnData(x, obs=obs)
    df = compute_de(a, control="ctrl")
    assert df.loc[df.target == "d", "target_membership"].iloc[0] == 27


def test_errors():
    x, labels = _data()
    with pytest.raises(DataError, match="control 'nope'"):
        rank_sum_de(x, labels, "nope")
    with pytest.raises(DataError, match="labels"):
        rank_sum_de(x, labels[:-1], "ctrl")
    a = ad.AnnData(x, obs=pd.DataFrame({"p": labels}, index=[str(i) for i in range(labels.size)]))
    with pytest.raises(DataError, match="perturbation"):
        compute_de(a, control="ctrl")


def test_benjamini_hochberg_is_scipys_bit_for_bit():
    from scipy.stats import false_discovery_control

    from statecore.evaluation.de import benjamini_hochberg

    rng = np.random.default_rng(0)
    for shape in ((7,), (5, 40), (3, 1000)):
        p = rng.random(shape)
        p[..., ::3] = p[..., :1]  # ties
        p[..., 1] = 0.0
        p[..., 2] = 1.0
        assert np.array_equal(benjamini_hochberg(p), false_discovery_control(p, axis=-1))


@pytest.mark.parametrize("cpm", [False, True])
def test_sparse_rank_sums_equal_the_dense_path(cpm):
    """Sparse non-negative input ranks only its stored non-zeros; U and p equal the dense path
    bit for bit (float32 keys and float64 codes; explicit zeros, all-zero genes, ties)."""
    rng = np.random.default_rng(int(cpm))
    c = rng.poisson(rng.gamma(0.5, 1, 40), (300, 40)).astype(np.float64)
    x = np.log1p(c * 1e6 / np.maximum(c.sum(1, keepdims=True), 1)) if cpm else np.log1p(c).astype(np.float32)
    x[:, 3] = 0
    x[:5, 4] = 0
    xs = sp.csr_matrix(x)
    xs.data[::7] = 0  # explicit zeros
    lab = np.array(["ctrl"] * 80 + [f"p{i % 6}" for i in range(220)], dtype=object)
    s = rank_sum_arrays(xs, lab, "ctrl")
    d = rank_sum_arrays(xs.toarray(), lab, "ctrl")
    assert np.array_equal(s.statistic, d.statistic)
    assert np.array_equal(s.p_value, d.p_value)
