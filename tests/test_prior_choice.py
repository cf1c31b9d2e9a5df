"""prior_shrink="auto" (statecore.training.prior_choice): leave-one-pair-out choice on training pairs only."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from statecore.config import RunConfig, SplitConfig, STConfig, TrainConfig
from statecore.data.sets import PerturbationVocab
from statecore.data.splits import make_split
from statecore.errors import DataError
from statecore.training import prior_choice
from statecore.training.priors import prior_tables, vocab_pair_stats
from statecore.training.st_track import build_model

GENES = [f"g{i}" for i in range(30)]


def _screen(cells: dict[str, int], *, n_perts=12, effect=2.0, seed=0, combos=(), n_ctrl=150):
    """Gaussian log-expression: every single moves 3 random genes by +-effect in every context; a
    combination moves the sum of its singles; ``cells``: cells per perturbation in each context."""
    rng = np.random.default_rng(seed)
    perts = [f"P{i:02d}" for i in range(n_perts)]
    eff = {p: np.zeros(len(GENES)) for p in perts}
    for p in perts:
        eff[p][rng.choice(len(GENES), 3, replace=False)] = effect * rng.choice([-1, 1], 3)
    eff.update({c: sum(eff[p] for p in c.split("+")) for c in combos})
    X, ctx, lab = [], [], []
    for c, n in cells.items():
        base = 3 + rng.normal(0, 0.5, len(GENES))
        for p, k in [("ctrl", n_ctrl)] + [(p, n) for p in [*perts, *combos]]:
            X.append(rng.normal(base + (eff[p] if p != "ctrl" else 0), 1.0, (k, len(GENES))))
            ctx, lab = ctx + [c] * k, lab + [p] * k
    obs = pd.DataFrame({"context": ctx, "perturbation": lab}, index=[f"cell{i}" for i in range(len(lab))])
    adata = ad.AnnData(np.vstack(X).astype(np.float32), obs=obs, var=pd.DataFrame(index=GENES))
    adata.uns["control_label"] = "ctrl"
    return adata, PerturbationVocab.from_labels(["ctrl", *perts], "ctrl"), perts


def _choose(adata, vocab, train_pairs, target="c0"):
    return prior_choice.choose_for_run(
        adata, train_pairs=train_pairs, vocab=vocab, contexts=sorted(set(adata.obs["context"])), genes=GENES,
        target=target,
    )  # fmt: skip


def _model_prior(adata, vocab, train_pairs, contexts, shrink, context, label):
    """The shift prior the real model gives ``label`` in ``context`` with tables built from ``train_pairs``."""
    stats = vocab_pair_stats(adata, genes=GENES, vocab=vocab, train_pairs=train_pairs, noise=True)
    prior = prior_tables(stats, vocab=vocab, contexts=contexts, shrink=shrink)
    cfg = STConfig(
        num_genes=len(GENES), hidden_dim=8, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=16,
        perturbation_dim=len(vocab.names), residual="expression", shift_prior=True, prior_mode="add",
        relu_output=False, n_contexts=len(contexts), n_prior_pairs=prior.n_pairs, prior_shrink=shrink,
    )  # fmt: skip
    model = build_model(RunConfig(model=cfg), prior)  # the last layer starts at zero: output = x + prior
    z = torch.from_numpy(vocab.encode([label])).float()
    with torch.no_grad():
        out = model(torch.zeros(1, 2, len(GENES)), z, context=torch.tensor([contexts.index(context)]))
    return out[0, 0].double().numpy()


@pytest.mark.parametrize("shrink", prior_choice.CANDIDATES)
def test_leave_one_out_arithmetic_equals_rebuilding_the_tables_without_the_pair(shrink):
    adata, vocab, perts = _screen({"c0": 6, "c1": 4, "c2": 3}, n_perts=5, effect=0.7, combos=("P00+P01",))
    contexts = ["c0", "c1", "c2"]
    pairs = {"c0": [*perts, "P00+P01"], "c1": perts, "c2": perts[:3]}
    stats = vocab_pair_stats(
        adata, genes=GENES, vocab=vocab, train_pairs=pairs, noise=True, combinations=True
    )
    loo = prior_choice.loo_predictions(stats, vocab=vocab, contexts=contexts, shrink=shrink)
    row = {(c, p): k for k, (c, p) in enumerate(zip(stats.contexts, stats.labels))}
    for c, p in [("c0", "P00"), ("c2", "P01"), ("c1", "P04")]:  # in 3 contexts, in 3, in 2
        without = {k: [q for q in v if (k, q) != (c, p)] for k, v in pairs.items()}
        expected = _model_prior(adata, vocab, without, contexts, shrink, c, p)
        np.testing.assert_allclose(loo.pred[row[c, p]], expected, rtol=1e-4, atol=1e-5)
    # a combination: the sum of its singles as the model adds them (combinations are never in the tables)
    np.testing.assert_allclose(
        loo.pred[row["c0", "P00+P01"]],
        _model_prior(adata, vocab, pairs, contexts, shrink, "c0", "P00+P01"),
        rtol=1e-4,
        atol=1e-5,
    )
    # a rival's comparison: the prediction made without both pairs (only "context" depends on the rival)
    k, rivals = row["c0", "P00"], np.array([row["c0", "P02"], row["c0", "P03"]])
    both = prior_choice.rival_predictions(loo, stats, vocab=vocab, contexts=contexts, k=k, rivals=rivals)
    for r, q in zip(both, ("P02", "P03")):
        without = {**pairs, "c0": [x for x in pairs["c0"] if x not in ("P00", q)]}
        np.testing.assert_allclose(
            r, _model_prior(adata, vocab, without, contexts, shrink, "c0", "P00"), atol=1e-5
        )


def test_a_single_measured_in_one_context_only_is_skipped_and_counted():
    adata, vocab, perts = _screen({"c0": 5, "c1": 5}, n_perts=6)
    pairs = {"c0": perts, "c1": perts[:4]}  # P04, P05 measured in c0 only: no leave-one-out prediction
    choice = _choose(adata, vocab, pairs)
    assert choice.n_skipped == 2 and choice.n_scored == 4 and choice.scope == "c0"
    none = _choose(adata, vocab, {"c0": perts[:3], "c1": perts[3:]})  # no single in two contexts
    assert none.choice == "off" and none.n_scored == 0 and none.n_skipped == 6
    assert none.line().startswith("shift prior: kept off (no training pair to cross-validate")
    assert prior_choice.PriorChoice(**{**none.__dict__, "n_scored": 1}).line().count("n/a") == 6  # NaN scores


def test_pds_agrees_with_the_evaluation_metric():
    from statecore.evaluation.metrics import PseudobulkArrays, discrimination_score

    adata, vocab, perts = _screen({"c0": 4, "c1": 4, "c2": 4}, n_perts=8, effect=0.5, seed=3)
    pairs = {c: perts for c in ("c0", "c1", "c2")}
    stats = vocab_pair_stats(adata, genes=GENES, vocab=vocab, train_pairs=pairs, noise=True)
    loo = prior_choice.loo_predictions(stats, vocab=vocab, contexts=["c0", "c1", "c2"], shrink="zero")
    rows = np.flatnonzero(np.asarray(stats.contexts) == "c1")
    _, pds = prior_choice.pair_scores(
        loo, stats, vocab=vocab, contexts=["c0", "c1", "c2"], genes=GENES, rows=rows
    )
    zeros = np.zeros(len(GENES))
    pb = PseudobulkArrays(
        np.asarray(perts), np.asarray(GENES), stats.shift[rows], loo.pred[rows], zeros, zeros
    )
    np.testing.assert_allclose(pds, discrimination_score(pb, "l1"))
    assert 0.3 < pds.mean() < 1.0  # a real spread of ranks, not all first


def test_auto_picks_shrinkage_when_a_few_cell_context_pollutes_the_average():
    # c0 (target) and c1 measure every knockout well; c2 with 3 cells a knockout: its shifts are mostly noise,
    # which the plain average carries into every held-out prediction and the shrinkage removes
    adata, vocab, perts = _screen({"c0": 60, "c1": 60, "c2": 3}, n_perts=16, seed=1)
    choice = _choose(adata, vocab, {c: perts for c in ("c0", "c1", "c2")})
    assert choice.choice in ("zero", "context"), choice.line()
    s = choice.scores
    assert s[choice.choice]["pearson_delta"] > s["off"]["pearson_delta"] + 0.02
    assert s[choice.choice]["pds"] >= s["off"]["pds"] - prior_choice.TOLERANCE


def test_auto_keeps_off_when_every_effect_is_strong_and_well_measured():
    adata, vocab, perts = _screen({"c0": 60, "c1": 60, "c2": 60}, n_perts=12, effect=3.0, seed=2)
    choice = _choose(adata, vocab, {c: perts for c in ("c0", "c1", "c2")})
    assert choice.choice == "off", choice.line()
    assert choice.scores["off"]["pds"] == max(v["pds"] for v in choice.scores.values())


def test_decide_rule():
    def s(**kw):
        return {c: {"pds": v[0], "pearson_delta": v[1]} for c, v in kw.items()}

    assert prior_choice.decide(s(off=(0.80, 0.30), zero=(0.82, 0.20), context=(0.70, 0.90))) == "zero"
    assert prior_choice.decide(s(off=(0.80, 0.30), zero=(0.804, 0.40), context=(0.70, 0.90))) == "zero"
    assert prior_choice.decide(s(off=(0.80, 0.30), zero=(0.804, 0.303), context=(0.70, 0.9))) == "off"
    assert prior_choice.decide(s(off=(0.80, 0.30), zero=(0.80, 0.30), context=(0.80, 0.30))) == "off"
    nan = float("nan")  # no context with two scored pairs: pearson delta alone
    assert prior_choice.decide(s(off=(nan, 0.30), zero=(nan, 0.20), context=(nan, 0.50))) == "context"


def test_validation_and_test_cells_are_never_read():
    adata, vocab, perts = _screen({"c0": 8, "c1": 8, "c2": 8}, n_perts=12, effect=1.0, seed=4)
    split = make_split(
        adata, SplitConfig(task="underrepresented", context="c0", keep_fraction=0.6, val_fraction=0.3)
    )
    assert split.val and split.test
    vocab = PerturbationVocab.from_labels([p for _, p in split.pairs("train") | split.pairs("val")], "ctrl")
    train = {c: list(v) for c, v in split.train.items()}
    before = _choose(adata, vocab, train).to_dict()
    poisoned = adata.copy()
    pert, ctx = poisoned.obs["perturbation"].to_numpy(), poisoned.obs["context"].to_numpy()
    for value, held in ((1e6, split.val), (np.nan, split.test)):
        for c, ps in held.items():
            poisoned.X[(ctx == c) & np.isin(pert, ps)] = value
    assert json.dumps(_choose(poisoned, vocab, train).to_dict()) == json.dumps(before)


def _auto_config(**model):
    m = STConfig(
        hidden_dim=16, transformer_heads=2, transformer_layers=1, mlp_hidden_dim=32, set_size=8,
        residual="expression", shift_prior=True, prior_shrink="auto", prior_pairs="train",
    ).replace(**model)  # fmt: skip
    return RunConfig(
        split=SplitConfig(task="underrepresented", context="c0", val_fraction=0.2),
        model=m,
        train=TrainConfig(steps=4, batch_size=2, num_threads=1, val_every=2, warmup_steps=1),
    )


def test_a_run_records_its_choice_and_resume_keeps_it(prepared_synthetic, tmp_path, monkeypatch):
    from statecore.training.checkpoint import load_run
    from statecore.training.engine import train_run
    from statecore.training.st_track import resolve_auto_prior

    run_dir = tmp_path / "run"
    train_run(prepared_synthetic, _auto_config(), run_dir)
    record = json.loads((run_dir / "prior_choice.json").read_text())
    saved = json.loads((run_dir / "config.json").read_text())["model"]["prior_shrink"]
    assert record["choice"] == saved and saved in prior_choice.CANDIDATES
    run = load_run(run_dir)  # the concrete choice rebuilds the same model
    assert (run.model.pert_trust is not None) == (saved == "context")
    train = {c: list(v) for c, v in run.split.train.items()}  # the choice saw the training pairs only
    again = prior_choice.choose_for_run(
        prepared_synthetic, train_pairs=train, vocab=run.vocab, contexts=run.contexts, genes=run.genes,
        target="c0",
    )  # fmt: skip
    assert json.dumps(again.to_dict()) == json.dumps(record)

    def refuse(*a, **k):
        raise AssertionError("a resumed run must not choose again")

    monkeypatch.setattr(prior_choice, "choose_for_run", refuse)
    resumed = train_run(
        prepared_synthetic, _auto_config().replace(train=_auto_config().train.replace(steps=6)), run_dir
    )
    assert (
        resumed.step == 6
        and json.loads((run_dir / "config.json").read_text())["model"]["prior_shrink"] == saved
    )
    # a resumed config that still says "auto" reads the recorded choice
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    cfg = cfg.replace(model=cfg.model.replace(prior_shrink="auto"))
    from statecore.training.st_track import ExpressionTrack

    data = ExpressionTrack._saved_data(prepared_synthetic, cfg, run_dir)
    assert (
        resolve_auto_prior(prepared_synthetic, data, cfg, run_dir, resuming=True).model.prior_shrink == saved
    )


def test_auto_without_the_shift_prior_is_a_clear_error(prepared_synthetic, tmp_path):
    from statecore.training.engine import train_run

    with pytest.raises(DataError, match="--shift-prior on"):
        train_run(prepared_synthetic, _auto_config(shift_prior=False), tmp_path / "run")


def test_cli_prints_the_choice(prepared_synthetic, tmp_path, capsys):
    from statecore.cli import main

    path = tmp_path / "prep.h5ad"
    prepared_synthetic.write_h5ad(path)
    argv = ["train", "--data", str(path), "--run-dir", str(tmp_path / "run"), "--task", "underrepresented"]
    argv += ["--context", "c0", "--steps", "2", "--set-size", "8", "--batch-size", "2", "--threads", "1"]
    assert main([*argv, "--quiet", "--prior-shrink", "auto"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("done: step 2") and out[1].startswith("shift prior: chose ")
    assert (
        main(
            [
                *argv,
                "--quiet",
                "--prior-shrink",
                "auto",
                "--shift-prior",
                "off",
                "--run-dir",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )
    assert "--shift-prior on" in capsys.readouterr().err
