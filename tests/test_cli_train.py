import anndata as ad
import pytest
import torch

from statecore.cli import main


@pytest.fixture
def data_path(prepared_synthetic, tmp_path):
    path = tmp_path / "prep.h5ad"
    prepared_synthetic.write_h5ad(path)
    return path


def test_train_predict_baseline_end_to_end(data_path, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(data_path),
        "--run-dir",
        str(run),
        "--task",
        "underrepresented",
        "--context",
        "c0",
        "--steps",
        "6",
        "--set-size",
        "8",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("done: step 6")
    assert main(argv[:-1] + ["--steps", "8", "--quiet"]) == 0  # resume extends the same run
    assert "step 8" in capsys.readouterr().out
    pred, real = tmp_path / "pred.h5ad", tmp_path / "real.h5ad"
    assert (
        main(["predict", "--run-dir", str(run), "--split", "test", "-o", str(pred), "--real-out", str(real)])
        == 0
    )
    p, r = ad.read_h5ad(pred), ad.read_h5ad(real)
    assert list(p.var_names) == list(r.var_names)
    assert (
        main(
            [
                "predict",
                "--run-dir",
                str(run),
                "--context",
                "c1",
                "--perturbation",
                "P001",
                "--n-cells",
                "5",
                "-o",
                str(tmp_path / "one.h5ad"),
            ]
        )
        == 0
    )
    for kind in ("control", "perturbation_mean", "cell_mean"):
        assert (
            main(["baseline", "--run-dir", str(run), "--kind", kind, "-o", str(tmp_path / f"{kind}.h5ad")])
            == 0
        )


def test_errors_are_one_line(data_path, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(data_path),
            "--run-dir",
            str(tmp_path / "r"),
            "--context",
            "nowhere",
            "--steps",
            "1",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1
    code = main(
        ["predict", "--run-dir", str(tmp_path / "missing"), "--split", "test", "-o", str(tmp_path / "x.h5ad")]
    )
    assert code == 2 and "not found" in capsys.readouterr().err


def test_model_shape_flags_reach_the_saved_model(data_path, tmp_path, capsys):
    """--basal-encoder linear / --out-layers 2 build that model, save it in config.json, and reload it."""
    import json

    from statecore.training.checkpoint import load_run

    run = tmp_path / "run"
    argv = ["train", "--data", str(data_path), "--run-dir", str(run), "--task", "underrepresented"]
    argv += ["--context", "c0", "--steps", "2", "--set-size", "8", "--batch-size", "2", "--threads", "1"]
    argv += ["--basal-encoder", "linear", "--out-layers", "2", "--quiet"]
    assert main(argv) == 0
    model_cfg = json.loads((run / "config.json").read_text())["model"]
    assert model_cfg["basal_encoder"] == "linear" and model_cfg["out_layers"] == 2
    model = load_run(run).model
    assert sum(isinstance(m, torch.nn.Linear) for m in model.project_out) == 2
    assert isinstance(model.basal_encoder, torch.nn.Linear)
    capsys.readouterr()
    bad = argv[: argv.index("--out-layers")] + ["--out-layers", "0", "--quiet"]
    bad[bad.index(str(run))] = str(tmp_path / "bad")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--out-layers" in err and err.count("\n") == 1
