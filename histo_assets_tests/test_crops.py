"""core/crops.py: centred crops and tissue tiles, in one process and in worker processes (the same bytes; a bad
slide leaves nothing behind), without Dagster."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from PIL import Image

from histo_assets.core.crops import CropSettings, TileSettings, crop_class, tissue_mask, write_square_crops
from histo_assets.core.io import sha256_file, stable_hash
from histo_assets.core.slides import UnusableClassError
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import crop_settings
from histo_assets_tests.conftest import tissue_image, tree_hashes
from histo_assets_tests.test_slides import write_pyramid


PARAMS = yaml.safe_load(DEFAULT_PARAMS_FILE.read_text())


def settings(mode: str, resolution: int = 32, policy: str = "skip", **tiles) -> CropSettings:
    """Small limits and Pillow's default PNG compression; tiles as in params.yaml but for the test's changes."""
    tile = TileSettings(**(PARAMS["crops"]["tiles"] | {"tile_size": 64} | tiles)) if mode == "tiles" else None
    return CropSettings(mode, resolution, policy, 10_000_000, 1 << 30, tile, png_compress_level=-1)


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


TILE = 256


def write_deflate_pyramid(path: Path, size: tuple[int, int], seed: int) -> None:
    """A deflate-compressed three-level pyramid, tiled as scanners write them, so each tile decodes on its own."""
    base = np.asarray(tissue_image(size, seed=seed))
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(TILE, TILE), subifds=2, compression="zlib", photometric="rgb")
        for step in (2, 4):
            tif.write(base[::step, ::step], tile=(TILE, TILE), subfiletype=1, compression="zlib", photometric="rgb")


def corrupt_tile(path: Path, level: int, tile: int) -> None:
    """Overwrite one compressed tile of ``level`` with bytes no deflate decoder accepts."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0] if level == 0 else tif.pages[0].pages[level - 1]
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x55" * count)


@pytest.fixture
def sources(tmp_path) -> list[tuple[str, str]]:
    """A pyramid 2560 px wide (its tissue mask comes from level 1) and a plain PNG."""
    write_deflate_pyramid(tmp_path / "slide.tiff", (2560, 1536), seed=11)
    tissue_image((700, 500), seed=12).save(tmp_path / "plain.png")
    return [(name, sha256_file(tmp_path / name)) for name in ("plain.png", "slide.tiff")]


def pyramid_settings(mode: str = "tiles", level: int = 1) -> CropSettings:
    tiles = TileSettings(tile_size=128, level=0, mpp=None, stride=None, min_tissue_fraction=0.5, max_tiles_per_image=None)
    return CropSettings(mode, 32, "skip", 10_000_000, 1 << 30, tiles, png_compress_level=level)


def cut(sources, root: Path, out: Path, workers: int, crop_settings: CropSettings | None = None):
    records, problems = crop_class(sources, root, out, crop_settings or pyramid_settings(), workers=workers)
    return [r.as_row() for r in records], problems


@pytest.mark.parametrize("mode", ["tiles", "center"])
def test_two_workers_write_the_same_files_and_index_as_one(sources, tmp_path, mode):
    one = cut(sources, tmp_path, tmp_path / "one", workers=1, crop_settings=pyramid_settings(mode))
    two = cut(sources, tmp_path, tmp_path / "two", workers=2, crop_settings=pyramid_settings(mode))
    assert one == two and one[1] == []
    rows = one[0]
    assert {row["source_path"] for row in rows} == {"plain.png", "slide.tiff"}
    if mode == "tiles":
        assert sum(row["source_path"] == "slide.tiff" for row in rows) > 16, "the pyramid is split over several tasks"
    hashes = tree_hashes(tmp_path / "one")
    assert hashes == tree_hashes(tmp_path / "two")
    assert sorted(hashes) == sorted(row["crop_file"] for row in rows)
    assert all(hashes[row["crop_file"]] == row["crop_sha256"] for row in rows)


def test_compress_level_changes_bytes_not_pixels(sources, tmp_path):
    fast, _ = cut(sources, tmp_path, tmp_path / "fast", workers=1, crop_settings=pyramid_settings(level=1))
    small, _ = cut(sources, tmp_path, tmp_path / "small", workers=1, crop_settings=pyramid_settings(level=9))
    assert [r["crop_file"] for r in fast] == [r["crop_file"] for r in small]
    assert all(a["crop_sha256"] != b["crop_sha256"] for a, b in zip(fast, small))
    for row in fast:
        pixels = [np.asarray(Image.open(tmp_path / folder / row["crop_file"])) for folder in ("fast", "small")]
        assert np.array_equal(*pixels)
    with pytest.raises(ValueError, match="png_compress_level"):
        pyramid_settings(level=10)


@pytest.mark.parametrize(
    "level, tile, step",
    [
        (0, 5 * 10 + 3, "cutting"),  # last tile row of level 0: the slide's first windows are already written
        (1, 0, "planning"),  # level 1 is where the tissue mask is read
    ],
)
def test_corrupt_tile_skips_its_slide_with_the_reason_and_no_crop_of_it(sources, tmp_path, level, tile, step):
    corrupt_tile(tmp_path / "slide.tiff", level, tile)
    sources = [(rel, sha256_file(tmp_path / rel)) for rel, _ in sources]
    results = {workers: cut(sources, tmp_path, tmp_path / f"out{workers}", workers) for workers in (1, 2)}
    assert results[1] == results[2]
    rows, problems = results[1]
    ((path, reason),) = [(p.path, p.reason) for p in problems]
    assert path == "slide.tiff" and "corrupt pyramid: reading" in reason and f"at level {level}" in reason, (step, reason)
    assert rows and {row["source_path"] for row in rows} == {"plain.png"}
    for workers in (1, 2):
        left = sorted(p.name for p in (tmp_path / f"out{workers}").iterdir())
        assert left == sorted(row["crop_file"] for row in rows), "no crop of the bad slide, no temporary file"
