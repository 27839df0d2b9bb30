"""definitions.py: the pipeline's assets, jobs, automation and resources built from a params file."""

import datetime
import shutil

import dagster as dg
import pytest

from histo_assets.core.base_model import folder_weights_sha256, tiny_model_dir
from histo_assets.core.layout import Layout
from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.core.schemas import BaseModelSummary
from histo_assets.core.stage import read_summary
from histo_assets.definitions import STAGES, build_definitions, defs, pipeline_jobs
from histo_assets.params import DEFAULT_PARAMS_FILE, PROJECT_ROOT, load_params
from histo_assets.resources import BaseModelResource, DvcResource, ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import SMALL, TINY_MODEL_SEED, write_params

JOB_ASSETS = {
    "ingest_pipeline": {"slide_inventory", "square_crops", "augmented_crops"},
    "base_model_pipeline": {"base_model"},
    "training_pipeline": {"hypernetwork_checkpoints", "imported_hypernetwork_index", "imported_synthetic_images"},
    "checkpoint_pipeline": {"synthetic_images", "checkpoint_metrics"},
    "summary_pipeline": {"metrics_summary", "classifier_utility"},
    "release_pipeline": {"dataset_release"},
}


def selected(job: dg.JobDefinition) -> set[str]:
    return {key.to_user_string() for key in job.asset_layer.selected_asset_keys}


def class_and_step_keys(job: dg.JobDefinition) -> set[tuple[str, str]]:
    return {(key.keys_by_dimension["tissue_class"], key.keys_by_dimension["step"])
            for key in job.partitions_def.get_partition_keys()}


def every_class_and_step(p) -> set[tuple[str, str]]:
    """Every class with step 0 and each checkpoint step of the params."""
    return {(c, str(s)) for c in p.classes for s in (0, *p["training"]["checkpoint_steps"])}


def test_the_project_and_demo_params_files_give_their_own_pipelines_in_one_process():
    """Each Definitions takes its classes and steps (step 0 too) from its own file, and its runs read that file."""
    for path in (DEFAULT_PARAMS_FILE, PROJECT_ROOT / "params.demo.yaml"):
        p = load_params(path)
        built = build_definitions(p)
        assert built.resolve_job_def("ingest_pipeline").partitions_def.get_partition_keys() == p.classes
        assert built.resolve_assets_def("hypernetwork_checkpoints").partitions_def.get_partition_keys() == p.classes
        assert class_and_step_keys(built.resolve_job_def("checkpoint_pipeline")) == every_class_and_step(p)
        assert built.resources["params"].params_file == str(path)
    assert load_params(DEFAULT_PARAMS_FILE).classes != load_params(PROJECT_ROOT / "params.demo.yaml").classes


def test_every_pipeline_job_resolves_to_its_assets_and_partitions(small_params):
    p = load_params(small_params)
    built = build_definitions(p)
    assert [job.name for job in pipeline_jobs] == list(JOB_ASSETS)
    for name, assets in JOB_ASSETS.items():
        job = built.resolve_job_def(name)
        assert selected(job) == assets, name
    for name in ("ingest_pipeline", "training_pipeline"):
        assert built.resolve_job_def(name).partitions_def.get_partition_keys() == p.classes
    assert class_and_step_keys(built.resolve_job_def("checkpoint_pipeline")) == every_class_and_step(p)
    for name in ("base_model_pipeline", "summary_pipeline", "release_pipeline"):
        assert built.resolve_job_def(name).partitions_def is None, name


def test_every_asset_is_in_exactly_one_job_and_its_upstream_assets_in_the_same_or_an_earlier_one(small_params):
    """`histo-assets materialize` runs the jobs in this order, so no job waits on a later one."""
    graph = build_definitions(load_params(small_params)).resolve_asset_graph()
    job_of = {asset: index for index, assets in enumerate(JOB_ASSETS.values()) for asset in assets}
    all_assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(job_of) == all_assets and sum(map(len, JOB_ASSETS.values())) == len(all_assets)
    for key in graph.get_all_asset_keys():
        for parent in graph.get(key).parent_keys:
            assert job_of[parent.to_user_string()] <= job_of[key.to_user_string()], (parent, key)


def test_every_asset_but_the_release_can_be_checked_for_reuse_before_a_launch(small_params):
    graph = build_definitions(load_params(small_params)).resolve_asset_graph()
    assert set(STAGES) == {key.to_user_string() for key in graph.get_all_asset_keys()} - {"dataset_release"}


def test_the_resources_are_bound_to_the_params_file_and_stay_local_without_a_store_url(small_params, monkeypatch):
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    resources = build_definitions(load_params(small_params)).resources
    assert set(resources) == {"params", "base_model", "dvc", "object_store"}
    assert resources["params"] == ParamsResource(params_file=str(small_params))
    assert resources["base_model"] == BaseModelResource() and resources["dvc"] == DvcResource()
    assert isinstance(resources["object_store"], ObjectStoreResource) and not resources["object_store"].enabled


def test_the_store_url_comes_from_the_environment_unless_a_store_is_given(small_params, tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_URL_ENV, f"file://{tmp_path / 'from-env'}")
    p = load_params(small_params)
    assert build_definitions(p).resources["object_store"].url == f"file://{tmp_path / 'from-env'}"
    given = ObjectStoreResource(url=f"file://{tmp_path / 'given'}")
    assert build_definitions(p, object_store=given).resources["object_store"] is given


def test_a_given_base_model_resource_and_executor_are_what_the_jobs_use(small_params):
    base_model = BaseModelResource(device="cpu", threads=1)
    built = build_definitions(load_params(small_params), base_model=base_model, executor=dg.in_process_executor)
    assert built.resources["base_model"] is base_model
    assert all(built.resolve_job_def(job.name).executor_def is dg.in_process_executor for job in pipeline_jobs)
    assert build_definitions(load_params(small_params)).resolve_job_def("ingest_pipeline").executor_def \
        is not dg.in_process_executor


def test_the_module_defs_are_the_project_params_pipeline_with_its_sensors_and_schedule():
    assert defs.resources["params"].params_file == str(DEFAULT_PARAMS_FILE)
    classes = load_params(DEFAULT_PARAMS_FILE).classes
    assert defs.resolve_job_def("ingest_pipeline").partitions_def.get_partition_keys() == classes
    assert {sensor.name for sensor in defs.sensors} == {"raw_slides_sensor", "default_automation_condition_sensor",
                                                        "dead_run_reaper"}
    assert [schedule.name for schedule in defs.schedules] == ["weekly_refresh"]


def test_the_weekly_schedule_with_the_definitions_resources_refreshes_their_files_classes(tmp_path, small_dataset):
    params_file = write_params(tmp_path, small_dataset, classes=["x_one", "x_two"])
    built = build_definitions(load_params(params_file))
    when = datetime.datetime(2026, 11, 23, 3, 0, tzinfo=datetime.timezone.utc)
    schedule = built.resolve_schedule_def("weekly_refresh")
    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                            resources={"params": built.resources["params"]})
        assert [r.partition_key for r in schedule(context)] == ["x_one", "x_two"]
    assert schedule.job_name == "ingest_pipeline"


@pytest.mark.usefixtures("one_torch_thread")
def test_a_job_of_the_definitions_runs_on_the_data_folder_of_their_params_file(tmp_path, tiny_model_cache):
    data = tmp_path / "data"
    shutil.copytree(tiny_model_cache, data / ".cache" / "tiny_sd")
    params_file = write_params(tmp_path, data, **SMALL)
    built = build_definitions(load_params(params_file), base_model=BaseModelResource(device="cpu", threads=1))
    with dg.DagsterInstance.ephemeral() as instance:
        result = built.resolve_job_def("base_model_pipeline").execute_in_process(instance=instance)
        assert result.success
        summary = read_summary(Layout(data.resolve()).base_model, BaseModelSummary)
        assert summary["source"] == "tiny" and summary["name"] == f"tiny-sd-seed{TINY_MODEL_SEED}"
        assert summary["sha256"] == folder_weights_sha256(tiny_model_dir(tiny_model_cache, TINY_MODEL_SEED)), \
            "the model cached in the data folder was the one loaded"
        shown = result.asset_materializations_for_node("base_model")[0].metadata
        assert shown["sha256"].value == summary["sha256"]
        assert [run.job_name for run in instance.get_runs()] == ["base_model_pipeline"]
