"""Tiles per second cutting a large pyramidal slide, and the PNG compression level behind the speed.

    .venv/bin/python benchmarks/make_pyramidal_slide.py /tmp/bench-slides/raw/slide.tiff
    .venv/bin/python benchmarks/ingest_tiles.py /tmp/bench-slides/raw/slide.tiff [--rounds 2] [--sweep 200]

First a sweep: ``--sweep`` tissue tiles spread over the slide are read and resized once,
then PNG-encoded in memory at every zlib level, 0 to 9 (median of 3 passes per level),
for the time and size per crop that the level in params.yaml was chosen by. Then
`crop_class` tiles the whole slide as the pipeline does (512 px tiles at level 0, written
at 256 px, tissue fraction as in params.yaml) in three variants, interleaved for
``--rounds`` rounds: the old behaviour (1 worker, Pillow's default level 6), the chosen
level in one worker, and the chosen level with params' worker count. Each round writes
into a fresh temporary folder, removed afterwards. Times include hashing the slide and
the tissue mask, i.e. the whole call. The 1-minute load average is printed before and
after each measurement, because the machine is shared. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from histo_assets.core.crops import CropSettings, crop_class, tile_windows
from histo_assets.core.io import sha256_file
from histo_assets.core.slides import SlideSource
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import crop_settings

TILE_SIZE = 512
RESOLUTION = 256


def load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def sweep(slide: Path, settings: CropSettings, count: int) -> None:
    with SlideSource(slide, settings.max_image_pixels) as source:
        windows = [window for window, _ in tile_windows(source, settings.tiles, "skip", RESOLUTION)]
        picked = windows[:: max(1, len(windows) // count)][:count]
        start = time.perf_counter()
        crops = [
            source.read_region(w.x, w.y, w.level, (w.read_size, w.read_size)).resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC) for w in picked
        ]
        read_ms = (time.perf_counter() - start) * 1000 / len(crops)
    print(f"Compression sweep: {len(crops)} tiles, read + resize {read_ms:.1f} ms per crop; load before: {load()}\n")
    print("| zlib level | ms per crop (encode) | KiB per crop | size vs. level 6 | crops/s, one core (read + resize + encode) |")
    print("|---|---|---|---|---|")
    rows = []
    for level in range(10):
        passes, size = [], 0
        for _ in range(3):
            start = time.perf_counter()
            size = 0
            for crop in crops:
                buffer = io.BytesIO()
                crop.save(buffer, format="PNG", compress_level=level)
                size += buffer.tell()
            passes.append((time.perf_counter() - start) * 1000 / len(crops))
        rows.append((level, statistics.median(passes), size / len(crops) / 1024))
    level6 = rows[6][2]
    for level, ms, kib in rows:
        print(f"| {level} | {ms:.1f} | {kib:.1f} | {kib / level6:.2f}x | {1000 / (read_ms + ms):.0f} |")
    print(f"\nload after: {load()}\n")


def tile(slide: Path, settings: CropSettings, workers: int) -> tuple[list[dict], float, str, str]:
    before = load()
    with tempfile.TemporaryDirectory(prefix="ingest-tiles-") as tmp:
        start = time.perf_counter()
        records, problems = crop_class([(slide.name, sha256_file(slide))], slide.parent, Path(tmp), settings, workers=workers)
        seconds = time.perf_counter() - start
    if problems:
        raise SystemExit(f"the slide was skipped: {problems}")
    return [r.as_row() for r in records], seconds, before, load()


def main() -> None:
    params = load_params(DEFAULT_PARAMS_FILE)
    crops = params["crops"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sweep", type=int, default=200, help="tiles in the compression sweep; 0 skips it")
    parser.add_argument("--level", type=int, default=int(crops["png_compress_level"]), help="the chosen level (params.yaml)")
    parser.add_argument("--workers", type=int, default=int(crops["workers"]), help="workers of the new behaviour (params.yaml)")
    args = parser.parse_args()
    slide = args.slide.resolve()
    # params.yaml's crops and ingest, pinned to 512 px tiles read at level 0 (not by mpp) and written at 256 px.
    base = crop_settings(params)
    tiles = replace(base.tiles, tile_size=TILE_SIZE, level=0, mpp=None)

    def settings(level: int) -> CropSettings:
        return replace(base, mode="tiles", resolution=RESOLUTION, small_image_policy="skip", tiles=tiles,
                       png_compress_level=level)

    if args.sweep:
        sweep(slide, settings(args.level), args.sweep)
    variants = [("old: Pillow default level 6", 1, 6), (f"level {args.level}", 1, args.level), (f"level {args.level}", args.workers, args.level)]
    results: dict[int, list] = {index: [] for index in range(len(variants))}
    for _ in range(args.rounds):
        for index, (_, workers, level) in enumerate(variants):
            results[index].append(tile(slide, settings(level), workers))
    same = results[1][0][0] == results[2][0][0]
    print(f"Tiling {slide.name}: {len(results[0][0][0])} tiles; index and hashes identical for 1 and {args.workers} workers: {same}\n")
    print("| variant | workers | round seconds | median tiles/s | load before → after (1 min) |")
    print("|---|---|---|---|---|")
    for index, (name, workers, _) in enumerate(variants):
        runs = results[index]
        rate = statistics.median(len(rows) / seconds for rows, seconds, _, _ in runs)
        seconds = ", ".join(f"{s:.1f}" for _, s, _, _ in runs)
        loads = "; ".join(f"{before.split(',')[0]} → {after.split(',')[0]}" for _, _, before, after in runs)
        print(f"| {name} | {workers} | {seconds} | {rate:.1f} | {loads} |")


if __name__ == "__main__":
    main()
