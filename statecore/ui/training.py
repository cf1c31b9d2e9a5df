"""What the Train page launches: a RunConfig written into the run directory, trained by the CLI worker.

The app starts training exactly as a user would from the shell: it writes ``<run>/config.json`` (a
RunConfig, the same object the CLI flags build) and starts ``python -m statecore train --config
<run>/config.json`` through ``statecore.runs.jobs``. State Transition and State Embedding runs are both
RunConfigs (``track``), so they are started, watched, cancelled and resumed the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from statecore.config import APP_TRAIN, SE_PRESETS, SE_TRAIN, ST_PRESETS, RunConfig, SplitConfig
from statecore.errors import CheckpointError
from statecore.runs import jobs
from statecore.runs.files import atomic_write_json
from statecore.training.checkpoint import read_config
from statecore.training.tracks import ST_TRACKS


def st_run_config(
    *,
    data_path: str,
    spec,
    split: SplitConfig,
    preset: str = "small",
    set_size: int | None = None,
    embedding_run: str | None = None,
    features: dict | None = None,
    **train,
) -> RunConfig:
    """A State Transition run: the preset's model, the app's training defaults with ``train`` changes;
    ``features`` (STConfig fields, :func:`unseen_features`) switch on the gene-feature encoder."""
    model = ST_PRESETS[preset]
    if set_size:
        model = model.replace(set_size=int(set_size))
    if features:
        model = model.replace(**features)
    return RunConfig(
        data_path=str(Path(data_path).resolve()),
        track="embedding" if embedding_run else "hvg",
        embedding_run=str(Path(embedding_run).resolve()) if embedding_run else None,
        spec=spec,
        split=split,
        model=model,
        train=APP_TRAIN.replace(seed=split.seed, **train),
    )


def unseen_problem(options: dict | None) -> str:
    """What is wrong with the Train page's unseen-genes options, in the page's words ("" when nothing)."""
    if not options or not options.get("table"):
        return ""
    if not options.get("path"):
        return "Give the Gene feature table path, or choose Gene features: from the data (control cells)."
    if not Path(options["path"]).expanduser().is_file():
        return f"Gene feature table path: no file at {options['path']!r}; give the path of a table on the server."
    return ""


def unseen_features(options: dict | None) -> dict | None:
    """STConfig changes of the Train page's unseen-genes options (None for the other tasks)."""
    if options is None:
        return None
    table = options.get("table") and options.get("path")
    source = str(Path(options["path"]).expanduser().resolve()) if table else "data"
    return {"pert_encoding": "features", "gene_features": source, "perturbation_type": options["kind"]}


def se_run_config(*, data_path: str, preset: str = "small", hvg_only: bool = True, **train) -> RunConfig:
    """A State Embedding run on the prepared data (its HVGs by default)."""
    se = SE_PRESETS[preset].replace(hvg_only=hvg_only)
    return RunConfig(
        data_path=str(Path(data_path).resolve()), track="se", se=se, train=SE_TRAIN.replace(**train)
    )


def launch(run_dir: str | Path, config: RunConfig, *, threads: int) -> jobs.RunStatus:
    """Write ``config`` into ``run_dir`` and start its worker with ``threads`` CPU threads."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    atomic_write_json(path, config.to_dict())
    args = ["--config", str(path.resolve()), "--threads", str(threads), "--quiet"]
    return jobs.start(run_dir, args, threads=threads)


def ensemble_configs(config: RunConfig, k: int) -> list[RunConfig]:
    """``k`` members of an ensemble: the same split and data, training seeds seed, seed+1, ..."""
    if k < 1:
        raise ValueError(f"an ensemble needs at least one member; got {k}")
    return [config.replace(train=config.train.replace(seed=config.train.seed + i)) for i in range(k)]


def member_dir(run_dir: str | Path, i: int) -> Path:
    """Member i of the ensemble started as ``run_dir``: the run itself, then ``<run>-seed<i>`` siblings."""
    run_dir = Path(run_dir)
    return run_dir if i == 0 else run_dir.with_name(f"{run_dir.name}-seed{i}")


def run_kind(run_dir: str | Path) -> str:
    """ "embedding" for State Embedding runs, "transition" for State Transition runs, "" when unreadable."""
    try:
        config = read_config(run_dir)
    except CheckpointError:
        return ""
    return "transition" if config.track in ST_TRACKS else "embedding"


def model_runs(root: str | Path, kind: str = "transition") -> list[jobs.RunStatus]:
    """Runs of one kind that hold a usable model (best checkpoint written), newest first."""
    return [r for r in jobs.list_runs(root) if r.has_model and run_kind(r.run_dir) == kind]


def gpu_summary() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA)"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "GPU: Apple MPS"
    return "No GPU found: training runs on the CPU"


_FINISHED = re.compile(r"^done: step (\d+), .* \((.+)\) -> ")


def stop_reason(run_dir: str | Path) -> str | None:
    """Why a finished run stopped before its last step ("time budget of 3.0 min reached", "early stop:
    ..."), read from the worker's last summary line in ``log.txt``; None when it ran every step."""
    for line in reversed(jobs.log_tail(run_dir, 5).splitlines()):
        match = _FINISHED.match(line.strip())
        if match:
            return match[2]
    return None
