"""Reading raw slides safely: plain images and pyramidal whole-slide images.

Raw data arrives from labs as whatever their scanners and exports produce, so
every file is treated as untrusted: symlinks must stay inside the data root,
sizes and pixel counts are bounded before decoding, and every colour mode is
normalised to 8-bit RGB. A file that fails any of this is reported with a
reason and skipped; it never stops the other files.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import Log, sha256_file, stable_hash
from histo_assets.core.layout import INVENTORY
from histo_assets.core.schemas import SLIDE_INVENTORY

PYRAMID_SUFFIXES = {".svs", ".tif", ".tiff"}



class UnusableFileError(HistoAssetsError, ValueError):
    """A raw file that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class SlideRecord:
    """One inventoried raw file."""

    path: str
    sha256: str
    bytes: int
    width: int
    height: int
    levels: int
    mpp: float | None
    reader: str
    mode: str

    def as_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    """A raw file that was skipped, and why."""

    path: str
    reason: str


class UnusableClassError(HistoAssetsError, ValueError):
    """A class with nothing to go on; ``problems`` are the files skipped on the way, None where none was read."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems = problems


def report_problems(problems: list[Problem], warn: Log | None) -> None:
    """Each skipped file as a warning, so that it shows in the run's log as well as in the summary."""
    if warn:
        for problem in problems:
            warn(f"skipped {problem.path}: {problem.reason}")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (grey, palette, alpha, 16-bit, float, CMYK) to 8-bit RGB.

    Alpha is composited over white, the usual background of a glass slide.
    High-bit-depth images are rescaled by their actual range so faint 16-bit
    scans do not collapse to black.
    """
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class SlideSource:
    """Uniform region reading over a plain image or a tiffslide pyramid."""

    def __init__(self, path: Path, max_image_pixels: int):
        self.path = path
        self.max_image_pixels = max_image_pixels
        self._slide = None
        self._image: Image.Image | None = None
        if path.suffix.lower() in PYRAMID_SUFFIXES:
            self._slide = _open_pyramid(path)
        if self._slide is None:
            self._image = _open_plain(path, max_image_pixels)

    @property
    def reader(self) -> str:
        return "tiffslide" if self._slide is not None else "pillow"

    @property
    def mode(self) -> str:
        return "RGBA" if self._slide is not None else self._image.mode

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        if self._slide is not None:
            return [tuple(map(int, dims)) for dims in self._slide.level_dimensions]
        return [self._image.size]

    @property
    def level_downsamples(self) -> list[float]:
        if self._slide is not None:
            return [float(d) for d in self._slide.level_downsamples]
        return [1.0]

    @property
    def mpp(self) -> float | None:
        if self._slide is None:
            return None
        value = self._slide.properties.get("tiffslide.mpp-x")
        return float(value) if value else None

    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> Image.Image:
        """Read ``size`` pixels at ``level`` whose top-left is (x, y) in level-0 coordinates."""
        if size[0] * size[1] > self.max_image_pixels:
            raise UnusableFileError(f"region of {size[0]}x{size[1]} px exceeds the pixel limit {self.max_image_pixels}")
        if self._slide is not None:
            try:
                region = self._slide.read_region((x, y), level, size)
            except Exception as error:  # a pyramid decodes tile by tile, so a corrupt tile surfaces only here, as any decoder's error type
                raise UnusableFileError(
                    f"corrupt pyramid: reading {size[0]}x{size[1]} px at level {level}, x={x}, y={y} failed: {type(error).__name__}: {error}"
                ) from error
            return to_rgb8(region)
        return to_rgb8(self._image.crop((x, y, x + size[0], y + size[1])))

    def largest_level_within(self, max_pixels: int) -> int:
        """The most detailed level that can be decoded whole under the pixel limit."""
        for level, (w, h) in enumerate(self.level_dimensions):
            if w * h <= max_pixels:
                return level
        raise UnusableFileError(f"no pyramid level fits the pixel limit {max_pixels}")

    def read_level(self, level: int) -> Image.Image:
        width, height = self.level_dimensions[level]
        return self.read_region(0, 0, level, (width, height))

    def thumbnail(self, max_side: int) -> tuple[Image.Image, float]:
        """A low-resolution view and its downsample relative to level 0, for tissue masks."""
        dims = self.level_dimensions
        level = len(dims) - 1
        for candidate, (w, h) in enumerate(dims):
            if max(w, h) <= max_side * 2:
                level = candidate
                break
        image = self.read_level(level)
        scale = max(image.size) / max_side
        if scale > 1:
            image = image.resize((round(image.width / scale), round(image.height / scale)), Image.Resampling.BOX)
        return image, dims[0][0] / image.width

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
        if self._image is not None:
            self._image.close()

    def __enter__(self) -> SlideSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_pyramid(path: Path):
    """Open a tiled TIFF/SVS with tiffslide; None means 'read it as a plain image'."""
    import tiffslide

    slide = None
    try:
        slide = tiffslide.TiffSlide(path)
        if slide.level_count > 1 or slide.properties.get("tiffslide.vendor") == "aperio":
            return slide
    except Exception:
        pass  # tiffslide cannot parse it; Pillow gets its turn and reports the reason
    if slide is not None:
        slide.close()
    return None


def _open_plain(path: Path, max_image_pixels: int) -> Image.Image:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > max_image_pixels:
                raise UnusableFileError(
                    f"{image.width}x{image.height} px exceeds the pixel limit {max_image_pixels} (decompression bomb guard)"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnusableFileError(f"refused by the pixel limit {max_image_pixels} (decompression bomb guard): {error}")
    except UnusableFileError:
        raise
    except Image.UnidentifiedImageError:
        raise UnusableFileError("not an image Pillow or tiffslide can read")
    except (OSError, SyntaxError, ValueError) as error:
        raise UnusableFileError(f"truncated or corrupt image: {error}")
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image


def resolve_inside(path: Path, root: Path) -> Path:
    """The real path of ``path``, refusing links that leave ``root``."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise UnusableFileError(f"symlink leaves the data directory (points to {real})")
    return real


def open_source(path: Path, root: Path, max_image_pixels: int, max_file_bytes: int) -> SlideSource:
    """Validate and open one raw file, raising UnusableFileError with the reason."""
    real = resolve_inside(path, root)
    size = real.stat().st_size
    if size == 0:
        raise UnusableFileError("zero-byte file")
    if size > max_file_bytes:
        raise UnusableFileError(f"{size} bytes exceeds the file size limit {max_file_bytes}")
    return SlideSource(real, max_image_pixels)


def list_class_files(class_dir: Path, extensions: list[str]) -> tuple[list[Path], list[Problem]]:
    """Candidate files of one class folder (flat, sorted) and the entries ignored with a reason."""
    wanted = {ext.lower() for ext in extensions}
    files: list[Path] = []
    ignored: list[Problem] = []
    for entry in sorted(class_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            ignored.append(Problem(entry.name, "sub-folder ignored: class folders are flat"))
        elif entry.suffix.lower() in wanted:
            files.append(entry)
        else:
            ignored.append(Problem(entry.name, f"not an image file (extension {entry.suffix or 'none'!r})"))
    return files, ignored


def inventory_class(
    class_dir: Path, data_root: Path, extensions: list[str], max_image_pixels: int, max_file_bytes: int
) -> tuple[list[SlideRecord], list[Problem]]:
    """Hash and describe every usable raw file of one class; report the rest."""
    files, problems = list_class_files(class_dir, extensions)
    records: list[SlideRecord] = []
    for path in files:
        rel = os.path.relpath(path, data_root)
        try:
            with open_source(path, data_root, max_image_pixels, max_file_bytes) as source:
                width, height = source.level_dimensions[0]
                records.append(
                    SlideRecord(
                        path=rel,
                        sha256=sha256_file(source.path),
                        bytes=source.path.stat().st_size,
                        width=width,
                        height=height,
                        levels=len(source.level_dimensions),
                        mpp=source.mpp,
                        reader=source.reader,
                        mode=source.mode,
                    )
                )
        except UnusableFileError as error:
            problems.append(Problem(rel, str(error)))
    return records, problems


def unknown_class_folders(raw_root: Path, classes: list[str]) -> list[str]:
    """Folders beside the class folders that params do not name: ignored, so worth a warning (most are typos)."""
    if not raw_root.is_dir():
        return []
    return sorted(p.name for p in raw_root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in classes)


@dataclass(frozen=True)
class IngestSettings:
    """params' ``ingest`` section: which files are slides, and the size limits that guard decoding them."""

    extensions: tuple[str, ...]
    max_image_pixels: int
    max_file_bytes: int


def write_inventory(
    out: Path, class_dir: Path, data_root: Path, ingest: IngestSettings, *, tissue_class: str,
    warn: Log | None = None,
) -> dict[str, Any]:
    """Inventory one class folder into ``out``; the summary's fields.

    The data version is the hash of the files' content hashes: a class whose
    files did not change keeps it, so nothing downstream reruns, even when
    the files were rewritten.
    """
    if not class_dir.is_dir():
        raise UnusableClassError(f"class {tissue_class!r}: no folder {class_dir}")
    records, problems = inventory_class(
        class_dir, data_root, list(ingest.extensions), ingest.max_image_pixels, ingest.max_file_bytes
    )
    report_problems(problems, warn)
    if not records:
        raise UnusableClassError(f"class {tissue_class!r} has no usable slide in {class_dir}", problems)
    SLIDE_INVENTORY.write(out / INVENTORY, pd.DataFrame([r.as_row() for r in records]))
    return {
        "data_version": stable_hash(sorted((r.path, r.sha256) for r in records)),
        "count": len(records),
        "problems": [vars(x) for x in problems],
    }
