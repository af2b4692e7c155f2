"""CPU training: how many intra-op threads torch uses during a stage (`cpu_threads` in a recipe).

torch starts one thread per core, and the DataLoader's worker processes run on the same cores. For
a small model whose step is mostly short ops, a busy worker stalls every parallel op at its
barrier and fewer threads are faster; for convolutions over images more threads still win
(measured on the demo: docs/training.md, "Demo speed"). So it is a per-stage choice; the default
leaves torch's setting as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


@contextmanager
def stage_cpu_threads(threads: int | None, device: torch.device) -> Iterator[int]:
    """torch uses `threads` intra-op threads inside the block on a CPU device (None: unchanged)."""
    before = torch.get_num_threads()
    wanted = before if threads is None or device.type != "cpu" else int(threads)
    if wanted != before:
        log.info("CPU training: %d torch threads in this stage (was %d)", wanted, before)
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if wanted != before:
            torch.set_num_threads(before)
