"""Square crops from raw slides: the thesis's centre crop, or a tissue-masked grid.

Crop file names encode the source file's hash prefix, the pyramid level and
level-0 coordinates, so a crop can always be traced back to the exact pixels
it came from, and re-running on unchanged input gives identical names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from tqdm.auto import tqdm

from histo_assets.core.io import atomic_save_png, sha256_file
from histo_assets.core.slides import Problem, SlideSource, UnusableFileError, open_source

MASK_MAX_SIDE = 1024
SMALL_IMAGE_POLICIES = ("skip", "upscale")


@dataclass(frozen=True)
class TileSettings:
    tile_size: int
    level: int = 0
    mpp: float | None = None
    stride: int | None = None
    min_tissue_fraction: float = 0.5
    max_tiles_per_image: int | None = None


@dataclass(frozen=True)
class CropRecord:
    """One written crop and where its pixels came from."""

    crop_file: str
    crop_sha256: str
    source_path: str
    source_sha256: str
    level: int
    x: int
    y: int
    size: int
    read_size: int
    tissue_fraction: float

    def as_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """A square region: level-0 origin and side, plus the side read at ``level``."""

    x: int
    y: int
    size: int
    level: int
    read_size: int


def tissue_mask(image: Image.Image) -> np.ndarray:
    """Tissue vs. background by Otsu's threshold on saturation.

    Glass and white background are unsaturated, while both H&E and IHC stains
    are saturated, so saturation separates tissue without stain-specific tuning.
    """
    saturation = rgb2hsv(np.asarray(image.convert("RGB")))[..., 1]
    if float(saturation.max() - saturation.min()) < 1e-6:
        return np.zeros(saturation.shape, dtype=bool)
    return saturation > threshold_otsu(saturation)


def _resize_square(image: Image.Image, resolution: int) -> Image.Image:
    if image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def crop_name(source_sha256: str, stem: str, window: Window) -> str:
    safe_stem = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)[:40]
    return f"{safe_stem}_{source_sha256[:8]}_L{window.level}_x{window.x}_y{window.y}_s{window.size}.png"


def center_window(source: SlideSource, resolution: int, small_image_policy: str) -> Window:
    """The largest centred square of the most detailed level that fits in memory."""
    level = source.largest_level_within(source.max_image_pixels)
    width, height = source.level_dimensions[level]
    side = min(width, height)
    if side < resolution and small_image_policy != "upscale":
        raise UnusableFileError(f"{width}x{height} px is smaller than the crop size {resolution}")
    downsample = source.level_downsamples[level]
    x, y = (width - side) // 2, (height - side) // 2
    return Window(round(x * downsample), round(y * downsample), round(side * downsample), level, side)


def _tile_geometry(source: SlideSource, settings: TileSettings) -> tuple[int, int, int]:
    """(level, side read at that level, side in level-0 pixels) for the requested scale."""
    downsamples = source.level_downsamples
    if settings.mpp is not None:
        base_mpp = source.mpp
        if base_mpp is None:
            raise UnusableFileError("tiles by microns-per-pixel requested, but the file records no mpp")
        wanted = settings.mpp / base_mpp
        level = max((i for i, d in enumerate(downsamples) if d <= wanted * 1.0001), default=0)
        size0 = round(settings.tile_size * wanted)
        return level, round(size0 / downsamples[level]), size0
    if settings.level >= len(downsamples):
        raise UnusableFileError(f"level {settings.level} requested, but the file has {len(downsamples)} level(s)")
    level = settings.level
    return level, settings.tile_size, round(settings.tile_size * downsamples[level])


def tile_windows(source: SlideSource, settings: TileSettings, small_image_policy: str, resolution: int) -> list[tuple[Window, float]]:
    """Grid windows over tissue, each with its tissue fraction, best first when capped."""
    level, read_size, size0 = _tile_geometry(source, settings)
    width0, height0 = source.level_dimensions[0]
    if size0 > min(width0, height0):
        if small_image_policy == "upscale":
            window = center_window(source, resolution, small_image_policy)
            return [(window, 1.0)]
        raise UnusableFileError(f"{width0}x{height0} px is smaller than the tile size {size0} (level-0 px)")
    thumb, downsample = source.thumbnail(MASK_MAX_SIDE)
    mask = tissue_mask(thumb)
    stride0 = round((settings.stride or settings.tile_size) * size0 / settings.tile_size)
    windows = []
    for y in range(0, height0 - size0 + 1, stride0):
        for x in range(0, width0 - size0 + 1, stride0):
            top, left = int(y / downsample), int(x / downsample)
            bottom, right = int(np.ceil((y + size0) / downsample)), int(np.ceil((x + size0) / downsample))
            region = mask[top:bottom, left:right]
            fraction = float(region.mean()) if region.size else 0.0
            if fraction >= settings.min_tissue_fraction:
                windows.append((Window(x, y, size0, level, read_size), round(fraction, 4)))
    if settings.max_tiles_per_image is not None and len(windows) > settings.max_tiles_per_image:
        ranked = sorted(windows, key=lambda item: (-item[1], item[0].y, item[0].x))[: settings.max_tiles_per_image]
        windows = sorted(ranked, key=lambda item: (item[0].y, item[0].x))
    return windows


def write_crops(
    source: SlideSource,
    source_rel: str,
    source_sha256: str,
    out_dir: Path,
    *,
    mode: str,
    resolution: int,
    small_image_policy: str,
    tiles: TileSettings | None = None,
) -> list[CropRecord]:
    """Cut one source into square PNG crops of side ``resolution`` in ``out_dir``."""
    if small_image_policy not in SMALL_IMAGE_POLICIES:
        raise ValueError(f"small_image_policy must be one of {SMALL_IMAGE_POLICIES}, not {small_image_policy!r}")
    if mode == "center":
        window = center_window(source, resolution, small_image_policy)
        region = source.read_region(window.x, window.y, window.level, (window.read_size, window.read_size))
        windows = [(window, round(float(tissue_mask(region).mean()), 4))]
    elif mode == "tiles":
        if tiles is None:
            raise ValueError("mode 'tiles' needs TileSettings")
        windows = tile_windows(source, tiles, small_image_policy, resolution)
    else:
        raise ValueError(f"crop mode must be 'center' or 'tiles', not {mode!r}")
    records = []
    stem = Path(source_rel).stem
    for window, fraction in windows:
        crop = source.read_region(window.x, window.y, window.level, (window.read_size, window.read_size))
        name = crop_name(source_sha256, stem, window)
        path = atomic_save_png(out_dir / name, _resize_square(crop, resolution))
        records.append(
            CropRecord(
                crop_file=name,
                crop_sha256=sha256_file(path),
                source_path=source_rel,
                source_sha256=source_sha256,
                level=window.level,
                x=window.x,
                y=window.y,
                size=window.size,
                read_size=window.read_size,
                tissue_fraction=fraction,
            )
        )
    return records


@dataclass(frozen=True)
class CropSettings:
    mode: str
    resolution: int
    small_image_policy: str
    max_image_pixels: int
    max_file_bytes: int
    tiles: TileSettings | None = None


def crop_class(
    sources: list[tuple[str, str]],
    data_root: Path,
    out_dir: Path,
    settings: CropSettings,
    log: Callable[[str], None] | None = None,
) -> tuple[list[CropRecord], list[Problem]]:
    """Crop every (relative path, sha256) source of a class; one bad file never stops the rest."""
    records: list[CropRecord] = []
    problems: list[Problem] = []
    for rel, sha in tqdm(sources, desc="square crops", unit="slide", disable=None):
        try:
            with open_source(data_root / rel, data_root, settings.max_image_pixels, settings.max_file_bytes) as source:
                if sha256_file(source.path) != sha:
                    raise UnusableFileError("file changed since it was inventoried; re-materialise raw_slides")
                written = write_crops(
                    source,
                    rel,
                    sha,
                    out_dir,
                    mode=settings.mode,
                    resolution=settings.resolution,
                    small_image_policy=settings.small_image_policy,
                    tiles=settings.tiles,
                )
        except UnusableFileError as error:
            problems.append(Problem(rel, str(error)))
            if log:
                log(f"skipped {rel}: {error}")
            continue
        records.extend(written)
        if log:
            log(f"{rel}: {len(written)} crop(s)")
    return records, problems
