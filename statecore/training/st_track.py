"""The expression track: the State Transition model on the prepared data's (HVG) expression.

``make_train_data`` turns a prepared AnnData + split into step-addressed set datasets
(``statecore.data.sets``); :class:`STTask` is what the engine trains (forward, loss, validation loss);
:class:`ExpressionTrack` builds both for a run directory. Track B (``statecore.embedding.track``) reuses
all of it and swaps the cells' representation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statecore.config import RunConfig, TrainConfig
from statecore.data.sets import PerturbationVocab, SetDataset, build_groups, obs_labels, select_genes
from statecore.data.splits import Split, make_split
from statecore.errors import DataError
from statecore.models.losses import discrimination_loss, get_loss
from statecore.models.transition import StateTransitionModel
from statecore.runs import files as runs
from statecore.training import checkpoint as ckpt
from statecore.training import distributed as dist_utils
from statecore.training import prior_choice
from statecore.training.priors import (
    FeatureRidge,
    ShiftPrior,
    feature_ridge,
    prior_tables,
    self_effect,
    vocab_pair_stats,
)
from statecore.training.tracks import BuiltTask

# validation loss: the first sets of the validation plan's epoch 0 (fixed); 96 sets every 100 steps keep
# validation near 2% of a run (256 sets cost 4.5%, bench/profile_step.py)
VAL_MAX_SETS = 96


@dataclass
class TrainData:
    train: SetDataset
    val: SetDataset | None
    genes: list[str]
    vocab: PerturbationVocab
    contexts: list[str]
    batches: list[str]
    split: Split | None = None
    unencoded: tuple[str, ...] = ()  # gene-feature runs: training perturbations without features, left out
    # SplitConfig.train_on_classified: the cells training and the prior draw from (statecore.data.mixscape)
    cells: np.ndarray | None = None


def make_train_data(
    adata,
    split: Split,
    *,
    set_size: int = 64,
    seed: int = 0,
    use_hvg: bool = True,
    genes: list[str] | None = None,
    vocab: PerturbationVocab | None = None,
    pert_features=None,
    batches: list[str] | None = None,
    cells: np.ndarray | None = None,
) -> TrainData:
    """Training and validation set datasets for ``split`` (controls of every context train as identity);
    ``cells``: a mask of the perturbed cells they may draw (None: all; :func:`classified_cells`)."""
    _, ctx, batch = obs_labels(adata)
    genes = list(genes) if genes is not None else select_genes(adata, use_hvg)
    if vocab is None:
        train_labels = [p for _, p in split.pairs("train") | split.pairs("val")]
        vocab = PerturbationVocab.from_labels(train_labels, split.control, features=pert_features)
    contexts = sorted(set(ctx))
    batches = list(batches) if batches is not None else sorted(set(map(str, batch)))
    kw = dict(genes=genes, vocab=vocab, batches=batches, set_size=set_size)
    train_pairs, val_pairs = split.pairs("train"), split.pairs("val")
    unencoded: tuple[str, ...] = ()
    if vocab.features is not None:  # a perturbation of a gene without features cannot be encoded: left out
        unencoded = tuple(sorted({p for _, p in train_pairs | val_pairs if not vocab.can_encode(p)}))
        train_pairs = {(c, p) for c, p in train_pairs if p not in unencoded}
        val_pairs = {(c, p) for c, p in val_pairs if p not in unencoded}
        if unencoded:
            warnings.warn(
                f"{len(unencoded)} training perturbation(s) have no gene features and are left out of ST's "
                f"training (baselines still use them): {list(unencoded[:10])}",
                stacklevel=2,
            )
    groups = build_groups(adata, control=split.control, pairs=train_pairs, include_controls=True, cells=cells)
    train = SetDataset(adata, groups, seed=seed, **kw)
    val = None
    if val_pairs:
        vgroups = build_groups(
            adata, control=split.control, pairs=val_pairs, include_controls=False, cells=cells
        )
        if vgroups:
            val = SetDataset(adata, vgroups, seed=seed + 1_000_003, **kw)
    return TrainData(
        train=train, val=val, genes=genes, vocab=vocab, contexts=contexts, batches=batches, split=split,
        unencoded=unencoded, cells=cells,
    )  # fmt: skip


def classified_cells(adata, config: RunConfig, split: Split) -> np.ndarray | None:
    """With ``SplitConfig.train_on_classified``, the cells training draws from: controls and the perturbed
    cells prepare did not call NP; a training or validation pair with too few of those keeps all its cells
    (a warning names them). None otherwise. Test cells are never filtered (scoring reads the data itself)."""
    if not config.split.train_on_classified:
        return None
    from statecore.config import MIN_TRAIN_CELLS
    from statecore.data.mixscape import training_cells

    cells, whole = training_cells(
        adata, control=split.control, pairs=split.pairs("train") | split.pairs("val")
    )
    if whole:
        warnings.warn(
            f"training on classified cells: {len(whole)} training/validation pair(s) have fewer than "
            f"{MIN_TRAIN_CELLS} cells called perturbed and keep all their cells: "
            f"{[f'{c}/{p}' for c, p in whole[:12]]}{' ...' if len(whole) > 12 else ''}",
            stacklevel=2,
        )
    return cells


def set_loss_fn(model: torch.nn.Module, loss_fn: Callable) -> Callable:
    """``(pred, batch) -> (scalar loss, extra metric tensors)`` of the expression track."""
    del model
    return lambda pred, batch: (loss_fn(pred, batch.x_target).mean(), {})


@dataclass
class DiscTerm:
    """The discriminative loss term (``losses.discrimination_loss``) against real training shifts: each
    single-perturbation set's predicted mean shift should be nearer its own pair's real shift than the
    other perturbations' real shifts in the same context (what the PDS ranks). Tables: training pairs only."""

    pair_index: torch.Tensor  # [C, P] row of table for (context, single), -1 where not a training pair
    table: torch.Tensor  # [K, G] real mean shift of each training pair
    weight: float

    def __call__(self, pred: torch.Tensor, b, context: torch.Tensor) -> torch.Tensor:
        z = b.z_pert  # [B, P]
        rows = self.pair_index.to(z.device)[context.clamp_min(0)]  # [B, P]
        rows = torch.where(context[:, None] >= 0, rows, torch.full_like(rows, -1))
        single = (z != 0).sum(dim=1) == 1
        own = rows.gather(1, z.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        own = torch.where(single, own, torch.full_like(own, -1))
        cand = torch.zeros(len(z), len(self.table) + 1, dtype=torch.bool, device=z.device)
        cand.scatter_(1, torch.where(rows >= 0, rows, len(self.table)), True)
        pred_shift = pred.mean(dim=1) - b.x_ctrl.mean(dim=1)
        return discrimination_loss(pred_shift, self.table.to(pred.device), own, cand[:, :-1])


class STTask:
    """A State Transition model + its set data, as the engine trains it (``statecore.training.tracks``)."""

    disc: DiscTerm | None = None  # set by the expression track when STConfig.disc_weight > 0

    def __init__(self, model, data: TrainData, *, loss: str = "energy", meta=None, step_loss=None) -> None:
        self.model, self.data = model, data
        self.loss_fn = get_loss(loss)
        self.step_loss = (step_loss or set_loss_fn)(model, self.loss_fn)
        self.meta = dict(meta or {})
        self.meta.setdefault("genes", data.genes)
        self.has_val = data.val is not None
        self.val_extras: dict[str, float] = {}  # logged beside val_loss (metrics.jsonl)
        # the shift prior's per-context table needs each set's context; other models never see it
        self._uses_context = bool(getattr(model, "needs_context", False))

    def batch(self, step: int, batch_size: int, *, rank: int, world_size: int):
        return self.data.train.batch(step, batch_size, rank=rank, world_size=world_size)

    def _kw(self, ds: SetDataset, b) -> dict[str, Any]:
        if not self._uses_context:
            return {}
        return {"context": ds.context_index(b.groups, self.data.contexts).to(b.x_ctrl.device)}

    def forward(self, module: Callable, b) -> torch.Tensor:
        return module(b.x_ctrl, b.z_pert, b.batch_idx, **self._kw(self.data.train, b))  # [B, S, G]

    def loss(self, out: torch.Tensor, b):
        loss, extra = self.step_loss(out, b)
        if self.disc is None:
            return loss, extra
        context = self.data.train.context_index(b.groups, self.data.contexts).to(out.device)
        term = self.disc(out, b, context)
        return loss + self.disc.weight * term, {**extra, "disc_loss": term.detach()}

    @torch.no_grad()
    def val_loss(self, device: torch.device, batch_size: int) -> float:
        """Mean per-set loss over the first sets of the validation plan's epoch 0 (fixed)."""
        ds, model = self.data.val, self.model
        was_training = model.training
        model.eval()
        total, n, corr = 0.0, 0, []
        with torch.random.fork_rng(devices=[]):  # a noise input must not shift the training RNG stream
            torch.manual_seed(0)
            for b in ds.iter_epoch(batch_size, epoch=0, max_sets=VAL_MAX_SETS):
                b = b.to(device)
                pred = model(b.x_ctrl, b.z_pert, b.batch_idx, **self._kw(ds, b))
                total += float(self.step_loss(pred, b)[0]) * b.x_target.shape[0]
                n += b.x_target.shape[0]
                if pred.shape == b.x_target.shape:  # expression track: genes on both sides
                    corr.append(set_pearson_delta(pred, b.x_target, b.x_ctrl))
        model.train(was_training)
        self.val_extras = {"val_pearson_delta": float(torch.cat(corr).nanmean())} if corr else {}
        return total / max(n, 1)


def set_pearson_delta(pred: torch.Tensor, real: torch.Tensor, ctrl: torch.Tensor) -> torch.Tensor:
    """Per set ``[B]``: Pearson correlation over genes of the predicted and the real mean change from the
    set's controls (a set-level pearson_delta, on validation pairs the model never trained on)."""
    base = ctrl.mean(1)  # [B, G]
    a = pred.mean(1) - base
    b = real.mean(1) - base
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def vocab_meta(data: TrainData) -> dict[str, Any]:
    """The checkpoint header's description of what the model reads and writes."""
    return {
        "genes": data.genes,
        "perturbations": list(data.vocab.names),
        "contexts": data.contexts,
        "batches": data.batches,
        "control": data.vocab.control,
        "combo_sep": data.vocab.combo_sep,
        "split": data.split.to_dict() if data.split is not None else None,
        "unencoded": list(data.unencoded),
    }


def feature_vocab(adata, config: RunConfig, genes: list[str]) -> PerturbationVocab:
    """The gene-feature vocabulary of a run (every gene of its feature table; see priors.feature_ridge)."""
    from statecore.data.gene_features import perturbation_feature_table
    from statecore.data.io import control_label

    control = control_label(adata)
    m = config.model
    table = perturbation_feature_table(
        m.gene_features, adata, control=control, dim=m.gene_feature_dim, seed=0
    )
    return PerturbationVocab.from_feature_table(table, control, config.spec.combo_sep, panel=genes)


def feature_prior_for(adata, data: TrainData, config: RunConfig) -> tuple[FeatureRidge, float]:
    """The ridge map features -> mean shift, fitted on the split's TRAINING pairs only (validation genes stay
    unseen, as test genes are), and the perturbation type's own-gene effect."""
    split = data.split
    pairs = {c: list(ps) for c, ps in split.train.items()}
    ridge = feature_ridge(
        adata, genes=data.genes, vocab=data.vocab, train_pairs=pairs, contexts=data.contexts, cells=data.cells
    )
    effect = self_effect(
        adata, genes=data.genes, control=split.control, train_pairs=pairs, kind=config.model.perturbation_type,
        combo_sep=data.vocab.combo_sep, cells=data.cells,
    )  # fmt: skip
    return ridge, effect


def prior_for(adata, data: TrainData, *, with_val: bool = True, shrink: str = "off") -> ShiftPrior:
    """The shift prior's tables from training and validation pairs (never test): validation pairs then only
    guide the choice of checkpoint, and the prior of a pair measured in few contexts is less noisy.
    ``with_val=False``: training pairs only (``STConfig.prior_pairs="train"``)."""
    if data.vocab.features is not None:
        raise DataError(
            "the shift prior needs one-hot perturbations; set shift prior off when giving features"
        )
    split = data.split
    val = split.val if with_val else {}
    pairs = {c: [*split.train.get(c, []), *val.get(c, [])] for c in sorted({*split.train, *val})}
    stats = vocab_pair_stats(
        adata, genes=data.genes, vocab=data.vocab, train_pairs=pairs, noise=shrink != "off", cells=data.cells
    )
    return prior_tables(stats, vocab=data.vocab, contexts=data.contexts, shrink=shrink)


def resolve_auto_prior(
    adata, data: TrainData, config: RunConfig, run_dir: Path, *, resuming: bool
) -> RunConfig:
    """``prior_shrink="auto"`` made concrete (``statecore.training.prior_choice``): chosen on the split's
    TRAINING pairs and recorded in ``prior_choice.json``; a resumed run reads its earlier choice."""
    m = config.model_config()
    if not (m.shift_prior and m.decoder_dim == 0 and data.vocab.features is None):
        raise DataError(
            "--prior-shrink auto (prior_shrink 'auto') chooses among the shift prior's shrinkages, so it needs "
            "the shift prior on (--shift-prior on), one-hot perturbations (no --gene-features) and the "
            "expression track (no --track embedding); otherwise use --prior-shrink off"
        )
    chosen = prior_choice.saved_choice(run_dir) if resuming else None
    if chosen is None:
        result = prior_choice.choose_for_run(
            adata, train_pairs={c: list(ps) for c, ps in data.split.train.items()}, vocab=data.vocab,
            contexts=data.contexts, genes=data.genes, target=data.split.context, cells=data.cells,
        )  # fmt: skip
        chosen = result.choice
        if dist_utils.current().is_main:
            prior_choice.save(result, run_dir)
    return config.replace(model=config.model.replace(prior_shrink=chosen))


def build_model(config: RunConfig, prior: ShiftPrior | FeatureRidge | None) -> StateTransitionModel:
    """A fresh ST model from the run's config, initial weights from its seed, prior tables copied in."""
    torch.manual_seed(config.train.seed)  # not from the process's RNG history
    model = StateTransitionModel(config.model_config())
    if isinstance(prior, FeatureRidge):
        if model.feature_map is not None:
            model.feature_map.copy_(torch.from_numpy(prior.maps))
        return model
    if prior is not None and model.pert_shift is not None:
        model.pert_shift.copy_(torch.from_numpy(prior.shift))
        if model.pair_index is not None:
            model.pair_index.copy_(torch.from_numpy(prior.pair_index))
            model.pair_shift.copy_(torch.from_numpy(prior.pair_shift))
        if prior.trust is not None and model.pert_trust is not None:
            model.pert_trust.copy_(torch.from_numpy(prior.trust))
            model.context_generic.copy_(torch.from_numpy(prior.generic))
    return model


class ExpressionTrack:
    """ST on expression (``RunConfig.track == "hvg"``)."""

    name = "hvg"

    def build(self, adata, config: RunConfig, run_dir: Path, *, resuming: bool) -> BuiltTask:
        data = (
            self._saved_data(adata, config, run_dir) if resuming else self._fresh_data(adata, config, run_dir)
        )
        if not resuming:
            config = self._with_shapes(config, data)
        data, config = self.adapt(adata, data, config)
        if config.model.prior_shrink == "auto":
            config = resolve_auto_prior(adata, data, config, run_dir, resuming=resuming)
        prior = None
        if (
            config.model.shift_prior
            and config.model_config().decoder_dim == 0
            and data.vocab.features is not None
        ):
            prior, effect = feature_prior_for(adata, data, config)
            config = config.with_shapes(
                config.model_config().replace(n_contexts=len(data.contexts), self_effect=effect)
            )
        elif config.model.shift_prior and config.model_config().decoder_dim == 0:
            # rebuilt on resume too: the weights then overwrite it
            prior = prior_for(
                adata, data, with_val=config.model.prior_pairs != "train", shrink=config.model.prior_shrink
            )
            config = config.with_shapes(
                config.model_config().replace(n_contexts=len(data.contexts), n_prior_pairs=prior.n_pairs)
            )
        model = build_model(config, prior)
        self.prepare_model(model, data, config, resuming=resuming)
        task = STTask(
            model, data, loss=config.model.loss, meta=vocab_meta(data), step_loss=self.step_loss_factory
        )
        if config.model.disc_weight > 0 and isinstance(prior, ShiftPrior):
            train_only = (
                prior if config.model.prior_pairs == "train" else prior_for(adata, data, with_val=False)
            )
            task.disc = DiscTerm(
                torch.from_numpy(train_only.pair_index),
                torch.from_numpy(train_only.pair_shift),
                float(config.model.disc_weight),
            )
        return BuiltTask(task=task, config=config)

    # hooks Track B overrides
    step_loss_factory = staticmethod(set_loss_fn)

    def adapt(self, adata, data: TrainData, config: RunConfig) -> tuple[TrainData, RunConfig]:
        return data, config

    def prepare_model(self, model, data: TrainData, config: RunConfig, *, resuming: bool) -> None:
        del model, data, config, resuming

    def input_gatherer(self, run, adata, rows: np.ndarray, default: Callable) -> Callable:
        del run, adata, rows
        return default

    def load_extras(self, config: RunConfig) -> Any:
        del config
        return None

    # data of a fresh or a resumed run
    @staticmethod
    def _with_shapes(config: RunConfig, data: TrainData) -> RunConfig:
        model = config.model_config().replace(
            num_genes=len(data.genes),
            perturbation_dim=data.vocab.dim,
            n_batches=len(data.batches) if len(data.batches) > 1 else 0,
            self_dims=data.vocab.n_panel,
        )
        return config.with_shapes(model)

    @staticmethod
    def _fresh_data(adata, config: RunConfig, run_dir: Path) -> TrainData:
        genes, vocab, eligible = select_genes(adata, True), None, None
        if config.model.pert_encoding == "features":
            vocab = feature_vocab(adata, config, genes)
            eligible = set(vocab.names[1:])
        elif config.split.task == "unseen":
            raise DataError(
                "the unseen-genes task needs gene features to encode genes never perturbed in training; "
                "use --gene-features data (computed from the training data) or --gene-features PATH"
            )
        # seeded: the same split on every rank
        split = make_split(adata, config.split, eligible=eligible, combo_sep=config.spec.combo_sep)
        data = make_train_data(
            adata, split, set_size=config.model.set_size, seed=config.train.seed, genes=genes, vocab=vocab,
            cells=classified_cells(adata, config, split),
        )  # fmt: skip
        if dist_utils.current().is_main:
            split.save(run_dir / "split.json")
            ckpt.write_vocab_files(
                run_dir, genes=data.genes, vocab=data.vocab, contexts=data.contexts, batches=data.batches
            )
        return data

    @staticmethod
    def _saved_data(adata, config: RunConfig, run_dir: Path) -> TrainData:
        split = Split.load(run_dir / "split.json")
        vocab = ckpt.read_vocab(run_dir, config)
        return make_train_data(
            adata,
            split,
            set_size=config.model.set_size,
            seed=config.train.seed,
            genes=runs.read_lines(run_dir / "genes.txt"),
            vocab=vocab,
            batches=runs.read_lines(run_dir / "batches.txt"),
            cells=classified_cells(adata, config, split),
        )


def fit_model(
    model: torch.nn.Module,
    data: TrainData,
    cfg: TrainConfig = TrainConfig(),
    *,
    run_dir=None,
    loss: str = "energy",
    hook=None,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
):
    """Train an ST ``model`` on ``data`` with the engine (the library entry for a model you built)."""
    from statecore.training.engine import fit

    task = STTask(model, data, loss=loss, meta=meta or vocab_meta(data))
    return fit(task, cfg, run_dir=run_dir, hook=hook, resume=resume)


fit = fit_model  # statecore.fit: the public name for training a model you built
