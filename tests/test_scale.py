"""The data path at scale: sparse gathers without densifying, on-disk (backed) training, GPU options on CPU."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from statecore.cli import main
from statecore.cli._common import read_prepared
from statecore.config import STConfig, TrainConfig
from statecore.data.sets import PerturbationVocab, RowGatherer, SetDataset, build_groups
from statecore.models.transition import StateTransitionModel
from statecore.runs.files import read_metrics, read_status
from statecore.training.st_track import TrainData
from statecore.training.st_track import fit_model as fit


def test_csr_gather_touches_only_the_asked_rows():
    rng = np.random.default_rng(0)
    X = sp.random(10_000, 1_000, density=0.05, format="csr", dtype=np.float32, random_state=0)
    genes = np.sort(rng.choice(1_000, 200, replace=False))
    gather = RowGatherer(X, genes)
    rows = rng.integers(0, 10_000, (4, 64))
    tracemalloc.start()
    block = gather(rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sp.issparse(gather.X)  # never converted to dense
    assert block.shape == (4, 64, 200) and block.dtype == np.float32
    np.testing.assert_array_equal(block[2, 5], X[rows[2, 5]].toarray()[0, genes])
    dense_bytes = 10_000 * 1_000 * 4
    assert peak < dense_bytes / 50  # a few row blocks (~0.2 MB), far from the 40 MB dense matrix


@pytest.mark.parametrize("sparse", [True, False])
def test_backed_batches_equal_in_memory_batches(prepared_synthetic, tmp_path, sparse):
    a = prepared_synthetic
    if not sparse:
        a.X = a.X.toarray()
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    backed = read_prepared(str(path), backed=True)
    if sparse:  # the counts layer (as large as X) is not read; X stays on disk
        assert "counts" not in backed.layers and not sp.issparse(backed.X)
    groups = build_groups(a, control="ctrl")
    vocab = PerturbationVocab.from_labels(a.obs["perturbation"].astype(str), "ctrl")
    genes = list(a.var_names[::3])  # a column subset, as with HVGs
    mem = SetDataset(a, groups, genes=genes, vocab=vocab, set_size=16, seed=1)
    disk = SetDataset(
        backed, build_groups(backed, control="ctrl"), genes=genes, vocab=vocab, set_size=16, seed=1
    )
    assert disk.gather.backed and not mem.gather.backed
    for step in (0, 5):  # sets of 16 from groups of ~20 cells: padding repeats rows, rows are unsorted
        m, d = mem.batch(step, 3), disk.batch(step, 3)
        np.testing.assert_array_equal(m.x_ctrl.numpy(), d.x_ctrl.numpy())
        np.testing.assert_array_equal(m.x_target.numpy(), d.x_target.numpy())


def test_cli_train_backed(prepared_synthetic, tmp_path, capsys):
    path = tmp_path / "prep.h5ad"
    prepared_synthetic.write_h5ad(path)
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(path),
        "--run-dir",
        str(run),
        "--task",
        "underrepresented",
        "--context",
        "c0",
        "--steps",
        "3",
        "--set-size",
        "8",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--backed",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("done: step 3")
    assert read_status(run)["state"] == "done" and [r["step"] for r in read_metrics(run)] == [3]


def _tiny_fit(prepared, **train):
    a = prepared
    groups = build_groups(a, control="ctrl")
    vocab = PerturbationVocab.from_labels(a.obs["perturbation"].astype(str), "ctrl")
    genes = list(a.var_names)
    ds = SetDataset(a, groups, genes=genes, vocab=vocab, set_size=8, seed=0)
    data = TrainData(train=ds, val=None, genes=genes, vocab=vocab, contexts=["c0"], batches=["all"])
    torch.manual_seed(0)
    model = StateTransitionModel(
        STConfig(
            num_genes=len(genes),
            perturbation_dim=vocab.dim,
            hidden_dim=16,
            transformer_heads=2,
            transformer_layers=1,
            mlp_hidden_dim=32,
            set_size=8,
        )
    )
    cfg = TrainConfig(
        steps=3, batch_size=2, warmup_steps=0, val_every=0, num_threads=1, device="cpu", **train
    )
    return fit(model, data, cfg)


def test_bf16_autocast_runs_on_cpu(prepared_synthetic):
    ref = _tiny_fit(prepared_synthetic.copy())
    res = _tiny_fit(prepared_synthetic, bf16=True)
    assert res.step == 3 and all(np.isfinite(v) for _, v in res.losses)
    # bf16 keeps ~3 significant digits: the first loss (before any update) agrees to that precision
    assert res.losses[0][1] == pytest.approx(ref.losses[0][1], rel=0.05)


@pytest.mark.slow
def test_torch_compile_runs_on_cpu(prepared_synthetic):
    ref = _tiny_fit(prepared_synthetic.copy())
    res = _tiny_fit(prepared_synthetic, compile=True)
    assert res.step == 3
    assert [v for _, v in res.losses] == pytest.approx([v for _, v in ref.losses], rel=1e-3)
