"""Multi-process training helpers: process-group setup from torchrun's environment, and agreement.

``torchrun --nproc_per_node=N -m statecore train ...`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; :func:`session` turns them into a process group (NCCL when the run is
on CUDA, gloo on CPU) and tears it down again. ``statecore.training.engine.fit`` asks :func:`current` which
rank it is; with one process every helper here is a no-op, so single-process code needs no branch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from statecore.errors import StatecoreError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank layout from the torchrun / SLURM-launched environment (single process when unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise StatecoreError(
            f"bad distributed environment ({exc}); RANK, LOCAL_RANK and WORLD_SIZE must be "
            "integers (set by torchrun)"
        ) from exc
    if world < 1 or not 0 <= rank < world:
        raise StatecoreError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def current() -> DistInfo:
    """The running process group's layout, or a single process when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(
            rank=rank,
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", str(rank))),
        )
    return DistInfo()


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(device: torch.device | str = "cpu") -> DistInfo:
    """Initialise the default process group from the environment when WORLD_SIZE > 1.

    Returns the layout; a single process (or an already initialised group) is left as it is.
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return current() if dist.is_initialized() else info
    if not dist.is_available():
        raise StatecoreError("WORLD_SIZE>1 but this torch build has no torch.distributed support")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise StatecoreError(
                f"WORLD_SIZE={info.world_size} but {key} is not set; launch with torchrun "
                "(it sets MASTER_ADDR/MASTER_PORT) or export them"
            )
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Without this barrier a rank that finishes first can close its gloo pairs while a peer still
        # reads from them, which aborts the peer ("terminate called without an active exception").
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[DistInfo]:
    """``with session(device) as info:`` a process group for the block when launched multi-process."""
    owned = not (dist.is_available() and dist.is_initialized())
    info = setup(device)
    try:
        yield info
    finally:
        if owned:
            teardown()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (stop requests, time budgets)."""
    if not current().enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_scalar(value: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (the logged loss is the whole global batch's loss)."""
    if not current().enabled:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def same_on_all(value: int) -> bool:
    """True when every rank passed the same integer (e.g. the step it resumes from)."""
    if not current().enabled:
        return True
    t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item() == -t[1].item())


def mean_values(values: torch.Tensor) -> list[float]:
    """Element-wise mean of a 1-d tensor over ranks, as floats: one collective for many logged steps."""
    t = values.detach().to(torch.float64).reshape(-1)
    if not current().enabled:
        return t.cpu().tolist()
    t = t.to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).cpu().tolist()
