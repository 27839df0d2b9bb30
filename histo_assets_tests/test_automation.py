"""The raw-slide sensor and the weekly schedule request exactly the partitions they should."""

import datetime
import json

import dagster as dg

from histo_assets.definitions import defs, ingest_job, raw_slides_sensor, weekly_refresh
from histo_assets.core.object_store import ObjectStore
from histo_assets.resources import ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import THESIS_CLASSES, tissue_image


def evaluate(params_file, cursor=None, store_url=None):
    resources = {"params": ParamsResource(params_file=str(params_file)), "object_store": ObjectStoreResource(url=store_url)}
    context = dg.build_sensor_context(cursor=cursor, resources=resources)
    result = raw_slides_sensor(context)
    requests = [] if isinstance(result, dg.SkipReason) else result
    return requests, context.cursor


def test_sensor_requests_only_the_classes_whose_slides_changed(small_params, small_dataset):
    first, cursor = evaluate(small_params)
    assert first == [] and set(json.loads(cursor)) == set(THESIS_CLASSES), "switching the sensor on starts nothing"
    unchanged, cursor = evaluate(small_params, cursor)
    assert unchanged == []
    changed_class = THESIS_CLASSES[1]
    tissue_image((128, 128), seed=99).save(small_dataset / "raw" / changed_class / "new-slide.png")
    second, cursor = evaluate(small_params, cursor)
    assert [r.partition_key for r in second] == [changed_class]
    assert second[0].run_key.startswith(changed_class)
    (small_dataset / "raw" / changed_class / "new-slide.png").unlink()
    removed, _ = evaluate(small_params, cursor)
    assert [r.partition_key for r in removed] == [changed_class]


def test_with_an_object_store_the_sensor_watches_what_the_lab_pushed_there(small_params, small_dataset, tmp_path):
    url = f"file://{tmp_path / 'bucket'}"
    store = ObjectStore(url)
    for name in THESIS_CLASSES:
        store.push(small_dataset / "raw" / name, f"raw/{name}")
    first, cursor = evaluate(small_params, store_url=url)
    assert first == [], "the first tick records what the lab pushed"
    changed_class = THESIS_CLASSES[2]
    tissue_image((128, 128), seed=98).save(small_dataset / "raw" / changed_class / "new-slide.png")
    unpushed, cursor = evaluate(small_params, cursor, store_url=url)
    assert unpushed == [], "a file only on this machine is not what the cluster will read"
    store.push(small_dataset / "raw" / changed_class, f"raw/{changed_class}")
    pushed, _ = evaluate(small_params, cursor, store_url=url)
    assert [r.partition_key for r in pushed] == [changed_class]


def test_weekly_schedule_refreshes_every_class_once_per_week(small_params):
    when = datetime.datetime(2026, 11, 23, 3, 0, tzinfo=datetime.timezone.utc)
    context = dg.build_schedule_context(scheduled_execution_time=when, resources={"params": ParamsResource(params_file=str(small_params))})
    requests = weekly_refresh(context)
    assert sorted(r.partition_key for r in requests) == sorted(THESIS_CLASSES)
    assert all(r.run_key.startswith("weekly-2026-11-23-") for r in requests)
    assert weekly_refresh.cron_schedule == "0 3 * * 1"


def test_sensor_and_schedule_target_ingest_and_downstream_assets_follow():
    assert raw_slides_sensor.job_name == ingest_job.name == weekly_refresh.job_name
    graph = defs.resolve_asset_graph()
    followers = [key.path[-1] for key in graph.get_all_asset_keys() if graph.get(key).automation_condition is not None]
    assert set(followers) >= {"square_crops", "augmented_crops", "hypernetwork_checkpoints", "synthetic_images",
                              "checkpoint_metrics", "metrics_summary", "dataset_release"}


def test_the_automation_condition_sensor_ships_running_over_every_asset():
    """The README's "the rest of the graph follows in `dagster dev`" holds out of the box."""
    sensors = {sensor.name: sensor for sensor in defs.sensors}
    sensor = sensors["default_automation_condition_sensor"]
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert sensor.asset_selection.resolve(graph) == graph.get_all_asset_keys()
