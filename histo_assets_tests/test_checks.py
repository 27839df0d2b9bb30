"""checks.py: the image checks a partition's run reports, on a real folder of PNGs."""

import shutil

import dagster as dg
from PIL import Image

from histo_assets.checks import CHECKPOINTS_LOAD, DECODE, ENOUGH, SIZE_MODE, UNIQUE, checkpoint_check_result
from histo_assets.checks import image_check_results, image_check_specs
from histo_assets_tests.conftest import tissue_image

RESOLUTION = 32


def results(folder, minimum):
    return {result.check_name: result for result in image_check_results("square_crops", folder, RESOLUTION, minimum)}


def test_a_good_folder_passes_every_check(tmp_path):
    for index in range(3):
        tissue_image((RESOLUTION, RESOLUTION), seed=index).save(tmp_path / f"{index}.png")
    checks = results(tmp_path, minimum=3)
    assert all(result.passed for result in checks.values())
    assert checks[ENOUGH].metadata["count"].value == 3


def test_each_fault_fails_its_own_check_and_names_the_file(tmp_path):
    tissue_image((RESOLUTION, RESOLUTION), seed=1).save(tmp_path / "good.png")
    shutil.copy(tmp_path / "good.png", tmp_path / "copy.png")
    tissue_image((RESOLUTION + 1, RESOLUTION), seed=2).save(tmp_path / "wide.png")
    Image.new("L", (RESOLUTION, RESOLUTION)).save(tmp_path / "grey.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    checks = results(tmp_path, minimum=10)
    assert not checks[ENOUGH].passed and checks[ENOUGH].metadata["minimum"].value == 10
    assert not checks[DECODE].passed and "cut.png" in checks[DECODE].metadata["examples"].value
    assert not checks[SIZE_MODE].passed
    assert "wide.png" in checks[SIZE_MODE].metadata["wrong_size"].value
    assert "grey.png" in checks[SIZE_MODE].metadata["wrong_mode"].value
    assert not checks[UNIQUE].passed and checks[UNIQUE].severity == dg.AssetCheckSeverity.WARN


def test_only_the_duplicate_check_is_non_blocking():
    blocking = {spec.name: spec.blocking for spec in image_check_specs("square_crops")}
    assert blocking == {ENOUGH: True, DECODE: True, SIZE_MODE: True, UNIQUE: False}


def test_the_checkpoint_check_fails_naming_a_step_never_written_and_a_file_gone_from_disk(tmp_path):
    result = checkpoint_check_result(tmp_path, [{"step": 5, "file": "a-5.pt", "sha256": "0" * 64}], [5, 10])
    assert (result.asset_key, result.check_name, result.passed) == (CHECKPOINTS_LOAD.asset_key, CHECKPOINTS_LOAD.name, False)
    assert result.metadata["problems"].value == "missing steps [10]; a-5.pt: missing or changed on disk"
    assert result.metadata["checkpoints"].value == 1
