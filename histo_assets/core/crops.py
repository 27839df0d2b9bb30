"""Square crops from raw slides: the thesis's centre crop, or a tissue-masked grid.

Crop file names encode the source file's hash prefix, the pyramid level and
level-0 coordinates, so a crop can always be traced back to the exact pixels
it came from, and re-running on unchanged input gives identical names.

Crops can be cut by several processes: PNG encoding dominates tiling, and
one process uses one core. Which process cuts a window never changes its
bytes or its place in the index.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from histo_assets.core.io import Log, atomic_save_png, sha256_file, stable_hash
from histo_assets.core.layout import IMAGES, INDEX, PREVIEW
from histo_assets.core.previews import write_preview
from histo_assets.core.schemas import CROP_INDEX
from histo_assets.core.slides import (
    Problem,
    SlideSource,
    UnusableClassError,
    UnusableFileError,
    open_source,
    report_problems,
)

MASK_MAX_SIDE = 1024
SMALL_IMAGE_POLICIES = ("skip", "upscale")
CROP_MODES = ("center", "tiles")
CHUNK_MAX = 32


@dataclass(frozen=True)
class TileSettings:
    """params' ``crops.tiles``; ``mpp``, ``stride`` and ``max_tiles_per_image`` may be None (see params.yaml)."""

    tile_size: int
    level: int
    mpp: float | None
    stride: int | None
    min_tissue_fraction: float
    max_tiles_per_image: int | None


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
    from skimage.color import rgb2hsv  # with scipy, half a second that only tiling needs
    from skimage.filters import threshold_otsu

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


@dataclass(frozen=True)
class CropSettings:
    """Everything that decides a crop's bytes; the pipeline builds it from params' ``crops`` and ``ingest``."""

    mode: str
    resolution: int
    small_image_policy: str
    max_image_pixels: int
    max_file_bytes: int
    tiles: TileSettings | None
    # zlib level of the PNGs (0-9), or -1 for Pillow's own default (zlib's 6).
    png_compress_level: int

    def __post_init__(self) -> None:
        """Refuse bad settings here, in the caller, rather than once per file inside worker processes."""
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode must be one of {CROP_MODES}, not {self.mode!r}")
        if self.mode == "tiles" and self.tiles is None:
            raise ValueError("mode 'tiles' needs TileSettings")
        if self.small_image_policy not in SMALL_IMAGE_POLICIES:
            raise ValueError(f"small_image_policy must be one of {SMALL_IMAGE_POLICIES}, not {self.small_image_policy!r}")
        if not -1 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be 0-9 (or -1, zlib's default), not {self.png_compress_level}")


def plan_windows(source: SlideSource, settings: CropSettings) -> list[tuple[Window, float | None]]:
    """The windows to cut from one source, each with its tissue fraction.

    A centre crop's fraction is None here: it is measured on the pixels read
    to cut it, so that the region is read once.
    """
    if settings.mode == "center":
        return [(center_window(source, settings.resolution, settings.small_image_policy), None)]
    return tile_windows(source, settings.tiles, settings.small_image_policy, settings.resolution)


def _cut(
    source: SlideSource, stem: str, source_sha256: str, windows: list[tuple[Window, float | None]], out_dir: Path, settings: CropSettings
) -> list[tuple[str, str, float]]:
    """Write each window's crop; (name, crop sha256, tissue fraction) per window, in window order.

    Each crop depends only on its window, which is what lets any process cut
    any window. On an error the crops this call wrote are removed, so a bad
    tile never leaves part of its slide behind.
    """
    written: list[tuple[str, str, float]] = []
    try:
        for window, fraction in windows:
            region = source.read_region(window.x, window.y, window.level, (window.read_size, window.read_size))
            if fraction is None:
                fraction = round(float(tissue_mask(region).mean()), 4)
            name = crop_name(source_sha256, stem, window)
            crop = _resize_square(region, settings.resolution)
            path = atomic_save_png(out_dir / name, crop, compress_level=settings.png_compress_level)
            written.append((name, sha256_file(path), fraction))
    except BaseException:
        _remove(out_dir, written)
        raise
    return written


def _remove(out_dir: Path, crops: list[tuple[str, str, float]]) -> None:
    for name, _, _ in crops:
        (out_dir / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class _Plan:
    """One validated source: its real path, its windows, and its crops if they were cut while it was open."""

    path: Path
    windows: list[tuple[Window, float | None]]
    cut: list[tuple[str, str, float]] | None


def _plan_source(rel: str, sha: str, data_root: Path, out_dir: Path, settings: CropSettings) -> _Plan:
    """Open, verify and plan one source (a worker task).

    A plain image is decoded whole on opening, so its crops are cut right
    away by the process that decoded it; a pyramid reads only the tiles a
    window touches, so its windows are handed back to be spread over workers.
    """
    with open_source(data_root / rel, data_root, settings.max_image_pixels, settings.max_file_bytes) as source:
        if sha256_file(source.path) != sha:
            raise UnusableFileError("file changed since it was inventoried; re-materialise slide_inventory")
        windows = plan_windows(source, settings)
        if source.reader == "tiffslide":
            return _Plan(source.path, windows, None)
        return _Plan(source.path, windows, _cut(source, Path(rel).stem, sha, windows, out_dir, settings))


def _cut_pyramid_chunk(
    path: Path, rel: str, sha: str, windows: list[tuple[Window, float | None]], out_dir: Path, settings: CropSettings
) -> list[tuple[str, str, float]]:
    """Cut some windows of a pyramid that ``_plan_source`` already validated (a worker task)."""
    with SlideSource(path, settings.max_image_pixels) as source:
        return _cut(source, Path(rel).stem, sha, windows, out_dir, settings)


def _chunks(windows: list, workers: int) -> list[list]:
    """Consecutive runs of a pyramid's windows, one worker task each.

    About four per worker keeps every worker busy until the slide is done;
    at most CHUNK_MAX keeps reopening the slide for each run (about 8 ms on
    benchmarks/make_pyramidal_slide.py's slide) near 2 % of cutting it
    (about 12 ms per 512 px window).
    """
    size = max(1, min(CHUNK_MAX, math.ceil(len(windows) / (4 * workers))))
    return [windows[start : start + size] for start in range(0, len(windows), size)]


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[Executor]:
    """One background thread (work in this process, one crop at a time) or ``workers`` processes.

    Processes are spawned, not forked: the caller may be a Dagster run with
    torch's thread pools and locks in memory, which fork would copy in
    whatever state they are in; a spawned worker imports only this module
    and its imports (Pillow, numpy, pandas, scikit-image, tiffslide), never torch. Pending tasks are cancelled and
    running ones awaited before any error leaves, so nothing is written after
    the caller starts cleaning up.
    """
    if workers <= 1:
        pool: Executor = ThreadPoolExecutor(max_workers=1)
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _gather(pieces: list[tuple[Future, int]], out_dir: Path, bar: tqdm) -> list[tuple[str, str, float]]:
    """A pyramid's crops in window order; if any piece failed, the crops of the others are removed too."""
    crops: list[tuple[str, str, float]] = []
    failure: BaseException | None = None
    for piece, count in pieces:
        error = piece.exception()
        bar.update(count)
        if error is None:
            crops.extend(piece.result())
        elif failure is None:
            failure = error
    if failure is not None:
        _remove(out_dir, crops)
        raise failure
    return crops


def crop_class(
    sources: list[tuple[str, str]],
    data_root: Path,
    out_dir: Path,
    settings: CropSettings,
    log: Log | None = None,
    workers: int = 1,
) -> tuple[list[CropRecord], list[Problem]]:
    """Crop every (relative path, sha256) source of a class; one bad file never stops the rest.

    Sources are planned and cut by ``workers`` processes (one means this
    process), whatever finishes first; records and problems are still listed
    in source then window order, and each crop's bytes depend only on its
    window, so the output is the same for any number of workers. A source
    that fails part-way leaves no crop behind.
    """
    records: list[CropRecord] = []
    problems: list[Problem] = []
    with _executor(workers) as pool, tqdm(total=0, desc="square crops", unit="crop", disable=None) as bar:
        planning = {pool.submit(_plan_source, rel, sha, data_root, out_dir, settings): index for index, (rel, sha) in enumerate(sources)}
        outcomes: list[_Plan | UnusableFileError | None] = [None] * len(sources)
        pieces: list[list[tuple[Future, int]]] = [[] for _ in sources]
        for future in as_completed(planning):
            index = planning[future]
            try:
                plan = future.result()
            except UnusableFileError as error:
                outcomes[index] = error
                continue
            outcomes[index] = plan
            bar.total += len(plan.windows)
            if plan.cut is not None:
                bar.update(len(plan.cut))
                continue
            rel, sha = sources[index]
            for chunk in _chunks(plan.windows, workers):
                pieces[index].append((pool.submit(_cut_pyramid_chunk, plan.path, rel, sha, chunk, out_dir, settings), len(chunk)))
        for (rel, sha), outcome, source_pieces in zip(sources, outcomes, pieces):
            try:
                if isinstance(outcome, UnusableFileError):
                    raise outcome
                cut = outcome.cut if outcome.cut is not None else _gather(source_pieces, out_dir, bar)
            except UnusableFileError as error:
                problems.append(Problem(rel, str(error)))
                if log:
                    log(f"skipped {rel}: {error}")
                continue
            records.extend(
                CropRecord(
                    crop_file=name,
                    crop_sha256=crop_sha,
                    source_path=rel,
                    source_sha256=sha,
                    level=window.level,
                    x=window.x,
                    y=window.y,
                    size=window.size,
                    read_size=window.read_size,
                    tissue_fraction=fraction,
                )
                for (window, _), (name, crop_sha, fraction) in zip(outcome.windows, cut)
            )
            if log:
                log(f"{rel}: {len(cut)} crop(s)")
    return records, problems


def write_square_crops(
    out: Path, sources: list[tuple[str, str]], data_root: Path, settings: CropSettings, *, tissue_class: str,
    workers: int = 1, log: Log | None = None, warn: Log | None = None,
) -> dict[str, Any]:
    """A class's crops, their index and a preview in ``out``; the summary fields that describe them.

    A source that gives no crop is skipped and listed in the summary; a class
    none of whose sources gives one is refused, as there is nothing to train on.
    """
    records, problems = crop_class(sources, data_root, out / IMAGES, settings, log=log, workers=workers)
    report_problems(problems, warn)
    if not records:
        raise UnusableClassError(
            f"class {tissue_class!r}: no crop could be cut from its {len(sources)} slide(s)", problems
        )
    CROP_INDEX.write(out / INDEX, pd.DataFrame([r.as_row() for r in records]))
    write_preview(out / IMAGES, out / PREVIEW)
    return {
        "count": len(records),
        "problems": [vars(x) for x in problems],
        "data_version": stable_hash(sorted((r.crop_file, r.crop_sha256) for r in records)),
    }
