"""Data parallelism under ``torchrun``: the process group and the few collectives the pipeline uses.

``steerplug collect`` and ``steerplug train`` call :func:`setup` unconditionally. Started by
``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it joins the process group once, with
``nccl`` when the work runs on CUDA and ``gloo`` on the CPU; started as one plain process it
returns a :class:`Dist` of world size 1 whose collectives do nothing, so the single-process path
pays nothing and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


def env_world_size() -> int:
    """The world size ``torchrun`` set in the environment (1 when not under ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world_size``, working on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` over all ranks in place (``sum`` or ``max``) and return it."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with rank ``src``'s ``t``."""
        if self.active:
            import torch.distributed as dist

            dist.broadcast(t, src)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out



def setup(device: str | torch.device | None = None) -> Dist:
    """Join the process group ``torchrun`` describes, once; return this process's :class:`Dist`.

    ``device``: where the work runs. None: ``cuda:LOCAL_RANK`` under ``torchrun`` when CUDA is
    available, else the CPU. The backend follows it: ``nccl`` for CUDA, ``gloo`` for the CPU.
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if world == 1:
        return Dist(0, 1, device)
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


SINGLE = Dist()
"""The single-process :class:`Dist` on the CPU (no collectives)."""
