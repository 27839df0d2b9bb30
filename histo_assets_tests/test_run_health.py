"""Faults: a run killed with SIGKILL hands back its `gpu` pool slot, and the commands stop on SIGTERM.

Real `histo-assets materialize` processes train the tiny pipeline in copies of
the session's pipeline; they are killed the way an OOM kill or a power loss
ends a process (SIGKILL to the whole process group), or stopped the way
`timeout`, systemd or Kubernetes stop one (SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from histo_assets.params import PROJECT_ROOT
from histo_assets.run_health import dead_run_sensor, holding_pools
from histo_assets_tests.tiny_pipeline import FIRST, Pipeline, run_ok

POOL = "gpu"
# Long enough to be killed after its first checkpoint, short enough for a test.
CHECKPOINT_STEPS = [30, 90, 150]
TRAINING = ["--job", "training_pipeline", "--partition", FIRST,
            "--set", f"training.max_steps={CHECKPOINT_STEPS[-1]}", "--set", f"training.checkpoint_steps={CHECKPOINT_STEPS}"]
LONG_TRAINING = ["--job", "training_pipeline", "--partition", FIRST,
                 "--set", "training.max_steps=3000", "--set", "training.checkpoint_steps=[1500, 3000]"]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slot_holders(work: Pipeline) -> set[str]:
    with work.instance() as instance:
        return instance.event_log_storage.get_concurrency_info(POOL).active_run_ids


def training_runs(work: Pipeline) -> list[dg.DagsterRun]:
    with work.instance() as instance:
        return list(instance.get_runs(dg.RunsFilter(job_name="training_pipeline")))


def failure_message(work: Pipeline, run_id: str) -> str:
    with work.instance() as instance:
        events = instance.all_logs(run_id, of_type={dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED})
        return " ".join(event.message or "" for event in events)


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def fresh(pipeline, tmp_path) -> Callable[[str], Pipeline]:
    """Copies of the session's pipeline whose training history is forgotten, so training starts afresh."""
    def copy(name: str) -> Pipeline:
        return pipeline.copy(tmp_path / name)

    return copy


def test_a_sigkilled_training_run_frees_the_pool_and_the_next_run_resumes_to_identical_weights(fresh, tmp_path):
    reference = fresh("reference")
    run_ok(reference.materialize(*TRAINING))
    final = Path("hypernetwork_checkpoints") / FIRST / f"{FIRST}.pt"

    work = fresh("killed")
    checkpoints = work.data / "hypernetwork_checkpoints" / FIRST
    process = work.popen(*TRAINING, output=tmp_path / "killed.log")
    first = CHECKPOINT_STEPS[0]
    wait_for(lambda: (checkpoints / f"{FIRST}-{first}.pt.optim").is_file(), 300, "the first checkpoint and its sidecar")
    kill_group(process)
    assert not (checkpoints / f"{FIRST}-{CHECKPOINT_STEPS[-1]}.pt").is_file(), "the run was killed before it finished"
    # Resume takes the latest checkpoint whose optimizer sidecar was written too (a kill may fall between them).
    resumable = max(step for step in CHECKPOINT_STEPS[:-1] if (checkpoints / f"{FIRST}-{step}.pt.optim").is_file())

    (dead,) = [run for run in training_runs(work) if run.status == dg.DagsterRunStatus.STARTED]
    assert slot_holders(work) == {dead.run_id}, "the dead run still holds the gpu slot"

    # In `dagster dev`, the daemon's sensor finds it.
    with work.instance() as instance:
        reason = dead_run_sensor(dg.build_sensor_context(instance=instance))
        assert dead.run_id in reason.skip_message
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
    assert slot_holders(work) == set()
    assert "none of its processes" in failure_message(work, dead.run_id)

    started = time.monotonic()
    output = run_ok(work.materialize(*TRAINING))
    assert time.monotonic() - started < 120
    assert f"resuming {FIRST} from {FIRST}-{resumable}.pt at step {resumable - 1}" in output
    assert (work.data / final).read_bytes() == (reference.data / final).read_bytes()
    for step in CHECKPOINT_STEPS:
        name = Path("hypernetwork_checkpoints") / FIRST / f"{FIRST}-{step}.pt"
        assert (work.data / name).read_bytes() == (reference.data / name).read_bytes(), step


@contextlib.contextmanager
def holder_and_waiter(work: Pipeline, logs: Path) -> Iterator[tuple[subprocess.Popen, subprocess.Popen, str, Path]]:
    """A long training run holding the gpu slot and a second one waiting for it; both killed at the end."""
    holder = work.popen(*LONG_TRAINING, output=logs / "holder.log")
    started = [holder]
    try:
        wait_for(lambda: len(slot_holders(work)) == 1, 300, "the first run to claim the gpu slot")
        (holding,) = slot_holders(work)
        waiter_log = logs / "waiter.log"
        started.append(work.popen(*LONG_TRAINING, output=waiter_log))
        wait_for(lambda: "waiting for a free slot" in waiter_log.read_text(), 120, "the second run to wait")
        yield holder, started[1], holding, waiter_log
    finally:
        for process in started:
            if process.poll() is None:
                kill_group(process)


def test_a_waiting_run_sleeps_takes_over_from_a_killed_one_and_stops_on_sigterm(fresh, tmp_path):
    work = fresh("contended")
    with holder_and_waiter(work, tmp_path) as (holder, waiter, holding, waiter_log):
        before = cpu_seconds(waiter.pid)
        time.sleep(4)
        assert cpu_seconds(waiter.pid) - before < 0.4, "waiting for a slot must not spin"

        kill_group(holder)
        took_over = wait_for(lambda: slot_holders(work) - {holding}, 60, "the waiting run to take the slot")
        assert took_over < 60
        assert "none of its processes" in failure_message(work, holding)
        (taking,) = slot_holders(work)

        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(timeout=60) == 143
        assert slot_holders(work) == set()
        with work.instance() as instance:
            assert instance.get_run_by_id(taking).status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE)
        assert "stopped by SIGTERM" in waiter_log.read_text()


def test_materialize_stops_on_sigterm_while_waiting_for_a_slot(fresh, tmp_path):
    work = fresh("waiting")
    with holder_and_waiter(work, tmp_path) as (_, waiter, holding, waiter_log):
        runs_before = {run.run_id for run in training_runs(work)}
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(timeout=30) == 143
        assert "stopped by SIGTERM" in waiter_log.read_text()
        assert {run.run_id for run in training_runs(work)} == runs_before, "a run stopped while waiting never started"
        assert slot_holders(work) == {holding}, "the running one keeps its slot"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> set[int]:
    parents = {int(entry.name): fields[1] for entry in Path("/proc").iterdir()
               if entry.name.isdigit() and (fields := _stat(int(entry.name)))}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if int(parent) in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (fields := _stat(pid)) and fields[0] != "Z"}


def start_ui(env: dict[str, str], port: int) -> subprocess.Popen:
    """`histo-assets ui` as a non-interactive shell starts a background job: SIGINT ignored, which dagster dev inherits."""
    ui = subprocess.Popen([sys.executable, "-m", "histo_assets.cli", "ui", "--port", str(port)], env=env,
                          cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: answers(port), 180, "the Dagster UI to answer")
    except BaseException:
        kill_group(ui)
        raise
    return ui


def answers(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_ui_stops_on_sigterm_with_all_its_children(tmp_path):
    port = free_port()
    ui = start_ui(os.environ | {"DAGSTER_HOME": str(tmp_path / "home")}, port)
    try:
        children = descendants(ui.pid)
        assert len(children) >= 3, "dagster dev, its webserver, daemon and code server run"
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 143
        wait_for(lambda: not alive(children), 30, "every child of the UI to exit")
        assert not answers(port)
    finally:
        if ui.poll() is None:
            kill_group(ui)


def test_the_daemon_of_dagster_dev_marks_a_killed_run_failed_and_frees_its_slot(fresh, tmp_path):
    work = fresh("daemon")
    ui = start_ui(work.environment(), free_port())
    try:
        holder = work.popen(*LONG_TRAINING, output=tmp_path / "holder.log")
        wait_for(lambda: len(slot_holders(work)) == 1, 300, "the run to claim the gpu slot")
        (dead,) = slot_holders(work)
        kill_group(holder)
        took = wait_for(lambda: not slot_holders(work), 60, "the daemon's dead_run_reaper sensor")
        print(f"the daemon freed the dead run's slot {took:.1f} s after the kill")
        with work.instance() as instance:
            assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
        assert "none of its processes" in failure_message(work, dead)
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)


def test_a_second_run_on_this_machine_waits_for_the_pool_lock_and_a_killed_holder_releases_it(tmp_path):
    messages, entered = [], threading.Event()

    def second_run() -> None:
        with holding_pools(tmp_path, ["gpu"], log=messages.append):
            entered.set()

    with holding_pools(tmp_path, ["gpu"], log=messages.append):
        waiter = threading.Thread(target=second_run)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set()
    waiter.join(timeout=10)
    assert entered.is_set() and messages == ["waiting for another run on this machine to release pool gpu"]

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from histo_assets.run_health import holding_pools\n"
        "with holding_pools(Path(sys.argv[1]), ['gpu']):\n    print('held', flush=True); time.sleep(600)"
    ), str(tmp_path)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=10)
    messages.clear()
    with holding_pools(tmp_path, ["gpu"], log=messages.append):
        assert messages == []
