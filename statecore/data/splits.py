"""Train / validation / test splits over (context, perturbation) pairs.

A split never lists cells, only pairs, so it stays valid for any file holding the same labels and
serialises to a small ``split.json``. Every shuffle runs on sorted labels with a seeded
``np.random.Generator`` so that the same data and seed give the same split on any machine.
Combinations (``"A+B"``) are perturbations like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from statecore.config import SPLIT_TASKS, SplitConfig
from statecore.data.io import obs_labels
from statecore.errors import DataError
from statecore.runs.files import atomic_write_json

TASKS = SPLIT_TASKS
ROLES = ("train", "val", "test", "controls")


@dataclass(frozen=True)
class Split:
    task: str
    context: str
    control: str
    seed: int
    train: dict[str, list[str]] = field(default_factory=dict)  # context -> training perturbations
    val: dict[str, list[str]] = field(default_factory=dict)  # carved from training pairs, never test
    test: dict[str, list[str]] = field(default_factory=dict)  # target context -> test perturbations

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "context": self.context,
            "control": self.control,
            "seed": int(self.seed),
            "train": {k: list(v) for k, v in self.train.items()},
            "val": {k: list(v) for k, v in self.val.items()},
            "test": {k: list(v) for k, v in self.test.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        known = {"task", "context", "control", "seed", "train", "val", "test"}
        unknown = sorted(set(d) - known)
        missing = sorted({"task", "context", "control", "seed"} - set(d))
        if unknown or missing:
            raise DataError(
                f"split.json: unknown keys {unknown} / missing keys {missing}; regenerate it with make_split"
            )
        return cls(
            task=str(d["task"]),
            context=str(d["context"]),
            control=str(d["control"]),
            seed=int(d["seed"]),
            train={str(k): [str(p) for p in v] for k, v in d.get("train", {}).items()},
            val={str(k): [str(p) for p in v] for k, v in d.get("val", {}).items()},
            test={str(k): [str(p) for p in v] for k, v in d.get("test", {}).items()},
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read split file {str(path)!r}: {exc}") from exc

    def pairs(self, role: str) -> set[tuple[str, str]]:
        """(context, perturbation) pairs of a role: train, val or test."""
        table = {"train": self.train, "val": self.val, "test": self.test}.get(role)
        if table is None:
            raise ValueError(f"role must be one of train, val, test; got {role!r}")
        return {(c, p) for c, ps in table.items() for p in ps}

    def cell_mask(self, adata, role: str) -> np.ndarray:
        """Boolean mask over ``adata`` cells: train = all controls + train pairs; val / test = their pairs;
        controls = control cells of every context."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}; got {role!r}")
        pert, ctx, _ = obs_labels(adata)
        is_ctrl = pert == self.control
        if role == "controls":
            return is_ctrl
        keys = np.char.add(np.char.add(ctx.astype(str), "\x1f"), pert.astype(str))
        wanted = np.asarray([f"{c}\x1f{p}" for c, p in self.pairs(role)], dtype=str)
        mask = np.isin(keys, wanted) if wanted.size else np.zeros(adata.n_obs, dtype=bool)
        return mask | is_ctrl if role == "train" else mask


def make_split(adata, cfg: SplitConfig, *, eligible=None, combo_sep: str = "+") -> Split:
    """Dispatch on ``cfg.task``: zeroshot | underrepresented | explicit | unseen.

    ``eligible`` (unseen only): the genes a model can encode (those with gene features); held-out and
    validation perturbations are drawn among them."""
    if cfg.context is None:
        raise DataError(f"choose a target context for the split (--context); available: {_contexts(adata)}")
    if cfg.task == "zeroshot":
        return split_zeroshot(adata, cfg.context, seed=cfg.seed, val_fraction=cfg.val_fraction)
    if cfg.task == "underrepresented":
        return split_underrepresented(
            adata, cfg.context, alpha=cfg.keep_fraction, seed=cfg.seed, val_fraction=cfg.val_fraction
        )
    if cfg.task == "explicit":
        return split_explicit(
            adata, cfg.context, list(cfg.test_perts), seed=cfg.seed, val_fraction=cfg.val_fraction
        )
    if cfg.task == "unseen":
        return split_unseen(
            adata,
            cfg.context,
            test_perts=list(cfg.test_perts),
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            eligible=eligible,
            combo_sep=combo_sep,
        )
    raise DataError(f"unknown split task {cfg.task!r}; use one of {', '.join(TASKS)}")


def split_unseen(
    adata,
    target_context: str,
    *,
    test_perts=(),
    test_fraction: float = 0.2,
    seed: int = 0,
    val_fraction: float = 0.1,
    eligible=None,
    combo_sep: str = "+",
) -> Split:
    """Perturbed genes held out of EVERY context: no training cell of any context saw them perturbed.

    Test genes are ``test_perts`` or a seeded ``test_fraction`` of the target context's single
    perturbations (among ``eligible`` genes when given). A combination holding a test gene leaves training
    too. Validation is asked the same question: a seeded ``val_fraction`` of the remaining genes is moved,
    in every context, out of training into validation, so settings are chosen on genes the model never saw.
    """
    table, control = _pert_table(adata, target_context)
    target = str(target_context)
    ok = (lambda g: True) if eligible is None else set(map(str, eligible)).__contains__
    singles = [p for p in table[target] if combo_sep not in p or not combo_sep]
    rng = np.random.default_rng(seed)
    if test_perts:
        test = _check_unseen_tests([str(p) for p in test_perts], table, target, control, ok)
    else:
        if not 0.0 < float(test_fraction) < 1.0:
            raise DataError(f"test fraction must lie in (0, 1); got {test_fraction}")
        pool = [p for p in singles if ok(p)]
        if len(pool) < 2:
            raise DataError(
                f"context {target!r} has {len(pool)} single perturbation(s) with gene features; the unseen "
                "split needs at least 2 (one to hold out, one to train on); give a feature table covering "
                "more of the perturbed genes (--gene-features PATH)"
            )
        n_test = min(len(pool) - 1, max(1, int(round(test_fraction * len(pool)))))
        test = sorted(pool[i] for i in rng.permutation(len(pool))[:n_test])
    held = set(test)

    def parts(label: str) -> set[str]:
        return set(label.split(combo_sep)) if combo_sep else {label}

    train = {c: [p for p in ps if not parts(p) & held] for c, ps in table.items()}
    if not any(train.values()):
        raise DataError("holding out the test genes leaves no training perturbation; hold out fewer")
    val = _carve_unseen_val(train, val_fraction, rng, ok, parts)
    return Split(
        task="unseen", context=target, control=control, seed=int(seed), train=train, val=val,
        test={target: sorted(held)},
    )  # fmt: skip


def _check_unseen_tests(test, table, target, control, ok) -> list[str]:
    if control in test:
        raise DataError(
            f"the control label {control!r} cannot be a test perturbation; remove it from the list"
        )
    absent = sorted(set(test) - set(table[target]))
    if absent:
        have = table[target]
        raise DataError(
            f"test perturbation(s) {absent} have no cells in context {target!r}; choose from "
            f"{have[:20]}{' ...' if len(have) > 20 else ''}"
        )
    lacking = sorted(p for p in set(test) if not ok(p))
    if lacking:
        raise DataError(
            f"no gene features for test perturbation(s) {lacking}; a model cannot encode a gene without "
            "features: use a gene feature table that covers them (--gene-features PATH) or drop them"
        )
    return sorted(set(test))


def _carve_unseen_val(train, val_fraction, rng, ok, parts) -> dict[str, list[str]]:
    """Move a seeded share of the training genes, in every context, into validation (in place)."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    genes = sorted({p for ps in train.values() for p in ps if len(parts(p)) == 1 and ok(p)})
    val: dict[str, list[str]] = {c: [] for c in train}
    if val_fraction == 0 or len(genes) < 3:
        return val
    n_val = min(len(genes) - 2, max(1, int(round(val_fraction * len(genes)))))
    chosen = {genes[i] for i in rng.permutation(len(genes))[:n_val]}
    for c, ps in train.items():
        val[c] = sorted(p for p in ps if p in chosen)
        train[c] = [p for p in ps if not parts(p) & chosen]
    return val


def split_underrepresented(
    adata, target_context: str, alpha: float = 0.3, seed: int = 0, val_fraction: float = 0.1
) -> Split:
    """The target context keeps a fraction ``alpha`` (at least one) of its perturbations in training;
    the rest are test. Every other context is fully in training."""
    if not 0.0 < float(alpha) < 1.0:
        raise DataError(
            f"alpha (share of the target context's perturbations kept in training) must lie in "
            f"(0, 1); got {alpha}"
        )
    table, control = _pert_table(adata, target_context)
    target = table[target_context]
    if len(target) < 2:
        raise DataError(
            f"context {target_context!r} has {len(target)} perturbation(s); the underrepresented "
            "split needs at least 2 (one to keep, one to test); use the zero-shot split instead"
        )
    rng = np.random.default_rng(seed)
    shuffled = [target[i] for i in rng.permutation(len(target))]
    n_keep = min(len(target) - 1, max(1, int(round(alpha * len(target)))))
    keep, test = sorted(shuffled[:n_keep]), sorted(shuffled[n_keep:])
    return _finish("underrepresented", table, target_context, control, seed, keep, test, val_fraction, rng)


def split_zeroshot(adata, target_context: str, seed: int = 0, val_fraction: float = 0.1) -> Split:
    """Only the target context's controls are seen in training; all of its perturbations are test."""
    table, control = _pert_table(adata, target_context)
    rng = np.random.default_rng(seed)
    return _finish(
        "zeroshot", table, target_context, control, seed, [], list(table[target_context]), val_fraction, rng
    )


def split_explicit(adata, target_context: str, test_perts, seed: int = 0, val_fraction: float = 0.1) -> Split:
    """A given list of test perturbations for the target context; its other perturbations train."""
    table, control = _pert_table(adata, target_context)
    test_perts = [str(p) for p in test_perts]
    if not test_perts:
        raise DataError("the explicit split needs at least one test perturbation (--test-perts)")
    if control in test_perts:
        raise DataError(
            f"the control label {control!r} cannot be a test perturbation; remove it from the list"
        )
    available = set(table[target_context])
    missing = sorted(set(test_perts) - available)
    if missing:
        raise DataError(
            f"test perturbation(s) {missing} have no cells in context {target_context!r}; "
            f"choose from {sorted(available)[:20]}{' ...' if len(available) > 20 else ''}"
        )
    test = sorted(set(test_perts))
    keep = sorted(available - set(test))
    rng = np.random.default_rng(seed)
    return _finish("explicit", table, target_context, control, seed, keep, test, val_fraction, rng)


def _finish(task, table, target, control, seed, keep, test, val_fraction, rng) -> Split:
    if not test:
        raise DataError(f"the {task} split of context {target!r} has no test perturbation")
    train = {c: list(ps) for c, ps in table.items() if c != target}
    train[target] = list(keep)
    val = _carve_val(train, target, val_fraction, rng)
    return Split(
        task=task,
        context=str(target),
        control=control,
        seed=int(seed),
        train=train,
        val=val,
        test={str(target): list(test)},
    )


def _carve_val(train: dict[str, list[str]], target: str, val_fraction: float, rng) -> dict[str, list[str]]:
    """Move a share of training pairs into validation, in place.

    Pairs come from the non-target contexts (the target keeps its few training pairs) and a pair is
    only taken when its perturbation stays in training elsewhere and its context keeps at least one
    training perturbation, so validation asks the same question as the test: a known perturbation in
    a context where it was not seen.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    val: dict[str, list[str]] = {c: [] for c in train}
    candidates = sorted((c, p) for c, ps in train.items() if c != target for p in ps)
    if val_fraction == 0 or not candidates:
        return val
    n_val = max(1, int(round(val_fraction * len(candidates))))
    seen: dict[str, int] = {}  # training contexts per perturbation
    for ps in train.values():
        for p in ps:
            seen[p] = seen.get(p, 0) + 1
    taken = 0
    for i in rng.permutation(len(candidates)):
        if taken == n_val:
            break
        c, p = candidates[i]
        if seen[p] < 2 or len(train[c]) < 2:
            continue
        train[c].remove(p)
        val[c].append(p)
        seen[p] -= 1
        taken += 1
    return {c: sorted(ps) for c, ps in val.items()}


def _contexts(adata) -> list[str]:
    return sorted(adata.obs["context"].astype(str).unique()) if "context" in adata.obs.columns else []


def _pert_table(adata, target_context: str) -> tuple[dict[str, list[str]], str]:
    """context -> sorted perturbations with cells there (control excluded), and the control label."""
    from statecore.data.io import control_label

    control = control_label(adata)
    pert, ctx, _ = obs_labels(adata)
    contexts = sorted(set(ctx))
    target_context = str(target_context)
    if target_context not in contexts:
        raise DataError(f"context {target_context!r} not found; available contexts: {contexts}")
    table: dict[str, list[str]] = {}
    for c in contexts:
        table[c] = sorted(set(pert[(ctx == c) & (pert != control)]))
    if not table[target_context]:
        raise DataError(
            f"context {target_context!r} has no perturbed cells (only controls {control!r}); "
            "choose a context with perturbations"
        )
    if not np.any((ctx == target_context) & (pert == control)):
        raise DataError(
            f"context {target_context!r} has no control cells ({control!r}); a model cannot "
            "predict it without them; choose another context"
        )
    return table, control
