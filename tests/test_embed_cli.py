"""`python -m statecore embed fit|transform` end to end on a tiny synthetic screen."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from statecore.cli import main

TINY_ARGS = [
    "--L",
    "16",
    "--hidden-dim",
    "32",
    "--layers",
    "1",
    "--output-dim",
    "8",
    "--gene-feature-dim",
    "8",
    "--n-loss-genes",
    "16",
    "--steps",
    "6",
    "--batch-size",
    "16",
    "--num-threads",
    "1",
]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    from statecore.data.synthetic import make_perturbation_adata

    path = tmp_path_factory.mktemp("embed_cli") / "screen.h5ad"
    make_perturbation_adata(
        n_cells=120, n_genes=40, n_perturbations=4, contexts=("c0", "c1"), seed=2
    ).write_h5ad(path)
    return path


def test_fit_then_transform(tmp_path, data_path, capsys):
    run_dir = tmp_path / "se"
    assert main(["embed", "fit", "--data", str(data_path), "--run-dir", str(run_dir), *TINY_ARGS]) == 0
    for name in ("config.json", "genes.txt", "model.safetensors", "status.json", "metrics.jsonl"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["track"] == "se" and config["se"]["L"] == 16 and config["se"]["n_genes"] == 40
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert "step 6/6" in capsys.readouterr().out

    out = tmp_path / "emb.h5ad"
    before = data_path.read_bytes()
    assert (
        main(["embed", "transform", "--run-dir", str(run_dir), "--data", str(data_path), "-o", str(out)]) == 0
    )
    assert data_path.read_bytes() == before  # the input file is never written
    result = ad.read_h5ad(out)
    assert result.obsm["X_state"].shape == (120, 8)
    np.testing.assert_allclose(np.linalg.norm(result.obsm["X_state"], axis=1), 1.0, atol=1e-5)

    # a second fit into the same finished run dir is refused without --overwrite
    assert main(["embed", "fit", "--data", str(data_path), "--run-dir", str(run_dir), *TINY_ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_user_errors_exit_2_with_one_line(tmp_path, data_path, capsys):
    assert (
        main(
            [
                "embed",
                "transform",
                "--run-dir",
                str(tmp_path / "nope"),
                "--data",
                str(data_path),
                "-o",
                str(tmp_path / "o.h5ad"),
            ]
        )
        == 2
    )
    assert "not a finished embedding run" in capsys.readouterr().err
    assert (
        main(["embed", "fit", "--data", str(tmp_path / "absent.h5ad"), "--run-dir", str(tmp_path / "r")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "embed",
                "fit",
                "--data",
                str(data_path),
                "--run-dir",
                str(tmp_path / "r2"),
                "--hidden-dim",
                "30",
                "--heads",
                "4",
            ]
        )
        == 2
    )
    assert "divisible by heads" in capsys.readouterr().err
    assert (
        main(
            [
                "embed",
                "fit",
                "--data",
                str(data_path),
                "--run-dir",
                str(tmp_path / "r3"),
                "--gene-features",
                "file",
                *TINY_ARGS,
            ]
        )
        == 2
    )
    assert "gene_features_path" in capsys.readouterr().err


def test_fit_with_a_feature_file(tmp_path, data_path):
    genes = list(ad.read_h5ad(data_path).var_names)
    csv = tmp_path / "feat.csv"
    rows = [f"{g},{i % 3},{i % 5},{i % 7}" for i, g in enumerate(reversed(genes))]
    csv.write_text("gene,a,b,c\n" + "\n".join(rows) + "\n")
    run_dir = tmp_path / "se_file"
    assert (
        main(
            [
                "embed",
                "fit",
                "--data",
                str(data_path),
                "--run-dir",
                str(run_dir),
                *TINY_ARGS,
                "--gene-features",
                "file",
                "--gene-features-path",
                str(csv),
            ]
        )
        == 0
    )
    assert json.loads((run_dir / "config.json").read_text())["se"]["gene_feature_dim"] == 3


def test_help_runs_as_a_module():
    res = subprocess.run(
        [sys.executable, "-m", "statecore", "embed", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "--gene-features" in res.stdout
