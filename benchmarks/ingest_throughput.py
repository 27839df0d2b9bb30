"""Crops per second and augmented images per second on the demo slides, one process vs. both cores.

Run after `histo-assets fetch-sample-data`:
    .venv/bin/python benchmarks/ingest_throughput.py [--resolution 64 512]
Prints a Markdown table; results are recorded in benchmarks/README.md.
"""

import argparse
import tempfile
import time
from pathlib import Path

from histo_assets.core.augment import AugmentationRecipe, augment_class
from histo_assets.core.crops import CropSettings, TileSettings, crop_class
from histo_assets.core.io import sha256_file
from histo_assets.core.slides import inventory_class
from histo_assets.params import PROJECT_ROOT, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--params", default=str(PROJECT_ROOT / "params.demo.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    ingest, tiles = params["ingest"], params["crops"]["tiles"]
    recipe = AugmentationRecipe.from_params(params["augmentation"])
    total = int(params["augmentation"]["total"])
    print("| resolution | stage | workers | images | seconds | images/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in args.resolution:
            sources = []
            for tissue_class in params.classes:
                records, _ = inventory_class(
                    params.data_dir / "raw" / tissue_class, params.data_dir, ingest["extensions"],
                    int(ingest["max_image_pixels"]), int(ingest["max_file_bytes"]),
                )
                sources += [(r.path, r.sha256) for r in records]
            settings = CropSettings("tiles", resolution, "skip", int(ingest["max_image_pixels"]),
                                    int(ingest["max_file_bytes"]), TileSettings(**(tiles | {"tile_size": max(resolution, tiles["tile_size"])})))
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
