"""Training loop for the State Transition model: ``fit`` (one loop for CLI, app and tests).

``fit`` owns the optimizer, schedule, device, checkpoints, validation, stop requests and resume;
``train_run`` turns a prepared AnnData + RunConfig into training data and a run directory, then
calls ``fit``. Batches are a pure function of the step (see ``statecore.data.sets``), so a resumed run
replays exactly the batches the uninterrupted run would have seen.

Multi-process training: when a process group is running (``statecore.training.distributed.session``, set up
by the train command under torchrun), ``fit`` wraps the model in DistributedDataParallel. The global
batch of a step (``cfg.batch_size`` sets) is still a function of (seed, step); rank r trains on its
r-th slice, so N ranks reproduce single-process training with the same batch size. Rank 0 alone
writes the run directory; stop requests and time budgets are agreed by all-reduce so that every
rank stops at the same step.
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
from statecore.data.sets import PerturbationVocab, SetDataset, build_groups, obs_labels, select_genes
from statecore.embedding import track as embedding_track
from statecore.errors import DataError, StatecoreError
from statecore.models.losses import get_loss
from statecore.runs import files as runs
from statecore.training import checkpoint as ckpt
from statecore.training import distributed as dist_utils

# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    train: SetDataset
    val: SetDataset | None
    genes: list[str]
    vocab: PerturbationVocab
    contexts: list[str]
    batches: list[str]
    split: Any = None  # statecore.data.splits.Split


def make_train_data(
    adata,
    split,
    *,
    set_size: int = 64,
    seed: int = 0,
    use_hvg: bool = True,
    genes: list[str] | None = None,
    vocab: PerturbationVocab | None = None,
    pert_features=None,
    batches: list[str] | None = None,
) -> TrainData:
    """Training and validation set datasets for ``split`` (controls of every context train as identity)."""
    _, ctx, batch = obs_labels(adata)
    genes = list(genes) if genes is not None else select_genes(adata, use_hvg)
    if vocab is None:
        train_labels = [p for _, p in split.pairs("train") | split.pairs("val")]
        vocab = PerturbationVocab.from_labels(train_labels, split.control, features=pert_features)
    contexts = sorted(set(ctx))
    batches = list(batches) if batches is not None else sorted(set(map(str, batch)))
    train_groups = build_groups(
        adata, control=split.control, pairs=split.pairs("train"), include_controls=True
    )
    train = SetDataset(
        adata, train_groups, genes=genes, vocab=vocab, batches=batches, set_size=set_size, seed=seed
    )
    val = None
    val_pairs = split.pairs("val")
    if val_pairs:
        val_groups = build_groups(adata, control=split.control, pairs=val_pairs, include_controls=False)
        if val_groups:
            val = SetDataset(
                adata,
                val_groups,
                genes=genes,
                vocab=vocab,
                batches=batches,
                set_size=set_size,
                seed=seed + 1_000_003,
            )
    return TrainData(
        train=train, val=val, genes=genes, vocab=vocab, contexts=contexts, batches=batches, split=split
    )


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
        raise StatecoreError("--device cuda requested but no CUDA GPU is available; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise StatecoreError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def default_threads() -> int:
    """All cores but one (the UI or the shell keeps one), at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at ``total``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@dataclass
class Progress:
    """What the progress hook receives (CLI tqdm bar, app status, tests)."""

    step: int
    total: int
    loss: float | None
    lr: float
    val_loss: float | None = None
    best_val: float | None = None
    cells_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    event: str = "log"  # log | val | checkpoint | start | end


@dataclass
class FitResult:
    state: str  # done | cancelled
    step: int
    best_val: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) of this process
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


@torch.no_grad()
def evaluate_loss(
    model,
    data: SetDataset,
    loss_fn,
    device,
    batch_size: int,
    max_sets: int = 256,
    contexts: list[str] | None = None,
) -> float:
    """Mean per-set loss over the first ``max_sets`` sets of the dataset's epoch-0 plan (fixed)."""
    was_training = model.training
    model.eval()
    set_loss = embedding_track.step_loss_fn(model, loss_fn)  # HVG track, or emb + alpha * expr
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[]):  # a noise input must not shift the training RNG stream
        torch.manual_seed(0)
        for b in data.iter_epoch(batch_size, epoch=0, max_sets=max_sets):
            b = b.to(device)
            kw = (
                {"context": data.context_index(b.groups, contexts).to(device)}
                if contexts is not None and getattr(model, "pair_shift", None) is not None
                else {}
            )
            pred = model(b.x_ctrl, b.z_pert, b.batch_idx, **kw)
            total += float(set_loss(pred, b)[0]) * b.x_target.shape[0]  # mean over the batch's sets -> sum
            n += b.x_target.shape[0]
    model.train(was_training)
    return total / max(n, 1)


# --------------------------------------------------------------------------- fit


def fit(
    model: torch.nn.Module,
    data: TrainData,
    cfg: TrainConfig = TrainConfig(),
    *,
    run_dir: str | os.PathLike | None = None,
    loss: str = "energy",
    hook: Callable[[Progress], None] | None = None,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` for ``cfg.steps`` steps (or ``cfg.max_minutes``), checkpointing into
    ``run_dir`` (optional). With ``resume`` and a ``last.safetensors`` there, training continues from it."""
    run_dir = Path(run_dir) if run_dir is not None else None
    dinfo = dist_utils.current()
    device = resolve_device(cfg.device)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)  # one GPU per process
    writer = dinfo.is_main  # only rank 0 writes checkpoints, metrics and status
    if not writer:
        hook = None
    torch.set_num_threads(cfg.num_threads or default_threads())
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    model.to(device).train()
    loss_fn = get_loss(loss)
    step_loss = embedding_track.step_loss_fn(model, loss_fn)  # (pred, batch) -> (loss, extra metrics)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = dict(meta or {})
    meta.setdefault("genes", data.genes)

    step, best_val = 0, None
    if (
        run_dir is not None
        and resume
        and (run_dir / ckpt.LAST).exists()
        and (run_dir / ckpt.TRAIN_STATE_JSON).exists()
    ):
        ckpt.load_model_weights(model, run_dir / ckpt.LAST)
        info = ckpt.load_train_state(run_dir, optimizer)
        step, best_val = int(info["step"]), info.get("best_val")
        if writer:
            runs.truncate_metrics(run_dir, step)
    # every rank has decided whether to resume before rank 0 may write a checkpoint
    if not dist_utils.same_on_all(step):
        raise StatecoreError(
            f"rank {dinfo.rank} would resume from step {step} but other ranks from another step; "
            "the run directory must be on a file system that every node sees"
        )
    if dinfo.rank > 0:
        # model noise inputs (noise_dim > 0) must differ between ranks
        torch.manual_seed(cfg.seed + 1_000_003 * dinfo.rank + step)
    total = int(cfg.steps)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if cfg.bf16 and device.type in ("cuda", "cpu")
        else None
    )
    wrapped = model
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(wrapped) if cfg.compile else wrapped
    # the shift prior's per-context table needs each set's context; other models never see it
    ctx_of = (
        (lambda b: {"context": data.train.context_index(b.groups, data.contexts).to(device)})
        if getattr(model, "pair_shift", None) is not None
        else (lambda b: {})
    )

    started = time.time()
    deadline = started + cfg.max_minutes * 60.0 if cfg.max_minutes else None
    last_ckpt_time, last_status_time = started, 0.0
    window_t, window_cells = time.time(), 0
    cells_per_s = eta_s = None
    result = FitResult(state="done", step=step, best_val=best_val)

    def save(best: bool = False) -> None:
        if run_dir is None or not writer:
            return
        ckpt.save_weights(run_dir / ckpt.LAST, model, meta)
        ckpt.save_train_state(run_dir, optimizer, {"step": step, "best_val": best_val, "total": total})
        if best or data.val is None:
            ckpt.save_weights(run_dir / ckpt.BEST, model, meta)

    def status(**kw) -> None:
        if run_dir is not None and writer:
            fields = {
                "step": step,
                "total": total,
                "best_val": best_val,
                "eta_s": eta_s,
                "cells_per_s": cells_per_s,
            }
            runs.write_status(run_dir, **{**fields, **kw})

    def emit(event: str, loss_value: float | None, val_loss: float | None = None) -> None:
        if hook is not None:
            hook(
                Progress(
                    step=step,
                    total=total,
                    loss=loss_value,
                    lr=lr_at(max(step - 1, 0), cfg, total),
                    val_loss=val_loss,
                    best_val=best_val,
                    cells_per_s=cells_per_s,
                    eta_s=eta_s,
                    elapsed_s=time.time() - started,
                    event=event,
                )
            )

    status(state="running", pid=os.getpid(), started=runs.now_iso(), error=None)
    emit("start", None)
    try:
        with _StopFlag(run_dir) as stop:
            while step < total:
                if dist_utils.any_true(stop.requested()):
                    result.state, result.reason = "cancelled", "stop requested"
                    break
                if deadline is not None and dist_utils.any_true(time.time() >= deadline):
                    result.reason = f"time budget of {cfg.max_minutes} min reached"
                    break
                lr = lr_at(step, cfg, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = data.train.batch(
                    step, cfg.batch_size, rank=dinfo.rank, world_size=dinfo.world_size
                ).to(device)
                if autocast is not None:
                    with autocast:
                        pred = step_fn(batch.x_ctrl, batch.z_pert, batch.batch_idx, **ctx_of(batch))
                    loss_value, extra = step_loss(pred.float(), batch)
                else:
                    pred = step_fn(batch.x_ctrl, batch.z_pert, batch.batch_idx, **ctx_of(batch))
                    loss_value, extra = step_loss(pred, batch)
                optimizer.zero_grad(set_to_none=True)
                loss_value.backward()
                if cfg.grad_clip and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                step += 1
                lv = dist_utils.mean_scalar(
                    loss_value.detach()
                )  # the global batch's loss, same on every rank
                if not math.isfinite(lv):
                    raise StatecoreError(
                        f"training diverged at step {step} (loss {lv}); lower the learning "
                        f"rate (now {cfg.lr}) or the set size"
                    )
                result.losses.append((step, lv))
                window_cells += batch.n_cells * dinfo.world_size
                now = time.time()

                val_loss = None
                if (
                    writer
                    and data.val is not None
                    and cfg.val_every
                    and (step % cfg.val_every == 0 or step == total)
                ):
                    val_loss = evaluate_loss(
                        model, data.val, loss_fn, device, cfg.batch_size, contexts=data.contexts
                    )
                    result.val_losses.append((step, val_loss))
                    if best_val is None or val_loss < best_val:
                        best_val = val_loss
                        if run_dir is not None:
                            ckpt.save_weights(run_dir / ckpt.BEST, model, meta)
                if step % max(1, cfg.log_every) == 0 or step == total or val_loss is not None:
                    cells_per_s = window_cells / max(now - window_t, 1e-9)
                    window_t, window_cells = time.time(), 0
                    steps_per_s = cells_per_s / max(batch.n_cells, 1)
                    eta_s = (total - step) / max(steps_per_s, 1e-9)
                    if deadline is not None:
                        eta_s = min(eta_s, max(0.0, deadline - now))
                    record = {
                        "step": step,
                        "loss": lv,
                        "lr": lr,
                        "cells_per_s": cells_per_s,
                        "eta_s": eta_s,
                        "time": now - started,
                    }
                    record.update(extra)  # embedding track: loss_emb, loss_expr of this step
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                    if run_dir is not None and writer:
                        runs.append_metrics(run_dir, record)
                    emit("val" if val_loss is not None else "log", lv, val_loss)
                if step % max(1, cfg.ckpt_every_steps) == 0 or (
                    cfg.ckpt_every_seconds and now - last_ckpt_time >= cfg.ckpt_every_seconds
                ):
                    save()
                    last_ckpt_time = time.time()
                    status(state="running")
                    last_status_time = last_ckpt_time
                elif now - last_status_time >= 1.0:
                    status(state="running")
                    last_status_time = now
            save()
            result.step, result.best_val = step, best_val
            status(state=result.state, eta_s=0.0 if result.state == "done" else None)
            emit("end", result.losses[-1][1] if result.losses else None)
    except BaseException as exc:
        if run_dir is not None and writer:
            msg = str(exc) or type(exc).__name__
            state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                save()
            except Exception:  # noqa: BLE001 - the original error matters more than a failed save
                pass
            runs.write_status(
                run_dir,
                state=state,
                step=step,
                best_val=best_val,
                error=None if state == "cancelled" else msg,
            )
        raise
    return result


# --------------------------------------------------------------------------- runs from data


def _vocab_meta(data: TrainData, split) -> dict[str, Any]:
    return {
        "genes": data.genes,
        "perturbations": list(data.vocab.names),
        "contexts": data.contexts,
        "batches": data.batches,
        "control": data.vocab.control,
        "combo_sep": data.vocab.combo_sep,
        "split": split.to_dict() if split is not None else None,
    }


def _shift_prior_tables(adata, data: TrainData, split):
    """(all-context shift [P, G], pair index [C, P], per-context pair shifts [K, G]) for the shift prior.

    Training and validation pairs (never test), as the baselines use: validation pairs then only guide the
    choice of checkpoint, and the prior of a pair measured in few contexts is less noisy."""
    from statecore.training.priors import shift_prior_tables

    if data.vocab.features is not None:
        raise DataError("shift_prior needs one-hot perturbations; use --shift-prior off when giving features")
    pairs = {c: [*split.train.get(c, []), *split.val.get(c, [])] for c in {*split.train, *split.val}}
    return shift_prior_tables(
        adata, genes=data.genes, vocab=data.vocab, train_pairs=pairs, contexts=data.contexts
    )


def train_run(
    adata,
    run_cfg: RunConfig,
    run_dir: str | os.PathLike,
    *,
    hook: Callable[[Progress], None] | None = None,
    pert_features=None,
) -> FitResult:
    """Train (or resume) a run directory on a prepared AnnData.

    A fresh run makes the split, writes config.json, split.json and the vocabularies, builds the model
    and trains. A run directory that already has a config resumes: its saved config, split and
    vocabularies win over ``run_cfg`` except for the training length (steps, max_minutes).
    """
    from statecore.data.splits import Split, make_split
    from statecore.models.transition import StateTransitionModel

    run_dir = Path(run_dir)
    writer = dist_utils.current().is_main
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = runs.read_json(run_dir / "config.json")
    resuming = isinstance(existing, dict) and (run_dir / "split.json").exists()
    dist_utils.barrier()  # every rank has looked before rank 0 writes a fresh run's files
    if resuming:
        saved = RunConfig.from_dict(existing)
        run_cfg = saved.replace(
            train=saved.train.replace(steps=run_cfg.train.steps, max_minutes=run_cfg.train.max_minutes)
        )
        split = Split.load(run_dir / "split.json")
        loaded_genes = runs.read_lines(run_dir / "genes.txt")
        vinfo = runs.read_json(run_dir / "vocab.json") or {}
        features = None
        if vinfo.get("features"):
            features = ckpt.read_weights(run_dir / ckpt.FEATURES)[0]["features"].numpy()
        vocab = PerturbationVocab(
            control=vinfo.get("control", split.control),
            names=tuple(runs.read_lines(run_dir / "perturbations.txt")),
            combo_sep=vinfo.get("combo_sep", run_cfg.spec.combo_sep),
            features=features,
        )
        batches = runs.read_lines(run_dir / "batches.txt")
        data = make_train_data(
            adata,
            split,
            set_size=run_cfg.model.set_size,
            seed=run_cfg.train.seed,
            genes=loaded_genes,
            vocab=vocab,
            batches=batches,
        )
    else:
        if writer:
            runs.write_status(
                run_dir,
                state="queued",
                step=0,
                total=run_cfg.train.steps,
                pid=os.getpid(),
                started=runs.now_iso(),
            )
        split = make_split(adata, run_cfg.split)  # seeded: the same split on every rank
        data = make_train_data(
            adata,
            split,
            set_size=run_cfg.model.set_size,
            seed=run_cfg.train.seed,
            pert_features=pert_features,
        )
        model_cfg = run_cfg.model.replace(
            num_genes=len(data.genes),
            perturbation_dim=data.vocab.dim,
            n_batches=len(data.batches) if len(data.batches) > 1 else 0,
        )
        run_cfg = run_cfg.replace(model=model_cfg)
        if writer:
            split.save(run_dir / "split.json")
            ckpt.write_vocab_files(
                run_dir, genes=data.genes, vocab=data.vocab, contexts=data.contexts, batches=data.batches
            )
    if run_cfg.track == "embedding":  # Track B: sets of SE embeddings + a gene decoder to data.genes
        data, run_cfg = embedding_track.to_embedding_data(adata, data, run_cfg)
    prior = None
    fresh = not (run_dir / ckpt.LAST).exists()  # a resumed run loads its prior tables with the weights
    if run_cfg.model.shift_prior and run_cfg.model.decoder_dim == 0 and fresh:
        prior = _shift_prior_tables(adata, data, split)
        run_cfg = run_cfg.replace(
            model=run_cfg.model.replace(n_contexts=len(data.contexts), n_prior_pairs=len(prior[2]))
        )
    if writer:
        runs.atomic_write_json(run_dir / "config.json", run_cfg.to_dict())
    torch.manual_seed(run_cfg.train.seed)  # initial weights from the seed, not from the process's RNG history
    model = StateTransitionModel(run_cfg.model)
    if prior is not None:
        model.pert_shift.copy_(torch.from_numpy(prior[0]))
        if model.pair_index is not None:
            model.pair_index.copy_(torch.from_numpy(prior[1]))
            model.pair_shift.copy_(torch.from_numpy(prior[2]))
    if run_cfg.track == "embedding" and not (run_dir / ckpt.LAST).exists():  # a resumed run loads its decoder
        embedding_track.warm_up_decoder(model, data.train, seed=run_cfg.train.seed)
    return fit(
        model,
        data,
        run_cfg.train,
        run_dir=run_dir,
        loss=run_cfg.model.loss,
        hook=hook,
        meta=_vocab_meta(data, split),
    )
