import numpy as np
import pytest

from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
from statecore.errors import DataError
from statecore.inference.predict import predict, predict_split
from statecore.training.checkpoint import load_run
from statecore.training.engine import train_run


@pytest.fixture(scope="module")
def trained(_prepared_synthetic_master, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pred") / "run"
    cfg = RunConfig(
        split=SplitConfig(task="underrepresented", context="c0"),
        model=STConfig(
            hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=32, set_size=8
        ),
        train=TrainConfig(steps=5, batch_size=2, num_threads=1),
    )
    train_run(_prepared_synthetic_master, cfg, run_dir)
    return run_dir


def test_predict_split_contract(trained, prepared_synthetic):
    run = load_run(trained)
    before = prepared_synthetic.X.copy()
    pred, real = predict_split(run, prepared_synthetic)
    assert (prepared_synthetic.X != before).nnz == 0  # caller's object untouched
    assert list(pred.var_names) == run.genes == list(real.var_names)
    test = set(run.split.test["c0"])
    n_ctrl = int(
        ((prepared_synthetic.obs.context == "c0") & (prepared_synthetic.obs.perturbation == "ctrl")).sum()
    )
    counts = pred.obs.perturbation.value_counts()
    assert set(counts.index) == test | {"ctrl"}
    assert all(counts[p] == n_ctrl for p in test)  # n cells from the controls, never from real test cells
    assert (pred.X >= 0).all() and pred.X.dtype == np.float32
    assert set(real.obs.perturbation) == test | {"ctrl"} and set(pred.obs.context) == {"c0"}


def test_predict_n_cells_combo_and_errors(trained, prepared_synthetic):
    run = load_run(trained)
    out = predict(run, prepared_synthetic, context="c1", perturbations=["P000+P001"], n_cells=21, seed=1)
    assert int((out.obs.perturbation == "P000+P001").sum()) == 21
    again = predict(run, prepared_synthetic, context="c1", perturbations=["P000+P001"], n_cells=21, seed=1)
    assert np.array_equal(out.X, again.X)
    with pytest.raises(DataError, match="unknown to the model"):
        predict(run, prepared_synthetic, context="c1", perturbations=["NOPE"])
    with pytest.raises(DataError, match="no control cells"):
        predict(run, prepared_synthetic, context="mars", perturbations=["P000"])


def test_streamed_prediction_file_equals_the_in_memory_one(trained, prepared_synthetic, tmp_path):
    import anndata as ad

    from statecore.inference.predict import write_prediction

    run = load_run(trained)
    kw = dict(context="c1", perturbations=["P000", "P001+P002"], n_cells=300, seed=3)  # 3 forward chunks each
    mem = predict(run, prepared_synthetic, **kw)
    n = write_prediction(tmp_path / "p.h5ad", run, prepared_synthetic, **kw)
    disk = ad.read_h5ad(tmp_path / "p.h5ad")
    assert n == 600 and disk.shape == mem.shape and list(disk.var_names) == list(mem.var_names)
    np.testing.assert_array_equal(disk.X, mem.X)
    assert disk.obs.astype(str).equals(mem.obs.astype(str)) and disk.uns["statecore"] == mem.uns["statecore"]
    assert not list(tmp_path.glob(".*.tmp"))
