"""Checkpoints: safetensors weights + JSON metadata; nothing is ever pickled or unpickled.

A weights file is self-describing: its safetensors header metadata holds the model config, gene
names and vocabularies, so a single ``model.safetensors`` can rebuild its model. A run directory
additionally holds ``config.json``, ``split.json`` and the text vocabularies (see CONTRACTS.md), and
``train_state.safetensors`` + ``train_state.json`` (optimizer, RNG, step) for resuming.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from statecore.config import RunConfig
from statecore.data.sets import PerturbationVocab
from statecore.data.splits import Split
from statecore.errors import CheckpointError
from statecore.models.transition import StateTransitionModel
from statecore.runs.files import atomic_write_json, read_json, read_lines, write_lines
from statecore.training.tracks import ST_TRACKS, get_track

FORMAT = "statecore-st-v1"
BEST, LAST = "model.safetensors", "last.safetensors"
TRAIN_STATE, TRAIN_STATE_JSON = "train_state.safetensors", "train_state.json"
FEATURES = "pert_features.safetensors"


HEADER_KEY = "statecore"


def _header(fields: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata: one JSON string with sorted keys. The file format stores metadata as a hash
    map whose order changes from run to run, so several keys would make identical runs differ in bytes."""
    return {HEADER_KEY: json.dumps({"format": FORMAT, **fields}, sort_keys=True)}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata
        )
        with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-able: config, genes, vocabularies) atomically."""
    cfg = getattr(model, "cfg", None)
    header: dict[str, Any] = {"meta": meta}
    if cfg is not None:
        header["config"] = cfg.to_dict()
    state = model.state_dict()
    _atomic_save({k: state[k] for k in sorted(state)}, Path(path), _header(header))


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
    try:
        if HEADER_KEY in header:
            meta = json.loads(header[HEADER_KEY])
        else:  # files written before the single header key
            meta = {k: (json.loads(v) if k != "format" else v) for k, v in header.items()}
    except ValueError as exc:
        raise CheckpointError(f"{str(path)!r}: corrupt checkpoint metadata ({exc})") from exc
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
    run_dir: str | os.PathLike,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    model: torch.nn.Module | None = None,
) -> None:
    """The whole resume state in ONE safetensors file, written atomically: the model's weights
    (``model.*``), the optimizer's tensors (``opt.*``) and the torch RNG, with the step, the param groups and
    the optimizer's scalars in its header. One rename makes it visible, so a kill at any moment leaves the
    previous state or the new one, never a mix of steps (two files, weights and optimizer state, could
    be caught between their writes and force a restart from step 0).
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
    if model is not None:
        tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    payload = dict(info, param_groups=sd["param_groups"], opt_scalars=scalars)
    _atomic_save(
        {k: tensors[k] for k in sorted(tensors)}, run_dir / TRAIN_STATE, _header({"train_state": payload})
    )
    (run_dir / TRAIN_STATE_JSON).unlink(missing_ok=True)  # the older layout's second file, now stale


def _train_state_info(run_dir: Path, tensors_meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The resume info: from the train state's own header, or (runs written before) train_state.json."""
    meta = tensors_meta if tensors_meta is not None else _read_header(run_dir / TRAIN_STATE)
    info = (meta or {}).get("train_state")
    if info is None:
        info = read_json(run_dir / TRAIN_STATE_JSON)
    return info if isinstance(info, dict) and isinstance(info.get("step"), int) else None


def _read_header(path: Path) -> dict[str, Any] | None:
    """A safetensors file's statecore header without reading its tensors; None when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        return json.loads(header[HEADER_KEY]) if HEADER_KEY in header else {}
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def load_train_state(
    run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Restore the optimizer, the torch RNG and (when given and stored) the model's weights saved by
    :func:`save_train_state`; return the info dict. Returns ``info["model_loaded"]`` False for runs
    written before the weights lived in this file (the caller then loads last.safetensors)."""
    run_dir = Path(run_dir)
    tensors, meta = read_weights(run_dir / TRAIN_STATE)
    info = _train_state_info(run_dir, meta)
    if info is None:
        raise CheckpointError(
            f"{str(run_dir / TRAIN_STATE)!r} holds no training state; cannot resume this run"
        )
    state: dict[int, dict[str, Any]] = {}
    weights = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
        elif name.startswith("model."):
            weights[name[len("model.") :]] = value
    for idx, extra in info.get("opt_scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        if model is not None and weights:
            model.load_state_dict(weights, strict=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"training state in {str(run_dir)!r} does not match the model ({exc})") from exc
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return dict(info, model_loaded=bool(model is not None and weights))


# --------------------------------------------------------------------------- resume points


def resume_point(run_dir: str | os.PathLike) -> int | None:
    """The step a run directory can resume from, or None when it holds no complete training state.

    The state is one file (``train_state.safetensors``, written atomically), complete when it reads.
    Runs written before kept the weights in ``last.safetensors`` and the step in ``train_state.json``:
    those are complete when all three read and agree on the step.
    """
    run_dir = Path(run_dir)
    header = _read_header(run_dir / TRAIN_STATE) if (run_dir / TRAIN_STATE).is_file() else None
    if header is None:
        return None
    if "train_state" in header:
        info = _train_state_info(run_dir, header)
        return int(info["step"]) if info is not None else None
    info = _train_state_info(run_dir, header)  # the older layout
    if info is None or not (run_dir / LAST).is_file():
        return None
    saved = _read_header(run_dir / LAST)
    if saved is None:
        return None
    saved_step = (saved.get("meta") or {}).get("step", info["step"])  # older runs did not record it
    return int(info["step"]) if saved_step == info["step"] else None


def temp_file_pid(path: Path) -> int | None:
    """The writer's pid in an atomic write's temporary name (``.NAME.PID.tmp`` or ``.NAME.PID.HEX.tmp``)."""
    parts = path.name.split(".")
    if len(parts) < 4:
        return None
    # the pid sits before the random part when there is one (which may itself be all digits)
    if parts[-3].isdigit() and len(parts[-2]) == 8:
        return int(parts[-3])
    return int(parts[-2]) if parts[-2].isdigit() else None


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes whose writer is dead (a SIGKILL or power loss in the
    middle of a checkpoint write leaves one; no ``finally`` runs). Called by a worker that holds the run,
    before it reads the run's state. Returns what was removed."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp"):
        pid = temp_file_pid(tmp)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not our writer, leave its file alone
        return True
    return True


def clear_training_state(run_dir: str | os.PathLike) -> None:
    """Remove what a failed first attempt left (weights, optimizer state, metrics) so a restart is clean."""
    run_dir = Path(run_dir)
    for name in (LAST, BEST, TRAIN_STATE, TRAIN_STATE_JSON, "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- whole runs


@dataclass
class LoadedRun:
    model: torch.nn.Module
    config: RunConfig
    genes: list[str]
    perturbations: list[str]
    contexts: list[str]
    split: Split | None
    run_dir: Path
    vocab: PerturbationVocab | None = None
    batches: list[str] | None = None
    track: Any = None  # statecore.training.tracks.Track of config.track
    extras: Any = None  # what the track needs at prediction (Track B: the SE run that embeds inputs)

    @property
    def embedding(self) -> Any:  # the name Track B callers used before tracks were objects
        return self.extras


def write_vocab_files(run_dir: str | os.PathLike, *, genes, vocab, contexts, batches) -> None:
    run_dir = Path(run_dir)
    write_lines(run_dir / "genes.txt", list(genes))
    write_lines(run_dir / "perturbations.txt", list(vocab.names))
    write_lines(run_dir / "contexts.txt", list(contexts))
    write_lines(run_dir / "batches.txt", list(batches))
    atomic_write_json(
        run_dir / "vocab.json",
        {
            "control": vocab.control,
            "combo_sep": vocab.combo_sep,
            "features": vocab.features is not None,
            "n_panel": int(vocab.n_panel),
            "source": vocab.source,
        },
    )
    if vocab.features is not None:
        tensors = {"features": torch.as_tensor(np.asarray(vocab.features, dtype=np.float32))}
        if vocab.self_index is not None:
            tensors["self_index"] = torch.as_tensor(np.asarray(vocab.self_index, dtype=np.int64))
        _atomic_save(tensors, run_dir / FEATURES, _header({}))


def read_vocab(run_dir: str | os.PathLike, config: RunConfig) -> PerturbationVocab:
    """The perturbation vocabulary a run was trained with (perturbations.txt, vocab.json, features)."""
    run_dir = Path(run_dir)
    try:
        names = read_lines(run_dir / "perturbations.txt")
    except OSError as exc:
        raise CheckpointError(f"run {str(run_dir)!r} is incomplete: {exc}") from exc
    vinfo = read_json(run_dir / "vocab.json") or {}
    features = self_index = None
    if vinfo.get("features"):
        tensors = read_weights(run_dir / FEATURES)[0]
        features = tensors["features"].numpy()
        self_index = tensors["self_index"].numpy() if "self_index" in tensors else None
    return PerturbationVocab(
        control=vinfo.get("control", config.spec.control),
        names=tuple(names),
        combo_sep=vinfo.get("combo_sep", config.spec.combo_sep),
        features=features,
        self_index=self_index,
        n_panel=int(vinfo.get("n_panel", 0)),
        source=str(vinfo.get("source", "")),
    )


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    """A run directory's RunConfig (CheckpointError naming the file when it is missing or invalid)."""
    path = Path(run_dir) / "config.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} missing or unreadable; is this a statecore run?")
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a statecore run configuration ({exc})") from exc


def load_run(run_dir: str | os.PathLike, device: str = "cpu", *, which: str = "best") -> LoadedRun:
    """Rebuild a trained State Transition model from a run directory (``which``: best, last)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} not found")
    config = read_config(run_dir)
    if config.track not in ST_TRACKS:
        raise CheckpointError(
            f"{str(run_dir)!r} holds a State Embedding ({config.track}) run, not a State Transition run; "
            "pick a run trained with `python -m statecore train`"
        )
    path = run_dir / (BEST if which == "best" else LAST)
    if which == "best" and not path.exists() and (run_dir / LAST).exists():
        path = run_dir / LAST  # a run stopped before its first validation has only "last"
    try:
        genes = read_lines(run_dir / "genes.txt")
        contexts = read_lines(run_dir / "contexts.txt")
        batches = read_lines(run_dir / "batches.txt") if (run_dir / "batches.txt").exists() else []
    except OSError as exc:
        raise CheckpointError(f"run {str(run_dir)!r} is incomplete: {exc}") from exc
    vocab = read_vocab(run_dir, config)
    model_cfg = config.model_config()
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
    track = get_track(config.track)
    return LoadedRun(
        model=model,
        config=config,
        genes=genes,
        perturbations=list(vocab.names),
        contexts=contexts,
        split=split,
        run_dir=run_dir,
        vocab=vocab,
        batches=batches,
        track=track,
        extras=track.load_extras(config),
    )
