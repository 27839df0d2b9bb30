"""Square crops cut by worker processes: the same bytes as one process, and a bad slide leaves nothing behind."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histo_assets.core.crops import CropSettings, TileSettings, crop_class
from histo_assets.core.io import sha256_file
from histo_assets_tests.conftest import tissue_image, tree_hashes

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


def settings(mode: str = "tiles", level: int = 1) -> CropSettings:
    tiles = TileSettings(tile_size=128, level=0, mpp=None, stride=None, min_tissue_fraction=0.5, max_tiles_per_image=None)
    return CropSettings(mode, 32, "skip", 10_000_000, 1 << 30, tiles, png_compress_level=level)


def cut(sources, root: Path, out: Path, workers: int, crop_settings: CropSettings | None = None):
    records, problems = crop_class(sources, root, out, crop_settings or settings(), workers=workers)
    return [r.as_row() for r in records], problems


@pytest.mark.parametrize("mode", ["tiles", "center"])
def test_two_workers_write_the_same_files_and_index_as_one(sources, tmp_path, mode):
    one = cut(sources, tmp_path, tmp_path / "one", workers=1, crop_settings=settings(mode))
    two = cut(sources, tmp_path, tmp_path / "two", workers=2, crop_settings=settings(mode))
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
    fast, _ = cut(sources, tmp_path, tmp_path / "fast", workers=1, crop_settings=settings(level=1))
    small, _ = cut(sources, tmp_path, tmp_path / "small", workers=1, crop_settings=settings(level=9))
    assert [r["crop_file"] for r in fast] == [r["crop_file"] for r in small]
    assert all(a["crop_sha256"] != b["crop_sha256"] for a, b in zip(fast, small))
    for row in fast:
        pixels = [np.asarray(Image.open(tmp_path / folder / row["crop_file"])) for folder in ("fast", "small")]
        assert np.array_equal(*pixels)
    with pytest.raises(ValueError, match="png_compress_level"):
        settings(level=10)


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
