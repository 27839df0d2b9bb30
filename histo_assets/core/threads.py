"""How many CPU threads one compute step gives torch, so steps running side by side share the cores.

torch sizes its intra-op pool to every core it can see, and each OpenMP thread spins while it
waits for the others. A Dagster host runs several steps at once, each with such a pool, so the
threads outnumber the cores and spin against each other: on the 2-core development VM the tiny
model's training loop fell to a fraction of its idle speed next to two busy processes, and held up
with one thread per step (benchmarks/thread_contention.py, figures in benchmarks/README.md).
The policy divides the cores a process may really use among the steps allowed to run at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Read once, when each runtime loads; torch's setters reach the pools only after import.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs the cgroup v2 quota allows, at least 1; None without a quota.

    A container sees every host core in its affinity mask but is throttled to its quota, so
    threads beyond the quota only wait. Rounded down, because a thread over a part-core would be
    throttled in every period.
    """
    try:
        quota, period = cpu_max.read_text().split()
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its affinity mask (taskset, cpusets), capped by the cgroup quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    return cores if limit is None else min(cores, limit)


def threads_per_step(cores: int, concurrent_steps: int | None = None) -> int:
    """An equal share of the cores for each step that may run at once, at least 1.

    Unknown concurrency is taken as one step per core, what Dagster's multiprocess executor
    allows by default (its max_concurrent defaults to the core count).
    """
    return max(1, cores // (concurrent_steps or cores))


def environment_threads() -> int | None:
    """An operator's thread count from the environment (the first level of OMP_NUM_THREADS="4,2").

    torch read it at import; the policy's own default must not undo it afterwards.
    """
    for name in THREAD_ENV_VARS:
        value = os.environ.get(name, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def thread_count(threads: int | None = None, concurrent_steps: int | None = None, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """An explicit setting wins, then the environment; otherwise this process's share of the cores it may use."""
    return threads or environment_threads() or threads_per_step(available_cores(cpu_max), concurrent_steps)


def apply_threads(threads: int) -> None:
    """Size the BLAS/OpenMP pools of this process, whether or not torch is imported yet.

    Before torch is imported, the environment is the only way in; variables already set are the
    operator's and stay. Afterwards only torch's setters reach the pools.
    torch sizes its inter-op pool once per process, so a second call leaves it as the first set it.
    """
    if "torch" not in sys.modules:
        for name in THREAD_ENV_VARS:
            os.environ.setdefault(name, str(threads))
        return
    import torch

    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already sized, or inter-op work has started: torch refuses a change
            pass
