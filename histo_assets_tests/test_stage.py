"""The check a launcher makes before starting a run: would it only confirm that every stage reuses its output?"""

import os

import dagster as dg
import pytest

from histo_assets.assets import evaluation, generation, ingest
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.layout import Layout
from histo_assets.core.stage import read_summary
from histo_assets.definitions import STAGES
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.partitions import Partitions
from histo_assets.stage import Part, launch_reason, stage_asset
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import THESIS_CLASSES
from histo_assets_tests.test_assets_ingest import ASSETS, materialize

FIRST, SECOND, _ = THESIS_CLASSES


def reason(instance, params_file, partition, overrides=()):
    return launch_reason(instance, STAGES, ASSETS, load_params(params_file, list(overrides)), partition,
                         BaseModelResource())


def unchanged(instance, params_file, partition, overrides=()):
    return reason(instance, params_file, partition, overrides) is None


def instance() -> dg.DagsterInstance:
    """Entered, so that Dagster's definitions loading finds this instance's state storage, whatever ran before."""
    return dg.DagsterInstance.ephemeral()


def test_a_partition_is_unchanged_only_when_its_folders_and_dagsters_record_both_are(small_params, small_dataset):
    with instance() as recorded:
        assert not unchanged(recorded, small_params, FIRST), "nothing built yet"
        assert materialize(small_params, FIRST, recorded).success
        assert unchanged(recorded, small_params, FIRST)
        assert not unchanged(recorded, small_params, SECOND), "another class was never built"
        assert not unchanged(recorded, small_params, FIRST, ["augmentation.total=9"]), "a changed param"
        assert reason(recorded, small_params, FIRST, ["augmentation.total=9"]) == \
            "augmented_crops: its inputs, params or code changed, or it was never built"
    with instance() as other:
        assert reason(other, small_params, FIRST) == \
            "slide_inventory: built, but this Dagster instance has no record of it", "as after a dvc pull"


def test_a_rewritten_raw_file_relaunches_its_class_and_the_run_keeps_its_data_version(small_params, small_dataset):
    with instance() as recorded:
        assert materialize(small_params, FIRST, recorded).success
        inventory = read_summary(small_dataset / "slide_inventory" / FIRST)
        assert inventory["fingerprint"] != inventory["data_version"], "names, sizes and times, not content, decide reuse"
        slide = sorted((small_dataset / "raw" / FIRST).iterdir())[0]
        slide.write_bytes(slide.read_bytes())
        os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 10**9))
        assert not unchanged(recorded, small_params, FIRST)

        result = materialize(small_params, FIRST, recorded)
        assert result.success
        rebuilt = read_summary(small_dataset / "slide_inventory" / FIRST)
        assert rebuilt["fingerprint"] != inventory["fingerprint"] and rebuilt["data_version"] == inventory["data_version"]
        reused = {node: result.asset_materializations_for_node(node)[0].metadata["reused_unchanged_output"].value
                  for node in ("square_crops", "augmented_crops")}
        assert reused == {"square_crops": True, "augmented_crops": True}
        assert unchanged(recorded, small_params, FIRST)


def test_a_partition_whose_last_run_failed_is_relaunched(small_params, small_dataset):
    with instance() as recorded:
        assert materialize(small_params, FIRST, recorded).success
        # The blocking check fails, so the run fails after square_crops was materialised and reused.
        assert not materialize(small_params, FIRST, recorded, ["checks.min_square_crops=1000"]).success
        assert reason(recorded, small_params, FIRST, ["checks.min_square_crops=1000"]) == \
            "slide_inventory: its last run did not succeed"


def test_a_stage_writes_its_own_folder_and_reads_the_named_ones_for_its_partition_or_for_every_class_and_step():
    p = load_params(DEFAULT_PARAMS_FILE)
    at, part = Layout(p.data_dir), Part(p.classes[0], p.steps[1])
    metrics = STAGES["checkpoint_metrics"]
    assert metrics.output(at, part) == at.checkpoint_metrics(part.tissue_class, part.step)
    assert metrics.read_folders(p, part) == [at.synthetic_images(part.tissue_class, part.step),
                                             at.augmented_crops(part.tissue_class), at.square_crops(part.tissue_class)]
    across = STAGES["metrics_summary"].read_folders(p, Part())
    expected = {folder for c in p.classes for folder in (at.square_crops(c), at.augmented_crops(c))} | {
        folder for c in p.classes for step in p.steps for folder in (at.synthetic_images(c, step), at.checkpoint_metrics(c, step))}
    assert len(across) == len(expected) and set(across) == expected, "each folder once"


def test_an_asset_is_built_from_its_declaration():
    p = load_params(DEFAULT_PARAMS_FILE)
    partitions = Partitions.from_params(p)
    crops = ingest.square_crops.build(p, partitions)
    spec = crops.specs_by_key[dg.AssetKey("square_crops")]
    assert (spec.group_name, spec.code_version) == ("ingest", ingest.square_crops.spec.code_version)
    assert spec.description.split() == ingest.square_crops.recipe.__doc__.split()
    assert crops.partitions_def == partitions.tissue_class
    assert crops.required_resource_keys - {"io_manager"} == {"params", "object_store"}
    utility = evaluation.classifier_utility.build(p, partitions)
    assert utility.partitions_def is None
    assert utility.required_resource_keys - {"io_manager"} == {"params", "object_store", "base_model"}
    assert utility.node_def.compute_fn.decorated_fn.__module__ == "histo_assets.assets.evaluation", "where its code is"
    checked = {spec.name: spec.blocking for spec in crops.check_specs}
    assert checked == {"enough_images": True, "images_decode": True, "size_and_rgb_mode": True, "no_duplicate_images": False}
    assert len(list(generation.synthetic_images.build(p, partitions).check_specs)) == 4
    assert not list(utility.check_specs), "only stages declaring min_images check their images"


class UnusableThingError(HistoAssetsError):
    pass


@stage_asset()
def refusing(stage):
    raise UnusableThingError("thing.png is unusable: it is empty")


@stage_asset()
def failing(stage):
    return {}["bug"]


def test_a_project_error_fails_the_run_with_its_message_and_a_bug_keeps_its_traceback(small_params):
    p = load_params(small_params)
    resources = {"params": ParamsResource(params_file=str(small_params)), "object_store": ObjectStoreResource()}
    for declared in (refusing, failing):
        with instance() as recorded:
            result = dg.materialize([declared.build(p, Partitions.from_params(p))], resources=resources,
                                    instance=recorded, raise_on_error=False)
        assert not result.success
        error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
        if declared is refusing:
            assert (error.cls_name, error.message.strip()) == ("Failure", "dagster._core.definitions.events.Failure: "
                                                                           "thing.png is unusable: it is empty")
            assert error.cause.cls_name == "UnusableThingError", "the refusal stays attached"
        else:
            assert error.cls_name == "DagsterExecutionStepExecutionError" and error.cause.cls_name == "KeyError"


def test_a_declaration_missing_what_a_stage_needs_is_refused_when_the_module_loads():
    with pytest.raises(TypeError, match="needs its summary schema and its code version"):
        stage_asset(inputs=lambda p, part, base_model: {}, code_version="1")
    with pytest.raises(TypeError, match="partitioned='class': expected one of tissue_class, class_and_step"):
        stage_asset(partitioned="class")
