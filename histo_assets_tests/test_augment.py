"""core/augment.py: the rudi augmentation recipe, captions and the held-out crops it leaves alone, without Dagster."""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from histo_assets.core.augment import (
    AugmentationSettings,
    CaptionModeError,
    apply_recipe,
    augment_class,
    write_augmented_crops,
    write_captions,
)
from histo_assets.core.holdout import SplitSettings
from histo_assets.core.io import sha256_file, stable_hash
from histo_assets.core.schemas import HELD_OUT_CROPS
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import augmentation_recipe, augmentation_settings
from histo_assets_tests.conftest import tissue_image


RECIPE = augmentation_recipe(load_params(DEFAULT_PARAMS_FILE))


def augmentation(**changes) -> AugmentationSettings:
    """params.yaml's augmentation with a test's changes, e.g. total=5."""
    overrides = [f"augmentation.{key}={value}" for key, value in changes.items()]
    return augmentation_settings(load_params(DEFAULT_PARAMS_FILE, overrides))


@pytest.fixture
def crops(tmp_path) -> list[tuple[Path, str]]:
    folder = tmp_path / "crops"
    folder.mkdir()
    out = []
    for index in range(3):
        path = folder / f"crop{index}.png"
        tissue_image((48, 48), seed=index, tissue=1.0).save(path)
        out.append((path, sha256_file(path)))
    return out


def run_augmentation(crops, out: Path, workers: int, seed: int = 7):
    return augment_class(crops, out, recipe=RECIPE, total=20, keep_originals=True, seed=seed, workers=workers)


def test_augmentation_is_byte_identical_across_runs_and_worker_counts(crops, tmp_path):
    one = run_augmentation(crops, tmp_path / "one", workers=1)
    two = run_augmentation(crops, tmp_path / "two", workers=2)
    assert [(r.file, r.sha256) for r in one] == [(r.file, r.sha256) for r in two]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert all(sha256_file(tmp_path / "one" / f) == sha256_file(tmp_path / "two" / f) for f in files)
    other = run_augmentation(crops, tmp_path / "other", workers=1, seed=8)
    assert [r.sha256 for r in other] != [r.sha256 for r in one]


def test_augmentation_keeps_originals_names_sources_and_leaves_sources_alone(crops, tmp_path):
    before = sorted(p.name for p in crops[0][0].parent.iterdir())
    records = run_augmentation(crops, tmp_path / "out", workers=1)
    assert sorted(p.name for p in crops[0][0].parent.iterdir()) == before
    frame = pd.DataFrame([r.as_row() for r in records])
    assert (frame["kind"] == "original").sum() == 3 and (frame["kind"] == "augmented").sum() == 20
    augmented = frame[frame["kind"] == "augmented"]
    assert augmented["file"].str.match(r"^aug-\d{5}-crop\d\.png$").all()
    assert set(augmented["source_crop"]) <= {"crop0.png", "crop1.png", "crop2.png"}
    known = {"RotateRange", "Distort", "Skew", "Zoom", "Flip"}
    fired = [op for ops in augmented["operations"] for op in ops.split(",") if op]
    assert set(fired) <= known and len(fired) > 20
    assert all(Image.open(tmp_path / "out" / f).size == (48, 48) for f in frame["file"])


def test_operations_fire_at_augmentors_rounded_rate():
    image = tissue_image((32, 32), seed=1, tissue=1.0)
    fired = [len(apply_recipe(image, RECIPE, seed)[1]) for seed in range(200)]
    rate = sum(fired) / (200 * 5)
    assert 0.68 < rate < 0.82


def test_captions_are_the_class_name_unless_file_names_are_asked_for(tmp_path):
    write_captions(tmp_path, ["a.png", "b.png"], "fibro_adenoma", "class")
    assert [p.read_text() for p in sorted(tmp_path.glob("*.txt"))] == ["fibro adenoma\n"] * 2
    write_captions(tmp_path / "none", ["a.png"], "fibro_adenoma", "filename")
    assert not (tmp_path / "none").exists()
    with pytest.raises(CaptionModeError, match="augmentation.captions must be 'class' or 'filename', not 'words'"):
        write_captions(tmp_path, ["a.png"], "fibro_adenoma", "words")


def test_augmented_crops_leave_the_held_out_crops_alone(crops, tmp_path):
    index = pd.DataFrame({"crop_file": [path.name for path, _ in crops], "crop_sha256": [sha for _, sha in crops],
                          "source_path": [f"slide{i}.png" for i in range(len(crops))],
                          "x": 0, "y": 0, "size": 48})
    split = SplitSettings(holdout_fraction=0.3, group_fraction_tolerance=0.5, guard_tiles=1)
    logs = []
    summary = write_augmented_crops(tmp_path / "out", crops[0][0].parent, index, split_settings=split,
                                    groups={source: source for source in index["source_path"]},
                                    augmentation=augmentation(total=5, workers=1, captions="class"),
                                    tissue_class="alpha", seed=7, log=logs.append)
    held_out = pd.read_parquet(tmp_path / "out" / "holdout.parquet")
    augmented = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert tuple(held_out.columns) == HELD_OUT_CROPS.columns and len(held_out) == summary["held_out_crops"] == 1
    assert not set(held_out["crop_file"]) & set(augmented["source_crop"])
    assert summary["holdout_rule"] == "group" and summary["train_crops"] == 2 and summary["count"] == len(augmented)
    assert summary["data_version"] == stable_hash(sorted(zip(augmented["file"], augmented["sha256"])))
    assert len(list((tmp_path / "out" / "images").glob("*.txt"))) == len(augmented)
    assert any(line.startswith("alpha: group split") for line in logs)
