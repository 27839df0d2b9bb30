"""Square crops and the rudi augmentation recipe, without Dagster."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from histo_assets.core.augment import (
    AugmentationSettings,
    CaptionModeError,
    apply_recipe,
    augment_class,
    write_augmented_crops,
    write_captions,
)
from histo_assets.core.crops import CropSettings, TileSettings, crop_class, tissue_mask, write_square_crops
from histo_assets.core.holdout import SplitSettings
from histo_assets.core.io import sha256_file, stable_hash
from histo_assets.core.schemas import HELD_OUT_CROPS
from histo_assets.core.slides import UnusableClassError
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import augmentation_recipe, augmentation_settings, crop_settings
from histo_assets_tests.conftest import tissue_image
from histo_assets_tests.test_slides import write_pyramid

PARAMS = yaml.safe_load(DEFAULT_PARAMS_FILE.read_text())
RECIPE = augmentation_recipe(load_params(DEFAULT_PARAMS_FILE))


def settings(mode: str, resolution: int = 32, policy: str = "skip", **tiles) -> CropSettings:
    """Small limits and Pillow's default PNG compression; tiles as in params.yaml but for the test's changes."""
    tile = TileSettings(**(PARAMS["crops"]["tiles"] | {"tile_size": 64} | tiles)) if mode == "tiles" else None
    return CropSettings(mode, resolution, policy, 10_000_000, 1 << 30, tile, png_compress_level=-1)


def augmentation(**changes) -> AugmentationSettings:
    """params.yaml's augmentation with a test's changes, e.g. total=5."""
    overrides = [f"augmentation.{key}={value}" for key, value in changes.items()]
    return augmentation_settings(load_params(DEFAULT_PARAMS_FILE, overrides))


def source(tmp_path: Path, name: str, image: Image.Image) -> tuple[str, str]:
    path = tmp_path / name
    image.save(path)
    return name, sha256_file(path)


def test_center_crop_is_the_centred_square_resized(tmp_path):
    image = tissue_image((300, 200), seed=1)
    records, problems = crop_class([source(tmp_path, "wide.png", image)], tmp_path, tmp_path / "out", settings("center", 100))
    assert problems == []
    (record,) = records
    assert (record.x, record.y, record.size, record.level) == (50, 0, 200, 0)
    assert record.crop_file.startswith("wide_") and "_L0_x50_y0_s200" in record.crop_file
    crop = Image.open(tmp_path / "out" / record.crop_file)
    assert crop.size == (100, 100) and crop.mode == "RGB"
    expected = image.crop((50, 0, 250, 200)).resize((100, 100), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(crop), np.asarray(expected))


def test_small_image_is_skipped_or_upscaled_as_params_say(tmp_path):
    small = source(tmp_path, "small.png", tissue_image((40, 40), seed=2))
    records, problems = crop_class([small], tmp_path, tmp_path / "skip", settings("center", 64))
    assert records == [] and "smaller than the crop size" in problems[0].reason
    records, problems = crop_class([small], tmp_path, tmp_path / "up", settings("center", 64, policy="upscale"))
    assert problems == [] and Image.open(tmp_path / "up" / records[0].crop_file).size == (64, 64)


def test_tissue_mask_separates_stain_from_glass():
    mask = tissue_mask(tissue_image((200, 100), seed=3, tissue=0.5))
    assert mask[:, :90].mean() > 0.9 and mask[:, 110:].mean() < 0.05


def test_tiles_cover_tissue_only_with_coordinates_in_names(tmp_path):
    image = tissue_image((256, 128), seed=4, tissue=0.5)
    records, _ = crop_class([source(tmp_path, "half.png", image)], tmp_path, tmp_path / "out", settings("tiles"))
    assert sorted((r.x, r.y) for r in records) == [(0, 0), (0, 64), (64, 0), (64, 64)]
    assert all(r.tissue_fraction >= 0.5 and f"_x{r.x}_y{r.y}_s64" in r.crop_file for r in records)
    again, _ = crop_class([source(tmp_path, "half.png", image)], tmp_path, tmp_path / "again", settings("tiles"))
    assert [(r.crop_file, r.crop_sha256) for r in again] == [(r.crop_file, r.crop_sha256) for r in records]


def test_tiles_cap_keeps_most_tissue(tmp_path):
    image = tissue_image((256, 64), seed=5, tissue=0.9)
    records, _ = crop_class(
        [source(tmp_path, "strip.png", image)], tmp_path, tmp_path / "out", settings("tiles", max_tiles_per_image=2, min_tissue_fraction=0.0)
    )
    partial = 192
    assert len(records) == 2 and partial not in {r.x for r in records}


def test_tiles_from_pyramid_by_level_and_by_mpp(tmp_path):
    write_pyramid(tmp_path / "slide.tiff", mpp=0.5)
    rel, sha = "slide.tiff", sha256_file(tmp_path / "slide.tiff")
    by_level, _ = crop_class([(rel, sha)], tmp_path, tmp_path / "level", settings("tiles", level=1))
    assert by_level and all(r.level == 1 and r.size == 128 and r.read_size == 64 for r in by_level)
    by_mpp, _ = crop_class([(rel, sha)], tmp_path, tmp_path / "mpp", settings("tiles", mpp=2.0))
    assert by_mpp and all(r.level == 2 and r.size == 256 and r.read_size == 64 for r in by_mpp)


def test_mpp_tiles_need_an_mpp(tmp_path):
    records, problems = crop_class([source(tmp_path, "plain.png", tissue_image((256, 256), seed=6))], tmp_path, tmp_path / "o", settings("tiles", mpp=1.0))
    assert records == [] and "no mpp" in problems[0].reason


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


def test_crop_settings_read_the_crops_and_ingest_sections():
    crops, ingest = PARAMS["crops"], PARAMS["ingest"]
    settings = crop_settings(load_params(DEFAULT_PARAMS_FILE, ["resolution=64"]))
    assert (settings.mode, settings.resolution, settings.small_image_policy) == (crops["mode"], 64, crops["small_image_policy"])
    assert (settings.max_image_pixels, settings.max_file_bytes) == (ingest["max_image_pixels"], ingest["max_file_bytes"])
    assert settings.tiles == TileSettings(**crops["tiles"]) and settings.png_compress_level == crops["png_compress_level"]


def test_square_crops_are_written_with_index_preview_and_summary(tmp_path):
    sources = [source(tmp_path, "wide.png", tissue_image((300, 200), seed=1)),
               source(tmp_path, "small.png", tissue_image((40, 40), seed=2))]
    warnings = []
    summary = write_square_crops(tmp_path / "out", sources, tmp_path, settings("center", 64), tissue_class="alpha",
                                 warn=warnings.append)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert list(index["source_path"]) == ["wide.png"] and (tmp_path / "out" / "preview.png").is_file()
    assert summary["count"] == 1 and [p["path"] for p in summary["problems"]] == ["small.png"]
    assert summary["data_version"] == stable_hash([(index["crop_file"].iloc[0], index["crop_sha256"].iloc[0])])
    assert len(warnings) == 1 and warnings[0].startswith("skipped small.png: ")


def test_a_class_that_gives_no_crop_is_refused_with_its_skipped_files(tmp_path):
    small = source(tmp_path, "small.png", tissue_image((40, 40), seed=2))
    with pytest.raises(UnusableClassError, match=r"class 'alpha': no crop could be cut from its 1 slide\(s\)") as refused:
        write_square_crops(tmp_path / "out", [small], tmp_path, settings("center", 64), tissue_class="alpha")
    assert [p.path for p in refused.value.problems] == ["small.png"]


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
