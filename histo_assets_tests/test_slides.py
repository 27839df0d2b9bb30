"""Reading raw files: every kind of bad input is skipped with a reason, odd modes become RGB."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from histo_assets.core.io import stable_hash
from histo_assets.core.slides import (
    IngestSettings,
    SlideSource,
    UnusableClassError,
    UnusableFileError,
    inventory_class,
    open_source,
    to_rgb8,
    unknown_class_folders,
    write_inventory,
)
from histo_assets_tests.conftest import tissue_image

EXTENSIONS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".svs"]
LIMIT = 10_000_000
INGEST = IngestSettings(extensions=tuple(EXTENSIONS), max_image_pixels=LIMIT, max_file_bytes=1 << 30)


def inventory(folder: Path, root: Path, max_pixels: int = LIMIT):
    return inventory_class(folder, root, EXTENSIONS, max_pixels, 1 << 30)


@pytest.fixture
def class_dir(tmp_path):
    folder = tmp_path / "raw" / "alpha"
    folder.mkdir(parents=True)
    return folder


def test_good_files_are_inventoried_with_hash_and_size(class_dir, tmp_path):
    tissue_image((120, 80), seed=1).save(class_dir / "a.png")
    tissue_image((64, 64), seed=2).save(class_dir / "b.jpg", quality=95)
    records, problems = inventory(class_dir, tmp_path)
    assert problems == []
    assert [(r.path, r.width, r.height, r.levels) for r in records] == [
        ("raw/alpha/a.png", 120, 80, 1),
        ("raw/alpha/b.jpg", 64, 64, 1),
    ]
    assert all(len(r.sha256) == 64 and r.bytes > 0 for r in records)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "zero-byte"),
        ("notes.png", b"this is not an image at all", "not an image"),
        ("readme.txt", b"hello", "not an image file"),
    ],
)
def test_bad_files_are_skipped_with_reason(class_dir, tmp_path, name, content, reason):
    tissue_image((64, 64), seed=3).save(class_dir / "good.png")
    (class_dir / name).write_bytes(content)
    records, problems = inventory(class_dir, tmp_path)
    assert [r.path for r in records] == ["raw/alpha/good.png"]
    assert len(problems) == 1 and problems[0].path.endswith(name)
    assert reason in problems[0].reason


def test_truncated_file_is_skipped(class_dir, tmp_path):
    tissue_image((200, 200), seed=4).save(class_dir / "whole.png")
    data = (class_dir / "whole.png").read_bytes()
    (class_dir / "cut.png").write_bytes(data[: len(data) // 2])
    records, problems = inventory(class_dir, tmp_path)
    assert [r.path for r in records] == ["raw/alpha/whole.png"]
    assert "truncated or corrupt" in problems[0].reason


def test_decompression_bomb_is_refused(class_dir, tmp_path):
    Image.new("RGB", (4000, 4000), "white").save(class_dir / "bomb.png")
    records, problems = inventory(class_dir, tmp_path, max_pixels=1_000_000)
    assert records == []
    assert "pixel limit" in problems[0].reason


def test_symlink_leaving_data_dir_is_refused(class_dir, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    tissue_image((64, 64), seed=5).save(outside)
    (class_dir / "link.png").symlink_to(outside)
    inside = class_dir / "real.png"
    tissue_image((64, 64), seed=6).save(inside)
    (class_dir / "inner-link.png").symlink_to(inside)
    records, problems = inventory(class_dir, tmp_path / "raw")
    assert sorted(r.path for r in records) == ["alpha/inner-link.png", "alpha/real.png"]
    assert "symlink leaves the data directory" in problems[0].reason
    outside.unlink()


def test_subfolders_are_reported_not_read(class_dir, tmp_path):
    (class_dir / "nested").mkdir()
    tissue_image((64, 64), seed=7).save(class_dir / "nested" / "x.png")
    records, problems = inventory(class_dir, tmp_path)
    assert records == []
    assert "sub-folder" in problems[0].reason


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)),
        Image.new("RGBA", (64, 64), (255, 0, 0, 0)),
        Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8)),
        Image.new("CMYK", (64, 64), (0, 255, 0, 0)),
        Image.new("P", (64, 64), 3),
    ],
    ids=["grey", "rgba", "16-bit", "cmyk", "palette"],
)
def test_modes_are_converted_to_8bit_rgb(image):
    converted = to_rgb8(image)
    assert converted.mode == "RGB" and converted.size == image.size
    array = np.asarray(converted)
    assert array.dtype == np.uint8


def test_transparent_pixels_become_white_and_16bit_keeps_its_range():
    assert to_rgb8(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    ramp = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    values = np.asarray(to_rgb8(ramp))[..., 0]
    assert values.min() == 0 and values.max() == 255


def test_16bit_and_cmyk_files_are_inventoried(class_dir, tmp_path):
    Image.fromarray(np.full((64, 64), 3000, dtype=np.uint16)).save(class_dir / "deep.png")
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(class_dir / "print.tif")
    records, problems = inventory(class_dir, tmp_path)
    assert problems == []
    assert sorted(r.mode for r in records) == ["CMYK", "I;16"]
    with open_source(class_dir / "print.tif", tmp_path, LIMIT, 1 << 30) as source:
        assert source.read_region(0, 0, 0, (8, 8)).mode == "RGB"


def write_pyramid(path: Path, mpp: float = 0.5) -> np.ndarray:
    """A tiled three-level pyramidal TIFF with its resolution tag set, as scanners export."""
    base = np.asarray(tissue_image((1024, 768), seed=8))
    levels = [base, base[::2, ::2], base[::4, ::4]]
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(256, 256), subifds=2, resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER", photometric="rgb")
        for level in levels[1:]:
            tif.write(level, tile=(256, 256), subfiletype=1, photometric="rgb")
    return base


def test_pyramidal_tiff_reads_levels_and_mpp(class_dir, tmp_path):
    base = write_pyramid(class_dir / "slide.tiff")
    records, problems = inventory(class_dir, tmp_path)
    assert problems == []
    (record,) = records
    assert (record.width, record.height, record.levels, record.reader) == (1024, 768, 3, "tiffslide")
    assert record.mpp == pytest.approx(0.5)
    with SlideSource(class_dir / "slide.tiff", LIMIT) as source:
        region = np.asarray(source.read_region(256, 128, 0, (64, 64)))
        assert np.array_equal(region, base[128:192, 256:320])
        assert source.level_downsamples == pytest.approx([1.0, 2.0, 4.0])


def test_unreadable_wsi_is_refused(class_dir, tmp_path):
    (class_dir / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    records, problems = inventory(class_dir, tmp_path)
    assert records == [] and len(problems) == 1


def test_open_source_raises_reason(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(UnusableFileError, match="zero-byte"):
        open_source(tmp_path / "zero.png", tmp_path, LIMIT, 1 << 30)


def test_inventory_is_written_with_a_content_hash_version_and_its_skipped_files(class_dir, tmp_path):
    tissue_image((120, 80), seed=1).save(class_dir / "a.png")
    (class_dir / "empty.png").write_bytes(b"")
    warnings = []
    out = tmp_path / "slide_inventory" / "alpha"
    summary = write_inventory(out, class_dir, tmp_path, INGEST, tissue_class="alpha", warn=warnings.append)
    frame = pd.read_parquet(out / "inventory.parquet")
    assert list(frame["path"]) == ["raw/alpha/a.png"]
    assert summary["data_version"] == stable_hash([("raw/alpha/a.png", frame["sha256"].iloc[0])])
    assert summary["count"] == 1 and [p["path"] for p in summary["problems"]] == ["raw/alpha/empty.png"]
    assert warnings == [f"skipped raw/alpha/empty.png: {summary['problems'][0]['reason']}"]


def test_a_class_with_no_folder_or_no_usable_file_is_refused_and_writes_nothing(class_dir, tmp_path):
    out = tmp_path / "slide_inventory" / "alpha"
    with pytest.raises(UnusableClassError, match="class 'beta': no folder") as missing:
        write_inventory(out, tmp_path / "raw" / "beta", tmp_path, INGEST, tissue_class="beta")
    assert missing.value.problems is None
    (class_dir / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UnusableClassError, match="class 'alpha' has no usable slide") as unusable:
        write_inventory(out, class_dir, tmp_path, INGEST, tissue_class="alpha")
    assert [p.path for p in unusable.value.problems] == ["raw/alpha/junk.png"]
    assert not out.exists()


def test_unknown_class_folders_are_the_visible_folders_params_do_not_name(tmp_path):
    assert unknown_class_folders(tmp_path / "raw", ["alpha"]) == []
    for name in ("alpha", "mystery", ".hidden"):
        (tmp_path / "raw" / name).mkdir(parents=True)
    (tmp_path / "raw" / "notes.txt").write_text("not a folder")
    assert unknown_class_folders(tmp_path / "raw", ["alpha"]) == ["mystery"]
