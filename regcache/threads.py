"""torch's intra-op threads for CPU runs: the idle cores this process may use, less its data loader workers.

torch starts one OpenMP thread per core. On a machine whose cores are busy with other work each
parallel region waits for its slowest thread, which the scheduler keeps off the CPU: on a loaded
2-core machine the demo ran 41 minutes with 2 threads and 6 with one. So unless the user chose
(``OMP_NUM_THREADS``, an explicit option), a run takes

    threads = max(1, (cores - int(load) - processes * workers) // processes)

with ``cores`` the CPUs this process may run on (affinity and cgroup quota), ``load`` the
1-minute load average (other work already running) and ``workers`` each process's data loader
workers (each a process of its own, one thread: torch sets that in every worker).
"""

from __future__ import annotations

import logging
import math
import os

import torch

__all__ = ["available_cores", "choose_threads", "configure_threads"]

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_threads(workers: int = 0, processes: int = 1) -> int:
    """Intra-op threads per process: the idle cores shared by ``processes``, less their loader workers, at least 1."""
    cores = available_cores()
    try:
        busy = int(os.getloadavg()[0])
    except OSError:  # no load average on this system
        busy = 0
    idle = min(cores, max(0, cores - busy))
    return max(1, (idle - processes * max(0, workers)) // max(1, processes))


def configure_threads(workers: int = 0, processes: int = 1, explicit: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads by :func:`choose_threads` unless ``explicit`` or ``OMP_NUM_THREADS`` chose.

    Returns the thread count in use and what decided it.
    """
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"threads must be >= 1, got {explicit}")
        torch.set_num_threads(explicit)
        return explicit, "explicit option"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"  # torch already read it at start-up
    threads = choose_threads(workers, processes)
    torch.set_num_threads(threads)
    log.info(
        "torch threads: %d (%d cores, load %.1f, %d loader workers x %d processes; set OMP_NUM_THREADS to choose)",
        threads,
        available_cores(),
        os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        workers,
        processes,
    )
    return threads, "idle cores"
