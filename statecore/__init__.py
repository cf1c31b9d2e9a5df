"""statecore: train and run Arc Institute's State model on Perturb-seq data.

Public names are imported lazily so that ``import statecore`` stays fast (no torch or
scanpy until a name that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    # config
    "DataSpec": "statecore.config",
    "QCConfig": "statecore.config",
    "SplitConfig": "statecore.config",
    "STConfig": "statecore.config",
    "SEConfig": "statecore.config",
    "TrainConfig": "statecore.config",
    "RunConfig": "statecore.config",
    # data
    "DataError": "statecore.errors",
    "read_data": "statecore.data.io",
    "detect_spec": "statecore.data.io",
    "validate": "statecore.data.io",
    "prepare": "statecore.data.preprocess",
    "make_perturbation_adata": "statecore.data.synthetic",
    "Split": "statecore.data.splits",
    "make_split": "statecore.data.splits",
    "split_underrepresented": "statecore.data.splits",
    "split_zeroshot": "statecore.data.splits",
    "split_explicit": "statecore.data.splits",
    "build_sets": "statecore.data.sets",
    # models
    "StateTransitionModel": "statecore.models.transition",
    "StateEmbeddingModel": "statecore.models.embedding",
    "compute_mmd": "statecore.models.losses",
    "energy_distance": "statecore.models.losses",
    # workflow
    "fit": "statecore.training.st_track",  # fit(model, TrainData, TrainConfig): an ST model you built
    "train_run": "statecore.training.engine",
    "predict": "statecore.inference.predict",
    "evaluate": "statecore.evaluation.metrics",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'statecore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
