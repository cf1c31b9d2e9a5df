"""What the Train page launches: the options it collects and the CLI arguments they become.

The app starts training exactly as a user would from the shell (``python -m statecore train``)
through ``statecore.runs.jobs``; this module only turns page choices into that argument list and tells
runs apart (State Transition runs vs State Embedding runs) from their ``config.json``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from statecore.runs import jobs


@dataclass(frozen=True)
class TrainOptions:
    data_path: str
    task: str = "zeroshot"  # zeroshot | underrepresented | explicit
    context: str | None = None
    test_perts: tuple[str, ...] = ()
    keep_fraction: float = 0.3
    track: str = "hvg"  # hvg | embedding
    embedding_run: str | None = None
    preset: str = "small"
    set_size: int | None = None
    lr: float = 3e-4
    batch_size: int = 8
    steps: int = 400
    max_minutes: float | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    extra: tuple[str, ...] = field(default_factory=tuple)

    def to_args(self) -> list[str]:
        args = [
            "--data",
            self.data_path,
            "--task",
            self.task,
            "--preset",
            self.preset,
            "--steps",
            str(self.steps),
            "--lr",
            str(self.lr),
            "--batch-size",
            str(self.batch_size),
            "--device",
            self.device,
            "--seed",
            str(self.seed),
            "--quiet",
        ]
        if self.context:
            args += ["--context", self.context]
        if self.task == "explicit":
            args += ["--test-perts", ",".join(self.test_perts)]
        if self.task == "underrepresented":
            args += ["--keep-fraction", str(self.keep_fraction)]
        if self.track == "embedding" and self.embedding_run:
            args += ["--track", "embedding", "--embedding-run", self.embedding_run]
        for flag, value in (
            ("--set-size", self.set_size),
            ("--max-minutes", self.max_minutes),
            ("--threads", self.threads),
        ):
            if value is not None:
                args += [flag, str(value)]
        return args + list(self.extra)


def run_kind(run_dir: str | Path) -> str:
    """ "embedding" for State Embedding runs, else "transition"."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "transition"
    return "embedding" if cfg.get("kind") == "embedding" else "transition"


def model_runs(root: str | Path, kind: str = "transition") -> list[jobs.RunStatus]:
    """Runs of one kind that hold a usable model (best checkpoint written), newest first."""
    return [r for r in jobs.list_runs(root) if r.has_model and run_kind(r.run_dir) == kind]


def train_cli_flags() -> set[str]:
    """Option strings that ``python -m statecore train`` accepts (the worker's real parser)."""
    from statecore.cli import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse keeps subparsers here
        train = action.choices.get("train") if hasattr(action, "choices") else None
        if train is not None:
            return {opt for a in train._actions for opt in a.option_strings}
    return set()


def embedding_track_available(root: str | Path) -> bool:
    """The embedding track needs the SE model code, a trainer that takes an SE run, and a finished SE run."""
    return (
        importlib.util.find_spec("statecore.models.embedding") is not None
        and "--embedding-run" in train_cli_flags()
        and bool(model_runs(root, "embedding"))
    )


def gpu_summary() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA)"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "GPU: Apple MPS"
    return "No GPU found: training runs on the CPU"
