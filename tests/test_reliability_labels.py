"""Column detection and label checks, and a property test over arbitrary label columns."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statecore.cli import main
from statecore.config import DataSpec
from statecore.data.io import check, detect, unlabeled


def _adata(**obs) -> ad.AnnData:
    n = len(next(iter(obs.values())))
    X = np.random.default_rng(0).poisson(3.0, (n, 20)).astype(np.float32)
    return ad.AnnData(X, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n)]))


def test_no_silent_switch_to_a_single_valued_column(sample_path):
    a = ad.read_h5ad(sample_path)
    a = a[a.obs["perturbation"].astype(str) != "ctrl"].copy()
    del a.uns["control_label"]
    found = detect(a)
    # Before: "treatment" (every cell "none") was taken, with control "none" and 0 perturbations.
    assert found.spec.pert_col == "perturbation" and not found.control_found
    assert found.spec.control == "" and "no control label chosen" in " ".join(check(a, found.spec).errors)


def test_common_condition_names_case_insensitive():
    for col, ctrl in (
        ("STIM", "CTRL"),
        ("sgRNA", "NT"),
        ("Gene_Target", "non-targeting"),
        ("guide", "Control"),
    ):
        found = detect(_adata(**{col: [ctrl, "X", "Y", ctrl]}))
        assert (found.spec.pert_col, found.spec.control, found.control_found) == (col, ctrl, True)


def test_a_column_passed_over_is_named():
    found = detect(_adata(perturbation=["A", "B", "A", "B"], treatment=["DMSO", "drug", "DMSO", "drug"]))
    assert found.spec.pert_col == "treatment" and "'perturbation'" in found.notes[0]


def test_unlabeled_mask_on_plain_and_categorical():
    values = pd.Series(["a", None, "", " ", "nan", "NA", "b", np.nan], dtype=object)
    expect = [False, True, True, True, True, True, False, True]
    assert unlabeled(values).tolist() == expect
    assert unlabeled(values.astype("category")).tolist() == expect


LABEL = st.one_of(
    st.sampled_from(["ctrl", "CTRL", "A", "B", "", " ", "nan", "**x**", "a,b", "-x", "🧬"]),
    # text an .h5ad can store: no NUL, no lone surrogates (not encodable as UTF-8)
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6),
    st.none(),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.lists(LABEL, min_size=8, max_size=8), control=st.sampled_from([None, "ctrl", "A", ""]))
def test_any_label_column_gives_a_file_or_one_clear_line(tmp_path_factory, capsys, labels, control):
    d = tmp_path_factory.mktemp("h")
    a = _adata(perturbation=pd.array(labels * 5, dtype=object), context=["k"] * 40)
    spec = DataSpec(pert_col="perturbation", control=control or "", context_col="context")
    check(a, spec)  # never raises
    a.write_h5ad(d / "in.h5ad")
    before = (d / "in.h5ad").read_bytes()
    args = ["prepare", str(d / "in.h5ad"), "-o", str(d / "out.h5ad"), "--no-umap"]
    args += ["--min-genes", "0", "--min-cells", "0"] + (["--control", control] if control else [])
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert (d / "in.h5ad").read_bytes() == before
    if rc == 0:
        out = ad.read_h5ad(d / "out.h5ad")
        assert not unlabeled(out.obs["perturbation"].astype(str)).any()
    else:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err


def test_nul_in_a_label_is_one_clear_error():
    # Metadata read from a CSV can carry a NUL that no .h5ad can store: name it before writing fails.
    a = _adata(perturbation=["ctrl", "A\x00", "B", "ctrl"] * 5)
    rep = check(a, DataSpec(pert_col="perturbation", control="ctrl", context_col=None))
    assert len(rep.errors) == 1 and "NUL character" in rep.errors[0]


@pytest.mark.parametrize("n_dup", [1, 3])
def test_duplicate_ids_warn_and_are_made_unique(n_dup):
    a = _adata(perturbation=["ctrl", "A"] * 10)
    names = a.obs_names.to_numpy().copy()
    names[1 : 1 + n_dup] = names[0]
    a.obs_names = names
    rep = check(a, DataSpec(pert_col="perturbation", control="ctrl", context_col=None))
    assert rep.ok and f"{n_dup} duplicate cell ids" in " ".join(rep.warnings)
