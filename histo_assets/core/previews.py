"""Contact sheets: people judge tissue crops and synthetic tiles by eye faster than by tables."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from histo_assets.core.io import atomic_save_png

BACKGROUND = (255, 255, 255)
LABEL_HEIGHT = 12
PREVIEW_COUNT = 32


def contact_sheet(
    images: Sequence[Path | Image.Image],
    *,
    columns: int = 8,
    thumb: int = 96,
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """A grid of thumbnails, optionally captioned per image and per row."""
    count = max(len(images), 1)
    rows = -(-count // columns)
    label_h = LABEL_HEIGHT if labels else 0
    margin = 8 * max((len(t) for t in row_labels), default=0) if row_labels else 0
    sheet = Image.new("RGB", (margin + columns * (thumb + 2), rows * (thumb + 2 + label_h)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, item in enumerate(images):
        image = Image.open(item) if isinstance(item, Path) else item
        tile = image.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR)
        row, col = divmod(index, columns)
        x, y = margin + col * (thumb + 2), row * (thumb + 2 + label_h)
        sheet.paste(tile, (x, y))
        if labels:
            draw.text((x + 1, y + thumb), labels[index][: thumb // 6], fill=(0, 0, 0))
    if row_labels:
        for row, text in enumerate(row_labels[:rows]):
            draw.text((2, row * (thumb + 2 + label_h) + thumb // 2), text, fill=(0, 0, 0))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_preview(images_dir: Path, out: Path) -> Path:
    """The contact sheet of a stage folder: its first images in name order."""
    return atomic_save_png(out, contact_sheet(sorted(images_dir.glob("*.png"))[:PREVIEW_COUNT]))


def _markdown_png(data: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"


def markdown_image(image: Image.Image, alt: str) -> str:
    """Markdown embedding the PNG inline, which the Dagster UI renders in asset metadata."""
    return _markdown_png(png_bytes(image), alt)


def markdown_png_file(path: Path, alt: str) -> str:
    """:func:`markdown_image` for a PNG already on disk, without decoding it."""
    return _markdown_png(path.read_bytes(), alt)


def _cell(value) -> str:
    """A table cell: empty for a missing value (pandas may hold None as NaN), and a message's own
    ``|`` or line breaks escaped, so a skipped file's reason cannot break the table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def markdown_table(frame) -> str:
    """A pandas frame as a Markdown table, without the optional tabulate dependency."""
    header = "| " + " | ".join(map(_cell, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(map(_cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
