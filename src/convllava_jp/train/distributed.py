"""The launcher's processes: rank and world size, the process group, barriers.

Under `torchrun` / `accelerate launch` every process runs the same code; these helpers are the
only places that ask which process this is or make the processes wait for each other. Without a
launcher they answer "rank 0 of 1" and do nothing.
"""

from __future__ import annotations

import os

import torch


def env_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun / accelerate launch set both)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether a process group is up (several processes train together)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if is_distributed():
        torch.distributed.barrier()


def init_process_group() -> None:
    """Start the launcher's process group early (accelerate's, which the Trainer then reuses)."""
    if is_distributed():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
