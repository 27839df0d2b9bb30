"""core/quality.py: inspect_images names the undecodable, mis-sized, non-RGB and duplicate PNGs of a real folder."""

import shutil

from PIL import Image

from histo_assets.core.quality import FolderReport, inspect_images
from histo_assets_tests.conftest import tissue_image

SIZE = 32


def names(entries: list[str]) -> list[str]:
    return [entry.split(":")[0] for entry in entries]


def test_a_folder_of_good_images_reports_only_its_count(tmp_path):
    for index in range(3):
        tissue_image((SIZE, SIZE), seed=index).save(tmp_path / f"{index}.png")
    assert inspect_images(tmp_path, SIZE) == FolderReport(count=3)


def test_each_fault_is_reported_by_file_name(tmp_path):
    tissue_image((SIZE, SIZE), seed=1).save(tmp_path / "good.png")
    shutil.copy(tmp_path / "good.png", tmp_path / "copy.png")
    tissue_image((SIZE + 1, SIZE), seed=2).save(tmp_path / "wide.png")
    Image.new("L", (SIZE, SIZE), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (SIZE, SIZE), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    (tmp_path / "text.png").write_text("not an image")
    report = inspect_images(tmp_path, SIZE)
    assert report.count == 6
    assert len(report.undecodable) == 1 and report.undecodable[0].startswith("text.png: cannot identify image file")
    assert report.wrong_size == [f"wide.png: {SIZE + 1}x{SIZE}"]
    assert report.wrong_mode == ["grey.png: L", "rgba.png: RGBA"]
    assert report.duplicates == [["copy.png", "good.png"]]


def test_a_png_cut_short_in_its_pixel_data_is_undecodable(tmp_path):
    """Every image is decoded fully: a header that opens is not enough."""
    tissue_image((SIZE, SIZE), seed=3).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "header.png").write_bytes(data[:40])
    with Image.open(tmp_path / "half.png") as opened:
        assert opened.size == (SIZE, SIZE), "the header alone still opens"
    report = inspect_images(tmp_path, SIZE)
    assert report.count == 3 and names(report.undecodable) == ["half.png", "header.png"]
    assert report.wrong_size == report.wrong_mode == report.duplicates == []


def test_an_image_wrong_in_size_and_mode_is_listed_under_both(tmp_path):
    Image.new("L", (SIZE // 2, SIZE)).save(tmp_path / "small_grey.png")
    report = inspect_images(tmp_path, SIZE)
    assert report.wrong_size == [f"small_grey.png: {SIZE // 2}x{SIZE}"] and report.wrong_mode == ["small_grey.png: L"]


def test_only_a_square_of_the_expected_size_passes(tmp_path):
    tissue_image((SIZE, SIZE), seed=4).save(tmp_path / "square.png")
    assert inspect_images(tmp_path, SIZE).wrong_size == []
    assert inspect_images(tmp_path, 2 * SIZE).wrong_size == [f"square.png: {SIZE}x{SIZE}"]


def test_duplicates_are_grouped_by_content_and_undecodable_copies_count_too(tmp_path):
    tissue_image((SIZE, SIZE), seed=5).save(tmp_path / "a.png")
    tissue_image((SIZE, SIZE), seed=6).save(tmp_path / "b.png")
    tissue_image((SIZE, SIZE), seed=7).save(tmp_path / "unique.png")
    for source, copies in (("a.png", ["a2.png", "a3.png"]), ("b.png", ["b2.png"])):
        for copy in copies:
            shutil.copy(tmp_path / source, tmp_path / copy)
    (tmp_path / "broken1.png").write_bytes(b"broken")
    (tmp_path / "broken2.png").write_bytes(b"broken")
    report = inspect_images(tmp_path, SIZE)
    assert report.count == 8 and names(report.undecodable) == ["broken1.png", "broken2.png"]
    groups = [["a.png", "a2.png", "a3.png"], ["b.png", "b2.png"], ["broken1.png", "broken2.png"]]
    assert sorted(report.duplicates) == groups


def test_only_the_pngs_directly_in_the_folder_are_inspected(tmp_path):
    tissue_image((SIZE, SIZE), seed=8).save(tmp_path / "crop.png")
    Image.new("L", (3, 3)).save(tmp_path / "grey.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "nested").mkdir()
    Image.new("L", (3, 3)).save(tmp_path / "nested" / "grey.png")
    shutil.copy(tmp_path / "crop.png", tmp_path / "nested" / "crop.png")
    assert inspect_images(tmp_path, SIZE) == FolderReport(count=1)
    assert inspect_images(tmp_path / "nested", SIZE).count == 2


def test_an_empty_folder_reports_no_images(tmp_path):
    assert inspect_images(tmp_path, SIZE) == FolderReport(count=0)
