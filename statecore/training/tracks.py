"""The small protocol between the training engine and what it trains (a *track*).

The engine (``statecore.training.engine``) owns the loop: schedule, clipping, device/DDP/bf16, stop
requests, budgets, validation cadence, status, metrics, checkpoints and resume. A track owns the data
and the loss. Three tracks exist:

- ``hvg``: the State Transition model on expression (``statecore.training.st_track``);
- ``embedding``: ST on State Embedding cell embeddings with a gene decoder (Track B,
  ``statecore.embedding.track``);
- ``se``: the State Embedding model itself (``statecore.embedding.se``).

Track B and the SE model live in a higher layer than training, inference and checkpoints, which never
import them: they are found by name through :data:`TRACKS` (``"module:attribute"``, resolved on first
use, the way a plugin entry point is), so a run directory's ``config.json`` (``RunConfig.track``) is all a
reader needs to find its track.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from statecore.errors import StatecoreError

TRACKS: dict[str, str] = {
    "hvg": "statecore.training.st_track:ExpressionTrack",
    "embedding": "statecore.embedding.track:EmbeddingTrack",
    "se": "statecore.embedding.se:SETrack",
}
ST_TRACKS = ("hvg", "embedding")  # tracks whose model is a State Transition model


class Batch(Protocol):
    """What a track's batch offers the engine."""

    @property
    def n_cells(self) -> int: ...

    def to(self, device: torch.device) -> Batch: ...


class TrainTask(Protocol):
    """One run's trainable state, built by a track from data + RunConfig.

    ``batch(step, ...)`` is a pure function of the step (and the run's seed), so a resumed run replays
    exactly the batches an uninterrupted run would have seen, and rank r of N takes its r-th slice.
    ``forward`` runs under the engine's autocast; ``loss`` gets the float32 output.
    """

    model: torch.nn.Module
    meta: dict[str, Any]  # JSON-able header saved with every checkpoint (genes, vocabularies, ...)
    has_val: bool

    def batch(self, step: int, batch_size: int, *, rank: int, world_size: int) -> Batch: ...

    def forward(self, module: Callable, batch: Any) -> torch.Tensor: ...

    def loss(self, out: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def val_loss(self, device: torch.device, batch_size: int) -> float: ...


@dataclass
class BuiltTask:
    """A track's answer to ``build``: the task and the RunConfig to save (shapes filled in)."""

    task: Any  # TrainTask
    config: Any  # statecore.config.RunConfig
    files: dict[str, list[str]] = field(default_factory=dict)  # extra text files for the run directory


class Track(Protocol):
    """A way of training and using a model; see the module docstring."""

    name: str

    def build(self, adata, config, run_dir, *, resuming: bool) -> BuiltTask: ...

    def input_gatherer(
        self, run, adata, rows: np.ndarray, default: Callable[[np.ndarray], np.ndarray]
    ) -> Callable[[np.ndarray], np.ndarray]: ...

    def load_extras(self, config) -> Any: ...


_CACHE: dict[str, Any] = {}


def get_track(name: str) -> Track:
    """The track registered as ``name`` (``RunConfig.track``)."""
    if name not in TRACKS:
        raise StatecoreError(f"unknown track {name!r}; known tracks: {', '.join(TRACKS)}")
    if name not in _CACHE:
        module, _, attr = TRACKS[name].partition(":")
        _CACHE[name] = getattr(importlib.import_module(module), attr)()
    return _CACHE[name]
