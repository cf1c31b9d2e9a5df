"""A corpus of bad and awkward inputs through ``python -m statecore prepare``.

Each bad input: exit code 2, one stderr line ``error: ...`` naming the problem (checked by a
phrase), no traceback, and every input file byte-identical afterwards. Each awkward-but-valid input:
exit 0 and a prepared file with the canonical columns. Most cases call the CLI in-process
(``statecore.cli.main``); the crafted files that used to abort the process run as real subprocesses.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from statecore.cli import main
from statecore.data.synthetic import make_perturbation_adata

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-umap", "--min-genes", "0", "--min-cells", "0", "--n-hvg", "30"]


def _base(n_cells: int = 120, n_genes: int = 40, **kw) -> ad.AnnData:
    a = make_perturbation_adata(
        n_cells=n_cells, n_genes=n_genes, n_perturbations=4, contexts=("c0", "c1"), seed=0, **kw
    )
    del a.uns["synthetic"]  # the control must come from the labels, as in user data
    return a


def _h5(d: Path, a: ad.AnnData, name: str = "in.h5ad") -> Path:
    a.write_h5ad(d / name)
    return d / name


def _bundle(d: Path, a: ad.AnnData | None = None, *, gz: bool = False, genes_x_cells: bool = True) -> Path:
    """An MTX bundle folder (10x layout by default) of ``a``'s counts; no metadata."""
    a = _base() if a is None else a
    folder = d / "bundle"
    folder.mkdir()
    X = sp.coo_matrix(a.X.T if genes_x_cells else a.X)
    suffix = ".gz" if gz else ""

    def opener(name):
        return gzip.open(folder / (name + suffix), "wb") if gz else open(folder / name, "wb")

    with opener("matrix.mtx") as fh:
        scipy.io.mmwrite(fh, X)
    with opener("barcodes.tsv") as fh:
        fh.write(("\n".join(a.obs_names) + "\n").encode())
    with opener("features.tsv") as fh:
        fh.write(("\n".join(f"ID{i}\t{g}" for i, g in enumerate(a.var_names)) + "\n").encode())
    return folder


def _meta(a: ad.AnnData, **cols) -> pd.DataFrame:
    base = {"cell": a.obs_names, "perturbation": a.obs["perturbation"].astype(str).to_numpy()}
    base["context"] = a.obs["context"].astype(str).to_numpy()
    base.update(cols)
    return pd.DataFrame(base)


def _with_meta(d: Path, meta: pd.DataFrame, name: str = "metadata.csv", sep: str = ",", a=None) -> Path:
    folder = _bundle(d, a)
    meta.to_csv(folder / name, index=False, sep=sep)
    return folder


def _mtx_text(d: Path, text: str, n_bc: int = 2, n_genes: int = 2) -> Path:
    folder = d / "bundle"
    folder.mkdir()
    (folder / "matrix.mtx").write_text(text)
    (folder / "barcodes.tsv").write_text("".join(f"B{i}\n" for i in range(n_bc)))
    (folder / "features.tsv").write_text("".join(f"G{i}\tG{i}\n" for i in range(n_genes)))
    return folder


def _obs(a: ad.AnnData, **cols) -> ad.AnnData:
    for k, v in cols.items():
        a.obs[k] = v
    return a


def _labels(a: ad.AnnData, values) -> ad.AnnData:
    a.obs["perturbation"] = pd.Categorical(values)
    return a


def _X(a: ad.AnnData, fn: Callable[[np.ndarray], np.ndarray]) -> ad.AnnData:
    a.X = fn(a.X.toarray().astype(np.float32))
    return a


def _h5ad_bad_shape(d: Path) -> Path:
    path = _h5(d, _base())
    with h5py.File(path, "r+") as f:
        f["X"].attrs["shape"] = np.array([999, 40])
    return path


def _fifo(d: Path, name: str) -> Path:
    os.mkfifo(d / name)
    return d / name


MTX_HEAD = "%%MatrixMarket matrix coordinate integer general\n"
n = len(_base().obs_names) if False else 120  # cells of _base()

# (id, build(dir) -> (input, extra args), phrase expected in the one error line)
BAD: list[tuple[str, Callable, str]] = [
    ("missing-file", lambda d: (d / "nope.h5ad", []), "no readable data"),
    ("empty-folder", lambda d: ((d / "e").mkdir() or d / "e", []), "no matrix.mtx"),
    ("csv-input", lambda d: ((d / "x.csv").write_text("a,b\n1,2\n") and d / "x.csv", []), "not a supported"),
    ("text-as-h5ad", lambda d: ((d / "t.h5ad").write_text("hello") and d / "t.h5ad", []), "not an HDF5"),
    ("empty-h5ad", lambda d: ((d / "z.h5ad").write_bytes(b"") or d / "z.h5ad", []), "not an HDF5"),
    (
        "truncated-h5ad",
        lambda d: (_trunc(_h5(d, _base(), "full.h5ad"), d / "cut.h5ad"), []),
        "truncated or damaged",
    ),
    ("h5ad-shape-lies", lambda d: (_h5ad_bad_shape(d), []), "damaged"),
    ("fifo-h5ad", lambda d: (_fifo(d, "pipe.h5ad"), []), "no readable data"),
    ("dev-null", lambda d: (Path("/dev/null"), []), "no readable data"),
    ("all-zero", lambda d: (_h5(d, _X(_base(), np.zeros_like)), []), "only zeros"),
    ("nan-values", lambda d: (_h5(d, _X(_base(), lambda x: _put(x, np.nan))), []), "NaN"),
    ("inf-values", lambda d: (_h5(d, _X(_base(), lambda x: _put(x, np.inf))), []), "infinite"),
    ("negative-values", lambda d: (_h5(d, _X(_base(), lambda x: x - 3)), []), "negative values"),
    ("scaled-values", lambda d: (_h5(d, _X(_base(), lambda x: x * 37.3 + 0.1)), []), "neither counts"),
    ("no-genes", lambda d: (_h5(d, _base()[:, :0].copy()), []), "empty"),
    ("no-cells", lambda d: (_h5(d, _base()[:0].copy()), []), "empty"),
    ("no-label-columns", lambda d: (_h5(d, _no_obs(_base())), []), "not found in obs"),
    (
        "no-control-recognised",
        lambda d: (_h5(d, _labels(_base(), np.where(np.arange(n) % 2, "A", "B"))), []),
        "no control label chosen",
    ),
    ("control-not-present", lambda d: (_h5(d, _base()), ["--control", "DMSO"]), "label 'DMSO' not found"),
    ("only-controls", lambda d: (_h5(d, _labels(_base(), ["ctrl"] * n)), []), "no control label chosen"),
    (
        "only-controls-explicit",
        lambda d: (_h5(d, _labels(_base(), ["ctrl"] * n)), ["--control", "ctrl"]),
        "no perturbed cells",
    ),
    (
        "all-unlabeled",
        lambda d: (_h5(d, _labels(_base(), [np.nan] * n)), ["--control", "ctrl"]),
        "no cell has a label",
    ),
    ("pert-col-missing", lambda d: (_h5(d, _base()), ["--pert-col", "gene"]), "'gene' not found"),
    (
        "context-col-missing",
        lambda d: (_h5(d, _base()), ["--context-col", "celltype"]),
        "'celltype' not found",
    ),
    ("batch-col-missing", lambda d: (_h5(d, _base()), ["--batch-col", "lane"]), "'lane' not found"),
    (
        "context-without-controls",
        lambda d: (_h5(d, _ctx_no_ctrl(_base())), []),
        "have perturbed cells but no control",
    ),
    ("min-genes-too-high", lambda d: (_h5(d, _base()), ["--min-genes", "100000"]), "would remove all"),
    ("min-cells-too-high", lambda d: (_h5(d, _base()), ["--min-cells", "100000"]), "would remove all"),
    ("output-not-h5ad", lambda d: (_h5(d, _base()), ["-o", str(d / "o.csv")]), "must end in .h5ad"),
    ("output-is-input", lambda d: (_h5(d, _base()), ["-o", str(d / "in.h5ad")]), "overwrite the input"),
    (
        "seurat-v3-on-log",
        lambda d: (_h5(d, _X(_base(), np.log1p)), ["--hvg-flavor", "seurat_v3"]),
        "non-integer",
    ),
    ("budget-exceeded", lambda d: (_h5(d, _base()), ["#env", "0.000001"]), "more than the"),
    ("budget-not-a-number", lambda d: (_h5(d, _base()), ["#env", "lots"]), "not a positive number"),
    (
        "sample-without-controls",
        lambda d: (_h5(d, _sample_without_controls()), []),
        "no control label chosen",
    ),
    # ---- MTX bundles
    ("mtx-huge-nnz", lambda d: (_mtx_text(d, MTX_HEAD + "2 2 5000000000\n1 1 1\n"), []), "declares"),
    (
        "mtx-huge-array",
        lambda d: (_mtx_text(d, "%%MatrixMarket matrix array integer general\n200000 200000\n1\n"), []),
        "lists 2 barcodes",
    ),
    ("mtx-float-dims", lambda d: (_mtx_text(d, MTX_HEAD + "2e9 2e9 1\n1 1 1\n"), []), "not a Matrix Market"),
    ("mtx-negative-dims", lambda d: (_mtx_text(d, MTX_HEAD + "-2 2 1\n1 1 1\n"), []), "not a Matrix Market"),
    ("mtx-junk", lambda d: (_mtx_text(d, "hello world\n"), []), "not a Matrix Market"),
    ("mtx-empty", lambda d: (_mtx_text(d, ""), []), "not a Matrix Market"),
    ("mtx-index-out-of-range", lambda d: (_mtx_text(d, MTX_HEAD + "2 2 1\n9 9 1\n"), []), "truncated or not"),
    ("mtx-fewer-entries", lambda d: (_mtx_text(d, MTX_HEAD + "2 2 3\n1 1 1\n"), []), "truncated"),
    ("mtx-wrong-shape", lambda d: (_mtx_text(d, MTX_HEAD + "3 5 1\n1 1 1\n"), []), "lists 2 barcodes"),
    ("mtx-no-barcodes", lambda d: (_drop(_bundle(d), "barcodes.tsv"), []), "lacks barcodes"),
    ("mtx-no-features", lambda d: (_drop(_bundle(d), "features.tsv"), []), "lacks"),
    ("mtx-empty-barcodes", lambda d: (_emptied(_bundle(d), "barcodes.tsv"), []), "is empty"),
    ("mtx-truncated", lambda d: (_cut_file(_bundle(d), "matrix.mtx"), []), "truncated"),
    ("mtx-gz-garbage", lambda d: (_gz_garbage(d), []), "not a Matrix Market"),
    ("mtx-no-metadata", lambda d: (_bundle(d), []), "not found in obs"),
    (
        "meta-no-id-column",
        lambda d: (_with_meta(d, _meta(_base()).assign(cell=[f"X{i}" for i in range(n)])), []),
        "holds the cell ids",
    ),
    ("meta-missing-rows", lambda d: (_with_meta(d, _meta(_base()).iloc[:60]), []), "have no row in"),
    ("meta-duplicate-ids", lambda d: (_with_meta(d, _dup_meta()), []), "repeats cell id"),
    ("meta-empty-file", lambda d: (_meta_file(d, ""), []), "cannot read metadata"),
    ("meta-header-only", lambda d: (_meta_file(d, "cell,perturbation\n"), []), "needs a header line"),
    ("meta-one-column", lambda d: (_meta_file(d, "cell\n" + "\n".join(_base().obs_names)), []), "1 columns"),
    ("meta-binary", lambda d: (_meta_file(d, None), []), "cannot read metadata"),
    ("meta-is-folder", lambda d: (_bundle(d), ["--metadata", str(d)]), "no readable data"),
    ("meta-fifo", lambda d: (_bundle(d), ["--metadata", str(_fifo(d, "m.csv"))]), "no readable data"),
    ("meta-dev-zero", lambda d: (_bundle(d), ["--metadata", "/dev/zero"]), "no readable data"),
    (
        "meta-id-col-missing",
        lambda d: (_with_meta(d, _meta(_base())), ["--cell-id-col", "barcode"]),
        "not in",
    ),
    (
        "meta-stim-unknown-control",
        lambda d: (_with_meta(d, _meta(_base(), perturbation=np.where(np.arange(n) % 2, "IFN", "LPS"))), []),
        "no control label chosen",
    ),
]


def _put(x: np.ndarray, value: float) -> np.ndarray:
    x[0, 0] = value
    return x


def _trunc(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def _no_obs(a: ad.AnnData) -> ad.AnnData:
    a.obs = pd.DataFrame(index=a.obs_names)
    return a


def _ctx_no_ctrl(a: ad.AnnData) -> ad.AnnData:
    labels = a.obs["perturbation"].astype(str).to_numpy().copy()
    labels[(a.obs["context"].astype(str) == "c1").to_numpy() & (labels == "ctrl")] = "P000"
    return _labels(a, labels)


def _sample_without_controls() -> ad.AnnData:
    a = ad.read_h5ad(ROOT / "sample_data" / "perturbench_devel.h5ad")
    a = a[a.obs["perturbation"].astype(str) != "ctrl"].copy()
    del a.uns["control_label"]
    return a[:400].copy()


def _drop(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _emptied(folder: Path, name: str) -> Path:
    (folder / name).write_text("")
    return folder


def _cut_file(folder: Path, name: str) -> Path:
    text = (folder / name).read_text()
    (folder / name).write_text(text[: len(text) // 2])
    return folder


def _gz_garbage(d: Path) -> Path:
    folder = _bundle(d)
    (folder / "matrix.mtx").unlink()
    (folder / "matrix.mtx.gz").write_bytes(os.urandom(300))
    return folder


def _dup_meta() -> pd.DataFrame:
    meta = _meta(_base())
    meta.loc[1, "cell"] = meta.loc[0, "cell"]
    return meta


def _meta_file(d: Path, text: str | None) -> Path:
    folder = _bundle(d)
    if text is None:
        (folder / "metadata.csv").write_bytes(b"\xff\xfe\x00\x81" * 50)
    else:
        (folder / "metadata.csv").write_text(text)
    return folder


# (id, build(dir) -> (input, extra args), check(prepared AnnData))
def _has(**expect):
    def check(p: ad.AnnData):
        for key, value in expect.items():
            got = {
                "control": p.uns["statecore"]["control"],
                "pert_col": p.uns["statecore"]["columns"]["perturbation"],
                "n_obs": p.n_obs,
                "unique_ids": p.obs_names.is_unique,
            }[key]
            assert got == value, (key, got, value)

    return check


def _kang_like(d: Path, *, gz_meta: bool = False, sep: str = ",") -> Path:
    a = _base()
    stim = np.where(a.obs["perturbation"].astype(str) == "ctrl", "CTRL", "STIM")
    meta = pd.DataFrame({"barcode": a.obs_names, "stim": stim, "cell_type": a.obs["context"].astype(str)})
    folder = _bundle(d, a)
    name = "metadata.tsv.gz" if gz_meta else "metadata.csv"
    meta.to_csv(folder / name, index=False, sep="\t" if gz_meta else sep)
    return folder


VALID: list[tuple[str, Callable, Callable]] = [
    ("plain-h5ad", lambda d: (_h5(d, _base()), []), _has(control="ctrl", n_obs=n)),
    ("kang-stim-CTRL", lambda d: (_kang_like(d), []), _has(control="CTRL", pert_col="stim")),
    ("metadata-tsv-gz", lambda d: (_kang_like(d, gz_meta=True), []), _has(control="CTRL")),
    ("metadata-semicolons", lambda d: (_kang_like(d, sep=";"), []), _has(control="CTRL")),
    (
        "upper-case-column",
        lambda d: (_h5(d, _rename(_base(), "SGRNA", {"ctrl": "NT"})), []),
        _has(control="NT", pert_col="SGRNA"),
    ),
    (
        "condition-DMSO",
        lambda d: (_h5(d, _rename(_base(), "Condition", {"ctrl": "DMSO"})), []),
        _has(control="DMSO", pert_col="Condition"),
    ),
    (
        "unlabeled-cells-dropped",
        lambda d: (_h5(d, _labels(_base(), _blank(_base().obs["perturbation"], 7))), []),
        _has(n_obs=n - 7),
    ),
    ("duplicate-cell-ids", lambda d: (_h5(d, _dup_ids(_base())), []), _has(unique_ids=True, n_obs=n)),
    (
        "treatment-none-ignored",
        lambda d: (_h5(d, _obs(_base(), treatment="none")), []),
        _has(pert_col="perturbation", control="ctrl"),
    ),
    ("markdown-and-unicode-labels", lambda d: (_h5(d, _odd_labels(_base())), []), _has(control="ctrl")),
    (
        "numeric-labels-explicit-control",
        lambda d: (_h5(d, _numeric(_base())), ["--control", "0"]),
        _has(control="0"),
    ),
    ("dense-counts", lambda d: (_h5(d, _X(_base(), lambda x: x)), []), _has(n_obs=n)),
    ("csc-counts", lambda d: (_h5(d, _csc(_base())), []), _has(n_obs=n)),
    ("log-normalised", lambda d: (_h5(d, _lognorm(_base())), []), _has(n_obs=n)),
    ("cells-x-genes-gz-bundle", lambda d: (_bundle_meta(d), []), _has(control="ctrl")),
    ("default-umap-small", lambda d: (_h5(d, _base()), ["#default"]), _has(n_obs=n)),
]


def _rename(a: ad.AnnData, col: str, mapping: dict) -> ad.AnnData:
    a.obs[col] = a.obs.pop("perturbation").astype(str).replace(mapping)
    return a


def _blank(values: pd.Series, k: int) -> np.ndarray:
    out = values.astype(str).to_numpy().astype(object)
    out[[i for i in range(len(out)) if out[i] != "ctrl"][:k]] = [np.nan, "", " ", "nan", "NA", "", np.nan][:k]
    return out


def _dup_ids(a: ad.AnnData) -> ad.AnnData:
    names = a.obs_names.to_numpy().copy()
    names[1] = names[0]
    a.obs_names = names
    return a


def _odd_labels(a: ad.AnnData) -> ad.AnnData:
    odd = {"P000": "**bold** [x](http://e)", "P001": "IFN-β 🧬", "P002": "A,B", "P003": ":red[x] $y$ <b>"}
    return _labels(a, a.obs["perturbation"].astype(str).replace(odd).to_numpy())


def _numeric(a: ad.AnnData) -> ad.AnnData:
    codes = {"ctrl": 0, "P000": 1, "P001": 2, "P002": 3, "P003": 4}
    a.obs["perturbation"] = a.obs["perturbation"].astype(str).map(codes).astype(int).to_numpy()
    return a


def _csc(a: ad.AnnData) -> ad.AnnData:
    a.X = sp.csc_matrix(a.X)
    return a


def _lognorm(a: ad.AnnData) -> ad.AnnData:
    import scanpy as sc

    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def _bundle_meta(d: Path) -> Path:
    a = _base()
    folder = _bundle(d, a, gz=True, genes_x_cells=False)
    _meta(a).to_csv(folder / "metadata.csv.gz", index=False)
    return folder


def _hashes(d: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in d.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o170000 == 0o100000
    }


def _run(tmp_path: Path, build, monkeypatch, capsys) -> tuple[int, str, Path, dict, dict]:
    inputs = tmp_path / "in"
    inputs.mkdir()
    src, extra = build(inputs)
    out = tmp_path / "out" / "prepared.h5ad"
    args = list(extra)
    if args[:1] == ["#env"]:
        monkeypatch.setenv("STATECORE_MAX_MEMORY_GB", args[1])
        args = args[2:]
    fast = [] if args[:1] == ["#default"] else FAST
    args = [a for a in args if a != "#default"]
    if "-o" not in args:
        args += ["-o", str(out)]
    before = _hashes(inputs)
    capsys.readouterr()
    rc = main(["prepare", str(src), *fast, *args])
    err = capsys.readouterr().err
    return rc, err, out, before, _hashes(inputs)


@pytest.mark.parametrize("case_id, build, phrase", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, case_id, build, phrase):
    rc, err, out, before, after = _run(tmp_path, build, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, err
    assert phrase in errors[0], errors[0]
    assert "Traceback" not in err and before == after and not out.exists()


@pytest.mark.parametrize("case_id, build, check", VALID, ids=[c[0] for c in VALID])
def test_awkward_input_gives_a_valid_prepared_file(tmp_path, monkeypatch, capsys, case_id, build, check):
    rc, err, out, before, after = _run(tmp_path, build, monkeypatch, capsys)
    assert rc == 0, err
    assert "Traceback" not in err and before == after
    prepared = ad.read_h5ad(out)
    assert {"perturbation", "context", "batch"} <= set(prepared.obs.columns)
    ctrl = prepared.uns["statecore"]["control"]
    labels = prepared.obs["perturbation"].astype(str)
    assert (labels == ctrl).any() and (labels != ctrl).any() and "nan" not in set(labels)
    check(prepared)


def test_corpus_size():
    assert len(BAD) + len(VALID) >= 60


@pytest.mark.parametrize(
    "header",
    [
        MTX_HEAD + "2 2 5000000000\n1 1 1\n",
        "%%MatrixMarket matrix array integer general\n200000 200000\n1\n",
        MTX_HEAD + "2e9 2e9 1\n1 1 1\n",
    ],
    ids=["nnz-5e9", "array-200k", "dims-2e9"],
)
def test_crafted_mtx_in_a_real_process(tmp_path, header):
    """These 70-byte files used to abort the process (exit 134: a file closed under scipy's reader)."""
    folder = _mtx_text(tmp_path, header)
    before = _hashes(folder)
    proc = subprocess.run(
        [sys.executable, "-m", "statecore", "prepare", str(folder), "-o", str(tmp_path / "o.h5ad")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert _hashes(folder) == before
