"""Peak resident memory of a process, as the benchmarks report it.

`VmHWM` from /proc (Linux) is the peak of the process's own address space. `ru_maxrss` is not,
for a child started by fork/vfork + exec: the kernel carries the parent's peak across the exec, so
a small child of a large parent reports the parent's size (bench_reference's inference child
read 1701 MB that way against its own 1406).
"""

from __future__ import annotations

import resource
from pathlib import Path


def _status_mb(pid: int | str, field: str) -> float | None:
    """A kB field of /proc/PID/status in MiB; None where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set of process `pid` (default: this one), MiB; ru_maxrss where /proc is missing
    (then only for this process), NaN for another process."""
    peak = _status_mb(pid, "VmHWM")
    if peak is not None:
        return peak
    if pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux units: KiB
    return float("nan")


def current_rss_mb() -> float:
    """This process's resident set now, MiB (the peak so far where /proc is missing)."""
    now = _status_mb("self", "VmRSS")
    return peak_rss_mb() if now is None else now
