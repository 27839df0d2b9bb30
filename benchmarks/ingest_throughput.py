"""Crops per second and augmented images per second on the demo slides, one process vs. both cores.

Run after `histo-assets fetch-sample-data`:
    .venv/bin/python benchmarks/ingest_throughput.py [--resolution 64 512]
Prints a Markdown table; results are recorded in benchmarks/README.md.
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from histo_assets.core.augment import augment_class
from histo_assets.core.crops import crop_class
from histo_assets.core.io import sha256_file
from histo_assets.core.slides import inventory_class
from histo_assets.params import PROJECT_ROOT, load_params
from histo_assets.settings import augmentation_settings, crop_settings, ingest_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--params", default=str(PROJECT_ROOT / "params.demo.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    ingest, crops_base = ingest_settings(params), crop_settings(params)
    augmentation = augmentation_settings(params)
    recipe, total = augmentation.recipe, augmentation.total
    print("| resolution | stage | workers | images | seconds | images/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in args.resolution:
            sources = []
            for tissue_class in params.classes:
                records, _ = inventory_class(
                    params.data_dir / "raw" / tissue_class, params.data_dir, list(ingest.extensions),
                    ingest.max_image_pixels, ingest.max_file_bytes,
                )
                sources += [(r.path, r.sha256) for r in records]
            # Pillow's default PNG level (-1), what the figures in benchmarks/README.md were measured with.
            settings = replace(crops_base, mode="tiles", resolution=resolution, small_image_policy="skip",
                               tiles=replace(crops_base.tiles, tile_size=max(resolution, crops_base.tiles.tile_size)),
                               png_compress_level=-1)
            out = Path(tmp) / f"crops{resolution}"
            start = time.perf_counter()
            crops, _ = crop_class(sources, params.data_dir, out, settings)
            seconds = time.perf_counter() - start
            print(f"| {resolution} | square crops (tiles) | 1 | {len(crops)} | {seconds:.2f} | {len(crops) / seconds:.1f} |")
            inputs = [(out / c.crop_file, sha256_file(out / c.crop_file)) for c in crops]
            for workers in (1, 2):
                start = time.perf_counter()
                augment_class(inputs, Path(tmp) / f"aug{resolution}-{workers}", recipe=recipe, total=total,
                              keep_originals=False, seed=params.seed, workers=workers)
                seconds = time.perf_counter() - start
                print(f"| {resolution} | augmented crops | {workers} | {total} | {seconds:.2f} | {total / seconds:.1f} |")


if __name__ == "__main__":
    main()
