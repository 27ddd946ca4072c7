"""The distributed context of a repa process: rank, world size, local rank, barrier, agreement, broadcast.

One place for what torchrun / ``accelerate launch`` tell a process (env ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) and for the few collectives the stages need, so preprocess, reader and sampler agree on it.
Without a process group every collective is a no-op (world size 1, or ranks launched independently).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared outputs (manifest, lock, summaries)."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """True when a torch.distributed process group connects the ranks (collectives do something)."""
        import torch.distributed as td
        return self.world_size > 1 and td.is_available() and td.is_initialized()

    def barrier(self) -> None:
        if self.grouped:
            import torch.distributed as td
            td.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is True on every rank (stop all ranks together on a setup error)."""
        if not self.grouped:
            return bool(ok)
        import torch
        import torch.distributed as td
        t = torch.tensor([0 if ok else 1], dtype=torch.int64)
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t)
        return int(t.item()) == 0

    def broadcast(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank (a picklable object made by our own code, never user data)."""
        if not self.grouped:
            return obj
        import torch.distributed as td
        box = [obj]
        td.broadcast_object_list(box, src=src)
        return box[0]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun / accelerate "
                         "launch; unset it to run a single process)") from None


def from_env() -> DistContext:
    """The context torchrun / accelerate launch describe in RANK, WORLD_SIZE, LOCAL_RANK (checked)."""
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                         "(need 0 <= RANK < WORLD_SIZE); launch with torchrun or unset them")
    return DistContext(rank, world, local)


def context() -> DistContext:
    """The current context: from the process group if one is running, else from the environment."""
    import torch.distributed as td
    env = from_env()
    if td.is_available() and td.is_initialized():
        return DistContext(td.get_rank(), td.get_world_size(), env.local_rank)
    return env


def init(backend: str | None = None, timeout_s: float = 24 * 3600) -> DistContext:
    """Join the process group the launcher describes (world size > 1), once; returns the context.

    nccl when CUDA is available (each process on cuda:LOCAL_RANK), else gloo. The long default timeout is
    deliberate: ranks of a preprocess run finish their shards hours apart and meet at the final barrier.
    """
    import torch
    import torch.distributed as td
    ctx = from_env()
    if ctx.world_size > 1 and not td.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        td.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return context()
