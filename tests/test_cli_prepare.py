import anndata as ad
import numpy as np

from statecore.cli import main


def test_prepare_cli_on_sample(tmp_path, sample_path, capsys):
    before = sample_path.stat().st_mtime_ns
    out = tmp_path / "p.h5ad"
    assert main(["prepare", str(sample_path), "-o", str(out), "--no-umap", "--n-hvg", "200"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}") and "control 'ctrl'" in line and "\n" not in line
    p = ad.read_h5ad(out)
    assert sample_path.stat().st_mtime_ns == before
    meta = p.uns["statecore"]
    assert meta["control"] == "ctrl" and meta["columns"] == {
        "perturbation": "perturbation",
        "context": "context",
        "batch": "batch",
    }
    assert meta["qc_report"]["cells_out"] > 0.99 * meta["qc_report"]["cells_in"]  # panel keeps its cells
    assert p.var["highly_variable"].sum() == 200 and "counts" in p.layers
    assert set(p.obs["context"]) == {"k562", "T98G", "U87MG", "A172"}
    assert np.allclose(np.expm1(p.X[:5].toarray()).sum(1), 1e4, rtol=1e-3)


def test_prepare_cli_overrides_and_errors(tmp_path, synthetic_counts, capsys):
    src = tmp_path / "s.h5ad"
    synthetic_counts.write_h5ad(src)
    out = tmp_path / "o.h5ad"
    assert (
        main(
            [
                "prepare",
                str(src),
                "-o",
                str(out),
                "--no-umap",
                "--context-col",
                "none",
                "--batch-col",
                "none",
                "--min-genes",
                "0",
                "--min-cells",
                "0",
                "--n-hvg",
                "40",
                "--hvg-flavor",
                "seurat",
            ]
        )
        == 0
    )
    p = ad.read_h5ad(out)
    assert set(p.obs["context"]) == {"all"} and set(p.obs["batch"]) == {"all"}
    assert p.uns["statecore"]["qc_report"]["hvg_flavor"] == "seurat" and p.var["highly_variable"].sum() == 40
    assert main(["prepare", str(src), "-o", str(out), "--control", "NT", "--no-umap"]) == 2
    assert "no control cells: label 'NT'" in capsys.readouterr().err
    assert main(["prepare", str(src), "-o", str(tmp_path / "o.txt")]) == 2
