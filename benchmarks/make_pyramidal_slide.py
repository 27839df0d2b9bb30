"""Write a large tissue-like pyramidal slide, for timing ingest on a realistic whole-slide image.

    .venv/bin/python benchmarks/make_pyramidal_slide.py /tmp/bench-slides/raw/slide.tiff [--size 30720]

The result is a tiled (256 px), JPEG-compressed BigTIFF with a level every factor 2 down
to under 1,024 px and an mpp of 0.25 (a 40x scan), as Aperio-style scanners write:
tiffslide opens it as a pyramid. The content is drawn procedurally, tile by tile, so a
30k x 30k slide needs little memory: smooth blobs of tissue (roughly half the slide)
on white glass, eosin-pink stroma with texture and noise, and a hematoxylin-purple nucleus
in most cells of a 24 px grid. Every level is drawn from the same functions at its own
scale rather than downsampled, which keeps the levels consistent without holding level 0.
The same seed gives the same pixels.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

TILE = 256
MPP = 0.25
BLOB = 4096  # level-0 px between the control points of the tissue outline
TEXTURE = 48  # level-0 px between the control points of the stroma texture
CELL = 24  # level-0 px per cell; one nucleus at most per cell
GLASS = np.array([242.0, 240.0, 244.0])
EOSIN = np.array([226.0, 150.0, 190.0])
HEMATOXYLIN = np.array([92.0, 52.0, 140.0])


class Slide:
    """The slide's content as functions of level-0 coordinates, so any level can draw any tile."""

    def __init__(self, size: int, seed: int):
        rng = np.random.default_rng(seed)
        self.size = size
        self.seed = seed
        self.blobs = rng.random((size // BLOB + 3, size // BLOB + 3))
        self.fine_blobs = rng.random((size // (BLOB // 4) + 3, size // (BLOB // 4) + 3))
        self.texture = rng.random((size // TEXTURE + 3, size // TEXTURE + 3))
        cells = size // CELL + 2
        self.nucleus = rng.random((cells, cells)) < 0.7
        self.radius = rng.uniform(3.5, 7.0, (cells, cells))
        slack = CELL / 2 - self.radius
        self.centre_x = CELL / 2 + rng.uniform(-1, 1, (cells, cells)) * slack
        self.centre_y = CELL / 2 + rng.uniform(-1, 1, (cells, cells)) * slack

    @staticmethod
    def _value_noise(grid: np.ndarray, spacing: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Smoothly interpolated grid values at level-0 coordinates (rows ys, columns xs)."""
        gx, gy = xs / spacing, ys / spacing
        ix, iy = gx.astype(int), gy.astype(int)
        fx, fy = gx - ix, gy - iy
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
        top = grid[iy[:, None], ix[None, :]] * (1 - fx) + grid[iy[:, None], ix[None, :] + 1] * fx
        bottom = grid[iy[:, None] + 1, ix[None, :]] * (1 - fx) + grid[iy[:, None] + 1, ix[None, :] + 1] * fx
        return top * (1 - fy[:, None]) + bottom * fy[:, None]

    def tile(self, level: int, row: int, column: int) -> np.ndarray:
        """One TILE x TILE RGB tile of ``level`` (downsample 2**level)."""
        scale = 2**level
        xs = np.minimum((column * TILE + np.arange(TILE) + 0.5) * scale, self.size - 1)
        ys = np.minimum((row * TILE + np.arange(TILE) + 0.5) * scale, self.size - 1)
        outline = 0.75 * self._value_noise(self.blobs, BLOB, xs, ys) + 0.25 * self._value_noise(self.fine_blobs, BLOB // 4, xs, ys)
        tissue = np.clip((outline - 0.5) * 40, 0, 1)[..., None]
        stroma = 0.75 + 0.35 * self._value_noise(self.texture, TEXTURE, xs, ys)[..., None]
        cx, cy = (xs // CELL).astype(int), (ys // CELL).astype(int)
        dx = xs[None, :] - (cx[None, :] * CELL + self.centre_x[cy[:, None], cx[None, :]])
        dy = ys[:, None] - (cy[:, None] * CELL + self.centre_y[cy[:, None], cx[None, :]])
        inside = (dx * dx + dy * dy < self.radius[cy[:, None], cx[None, :]] ** 2) & self.nucleus[cy[:, None], cx[None, :]]
        stain = np.where(inside[..., None], HEMATOXYLIN, 255 - (255 - EOSIN) * stroma)
        noise = np.random.default_rng([self.seed, level, row, column]).normal(0, 6, (TILE, TILE, 3))
        pixels = GLASS * (1 - tissue) + stain * tissue + noise
        return np.clip(pixels, 0, 255).astype(np.uint8)


def level_sides(size: int) -> list[int]:
    sides = [size]
    while sides[-1] > 1024:
        sides.append(sides[-1] // 2)
    return sides


def write_slide(path: Path, size: int, seed: int, quality: int) -> None:
    slide = Slide(size, seed)
    sides = level_sides(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels_per_cm = 1e4 / MPP
    tiles_total = sum(math.ceil(side / TILE) ** 2 for side in sides)
    with tqdm(total=tiles_total, desc=path.name, unit="tile") as bar, tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, side in enumerate(sides):
            count = math.ceil(side / TILE)  # edge tiles are stored whole, as TIFF requires

            def tiles(level=level, count=count):
                for row in range(count):
                    for column in range(count):
                        bar.update()
                        yield slide.tile(level, row, column)

            extra = {"subifds": len(sides) - 1, "resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                tiles(),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                **(extra if level == 0 else {"subfiletype": 1}),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", type=int, default=30720, help="side of level 0 in px (default 30720 = 120 tiles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality of the tiles")
    args = parser.parse_args()
    write_slide(args.path, args.size, args.seed, args.quality)
    print(f"{args.path}: {args.path.stat().st_size / 2**20:.0f} MiB, levels {level_sides(args.size)}")


if __name__ == "__main__":
    main()
