"""core/previews.py: contact sheets lay thumbnails out as a grid; Markdown embeds decodable PNGs and whole tables."""

import base64
import io
import re

import pandas as pd
from PIL import Image

from histo_assets.core.previews import (
    BACKGROUND,
    LABEL_HEIGHT,
    PREVIEW_COUNT,
    contact_sheet,
    markdown_image,
    markdown_png_file,
    markdown_table,
    png_bytes,
    write_preview,
)
from histo_assets_tests.conftest import tissue_image

COLOURS = [(200, 30, 40), (30, 200, 40), (30, 40, 200), (120, 60, 180), (250, 160, 20)]


def solid(colour, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def tile_centre(sheet: Image.Image, index: int, *, columns: int, thumb: int, label_h: int = 0, margin: int = 0):
    row, col = divmod(index, columns)
    return sheet.getpixel((margin + col * (thumb + 2) + thumb // 2, row * (thumb + 2 + label_h) + thumb // 2))


def darkest(image: Image.Image, box) -> int:
    return min(low for low, _ in image.crop(box).getextrema())


def embedded_png(markdown: str, alt: str) -> bytes:
    match = re.fullmatch(rf"!\[{re.escape(alt)}\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:80]
    return base64.b64decode(match.group(1), validate=True)


def test_a_contact_sheet_lays_thumbnails_out_row_by_row_on_white():
    sheet = contact_sheet([solid(colour) for colour in COLOURS], columns=2, thumb=10)
    assert sheet.mode == "RGB" and sheet.size == (2 * 12, 3 * 12)
    assert [tile_centre(sheet, i, columns=2, thumb=10) for i in range(5)] == COLOURS
    assert tile_centre(sheet, 5, columns=2, thumb=10) == BACKGROUND, "the unfilled slot stays blank"
    assert sheet.getpixel((10, 5)) == BACKGROUND and sheet.getpixel((5, 10)) == BACKGROUND, "2-pixel gaps between tiles"


def test_files_and_images_of_any_mode_become_rgb_thumbnails(tmp_path):
    solid((90, 10, 10, 255), mode="RGBA").save(tmp_path / "rgba.png")
    solid(100, mode="L").save(tmp_path / "grey.png")
    sheet = contact_sheet([tmp_path / "rgba.png", tmp_path / "grey.png", solid((1, 2, 3))], columns=3, thumb=16)
    assert sheet.mode == "RGB" and sheet.size == (3 * 18, 18)
    assert [tile_centre(sheet, i, columns=3, thumb=16) for i in range(3)] == [(90, 10, 10), (100, 100, 100), (1, 2, 3)]


def test_an_empty_contact_sheet_is_one_blank_row():
    sheet = contact_sheet([], columns=4, thumb=20)
    assert sheet.size == (4 * 22, 22) and sheet.getextrema() == ((255, 255),) * 3


def test_captions_add_a_strip_under_each_row_with_the_text_in_it():
    sheet = contact_sheet([solid(COLOURS[0]), solid(COLOURS[1]), solid(COLOURS[2])], columns=2, thumb=48,
                          labels=["colon", "", "lung"])
    step = 48 + 2 + LABEL_HEIGHT
    assert sheet.size == (2 * 50, 2 * step)
    assert [tile_centre(sheet, i, columns=2, thumb=48, label_h=LABEL_HEIGHT) for i in range(3)] == COLOURS[:3]
    assert darkest(sheet, (0, 48, 48, 48 + LABEL_HEIGHT)) < 100, "caption under the first tile"
    assert darkest(sheet, (50, 48, 98, 48 + LABEL_HEIGHT)) == 255, "an empty caption draws nothing"
    assert darkest(sheet, (0, step + 48, 48, step + 48 + LABEL_HEIGHT)) < 100, "caption under the second row's tile"


def test_row_labels_shift_the_grid_right_by_a_margin_for_the_longest_label():
    images = [solid(colour) for colour in COLOURS[:4]]
    sheet = contact_sheet(images, columns=2, thumb=40, row_labels=["real", "generated"])
    margin = 8 * len("generated")
    assert sheet.size == (margin + 2 * 42, 2 * 42)
    assert [tile_centre(sheet, i, columns=2, thumb=40, margin=margin) for i in range(4)] == COLOURS[:4]
    assert darkest(sheet, (0, 0, margin, 42)) < 100 and darkest(sheet, (0, 42, margin, 84)) < 100, "rows are labelled"
    assert contact_sheet(images, columns=2, thumb=40).size == (2 * 42, 2 * 42)


def test_a_preview_shows_the_first_pngs_of_a_folder_in_name_order(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    colours = [(index * 7, 255 - index * 7, 100) for index in range(PREVIEW_COUNT + 2)]
    for index, colour in enumerate(colours):
        solid(colour, size=(4, 4)).save(images / f"{index:03d}.png")
    solid((0, 0, 0), size=(4, 4)).save(images / "000.jpg")
    (images / "0.txt").write_text("not an image")
    out = tmp_path / "stage" / "preview.png"
    assert write_preview(images, out) == out
    with Image.open(out) as preview:
        preview.load()
    assert preview.format == "PNG" and preview.mode == "RGB" and preview.size == (8 * 98, 4 * 98)
    assert [tile_centre(preview, i, columns=8, thumb=96) for i in range(PREVIEW_COUNT)] == colours[:PREVIEW_COUNT]


def test_a_markdown_image_embeds_a_png_that_decodes_to_the_image():
    image = tissue_image((48, 32), seed=3)
    data = embedded_png(markdown_image(image, "colon step 500"), "colon step 500")
    assert data == png_bytes(image) and data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (48, 32) and decoded.tobytes() == image.tobytes()


def test_a_png_file_is_embedded_byte_for_byte(tmp_path):
    path = tmp_path / "curve.png"
    tissue_image((40, 40), seed=4).save(path, compress_level=0)
    data = embedded_png(markdown_png_file(path, "loss curve"), "loss curve")
    assert data == path.read_bytes() and data != png_bytes(Image.open(path))


def test_a_markdown_table_has_the_frames_columns_and_one_line_per_row_without_the_index():
    readers = pd.Series(["pillow", None], dtype=object, index=[7, 9])  # object dtype keeps None (pandas' str makes NaN)
    frame = pd.DataFrame({"path": ["raw/a.png", "raw/b.svs"], "width": [256, 4096], "reader": readers}, index=[7, 9])
    assert markdown_table(frame) == "\n".join([
        "| path | width | reader |",
        "|---|---|---|",
        "| raw/a.png | 256 | pillow |",
        "| raw/b.svs | 4096 |  |",
    ])
    assert markdown_table(frame.iloc[:0]) == "| path | width | reader |\n|---|---|---|"


def test_a_markdown_table_leaves_missing_values_empty_and_escapes_what_would_break_it():
    frame = pd.DataFrame({"path": ["a|b.png", "c.png"], "reason": ["bad header\nsecond line", None]})
    assert markdown_table(frame).splitlines()[2:] == ["| a\\|b.png | bad header<br>second line |", "| c.png |  |"]
