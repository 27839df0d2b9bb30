"""Real Dagster materialisations of slide_inventory -> square_crops -> augmented_crops on a temp dataset."""

import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from histo_assets.params import PROJECT_ROOT, load_params
from histo_assets.resources import ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import THESIS_CLASSES, assets_by_name, tissue_image, tree_hashes

ASSETS = ["slide_inventory", "square_crops", "augmented_crops"]
FIRST, SECOND, THIRD = THESIS_CLASSES


def materialize(params_file: Path, partition: str, instance=None, overrides: list[str] | None = None):
    run_config = {"ops": {name: {"config": load_params(params_file, overrides or []).nested_overrides(overrides or [])} for name in ASSETS}}
    available = assets_by_name(load_params(params_file))
    return dg.materialize(
        [available[name] for name in ASSETS],
        partition_key=partition,
        resources={"params": ParamsResource(params_file=str(params_file)), "object_store": ObjectStoreResource()},
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config=run_config,
        raise_on_error=False,
    )


def check_results(result) -> dict[tuple[str, str], bool]:
    return {(e.asset_key.path[-1], e.check_name): e.passed for e in result.get_asset_check_evaluations()}


def test_three_assets_materialise_with_indexes_previews_and_passing_checks(small_params, small_dataset):
    result = materialize(small_params, FIRST)
    assert result.success
    checks = check_results(result)
    assert len(checks) == 8 and all(checks.values()), checks
    inventory = pd.read_parquet(small_dataset / "slide_inventory" / FIRST / "inventory.parquet")
    assert list(inventory["path"]) == [f"raw/{FIRST}/slide0.png", f"raw/{FIRST}/slide1.png"]
    crops = pd.read_parquet(small_dataset / "square_crops" / FIRST / "index.parquet")
    assert set(crops["source_sha256"]) == set(inventory["sha256"])
    assert {"crop_file", "source_sha256", "level", "x", "y", "size", "tissue_fraction"} <= set(crops.columns)
    augmented = pd.read_parquet(small_dataset / "augmented_crops" / FIRST / "index.parquet")
    holdout = pd.read_parquet(small_dataset / "augmented_crops" / FIRST / "holdout.parquet")
    assert len(holdout) >= 1 and not set(holdout["crop_file"]) & set(augmented["source_crop"])
    assert (augmented["kind"] == "augmented").sum() == 12
    assert (small_dataset / "augmented_crops" / FIRST / "preview.png").is_file()
    metadata = result.asset_materializations_for_node("augmented_crops")[0].metadata
    assert metadata["preview"].value.startswith("![")
    assert not list((small_dataset / "raw" / FIRST).glob("*output*"))


def test_rerun_recomputes_nothing_and_gives_identical_bytes(small_params, small_dataset):
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(small_params, FIRST, instance).success
    before = {stage: tree_hashes(small_dataset / stage / FIRST) for stage in ("square_crops", "augmented_crops")}
    mtimes = {p: p.stat().st_mtime_ns for p in (small_dataset / "augmented_crops" / FIRST).rglob("*.png")}
    second = materialize(small_params, FIRST, instance)
    assert second.success
    for node in ("square_crops", "augmented_crops"):
        assert second.asset_materializations_for_node(node)[0].metadata["reused_unchanged_output"].value is True
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    shutil.rmtree(small_dataset / "square_crops")
    shutil.rmtree(small_dataset / "augmented_crops")
    assert materialize(small_params, FIRST, instance).success
    after = {stage: tree_hashes(small_dataset / stage / FIRST) for stage in ("square_crops", "augmented_crops")}
    assert after == before


def test_run_config_overrides_params(small_params, small_dataset):
    assert materialize(small_params, FIRST, overrides=["augmentation.total=9"]).success
    augmented = pd.read_parquet(small_dataset / "augmented_crops" / FIRST / "index.parquet")
    assert (augmented["kind"] == "augmented").sum() == 9


def test_bad_files_are_skipped_and_reported_without_failing_the_class(small_params, small_dataset):
    folder = small_dataset / "raw" / FIRST
    (folder / "empty.png").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"\x00not a jpeg")
    (folder / "notes.txt").write_text("scanner log")
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(small_params, FIRST, instance)
    assert result.success
    skipped = result.asset_materializations_for_node("slide_inventory")[0].metadata["skipped"].value
    assert "empty.png" in skipped and "zero-byte" in skipped and "junk.jpg" in skipped and "notes.txt" in skipped
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("skipped" in m and "empty.png" in m and "zero-byte" in m for m in logs)


def test_empty_class_fails_only_its_own_partition_with_its_name(small_params, small_dataset):
    for path in (small_dataset / "raw" / SECOND).iterdir():
        path.unlink()
    failed = materialize(small_params, SECOND)
    assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert SECOND in failure.step_failure_data.error.message
    assert not (small_dataset / "square_crops" / SECOND).exists()
    assert materialize(small_params, THIRD).success


def test_unknown_class_folder_is_reported(small_params, small_dataset):
    (small_dataset / "raw" / "mystery").mkdir()
    tissue_image((64, 64), seed=1).save(small_dataset / "raw" / "mystery" / "a.png")
    result = materialize(small_params, FIRST)
    assert result.success
    metadata = result.asset_materializations_for_node("slide_inventory")[0].metadata
    assert metadata["unknown_class_folders"].value == "mystery"


def test_too_few_crops_fails_the_blocking_check_and_keeps_training_inputs_safe(small_params, small_dataset):
    result = materialize(small_params, FIRST, overrides=["checks.min_square_crops=1000"])
    checks = check_results(result)
    assert checks[("square_crops", "enough_images")] is False
    assert ("augmented_crops", "enough_images") not in checks
    assert not (small_dataset / "augmented_crops" / FIRST).exists()


def test_failed_stage_leaves_no_partial_output(small_params, small_dataset):
    assert materialize(small_params, FIRST).success
    before = tree_hashes(small_dataset / "square_crops" / FIRST)
    for path in (small_dataset / "raw" / FIRST).iterdir():
        path.write_bytes(b"")
    assert not materialize(small_params, FIRST).success
    assert tree_hashes(small_dataset / "square_crops" / FIRST) == before
    leftovers = [p.name for p in (small_dataset / "square_crops").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("params_name", ["params.yaml", "params.demo.yaml"])
def test_dagster_definitions_validate(params_name, tmp_path):
    env = {"HISTO_ASSETS_PARAMS": str(PROJECT_ROOT / params_name), "DAGSTER_HOME": str(tmp_path), "PATH": str(PROJECT_ROOT / ".venv" / "bin")}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = shutil.which("dagster", path=env["PATH"]) or "dagster"
    out = subprocess.run([dagster, "definitions", "validate", "-m", "histo_assets.definitions"], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Validation successful" in out.stderr + out.stdout
