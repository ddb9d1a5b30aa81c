"""The runtime of a training process: device, precision, memory format and its place in a DDP job."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liverus.engine.runtime import precision_name, resolve_channels_last, resolve_device, resolve_precision
from liverus.training.config import RuntimeConfig
from liverus.training.distributed import DistInfo, init_distributed

__all__ = ["Runtime"]


@dataclass(frozen=True)
class Runtime:
    """Where this process trains.

    Attributes:
        device: the torch device of this rank.
        amp: the autocast dtype, or ``None`` for fp32.
        channels_last: whether inputs and weights use the channels-last memory format.
        dist: rank and world size (world size 1 outside torchrun).
    """

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    dist: DistInfo

    @classmethod
    def from_config(cls, rc: RuntimeConfig) -> Runtime:
        """Resolve ``auto`` settings for this machine and join the DDP job when torchrun started one."""
        cuda = rc.device.startswith("cuda") or (rc.device == "auto" and torch.cuda.is_available())
        dist = init_distributed("cuda" if cuda else "cpu")
        device = resolve_device(rc.device, dist.local_rank if dist.enabled else None)
        if rc.threads:
            torch.set_num_threads(rc.threads)
        amp = resolve_precision(rc.precision, device)
        return cls(device, amp, resolve_channels_last(rc.channels_last, device, amp), dist)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def precision(self) -> str:
        return precision_name(self.amp)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)
