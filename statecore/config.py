"""Frozen configuration dataclasses: the single source of truth for every hyperparameter.

Every config round-trips through JSON (``to_dict`` / ``from_dict``) so that run directories
and checkpoints hold plain text, never pickles. Unknown keys in ``from_dict`` raise, so a
typo in a saved config or a CLI override cannot drift silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a dataclass from a JSON-like dict, rejecting unknown keys, restoring tuples."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    for key, value in list(data.items()):
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)  # type: ignore[call-arg]


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        return _from_dict(cls, data)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class DataSpec(_Serializable):
    """How the user's columns map onto statecore's canonical ones."""

    pert_col: str = "perturbation"
    control: str = "ctrl"
    context_col: str | None = "context"  # None: a single context named "all"
    batch_col: str | None = None  # None: a single batch named "all"
    cell_id_col: str | None = None  # MTX bundles: metadata column holding the barcode
    combo_sep: str = "+"  # combinations such as "KLF1+MAP2K6"
    min_cells_per_perturbation: int = 10  # fewer -> a warning


@dataclass(frozen=True)
class QCConfig(_Serializable):
    min_genes: int = 200  # per cell
    min_cells: int = 50  # per gene
    target_sum: float = 1e4
    log1p: bool = True
    n_hvg: int = 2000
    hvg_flavor: str = "auto"  # auto | seurat_v3 | seurat | cell_ranger
    umap: bool = True  # store X_umap in the prepared data (pages never recompute it)
    # above this many cells the UMAP is fitted on a seeded random subsample of this size (memory and
    # time stay bounded at millions of cells); the other cells get NaN coordinates (uns["statecore"]["umap"])
    umap_max_cells: int = 100_000
    # min_genes is meant for whole transcriptomes: on a gene panel (n_genes < 20,000) it is scaled by
    # n_genes / 20,000 so that e.g. a 500-gene file keeps its cells (see preprocess.effective_min_genes)
    scale_min_genes: bool = True
    # obs column of each cell's library size (e.g. whole-transcriptome UMIs of a targeted gene panel, whose
    # own totals move with the perturbation); None: the cell's total counts over the genes in the file
    library_size_col: str | None = None
    # call each targeting cell perturbed ("KO") or not ("NP") with a Mixscape-style classifier
    # (statecore.data.mixscape, settings in PerturbedCallConfig); prepare never drops a cell for it
    classify_perturbed: bool = False


# training on classified cells (SplitConfig.train_on_classified): a (context, perturbation) pair with fewer
# cells called KO (or unclassified) keeps all its cells (statecore.data.mixscape.training_cells)
MIN_TRAIN_CELLS = 10


@dataclass(frozen=True)
class PerturbedCallConfig(_Serializable):
    """Mixscape-style perturbed-cell classifier (statecore.data.mixscape; Papalexi et al. 2021)."""

    n_pcs: int = 30  # principal components of the context's HVG expression (the neighbour space)
    n_neighbors: int = 20  # nearest control cells of the same context whose mean a cell's signature subtracts
    min_de_genes: int = 5  # fewer DE genes: the perturbation has no detectable effect, its cells are all NP
    de_pval: float = (
        0.05  # Benjamini-Hochberg adjusted Wilcoxon p-value of a DE gene (signatures vs controls')
    )
    # and at least this mean signature difference (natural log1p units): Mixscape's log2 fold change of 0.25
    # (Seurat's logfc.threshold) is 0.25 * ln 2 = 0.17 in natural-log units
    de_min_diff: float = 0.17
    threshold: float = 0.5  # posterior P(KO) above which a cell is called KO
    max_iter: int = 10  # rounds of direction -> mixture -> calls (stops earlier when the calls stop changing)
    # fewer cells in a (context, perturbation), or fewer controls in a context: not classified ("unclassified")
    # and kept by training on classified cells
    min_cells: int = 10
    de_max_cells: int = 2000  # cells per side of the DE test (a seeded subsample above)
    pca_max_cells: int = 20_000  # cells the PCA is fitted on (a seeded subsample above; all are projected)
    seed: int = 0


@dataclass(frozen=True)
class SplitConfig(_Serializable):
    task: str = "zeroshot"  # zeroshot | underrepresented | explicit | unseen
    context: str | None = None  # target context (required)
    keep_fraction: float = 0.3  # underrepresented: share of the target's perturbations kept in training
    test_perts: tuple[str, ...] = ()  # explicit; unseen: perturbations held out of every context
    test_fraction: float = 0.2  # unseen: share of the target context's perturbations held out everywhere
    val_fraction: float = 0.1  # validation perturbations carved from training ones
    seed: int = 0
    # training and validation pairs draw perturbed cells only from cells prepare called perturbed
    # (obs["perturbed_call"], `prepare --classify-perturbed`; statecore.data.mixscape.training_cells);
    # controls and every test cell stay as they are
    train_on_classified: bool = False


@dataclass(frozen=True)
class STConfig(_Serializable):
    """State Transition model. Names follow the State paper walkthrough."""

    num_genes: int = 2000  # input/output width (genes, or embedding dims on the embedding track)
    hidden_dim: int = 256
    transformer_heads: int = 8
    transformer_layers: int = 4
    mlp_hidden_dim: int = 512
    perturbation_dim: int = 1  # one-hot vocabulary size or feature width
    n_batches: int = 0  # >0 adds a batch embedding
    basal_encoder: str = "mlp"  # mlp | linear
    out_layers: int = 3  # linear layers of the output MLP (hidden state -> genes)
    dropout: float = 0.0  # see ARCHITECTURE.md: dropout>0 collapses predicted spread
    relu_output: bool = True  # expression is non-negative
    set_size: int = 64
    loss: str = "energy"  # energy | mmd
    noise_dim: int = 0  # >0 adds a per-cell Gaussian noise input
    decoder_dim: int = 0  # >0: embedding track, decode hidden state to this many genes
    decoder_weight: float = 0.1  # alpha in loss = loss_emb + alpha * loss_expr
    # Track B at prediction: control cells' expression + decode(pred) - decode(control embeddings), so the
    # decoder's systematic error cancels and the predicted cells keep the controls' cell-to-cell spread
    decoder_residual: bool = False
    residual: str = "hidden"  # hidden (reference ST) | expression (add x_ctrl to the output) | none
    shift_prior: bool = False  # add each perturbation's mean training shift (statecore.training.priors)
    prior_mode: str = "scale_down"  # how cells take the prior's shift: add | scale_down | scale
    # shift prior of a single in a context where training measured it: "average" (over every training
    # context, its own included) or "leave_context_out" (over the other contexts only, as a held-out pair
    # sees it, so the model learns how a context deviates from the others rather than from itself)
    prior_singles: str = "average"
    context_gain: bool = False  # a learned per-context, per-gene gain on the prior's shift (starts at 1)
    # James-Stein shrinkage of the prior (statecore.training.priors): "off"; "zero" (each measured shift
    # toward 0); "context" (a single's average shift toward its context's mean perturbed shift); "auto" (one
    # of the three, chosen per run on its training pairs, statecore.training.prior_choice; the run's saved
    # config holds the choice)
    prior_shrink: str = "off"
    # pairs the prior's tables come from: "train_val" (training + validation pairs) or "train" (training
    # pairs only: validation pairs then stay unseen, for scoring settings on them as on a test)
    prior_pairs: str = "train_val"
    disc_weight: float = 0.0  # weight of the discriminative loss term (statecore.models.losses)
    n_contexts: int = 0  # shift prior: contexts of the per-context table (set by training)
    n_prior_pairs: int = 0  # shift prior: measured (context, single perturbation) pairs
    # Unseen genes (issue 14): "features" encodes a perturbation by its genes' feature vectors (any gene of the
    # feature table, measured or not) and its shift prior is a ridge map features -> mean shift fitted on the
    # training perturbations (statecore.training.priors.feature_ridge); "onehot" needs measured perturbations.
    pert_encoding: str = "onehot"  # onehot | features
    gene_features: str = "data"  # features: "data" (from the training controls) or a table's path
    gene_feature_dim: int = 32  # features from "data": principal components of control expression
    perturbation_type: str = "none"  # none | knockdown | knockout | activation: moves the target's own gene
    self_effect: float = 0.0  # set by training from perturbation_type (statecore.training.priors.self_effect)
    self_dims: int = 0  # features: width of the target-gene one-hot after the features (the gene panel)


@dataclass(frozen=True)
class SEConfig(_Serializable):
    """State Embedding model."""

    gene_feature_dim: int = 64
    hidden_dim: int = 128
    L: int = 256  # top expressed genes per cell
    heads: int = 4
    layers: int = 2
    n_bins: int = 10
    output_dim: int = 64  # cell embedding width
    gene_features: str = "pca"  # learned | random | pca | file
    gene_features_path: str | None = None
    n_loss_genes: int = 64  # sampled genes per cell in the self-supervised loss
    dropout: float = 0.0
    n_genes: int = 0  # >0: the model owns a [n_genes, gene_feature_dim] gene table (set by fit_embedding)
    bin_hidden_dim: int = 32  # width of the MLP that turns an expression value into bin weights
    decoder_hidden_dim: int = 128  # MLP predicting expression from [cell emb | gene emb | read depth]
    expressed_fraction: float = 0.5  # share of the loss genes drawn from each cell's expressed genes
    hvg_only: bool = False  # train on var["highly_variable"] genes only (default: every gene)
    batch_cells: int = (
        64  # cells per training step (SE trains on cells; ST's TrainConfig.batch_size counts sets)
    )


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    steps: int = 2000
    batch_size: int = 8  # sets per step
    lr: float = 3e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    max_minutes: float | None = None
    val_every: int = 100
    ckpt_every_steps: int = 100
    ckpt_every_seconds: float = 120.0
    log_every: int = 10
    num_threads: int | None = None  # None: every core (the app's job manager passes all but one)
    bf16: bool = False
    compile: bool = False
    patience: int = 0  # >0: stop when validation has not improved for this many checks (best model kept)


# Presets are named config values. ST presets predict expression as control + a learned shift
# (residual="expression"), chosen on a validation context (bench/tune_quality.py, docs/RESULTS.md): the
# hidden-space residual of the reference fitted as well but let a few predicted values run far outside the
# log1p range. shift_prior (statecore.training.priors) starts every prediction from the perturbation's mean
# training shift: on the synthetic validation screen it lifted pearson_delta 0.15 -> 0.57 and PDS
# 0.53 -> 0.96, and it was neutral on the Kang validation context (0.909 -> 0.911 pearson_delta).
ST_PRESETS: dict[str, STConfig] = {
    # small: one linear control encoder (as the reference State) and a two-layer output MLP since 2026-12-03:
    # 15 % fewer FLOPs per cell than the two-layer encoder / three-layer output, level on the validation
    # pairs of S1, P1 and C1 (docs/RESULTS.md "Issue 17, third session"; docs/PERFORMANCE.md)
    "small": STConfig(
        hidden_dim=256,
        transformer_heads=8,
        transformer_layers=4,
        mlp_hidden_dim=512,
        set_size=64,
        residual="expression",
        shift_prior=True,
        basal_encoder="linear",
        out_layers=2,
    ),
    "base": STConfig(
        hidden_dim=672,
        transformer_heads=8,
        transformer_layers=4,
        mlp_hidden_dim=1344,
        set_size=128,
        residual="expression",
        shift_prior=True,
    ),
}
# SEConfig's defaults (L=256, width 128) follow the paper's shape; "small" trains on a laptop CPU in about
# half a minute on the 6k-cell sample (300 steps of 64 cells), which the sparse sample data (~15 expressed
# genes per cell) does not outgrow.
SE_PRESETS: dict[str, SEConfig] = {
    "small": SEConfig(L=64, hidden_dim=64, gene_feature_dim=32, heads=4, layers=2, output_dim=64),
    "base": SEConfig(L=256, hidden_dim=128, gene_feature_dim=64, heads=4, layers=2, output_dim=64),
}
PRESETS = tuple(ST_PRESETS)
# Training lengths: the CLI's default is TrainConfig() (2,000 steps, the length the results in
# docs/RESULTS.md use); the app starts with a short first run that shows learning within minutes.
APP_TRAIN = TrainConfig(steps=400, max_minutes=3.0)
SE_TRAIN = TrainConfig(steps=300, lr=1e-3, warmup_steps=20, val_every=50, log_every=10)

# Names the CLI, the app and the package share, each defined once.
TRACKS = ("hvg", "embedding", "se")  # see statecore.training.tracks
SPLIT_TASKS = ("zeroshot", "underrepresented", "explicit", "unseen")  # statecore.data.splits
LOSSES = ("energy", "mmd", "energy_mean")  # statecore.models.losses
HVG_FLAVORS = ("auto", "seurat_v3", "seurat", "cell_ranger")  # statecore.data.preprocess
BASELINE_KINDS = (
    "control",
    "context_mean",
    "perturbation_mean",
    "cell_mean",
    "additive",
    "generic_response",
    "linear_features",
)  # inference.baselines
PERT_ENCODINGS = ("onehot", "features")
PERTURBATION_TYPES = ("none", "knockdown", "knockout", "activation")

# STConfig fields that the data decide (genes, vocabulary, batches, prior tables, decoder genes); a run's
# config.json keeps them apart from the hyperparameters, under "shapes".
SHAPE_FIELDS = (
    "num_genes",
    "perturbation_dim",
    "n_batches",
    "n_contexts",
    "n_prior_pairs",
    "decoder_dim",
    "self_dims",
)


@dataclass(frozen=True)
class ModelShapes(_Serializable):
    """The data-derived sizes of a State Transition model (set by training, saved in config.json)."""

    num_genes: int
    perturbation_dim: int
    n_batches: int = 0
    n_contexts: int = 0
    n_prior_pairs: int = 0
    decoder_dim: int = 0
    self_dims: int = 0

    @classmethod
    def of(cls, model: STConfig) -> ModelShapes:
        return cls(**{k: getattr(model, k) for k in SHAPE_FIELDS})


@dataclass(frozen=True)
class RunConfig(_Serializable):
    """Everything a run directory's config.json holds."""

    data_path: str = ""
    track: str = "hvg"  # hvg | embedding | se (statecore.training.tracks)
    embedding_run: str | None = None  # embedding track: the SE run that embeds the cells
    spec: DataSpec = field(default_factory=DataSpec)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: STConfig = field(default_factory=STConfig)  # ST hyperparameters (shape fields: see shapes)
    train: TrainConfig = field(default_factory=TrainConfig)
    se: SEConfig | None = None  # se track: the State Embedding model
    shapes: ModelShapes | None = None  # ST tracks: data-derived sizes, set by training

    def model_config(self) -> STConfig:
        """The State Transition model's full config: hyperparameters + the data's shapes."""
        if self.shapes is None:
            return self.model
        return self.model.replace(**self.shapes.to_dict())

    def with_shapes(self, model: STConfig) -> RunConfig:
        """This config with ``model``'s hyperparameters and its shapes kept apart."""
        defaults = STConfig()
        hyper = model.replace(**{k: getattr(defaults, k) for k in SHAPE_FIELDS})
        return self.replace(model=hyper, shapes=ModelShapes.of(model))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in SHAPE_FIELDS:  # the shapes live under "shapes" only
            out["model"].pop(key, None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RunConfig:
        data = dict(data or {})
        if data.get("kind") == "embedding":  # an SE run directory written before RunConfig covered SE
            return _legacy_se(data)
        model = dict(data.get("model") or {})
        legacy_shapes = {k: model.pop(k) for k in SHAPE_FIELDS if k in model}
        if data.get("shapes") is None and legacy_shapes and data.get("track", "hvg") != "se":
            data["shapes"] = {k: legacy_shapes.get(k, 0) for k in SHAPE_FIELDS}  # older runs: one dict
        data["model"] = model
        nested = {
            "spec": DataSpec,
            "split": SplitConfig,
            "model": STConfig,
            "train": TrainConfig,
            "se": SEConfig,
            "shapes": ModelShapes,
        }
        for key, sub in nested.items():
            if key in data and isinstance(data[key], dict):
                data[key] = sub.from_dict(data[key])
        cfg = _from_dict(cls, data)
        if cfg.track not in TRACKS:
            raise ValueError(f"RunConfig.track must be one of {TRACKS}; got {cfg.track!r}")
        return cfg


def _legacy_se(data: dict[str, Any]) -> RunConfig:
    """RunConfig of an SE run directory from before SE runs were RunConfigs ({"kind": "embedding", ...})."""
    train = TrainConfig.from_dict(data.get("train"))
    se = SEConfig.from_dict(data.get("se")).replace(batch_cells=train.batch_size)
    return RunConfig(data_path=str(data.get("data_path", "")), track="se", se=se, train=train)
