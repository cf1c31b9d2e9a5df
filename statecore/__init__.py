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
    "read_data": "statecore.io",
    "detect_spec": "statecore.io",
    "validate": "statecore.io",
    "prepare": "statecore.preprocess",
    "make_perturbation_adata": "statecore.synthetic",
    "Split": "statecore.splits",
    "make_split": "statecore.splits",
    "split_underrepresented": "statecore.splits",
    "split_zeroshot": "statecore.splits",
    "split_explicit": "statecore.splits",
    "build_sets": "statecore.sets",
    # models
    "StateTransitionModel": "statecore.models.transition",
    "StateEmbeddingModel": "statecore.models.embedding",
    "compute_mmd": "statecore.losses",
    "energy_distance": "statecore.losses",
    # workflow
    "fit": "statecore.train",
    "predict": "statecore.predict",
    "evaluate": "statecore.metrics",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'statecore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
