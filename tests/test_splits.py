import numpy as np
import pytest

from statecore.config import SplitConfig
from statecore.data.splits import Split, make_split, split_explicit, split_underrepresented, split_zeroshot
from statecore.errors import DataError


def _pairs(adata, mask):
    obs = adata.obs[mask]
    return set(zip(obs["context"].astype(str), obs["perturbation"].astype(str)))


def test_underrepresented_invariants(prepared_synthetic):
    a = prepared_synthetic
    s = split_underrepresented(a, "c1", alpha=0.3, seed=0)
    assert s.task == "underrepresented" and s.control == "ctrl"
    assert len(s.train["c1"]) == round(0.3 * 8) and len(s.test["c1"]) == 8 - round(0.3 * 8)
    assert not set(s.train["c1"]) & set(s.test["c1"])
    train_pairs = _pairs(a, s.cell_mask(a, "train"))
    assert not any(("c1", p) in train_pairs for p in s.test["c1"])  # no test pair leaks into training
    val_pairs = s.pairs("val")
    assert val_pairs and not val_pairs & s.pairs("test") and not val_pairs & s.pairs("train")
    assert all(c != "c1" for c, _ in val_pairs)
    # every cell of the target context's test perturbations is in the test mask, nowhere else
    test_mask = s.cell_mask(a, "test")
    assert not (test_mask & s.cell_mask(a, "train")).any() and not (test_mask & s.cell_mask(a, "val")).any()


def test_underrepresented_keeps_at_least_one(prepared_synthetic):
    s = split_underrepresented(prepared_synthetic, "c0", alpha=0.01, seed=1)
    assert len(s.train["c0"]) == 1 and len(s.test["c0"]) == 7


def test_zeroshot_keeps_only_target_controls(prepared_synthetic):
    a = prepared_synthetic
    s = split_zeroshot(a, "c2", seed=0)
    assert s.train["c2"] == [] and len(s.test["c2"]) == 8
    train = a.obs[s.cell_mask(a, "train")]
    target = train[train["context"] == "c2"]
    assert len(target) > 0 and set(target["perturbation"].astype(str)) == {"ctrl"}
    assert s.cell_mask(a, "controls").sum() == (a.obs["perturbation"] == "ctrl").sum()


def test_explicit_and_errors(prepared_synthetic):
    a = prepared_synthetic
    s = split_explicit(a, "c0", ["P003", "P001"], seed=0)
    assert s.test == {"c0": ["P001", "P003"]} and "P001" not in s.train["c0"]
    with pytest.raises(DataError, match="P999"):
        split_explicit(a, "c0", ["P999"])
    with pytest.raises(DataError, match="'cX' not found"):
        split_zeroshot(a, "cX")
    with pytest.raises(DataError, match="alpha"):
        split_underrepresented(a, "c0", alpha=1.5)
    with pytest.raises(DataError, match="control"):
        split_explicit(a, "c0", ["ctrl"])


def test_context_without_perturbations_or_controls(prepared_synthetic):
    a = prepared_synthetic
    only_ctrl = a[~((a.obs["context"] == "c1") & (a.obs["perturbation"] != "ctrl")).to_numpy()].copy()
    with pytest.raises(DataError, match="no perturbed cells"):
        split_zeroshot(only_ctrl, "c1")
    no_ctrl = a[~((a.obs["context"] == "c1") & (a.obs["perturbation"] == "ctrl")).to_numpy()].copy()
    with pytest.raises(DataError, match="no control cells"):
        split_zeroshot(no_ctrl, "c1")


def test_same_seed_same_split_and_order_independent(prepared_synthetic):
    a = prepared_synthetic
    s1 = split_underrepresented(a, "c1", alpha=0.5, seed=7)
    shuffled = a[np.random.default_rng(0).permutation(a.n_obs)].copy()
    s2 = split_underrepresented(shuffled, "c1", alpha=0.5, seed=7)
    assert s1 == s2
    others = {tuple(split_underrepresented(a, "c1", alpha=0.5, seed=k).test["c1"]) for k in range(6)}
    assert len(others) > 1  # the seed matters


def test_combos_count_as_perturbations():
    from statecore.data.synthetic import make_perturbation_adata

    a = make_perturbation_adata(
        n_cells=300, n_genes=30, n_perturbations=4, contexts=("a", "b"), n_combos=2, seed=0
    )
    s = split_zeroshot(a, "a")
    assert sum("+" in p for p in s.test["a"]) == 2


def test_roundtrip_and_make_split(tmp_path, prepared_synthetic):
    s = make_split(
        prepared_synthetic, SplitConfig(task="underrepresented", context="c2", keep_fraction=0.5, seed=3)
    )
    assert s == split_underrepresented(prepared_synthetic, "c2", alpha=0.5, seed=3)
    s.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == s
    assert Split.from_dict(s.to_dict()) == s
    with pytest.raises(DataError, match="target context"):
        make_split(prepared_synthetic, SplitConfig(task="zeroshot", context=None))
    with pytest.raises(DataError, match="unknown split task"):
        make_split(prepared_synthetic, SplitConfig(task="bogus", context="c0"))
    e = make_split(
        prepared_synthetic, SplitConfig(task="explicit", context="c0", test_perts=("P002",), val_fraction=0)
    )
    assert e.test == {"c0": ["P002"]} and not e.pairs("val")
