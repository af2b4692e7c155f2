"""One thread computes with all of torch's intra-op threads; the server's other threads use one.

torch's CPU ops run on OpenMP, which keeps a team of worker threads per thread that ever ran a
parallel op, for as long as that thread lives. Once the process holds more such workers than the
machine has cores, GNU OpenMP stops spinning between parallel regions and puts its workers to
sleep after each one, so every op of the engine pays a wake-up: on 2 cores a decode step of the
`small` model took 45-50 ms instead of 34-39 while a second live thread (one that had loaded the
model, or prepared one request's image) held a team (docs/benchmarks-infer.md).

So in a server: the model is loaded in a thread that then ends (its team goes with it), the
batcher's engine thread computes with the configured thread count, and the threads that only
prepare requests (HTTP handlers, the web UI's, the prefill worker) run torch on one thread, which
forms no team.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def set_intra_op_threads(threads: int) -> None:
    """From now on torch runs this thread's ops on `threads` intra-op threads.

    Also sets the count threads take when they first run a parallel op (torch keeps one global),
    so a thread meant to compute in parallel sets its own count when it starts (the batcher's
    engine and `stream`'s thread do).
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def one_intra_op_thread() -> None:
    """From now on torch runs this thread's ops without an OpenMP team."""
    set_intra_op_threads(1)


def call_in_passing_thread(fn: Callable[[], T], name: str = "loader") -> T:
    """`fn()` run in a thread that ends when it returns; its result, or its exception re-raised.

    For loading a model in a process whose main thread then serves: the OpenMP workers the
    loading started end with the thread instead of lingering beside the engine's.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the caller, KeyboardInterrupt included
            outcome["error"] = err

    thread = threading.Thread(target=target, name=name, daemon=True)  # Ctrl-C need not wait for it
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
