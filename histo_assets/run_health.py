"""Runs whose process died hand back what they held, and waiting for a pool costs no CPU.

A run ended by SIGKILL, an OOM kill, a pod eviction or a power loss never
reports its end, so the Dagster instance keeps it STARTED and keeps its
``gpu`` pool slot claimed: every later training and generation step would
wait for it forever. Dagster's run monitoring only notices dead workers for
run launchers that can check them (Kubernetes, Docker, ECS), not for local
processes, so for runs on this machine the check is done here: a run is dead
when no process it recorded (Dagster records each worker's pid in an engine
event) is still alive. Dead runs are marked failed, with the reason, and
their slots freed.

Two callers: ``histo-assets materialize``, before each run and while it waits
for a pool, and :data:`dead_run_sensor` in the daemon of ``dagster dev``.
Waiting happens here, asleep, rather than in Dagster's step executor, whose
slot-claim loop spins at full CPU while a pool is full.

Dagster claims a pool's slots step by step, inside a run, so two launchers
that both found a slot free can both start; a CI run under load once saw two
such runs train at once. On one machine :func:`holding_pools` closes that
gap with a lock file per pool, held for the whole run; the kernel releases
it when the holder's process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import dagster as dg
from dagster._core.launcher import DefaultRunLauncher

from histo_assets.core.io import Log

# Tag naming the machine a `histo-assets materialize` run executes on; its processes are only checked there.
HOST_TAG = "histo-assets/host"
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
POOL_POLL_SECONDS = 2.0
REAPER_INTERVAL_SECONDS = 20
# A pid counts as the run's process only if that process is not younger than the event recording it.
_START_TIME_SLACK_SECONDS = 2.0


def this_host() -> str:
    return socket.gethostname()


@functools.cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or None if there is no such process."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie has finished; only its parent has not collected it
        return None
    ticks_since_boot = int(fields[19])
    return _boot_time() + ticks_since_boot / os.sysconf("SC_CLK_TCK")


def _is_alive(pid: int, recorded_at: float) -> bool:
    started = process_start_time(pid)
    return started is not None and started <= recorded_at + _START_TIME_SLACK_SECONDS


def recorded_processes(instance: dg.DagsterInstance, run_id: str) -> list[tuple[int, float]]:
    """(pid, when it was recorded) for every process the run's engine events name."""
    processes = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = data.metadata.get("pid") if data is not None else None
        if pid is not None and str(pid.value).isdigit():
            processes.append((int(pid.value), entry.timestamp))
    return processes


def _runs_on_this_machine(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Our own runs say where they run; otherwise only a local run launcher's runs are local processes."""
    if HOST_TAG in run.tags:
        return run.tags[HOST_TAG] == this_host()
    return isinstance(instance.run_launcher, DefaultRunLauncher)


def reap_dead_runs(instance: dg.DagsterInstance, log: Log = print) -> list[str]:
    """Mark this machine's in-progress runs with no living process failed, and free every finished run's slots."""
    reaped = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        if not _runs_on_this_machine(instance, run):
            continue  # not ours to judge
        processes = recorded_processes(instance, run.run_id)
        if not processes:
            continue  # not started yet
        if any(_is_alive(pid, recorded_at) for pid, recorded_at in processes):
            continue
        pids = ", ".join(sorted({str(pid) for pid, _ in processes}))
        message = (f"run {run.run_id} ({run.job_name}) died: none of its processes (pid {pids}) on {this_host()} is "
                   "alive, so it was killed (SIGKILL, out of memory, eviction) or its machine stopped. Marked failed "
                   "by histo-assets and its pool slots freed; rerun it to resume from its last checkpoint.")
        instance.report_run_failed(run, message)
        reaped.append(run.run_id)
        log(message)
    if instance.event_log_storage.supports_global_concurrency_limits:
        holders = instance.event_log_storage.get_concurrency_run_ids()
        if holders:
            finished = instance.get_run_records(dg.RunsFilter(run_ids=list(holders)))
            for record in finished:
                if record.dagster_run.is_finished:
                    instance.event_log_storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return reaped


def full_pools(instance: dg.DagsterInstance, pools: Iterable[str]) -> dict[str, set[str]]:
    """The pools among ``pools`` with no free slot, each with the runs holding its slots."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    full = {}
    for pool in pools:
        info = storage.get_concurrency_info(pool)
        limit = info.slot_count if info.slot_count else info.limit
        if limit is not None and info.active_slot_count >= limit:
            full[pool] = info.active_run_ids
    return full


def wait_for_pools(instance: dg.DagsterInstance, pools: Iterable[str], log: Log = print,
                   poll_seconds: float = POOL_POLL_SECONDS) -> None:
    """Sleep until every pool in ``pools`` has a free slot, reaping dead runs on each poll."""
    pools = sorted(set(pools))
    announced: dict[str, set[str]] = {}
    while True:
        reap_dead_runs(instance, log)
        full = full_pools(instance, pools)
        if not full:
            return
        if full != announced:
            held = "; ".join(f"pool {pool} held by run {', '.join(sorted(runs)) or '?'}" for pool, runs in full.items())
            log(f"waiting for a free slot: {held}")
            announced = full
        time.sleep(poll_seconds)


@contextlib.contextmanager
def holding_pools(lock_dir: Path, pools: Iterable[str], log: Log = print) -> Iterator[None]:
    """Hold this machine's lock for each pool while the body runs; wait, asleep, while another run holds one."""
    with contextlib.ExitStack() as held:
        for pool in sorted(set(pools)):
            handle = held.enter_context((lock_dir / f"pool-{pool}.lock").open("a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"waiting for another run on this machine to release pool {pool}")
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def end_interrupted_run(instance: dg.DagsterInstance, run_id: str, reason: str) -> None:
    """After an interrupt, make sure the run is not left in progress and holds no slot."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceled(run, reason)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


@dg.sensor(
    name="dead_run_reaper",
    minimum_interval_seconds=REAPER_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks runs on this machine whose processes died (SIGKILL, out of memory, power loss) failed and "
    "frees their pool slots, so the next training or generation run is not blocked forever. Starts no runs.",
)
def dead_run_sensor(context: dg.SensorEvaluationContext):
    reaped = reap_dead_runs(context.instance, context.log.info)
    return dg.SkipReason(f"marked {len(reaped)} dead run(s) failed: {', '.join(reaped)}" if reaped
                         else "no dead runs")
