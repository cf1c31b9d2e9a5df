"""Checkpoints: safetensors weights + JSON metadata; nothing is ever pickled or unpickled.

A weights file is self-describing: its safetensors header metadata holds the model config, gene
names and vocabularies, so a single ``model.safetensors`` can rebuild its model. A run directory
additionally holds ``config.json``, ``split.json`` and the text vocabularies (see CONTRACTS.md), and
``train_state.safetensors`` + ``train_state.json`` (optimizer, RNG, step) for resuming.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from statecore.config import RunConfig, STConfig
from statecore.errors import CheckpointError
from statecore.runs.files import atomic_write_json, read_json, read_lines

FORMAT = "statecore-st-v1"
BEST, LAST = "model.safetensors", "last.safetensors"
TRAIN_STATE, TRAIN_STATE_JSON = "train_state.safetensors", "train_state.json"
FEATURES = "pert_features.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_weights(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-able: config, genes, vocabularies) atomically."""
    cfg = getattr(model, "cfg", None)
    header = {"format": FORMAT, "meta": json.dumps(meta)}
    if cfg is not None:
        header["config"] = json.dumps(cfg.to_dict())
    _atomic_save(dict(model.state_dict()), Path(path), header)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header metadata of a safetensors file; CheckpointError when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} not found; train a model first (python -m statecore train)"
        )
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a valid safetensors checkpoint ({exc}); statecore never "
            "loads pickled files: re-create it with statecore"
        ) from exc
    meta: dict[str, Any] = {}
    for key, value in header.items():
        try:
            meta[key] = json.loads(value) if key != "format" else value
        except ValueError as exc:
            raise CheckpointError(f"{str(path)!r}: corrupt metadata field {key!r}") from exc
    return tensors, meta


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load weights into ``model`` after checking every name and shape; returns the header metadata."""
    tensors, meta = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was it written for another model configuration?"
        )
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(
            f"{str(path)!r} has tensors of the wrong shape ({'; '.join(bad[:3])}); the data's "
            "genes or perturbations differ from the run's"
        )
    model.load_state_dict(tensors, strict=True)
    return meta


# --------------------------------------------------------------------------- training state (resume)


def save_train_state(
    run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer, info: dict[str, Any]
) -> None:
    """Optimizer tensors to safetensors, everything else (step, param groups, RNG) to JSON.

    The JSON is written last: a reader that finds it also finds the tensors it refers to.
    """
    run_dir = Path(run_dir)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    _atomic_save(tensors, run_dir / TRAIN_STATE, {"format": FORMAT})
    payload = dict(info, param_groups=sd["param_groups"], opt_scalars=scalars)
    atomic_write_json(run_dir / TRAIN_STATE_JSON, payload)


def load_train_state(run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and torch RNG state saved by :func:`save_train_state`; return the info dict."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / TRAIN_STATE_JSON)
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{str(run_dir / TRAIN_STATE_JSON)!r} missing or unreadable; cannot resume this run"
        )
    tensors, _ = read_weights(run_dir / TRAIN_STATE)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, extra in info.get("opt_scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = info["param_groups"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"optimizer state in {str(run_dir)!r} does not match the model ({exc})"
        ) from exc
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return info


# --------------------------------------------------------------------------- whole runs


@dataclass
class LoadedRun:
    model: torch.nn.Module
    config: RunConfig
    genes: list[str]
    perturbations: list[str]
    contexts: list[str]
    split: Any  # statecore.data.splits.Split | None
    run_dir: Path
    vocab: Any = None  # statecore.data.sets.PerturbationVocab
    batches: list[str] | None = None
    embedding: Any = (
        None  # embedding track: the SE run (statecore.embedding.se.EmbeddingRun) that embeds inputs
    )


def write_vocab_files(run_dir: str | os.PathLike, *, genes, vocab, contexts, batches) -> None:
    from statecore.runs.files import write_lines

    run_dir = Path(run_dir)
    write_lines(run_dir / "genes.txt", list(genes))
    write_lines(run_dir / "perturbations.txt", list(vocab.names))
    write_lines(run_dir / "contexts.txt", list(contexts))
    write_lines(run_dir / "batches.txt", list(batches))
    atomic_write_json(
        run_dir / "vocab.json",
        {"control": vocab.control, "combo_sep": vocab.combo_sep, "features": vocab.features is not None},
    )
    if vocab.features is not None:
        _atomic_save(
            {"features": torch.as_tensor(np.asarray(vocab.features, dtype=np.float32))},
            run_dir / FEATURES,
            {"format": FORMAT},
        )


def load_run(run_dir: str | os.PathLike, device: str = "cpu", *, which: str = "best") -> LoadedRun:
    """Rebuild a trained model from a run directory (``which``: best -> model.safetensors, last)."""
    from statecore.data.sets import PerturbationVocab
    from statecore.data.splits import Split
    from statecore.models.transition import StateTransitionModel

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} not found")
    cfg_dict = read_json(run_dir / "config.json")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(
            f"{str(run_dir / 'config.json')!r} missing or unreadable; is this a statecore run?"
        )
    config = RunConfig.from_dict(cfg_dict)
    path = run_dir / (BEST if which == "best" else LAST)
    if which == "best" and not path.exists() and (run_dir / LAST).exists():
        path = run_dir / LAST  # a run stopped before its first validation has only "last"
    try:
        genes = read_lines(run_dir / "genes.txt")
        names = read_lines(run_dir / "perturbations.txt")
        contexts = read_lines(run_dir / "contexts.txt")
        batches = read_lines(run_dir / "batches.txt") if (run_dir / "batches.txt").exists() else []
    except OSError as exc:
        raise CheckpointError(f"run {str(run_dir)!r} is incomplete: {exc}") from exc
    vinfo = read_json(run_dir / "vocab.json") or {}
    features = None
    if vinfo.get("features"):
        features = read_weights(run_dir / FEATURES)[0]["features"].numpy()
    vocab = PerturbationVocab(
        control=vinfo.get("control", config.spec.control),
        names=tuple(names),
        combo_sep=vinfo.get("combo_sep", config.spec.combo_sep),
        features=features,
    )
    model_cfg: STConfig = config.model
    n_out = model_cfg.decoder_dim or model_cfg.num_genes  # embedding track: genes are the decoder's outputs
    if n_out != len(genes) or model_cfg.perturbation_dim != vocab.dim:
        raise CheckpointError(
            f"run {str(run_dir)!r}: config expects {n_out} genes / perturbation "
            f"width {model_cfg.perturbation_dim}, files list {len(genes)} / {vocab.dim}"
        )
    model = StateTransitionModel(model_cfg)
    load_model_weights(model, path)
    model.to(device).eval()
    split = Split.load(run_dir / "split.json") if (run_dir / "split.json").exists() else None
    embedding = None
    if config.track == "embedding":
        from statecore.embedding.track import load_se_run

        embedding = load_se_run(config.embedding_run or "")
    return LoadedRun(
        model=model,
        config=config,
        genes=genes,
        perturbations=list(names),
        contexts=contexts,
        split=split,
        run_dir=run_dir,
        vocab=vocab,
        batches=batches,
        embedding=embedding,
    )
