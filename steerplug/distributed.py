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

    def all_reduce_many_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each of ``tensors`` over all ranks in place: one all-reduce each, all in flight at
        once (no flat copy: on 2 CPU processes that copy cost as much as a third of the reduction)."""
        if self.active:
            import torch.distributed as dist

            for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
                work.wait()
        return tensors

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with rank ``src``'s ``t``."""
        if self.active:
            import torch.distributed as dist

            dist.broadcast(t, src)
        return t

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the rows of ``x`` (all of it in one process)."""
        return x.tensor_split(self.world_size)[self.rank] if self.active else x

    def all_gather_rows(self, t: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Every rank's share of a ``(n_rows, ...)`` tensor split as :meth:`share` splits it, put back
        together in rank order (the rows of one process). ``t``: this rank's rows."""
        if not self.active:
            return t
        import torch.distributed as dist

        sizes = [len(r) for r in torch.arange(n_rows).tensor_split(self.world_size)]
        if t.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {t.shape[0]} rows; its share of {n_rows} is {sizes[self.rank]}.")
        if t.shape[0] < sizes[0]:  # shares differ by at most one row: pad to the largest
            t = torch.cat([t, t.new_zeros((sizes[0] - t.shape[0], *t.shape[1:]))])
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat([o[:n] for o, n in zip(out, sizes)])

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
