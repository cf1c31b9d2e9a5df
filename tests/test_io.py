import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from statecore.config import DataSpec
from statecore.data.io import check, control_label, detect_spec, read_data, validate
from statecore.errors import DataError

SPEC = DataSpec(pert_col="perturbation", control="ctrl", context_col="context", batch_col="batch")


def _bundle(folder, X, *, genes_x_cells=True, gz=False, gene_cols=2, features="features.tsv"):
    folder.mkdir()
    n_cells, n_genes = X.shape
    m = sp.coo_matrix(X.T if genes_x_cells else X)
    op = (lambda p: gzip.open(str(p) + ".gz", "wb")) if gz else (lambda p: open(p, "wb"))
    with op(folder / "matrix.mtx") as fh:
        scipy.io.mmwrite(fh, m)
    bcs = [f"BC{i}" for i in range(n_cells)]
    cols = [
        [f"ENSG{i}" for i in range(n_genes)],
        [f"GENE{i}" for i in range(n_genes)],
        ["Gene Expression"] * n_genes,
    ]
    lines = ["\t".join(c[i] for c in cols[:gene_cols]) for i in range(n_genes)]
    for name, text in (("barcodes.tsv", bcs), (features, lines)):
        with op(folder / name) as fh:
            fh.write(("\n".join(text) + "\n").encode())
    return bcs


@pytest.mark.parametrize("genes_x_cells", [True, False])
@pytest.mark.parametrize("gz", [False, True])
def test_mtx_bundle_both_orientations(tmp_path, genes_x_cells, gz):
    X = np.random.default_rng(0).poisson(1.0, (7, 5)).astype(np.float32)
    bcs = _bundle(tmp_path / "b", X, genes_x_cells=genes_x_cells, gz=gz)
    a = read_data(tmp_path / "b")
    assert a.shape == (7, 5) and list(a.obs_names) == bcs and a.var_names[0] == "GENE0"
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert a.var["gene_ids"].iloc[1] == "ENSG1"


@pytest.mark.parametrize("gene_cols", [1, 3])
def test_mtx_gene_columns_and_metadata_join(tmp_path, gene_cols):
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    _bundle(tmp_path / "b", X, gene_cols=gene_cols, features="genes.tsv")
    meta = pd.DataFrame(
        {"cell": ["BC3", "BC0", "BC2", "BC1"], "target_gene": ["A", "non-targeting", "A", "B"]}
    )
    meta.to_csv(tmp_path / "meta.csv", index=False)
    a = read_data(tmp_path / "b" / "matrix.mtx", metadata=tmp_path / "meta.csv")
    assert list(a.obs["target_gene"]) == ["non-targeting", "B", "A", "A"]
    assert a.var_names[0] == ("ENSG0" if gene_cols == 1 else "GENE0")
    spec = detect_spec(a)
    assert spec.pert_col == "target_gene" and spec.control == "non-targeting"
    meta.iloc[:3].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match="have no row in"):
        read_data(tmp_path / "b", metadata=tmp_path / "short.csv")


def test_mtx_count_mismatch_and_truncation(tmp_path):
    X = np.ones((4, 3), dtype=np.float32)
    _bundle(tmp_path / "b", X)
    (tmp_path / "b" / "barcodes.tsv").write_text("BC0\nBC1\n")
    with pytest.raises(DataError, match="lists 2 barcodes and 3 genes"):
        read_data(tmp_path / "b")
    (tmp_path / "b" / "barcodes.tsv").write_text("BC0\nBC1\nBC2\nBC3\n")
    text = (tmp_path / "b" / "matrix.mtx").read_text()
    (tmp_path / "b" / "matrix.mtx").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match="truncated"):
        read_data(tmp_path / "b")


def test_h5ad_read_does_not_modify_and_bad_files(tmp_path, synthetic_counts):
    path = tmp_path / "s.h5ad"
    synthetic_counts.write_h5ad(path)
    before = path.read_bytes()
    a = read_data(path)
    assert a.shape == synthetic_counts.shape and path.read_bytes() == before
    (tmp_path / "fake.h5ad").write_text("not hdf5")
    with pytest.raises(DataError, match="not an HDF5"):
        read_data(tmp_path / "fake.h5ad")
    (tmp_path / "cut.h5ad").write_bytes(before[: len(before) // 3])
    with pytest.raises(DataError, match="truncated or damaged"):
        read_data(tmp_path / "cut.h5ad")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="not a supported file type"):
        read_data(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no readable data at"):
        read_data(tmp_path / "missing.h5ad")


@pytest.mark.parametrize(
    "obs, expected",
    [
        (
            {"perturbation": ["ctrl", "A"], "cell_type": ["t", "t"], "batch": ["1", "2"]},
            ("perturbation", "ctrl", "cell_type", "batch"),
        ),
        (
            {"gene": ["NT", "KLF1"], "cell_line": ["k", "k"], "gem_group": ["1", "1"]},
            ("gene", "NT", "cell_line", "gem_group"),
        ),
        ({"Condition": ["DMSO", "drugX"], "Tissue": ["a", "b"]}, ("Condition", "DMSO", "Tissue", None)),
        (
            {"guide_target": ["non-targeting_2", "X"], "donor": ["d", "d"]},
            ("guide_target", "non-targeting_2", None, "donor"),
        ),
        (
            {"condition": ["stim", "stim"], "target_gene": ["control", "B"]},
            ("target_gene", "control", None, None),
        ),
    ],
)
def test_detect_spec_naming_schemes(obs, expected):
    a = ad.AnnData(np.ones((2, 2), dtype=np.float32), obs=pd.DataFrame(obs, index=["a", "b"]))
    s = detect_spec(a)
    assert (s.pert_col, s.control, s.context_col, s.batch_col) == expected


def _small(X=None, **obs):
    X = np.array([[1, 2, 0], [0, 3, 1], [2, 0, 1], [1, 1, 1]], dtype=np.float32) if X is None else X
    base = {"perturbation": ["ctrl", "A", "ctrl", "A"], "context": ["x", "x", "y", "y"], "batch": ["1"] * 4}
    base.update(obs)
    return ad.AnnData(X, obs=pd.DataFrame(base, index=[f"c{i}" for i in range(4)]))


def _errors(a, spec=SPEC, **kw):
    return " ".join(check(a, spec, **kw).errors)


def test_validation_messages():
    assert check(_small(), SPEC).errors == []
    assert "'pertubation' not found" in _errors(_small(), SPEC.replace(pert_col="pertubation"))
    assert "did you mean 'perturbation'" in _errors(_small(), SPEC.replace(pert_col="pertubation"))
    assert "context column 'celltype' not found" in _errors(_small(), SPEC.replace(context_col="celltype"))
    assert "no control cells: label 'ctrl'" in _errors(_small(perturbation=["NT", "A", "NT", "A"]))
    assert "--control NT" in _errors(_small(perturbation=["NT", "A", "NT", "A"]))
    assert "context(s) ['y'] have perturbed cells but no control" in _errors(
        _small(perturbation=["ctrl", "A", "A", "A"])
    )
    bad = np.array([[1, np.nan, 0], [0, np.inf, 1], [2, 0, 1], [1, 1, 1]], dtype=np.float32)
    assert "1 NaN and 1 infinite" in _errors(_small(bad))
    neg = np.array([[1, -2, 0], [0, 3, 1], [2, 0, 1], [1, 1, 1]], dtype=np.float32)
    assert "negative values (minimum -2)" in _errors(_small(neg))
    frac = np.array([[1.5, 2, 0], [0, 3, 1], [2, 0, 1], [1, 1, 1]], dtype=np.float32)
    assert "raw counts are required but X holds non-integer values (e.g. 1.5)" in _errors(
        _small(frac), require_counts=True
    )
    assert "neither counts nor log" in _errors(_small(frac * 40 + 0.25))
    assert "empty" in _errors(_small(np.zeros((4, 0), dtype=np.float32)))
    assert "only zeros" in _errors(_small(np.zeros((4, 3), dtype=np.float32)))
    # Unlabeled cells and duplicate cell ids are warnings (dropped / made unique by prepare), not errors.
    a = _small(perturbation=["ctrl", None, "ctrl", "A"])
    assert _errors(a) == "" and "1 of 4 cells have no label" in " ".join(check(a, SPEC).warnings)
    dup = _small()
    dup.obs_names = ["c0", "c0", "c1", "c2"]
    assert _errors(dup) == "" and "duplicate cell ids (e.g. 'c0')" in " ".join(check(dup, SPEC).warnings)


def test_validation_warnings_and_raise():
    a = _small()
    a.var_names = ["g", "g", "h"]
    warns = validate(a, SPEC)
    assert any("duplicate gene names (e.g. 'g')" in w for w in warns)
    assert any("fewer than 10 cells: 'A' (2)" in w for w in warns)
    with pytest.raises(DataError, match="no control cells"):
        validate(_small(perturbation=["x", "A", "x", "A"]), SPEC)


def test_control_label(prepared_synthetic, synthetic_counts):
    assert control_label(prepared_synthetic) == "ctrl" and control_label(synthetic_counts) == "ctrl"
    with pytest.raises(DataError, match="no control label"):
        control_label(ad.AnnData(np.ones((1, 1), dtype=np.float32)))
