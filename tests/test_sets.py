import numpy as np
import pytest
import scipy.sparse as sp
import torch

from statecore.config import SplitConfig
from statecore.data.sets import PerturbationVocab, SetDataset, build_groups, build_sets, obs_labels
from statecore.data.splits import make_split
from statecore.errors import DataError


def test_vocab_multi_hot_combos_and_unknown():
    v = PerturbationVocab.from_labels(["ctrl", "A", "B", "A+C"], "ctrl")
    assert v.names == ("ctrl", "A", "B", "C")
    z = v.encode(["ctrl", "A", "A+B"])
    assert z.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]]
    assert v.can_encode("B+C") and not v.can_encode("D")
    with pytest.raises(DataError, match="'D'"):
        v.encode(["D"])


def test_vocab_features_predict_unseen():
    feats = {"A": [1.0, 0.0], "B": [0.0, 1.0], "D": [2.0, 2.0]}
    v = PerturbationVocab.from_labels(["ctrl", "A", "B"], "ctrl", features=feats)
    assert v.dim == 2
    assert v.encode(["D", "A+B", "ctrl"]).tolist() == [[2, 2], [1, 1], [0, 0]]
    with pytest.raises(DataError):
        PerturbationVocab.from_labels(["ctrl", "A", "E"], "ctrl", features=feats)


@pytest.mark.parametrize("sparse", [True, False])
def test_set_invariants(prepared_synthetic, sparse):
    ad_ = prepared_synthetic
    if not sparse:
        ad_.X = ad_.X.toarray() if sp.issparse(ad_.X) else ad_.X
    pert, ctx, batch = obs_labels(ad_)
    groups = build_groups(ad_, control="ctrl")
    ds = SetDataset(
        ad_,
        groups,
        genes=list(ad_.var_names[:10]),
        vocab=PerturbationVocab.from_labels(pert, "ctrl"),
        batches=sorted(set(batch)),
        set_size=8,
        seed=0,
    )
    plan = ds.plan(0)
    assert len(plan) == sum(-(-len(g.cells) // 8) for g in groups)
    seen_ctrl_target = False
    for gi, target, ctrl in plan:
        g = groups[gi]
        assert len(target) == len(ctrl) == 8
        assert set(ctx[target]) == {g.context} and set(pert[target]) == {g.perturbation}
        assert set(ctx[ctrl]) == {g.context} and set(pert[ctrl]) == {"ctrl"}
        if np.any((pert == "ctrl") & (ctx == g.context) & (batch == g.batch)):
            assert set(batch[ctrl]) == {g.batch}  # same batch where that batch has controls
        seen_ctrl_target |= g.perturbation == "ctrl"
    assert seen_ctrl_target  # controls are identity targets too
    # every cell of the data appears in an epoch
    assert set(np.concatenate([t for _, t, _ in plan])) == set(range(ad_.n_obs))
    b = ds.batch(3, 4)
    assert b.x_ctrl.shape == b.x_target.shape == (4, 8, 10)
    dense = ad_.X.toarray() if sp.issparse(ad_.X) else ad_.X
    gi, target, ctrl = ds.plan(0)[12]
    assert np.allclose(b.x_target[0].numpy(), dense[target][:, :10])
    assert torch.equal(ds.batch(3, 4).x_target, b.x_target)  # a step always gives the same batch


def test_build_sets_walkthrough(prepared_synthetic):
    s = build_sets(prepared_synthetic, S=16)
    X_ctrl, Z_pert, X_pert = s
    assert X_ctrl.shape[1:] == (16, int(prepared_synthetic.var["highly_variable"].sum()))
    assert X_pert.shape == X_ctrl.shape and Z_pert.shape == (len(s), s.vocab.dim)


def test_split_restricts_groups(prepared_synthetic):
    split = make_split(prepared_synthetic, SplitConfig(task="zeroshot", context="c1"))
    groups = build_groups(prepared_synthetic, control="ctrl", pairs=split.pairs("train"))
    assert not [g for g in groups if g.context == "c1" and g.perturbation != "ctrl"]
    assert [g for g in groups if g.context == "c1" and g.perturbation == "ctrl"]
