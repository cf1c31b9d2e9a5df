"""Session fixtures built once and handed out as copies (tests may mutate what they get)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "perturbench_devel.h5ad"


@pytest.fixture(scope="session")
def _synthetic_counts_master():
    from statecore.data.synthetic import make_perturbation_adata

    return make_perturbation_adata(
        n_cells=400, n_genes=120, n_perturbations=8, contexts=("c0", "c1", "c2"), n_batches=2, seed=0
    )


@pytest.fixture(scope="session")
def _prepared_synthetic_master(_synthetic_counts_master):
    from statecore.config import DataSpec, QCConfig
    from statecore.data.preprocess import prepare

    spec = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")
    qc = QCConfig(min_genes=0, min_cells=0, n_hvg=100, umap=False)
    return prepare(_synthetic_counts_master, spec=spec, qc=qc)


@pytest.fixture
def synthetic_counts(_synthetic_counts_master):
    """Raw synthetic counts: 400 cells x 120 genes, 8 perturbations, contexts c0-c2, batches b0/b1."""
    return _synthetic_counts_master.copy()


@pytest.fixture
def prepared_synthetic(_prepared_synthetic_master):
    """``synthetic_counts`` after ``prepare`` (no QC filtering, 100 HVGs, no UMAP)."""
    return _prepared_synthetic_master.copy()


@pytest.fixture(scope="session")
def sample_path() -> Path:
    """The shipped real sample (perturbench_devel.h5ad); never modify it."""
    if not SAMPLE.exists():
        pytest.skip(f"sample data missing: {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, _prepared_synthetic_master):
    """A real (tiny) training run made by the CLI the app launches: 6 steps on 400 synthetic cells.

    Shared by the page and evaluation tests; copy it before writing into it."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("trained")
    data = base / "prep.h5ad"
    _prepared_synthetic_master.write_h5ad(data)
    run = base / "runs" / "tiny"
    cmd = [sys.executable, "-m", "statecore", "train", "--data", str(data), "--run-dir", str(run)]
    cmd += ["--context", "c2", "--steps", "6", "--set-size", "16", "--batch-size", "2", "--threads", "1"]
    done = subprocess.run([*cmd, "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return run
