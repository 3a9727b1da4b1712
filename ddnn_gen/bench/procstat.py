"""A process's CPU time, memory and page faults, for the benchmarks and the tests.

CPU time and resident memory come from psutil. psutil (7.2) exposes neither a process's minor page-fault
count nor its peak resident size, which the server's allocator test and the load bench need, so those two
are read from Linux's /proc/<pid>/stat and /proc/<pid>/status here.
"""

from __future__ import annotations

from pathlib import Path

import psutil


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of all the process's threads so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def minor_faults(pid: int) -> int:
    """Minor page faults of the process so far (field 10 of /proc/<pid>/stat)."""
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), 0 when the kernel does not report it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
