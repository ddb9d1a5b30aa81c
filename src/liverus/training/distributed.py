"""torchrun / DDP plumbing, and a batch sampler whose global batches do not depend on the world size.

``torchrun --nproc_per_node N`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init_distributed` reads
them and starts NCCL on GPUs or gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "init_distributed",
    "ShardedBatchSampler",
    "gather_objects",
    "broadcast_object",
    "barrier",
    "is_main_process",
    "unwrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``); otherwise a single process.

    Args:
        device_type: ``"cuda"`` selects NCCL (and the local GPU), anything else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    """All ranks' ``obj`` in rank order (just ``[obj]`` without DDP)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's share of each global batch, as ``(index, epoch)`` pairs.

    ``torch.utils.data.DistributedSampler`` shards the whole epoch (rank r takes every N-th index), so the global
    batches of an N-process run differ from those of a single process. Here one seeded permutation per epoch is cut
    into global batches first and each batch is then split across ranks, so a run on N processes with per-rank batch
    B/N performs exactly the optimisation steps of one process with batch B. The epoch travels with each index so
    that loader workers seed augmentation correctly without being told about epochs.

    Args:
        n: dataset size.
        batch_size: global batch size (divisible by ``world_size``).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: this process and the number of processes.
        shuffle: permute each epoch (training) or keep the order (evaluation).
        drop_last: drop the last incomplete global batch (training, so every step has the same size).
        weights: optional per-sample weights for class-balanced sampling with replacement.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        weights: Sequence[float] | None = None,
    ) -> None:
        if batch_size % world_size != 0:
            raise ValueError(f"global batch size {batch_size} must be divisible by the world size {world_size}")
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        if self.shuffle:
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                break
            mine = batch[self.rank :: self.world_size]
            if mine:
                yield [(i, self.epoch) for i in mine]

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest > self.rank else 0)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and ``torch.compile`` wrappers (whose state dict keys carry no wrapper prefix)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def is_main_process() -> bool:
    """True outside DDP and on rank 0: the process that writes files and talks to the user."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
