"""The training engine: one loop for every track (ST on expression, ST on embeddings, the SE model).

``fit(task, cfg, run_dir=...)`` owns the step loop, the learning-rate schedule and clipping, device,
DDP and bf16, stop requests (the ``<run>/STOP`` file and SIGTERM), step and time budgets, validation
cadence and early stopping, status, metrics and checkpoint cadence, and resume. A track
(``statecore.training.tracks``) supplies the model, step-addressed batches and the loss.
``train_run(adata, RunConfig, run_dir)`` is what the CLI, the app's workers and tests call: it finds the
run's track, lets it build the task, writes ``config.json`` and calls ``fit``.

Batches are a pure function of the step, so a resumed run replays exactly the batches the uninterrupted run
would have seen. Under ``torchrun`` (``statecore.training.distributed.session``) the model is wrapped in
DistributedDataParallel; the global batch of a step is still a function of (seed, step) and rank r trains
on its r-th slice, so N ranks reproduce single-process training. Rank 0 alone writes the run directory;
stop requests and time budgets are agreed by all-reduce so that every rank stops at the same step.

The loop keeps the host and the device in step only when it logs: losses stay tensors until every
``log_every`` steps, where one collective turns them into numbers (and a diverged loss is caught).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statecore.config import RunConfig, TrainConfig
from statecore.errors import StatecoreError
from statecore.runs import files as runs
from statecore.training import checkpoint as ckpt
from statecore.training import distributed as dist_utils
from statecore.training.tracks import get_track

# --------------------------------------------------------------------------- helpers


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StatecoreError("device cuda requested but no CUDA GPU is available; use device auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise StatecoreError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def default_threads() -> int:
    """Every core: a headless run or a cluster job owns its machine (the app's job manager passes fewer)."""
    return max(1, os.cpu_count() or 1)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at ``total``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@dataclass
class Progress:
    """What the progress hook receives (CLI progress, app status, tests)."""

    step: int
    total: int
    loss: float | None
    lr: float
    val_loss: float | None = None
    best_val: float | None = None
    cells_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    event: str = "log"  # log | val | start | end


@dataclass
class FitResult:
    state: str  # done | cancelled
    step: int
    best_val: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) of this process's run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    reason: str = ""


class _StopFlag:
    """Stop requests: SIGTERM (main thread only) or the file ``<run>/STOP``."""

    def __init__(self, run_dir: Path | None) -> None:
        self.stop_file = run_dir / "STOP" if run_dir is not None else None
        self.signalled = False
        self._old = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signalled = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())


# --------------------------------------------------------------------------- the loop


class _Loop:
    """State of one ``fit`` call; each method is one concern of the loop."""

    def __init__(self, task, cfg: TrainConfig, run_dir: Path | None, hook, resume: bool) -> None:
        self.task, self.cfg, self.run_dir = task, cfg, run_dir
        self.dinfo = dist_utils.current()
        self.device = resolve_device(cfg.device)
        if self.dinfo.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dinfo.local_rank)  # one GPU per process
        self.writer = self.dinfo.is_main and run_dir is not None  # rank 0 writes the run directory
        self.hook = hook if self.dinfo.is_main else None
        torch.set_num_threads(cfg.num_threads or default_threads())
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        self.model = task.model.to(self.device).train()
        self.optimizer = _optimizer(self.model, cfg, self.device)
        self.step, self.best_val, self.bad_checks = 0, None, 0
        self.total = int(cfg.steps)
        if resume and run_dir is not None and ckpt.resume_point(run_dir) is not None:
            self._load(run_dir)
        if not dist_utils.same_on_all(self.step):
            raise StatecoreError(
                f"rank {self.dinfo.rank} would resume from step {self.step} but other ranks from another "
                "step; the run directory must be on a file system that every node sees"
            )
        if self.dinfo.rank > 0:  # model noise inputs (noise_dim > 0) must differ between ranks
            torch.manual_seed(cfg.seed + 1_000_003 * self.dinfo.rank + self.step)
        self.module = self._wrap()
        self.autocast = cfg.bf16 and self.device.type in ("cuda", "cpu")
        self.pending: list[tuple[int, torch.Tensor]] = []  # losses not yet read back to the host
        self.extra: dict[str, torch.Tensor] = {}
        self.result = FitResult(state="done", step=self.step, best_val=self.best_val)
        self.started = time.time()
        self.deadline = self.started + cfg.max_minutes * 60.0 if cfg.max_minutes else None
        self.last_ckpt = self.started
        self.last_status = 0.0
        self.window_t, self.window_cells = self.started, 0
        self.cells_per_s: float | None = None
        self.eta_s: float | None = None

    def _load(self, run_dir: Path) -> None:
        info = ckpt.load_train_state(run_dir, self.optimizer, self.model)
        if not info["model_loaded"]:  # a run written before the weights lived in the training state
            ckpt.load_model_weights(self.model, run_dir / ckpt.LAST)
        self.step, self.best_val = int(info["step"]), info.get("best_val")
        self.bad_checks = int(info.get("bad_checks", 0))
        if self.writer:
            runs.truncate_metrics(run_dir, self.step)

    def _wrap(self):
        module = self.model
        if self.dinfo.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(self.model, device_ids=ids)
        return torch.compile(module) if self.cfg.compile else module

    # ----------------------------------------------------------------- one step
    def train_step(self) -> int:
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.task.batch(
            self.step, cfg.batch_size, rank=self.dinfo.rank, world_size=self.dinfo.world_size
        ).to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.task.forward(self.module, batch)
        loss, self.extra = self.task.loss(out.float(), batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.pending.append((self.step, loss.detach()))
        return batch.n_cells * self.dinfo.world_size

    def flush_losses(self) -> float | None:
        """Read the pending losses back (one collective); raise on a diverged loss."""
        if not self.pending:
            return self.result.losses[-1][1] if self.result.losses else None
        steps = [s for s, _ in self.pending]
        values = dist_utils.mean_values(torch.stack([v for _, v in self.pending]))
        self.pending.clear()
        for s, v in zip(steps, values):
            if not math.isfinite(v):
                raise StatecoreError(
                    f"training diverged at step {s} (loss {v}); lower the learning rate (now {self.cfg.lr}) "
                    "or the set size"
                )
        self.result.losses.extend(zip(steps, values))
        return values[-1]

    # ----------------------------------------------------------------- cadences
    def val_due(self) -> bool:
        """The same answer on every rank (rank 0 alone validates, but every rank logs that step)."""
        cfg = self.cfg
        return bool(
            self.task.has_val
            and cfg.val_every
            and (self.step % cfg.val_every == 0 or self.step == self.total)
        )

    def validate(self) -> float | None:
        if not (self.dinfo.is_main and self.val_due()):
            return None
        val = self.task.val_loss(self.device, self.cfg.batch_size)
        self.result.val_losses.append((self.step, val))
        if self.best_val is None or val < self.best_val:
            self.best_val, self.bad_checks = val, 0
            if self.writer:
                ckpt.save_weights(self.run_dir / ckpt.BEST, self.model, self._meta())
        else:
            self.bad_checks += 1
        return val

    def log(self, n_cells: int, val: float | None, now: float) -> None:
        cfg = self.cfg
        self.window_cells += n_cells
        if not (self.step % max(1, cfg.log_every) == 0 or self.step == self.total or self.val_due()):
            return
        loss = self.flush_losses()
        self.cells_per_s = self.window_cells / max(now - self.window_t, 1e-9)
        self.window_t, self.window_cells = now, 0
        self.eta_s = (self.total - self.step) * n_cells / max(self.cells_per_s, 1e-9)
        if self.deadline is not None:
            self.eta_s = min(self.eta_s, max(0.0, self.deadline - now))
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr_at(self.step - 1, cfg, self.total),
            "cells_per_s": self.cells_per_s,
            "eta_s": self.eta_s,
            "time": now - self.started,
        }
        record.update({k: float(v) for k, v in self.extra.items()})  # e.g. Track B's loss terms
        if val is not None:
            record["val_loss"] = val
            record.update(getattr(self.task, "val_extras", {}))
        if self.writer:
            runs.append_metrics(self.run_dir, record)
        self.emit("val" if val is not None else "log", loss, val)

    def checkpoint_if_due(self, now: float) -> None:
        cfg = self.cfg
        due = self.step % max(1, cfg.ckpt_every_steps) == 0 or (
            cfg.ckpt_every_seconds and now - self.last_ckpt >= cfg.ckpt_every_seconds
        )
        if due:
            self.save()
            self.last_ckpt = time.time()
        if due or now - self.last_status >= 1.0:
            self.status(state="running")
            self.last_status = now

    # ----------------------------------------------------------------- outputs
    def _meta(self) -> dict[str, Any]:
        return {**self.task.meta, "step": self.step}

    def save(self) -> None:
        if not self.writer:
            return
        # never checkpoint a diverged model (a local check: the wall-clock cadence differs between ranks)
        if self.pending and not bool(torch.isfinite(torch.stack([v for _, v in self.pending])).all()):
            self.flush_losses()  # raises, naming the step
        info = {
            "step": self.step,
            "best_val": self.best_val,
            "total": self.total,
            "bad_checks": self.bad_checks,
        }
        ckpt.save_train_state(self.run_dir, self.optimizer, info, self.model)  # the resume state, one file
        ckpt.save_weights(self.run_dir / ckpt.LAST, self.model, self._meta())  # what predictions load
        if not self.task.has_val:
            ckpt.save_weights(self.run_dir / ckpt.BEST, self.model, self._meta())

    def status(self, **fields: Any) -> None:
        if self.writer:
            base = {
                "step": self.step,
                "total": self.total,
                "best_val": self.best_val,
                "eta_s": self.eta_s,
                "cells_per_s": self.cells_per_s,
            }
            runs.write_status(self.run_dir, **{**base, **fields})

    def emit(self, event: str, loss: float | None, val: float | None = None) -> None:
        if self.hook is not None:
            lr = lr_at(max(self.step - 1, 0), self.cfg, self.total)
            self.hook(
                Progress(
                    step=self.step,
                    total=self.total,
                    loss=loss,
                    lr=lr,
                    val_loss=val,
                    best_val=self.best_val,
                    cells_per_s=self.cells_per_s,
                    eta_s=self.eta_s,
                    elapsed_s=time.time() - self.started,
                    event=event,
                )
            )

    # ----------------------------------------------------------------- the run
    def should_stop(self, stop: _StopFlag) -> bool:
        if dist_utils.any_true(stop.requested()):
            self.result.state, self.result.reason = "cancelled", "stop requested"
            return True
        if self.deadline is not None and dist_utils.any_true(time.time() >= self.deadline):
            self.result.reason = f"time budget of {self.cfg.max_minutes} min reached"
            return True
        if self.cfg.patience and self.bad_checks >= self.cfg.patience:
            self.result.reason = f"early stop: validation did not improve for {self.bad_checks} checks"
            return True
        return False

    def run(self) -> FitResult:
        self.status(state="running", pid=os.getpid(), started=runs.now_iso(), error=None)
        self.emit("start", None)
        with _StopFlag(self.run_dir) as stop:
            while self.step < self.total and not self.should_stop(stop):
                n_cells = self.train_step()
                val = self.validate()
                now = time.time()
                self.log(n_cells, val, now)
                self.checkpoint_if_due(now)
            last = self.flush_losses()
            self.save()
            if self.writer and self.best_val is None and self.task.has_val:
                # the budget ended before the first validation: the last model is the best one there is
                ckpt.save_weights(self.run_dir / ckpt.BEST, self.model, self._meta())
            self.result.step, self.result.best_val = self.step, self.best_val
            self.status(state=self.result.state, eta_s=0.0 if self.result.state == "done" else None)
            self.emit("end", last)
        return self.result

    def fail(self, exc: BaseException) -> None:
        if not self.writer:
            return
        state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            self.pending.clear()  # a failed step's losses may be the divergence itself
            info = {"step": self.step, "best_val": self.best_val, "total": self.total}
            ckpt.save_train_state(
                self.run_dir, self.optimizer, {**info, "bad_checks": self.bad_checks}, self.model
            )
            ckpt.save_weights(self.run_dir / ckpt.LAST, self.model, self._meta())
        except Exception:  # noqa: BLE001 - the original error matters more than a failed save
            pass
        error = None if state == "cancelled" else (str(exc) or type(exc).__name__)
        runs.write_status(self.run_dir, state=state, step=self.step, best_val=self.best_val, error=error)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update; on this project's CPU it cut the optimizer step from 49-74 ms to
    # 12-18 ms at the reference shape (bench/profile_step.py, docs/PERFORMANCE.md)
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def fit(
    task,
    cfg: TrainConfig = TrainConfig(),
    *,
    run_dir: str | os.PathLike | None = None,
    hook: Callable[[Progress], None] | None = None,
    resume: bool = True,
) -> FitResult:
    """Train ``task.model`` for ``cfg.steps`` steps (or ``cfg.max_minutes``), checkpointing into ``run_dir``
    (optional). With ``resume`` and a complete training state there, training continues from it."""
    loop = _Loop(task, cfg, Path(run_dir) if run_dir is not None else None, hook, resume)
    try:
        return loop.run()
    except BaseException as exc:
        loop.fail(exc)
        raise


# --------------------------------------------------------------------------- runs from data


def _start_config(config: RunConfig, run_dir: Path) -> tuple[RunConfig, bool]:
    """(config to build from, resuming): a run directory with a complete training state resumes with its
    saved config (only the training length may change); anything less restarts cleanly."""
    dist_utils.barrier()  # rank 0 has finished writing any earlier run here before anyone looks
    if dist_utils.current().is_main:
        ckpt.remove_stale_temp_files(run_dir)  # left by a worker killed mid-write
    saved = runs.read_json(run_dir / "config.json")
    resuming = ckpt.resume_point(run_dir) is not None and isinstance(saved, dict)
    dist_utils.barrier()  # every rank has looked before rank 0 writes a fresh run's files
    if resuming:
        old = RunConfig.from_dict(saved)
        train = old.train.replace(steps=config.train.steps, max_minutes=config.train.max_minutes)
        return old.replace(train=train), True
    if dist_utils.current().is_main:
        ckpt.clear_training_state(run_dir)  # a crash before the first complete checkpoint: start over
        runs.write_status(
            run_dir, state="queued", step=0, total=config.train.steps, pid=os.getpid(), started=runs.now_iso()
        )
    return config, False


def train_run(
    adata, config: RunConfig, run_dir: str | os.PathLike, *, hook: Callable[[Progress], None] | None = None
) -> FitResult:
    """Train (or resume) a run directory on a prepared AnnData, whatever its track.

    A fresh run lets its track make the split and data files, writes config.json (hyperparameters and the
    data-derived shapes apart), builds the model and trains. A run directory with a complete training
    state resumes: its saved config, split and vocabularies win over ``config`` except for the training
    length (steps, max_minutes).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config, resuming = _start_config(config, run_dir)
    built = get_track(config.track).build(adata, config, run_dir, resuming=resuming)
    if dist_utils.current().is_main:
        runs.atomic_write_json(run_dir / "config.json", built.config.to_dict())
    return fit(built.task, built.config.train, run_dir=run_dir, hook=hook, resume=resuming)
