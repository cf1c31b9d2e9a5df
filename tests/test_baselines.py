import anndata as ad
import numpy as np
import pandas as pd
import pytest

from statecore.data.splits import Split
from statecore.inference.baselines import predict_baseline


def _tiny():
    # 2 genes; contexts A (target) and B. Values chosen so every mean is exact by hand.
    rows = [
        ("A", "ctrl", [1, 1]),
        ("A", "ctrl", [3, 1]),  # ctrl mean A = [2, 1]
        ("A", "p1", [4, 4]),  # p1 in A: training  -> shift [2, 3]
        ("A", "p2", [9, 9]),  # test (never read)
        ("A", "p1+p3", [9, 9]),  # test (never read)
        ("B", "ctrl", [0, 2]),  # ctrl mean B = [0, 2]
        ("B", "p2", [1, 4]),
        ("B", "p2", [3, 4]),  # p2 in B: mean [2, 4] -> shift [2, 2]
        ("B", "p3", [0, 5]),  # p3 in B: shift [0, 3]
    ]
    obs = pd.DataFrame(
        {"context": [r[0] for r in rows], "perturbation": [r[1] for r in rows]},
        index=[f"c{i}" for i in range(len(rows))],
    )
    obs["batch"] = "all"
    a = ad.AnnData(
        X=np.array([r[2] for r in rows], dtype=np.float32), obs=obs, var=pd.DataFrame(index=["g0", "g1"])
    )
    a.uns["statecore"] = {"control": "ctrl"}
    split = Split(
        task="explicit",
        context="A",
        control="ctrl",
        seed=0,
        train={"A": ["p1"], "B": ["p2", "p3"]},
        val={"A": [], "B": []},
        test={"A": ["p2", "p1+p3"]},
    )
    return a, split


def _means(pred):
    return {p: pred[pred.obs.perturbation == p].X.mean(0).tolist() for p in ("p2", "p1+p3")}


def test_hand_computed_baselines():
    a, split = _tiny()
    kw = dict(genes=["g0", "g1"])
    pm = _means(predict_baseline(a, split, "perturbation_mean", **kw))
    assert pm["p2"] == pytest.approx([4, 3])  # ctrl A [2,1] + shift of p2 in B [2,2]
    assert pm["p1+p3"] == pytest.approx([4, 7])  # not trained anywhere: ctrl + [2,3] + [0,3]
    add = _means(predict_baseline(a, split, "additive", **kw))
    assert add["p1+p3"] == pytest.approx([4, 7]) and add["p2"] == pytest.approx([4, 3])
    cm = _means(predict_baseline(a, split, "context_mean", **kw))
    assert cm["p2"] == pytest.approx([4, 4])  # the only perturbed training cell of A
    cell = _means(predict_baseline(a, split, "cell_mean", **kw))
    assert cell["p2"] == pytest.approx([(4 + 2 + 0) / 3, (4 + 4 + 5) / 3])  # mean of group means
    ctrl = predict_baseline(a, split, "control", **kw)
    assert ctrl[ctrl.obs.perturbation == "p2"].X.mean(0).tolist() == pytest.approx([2, 1])
    for kind in ("control", "context_mean"):
        out = predict_baseline(a, split, kind, **kw)
        assert out.obs.perturbation.value_counts().to_dict() == {"p2": 2, "p1+p3": 2, "ctrl": 2}


def test_zero_shot_context_mean_uses_other_contexts():
    a, split = _tiny()
    z = Split(
        task="zeroshot",
        context="A",
        control="ctrl",
        seed=0,
        train={"A": [], "B": ["p2", "p3"]},
        val={},
        test={"A": ["p1", "p2"]},
    )
    out = predict_baseline(a, z, "context_mean", genes=["g0", "g1"], n_cells=3)
    # ctrl A [2,1] + mean perturbed B [(1+3+0)/3, (4+4+5)/3] - ctrl B [0,2]
    expect = [2 + 4 / 3, 1 + 13 / 3 - 2]
    assert out[out.obs.perturbation == "p1"].X.mean(0).tolist() == pytest.approx(expect)
    assert int((out.obs.perturbation == "p1").sum()) == 3
