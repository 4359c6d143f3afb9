"""Where this process stands in torch.distributed, for code that runs with or without a process group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from aclip.errors import ConfigError


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Processes that will train: devices per node times nodes (1 for `devices: auto` on CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str):
        if devices == "auto":
            devices = 1
        elif devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        else:
            devices = len([d for d in devices.split(",") if d.strip()])
    elif not isinstance(devices, int):
        devices = len(devices)
    if devices == -1:
        devices = max(1, torch.cuda.device_count())
    return devices * int(trainer_cfg.get("num_nodes", 1))


def per_device_batch_size(batch_size: int, world: int) -> int:
    """The share of the global `data.batch_size` that each of `world` processes trains on."""
    if batch_size % world:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must be divisible by the world size "
            f"{world} (trainer.devices x trainer.num_nodes); use a multiple of {world}"
        )
    return batch_size // world
