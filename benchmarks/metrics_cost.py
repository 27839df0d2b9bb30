"""Feature passes and seconds to score K checkpoints, with FeatureCache against recomputing the real set.

N_real real-like H&E images and K sets of N_gen "generated" images (noise
textures, made with numpy/PIL in a temporary folder) are scored with
`score_checkpoint`, on the random-conv fallback extractor (`build_extractor`
without Inception weights), wrapped so that it counts the images it sees:

* **FeatureCache**: what the pipeline does: real features come from the cache
  (computed on the first checkpoint), generated ones are extracted per checkpoint;
* **naive**: every checkpoint extracts the real set and its generated set anew.

The real set stands in for both the held-out reference and the training set
that `score_checkpoint` takes. Expected passes: N_real + K x N_gen against
K x (N_real + N_gen). Each approach runs `--repeats` times (fresh cache each
time), interleaved; the median is reported. Run:
    .venv/bin/python benchmarks/metrics_cost.py [--real 64 --checkpoints 4 --generated 32 --threads 1]
Prints a Markdown table.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from histo_assets.core.evaluation import FeatureCache, FeatureSet, MetricSettings, score_checkpoint
from histo_assets.core.feature_networks import ImageFeatureExtractor
from histo_assets.core.features import WEIGHTS_ENV, build_extractor, extract_features
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import from_section


class CountingExtractor(ImageFeatureExtractor):
    """Passes images to ``inner`` and counts them: one feature pass per image."""

    def __init__(self, inner: ImageFeatureExtractor) -> None:
        super().__init__()
        self.inner, self.num_features, self.has_logits, self.images = inner, inner.num_features, inner.has_logits, 0

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self.images += images.shape[0]
        return self.inner.features_and_logits(images)


def write_images(folder: Path, count: int, seed: int, size: int) -> list[Path]:
    """Pink/purple noise tiles, smoothed so that they are not pure white noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        tint = np.array([230, 150, 200]) - rng.integers(0, 80, 3)
        image = tint + rng.normal(0, 30, (size // 4, size // 4, 3))
        path = folder / f"{i:04d}.png"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--real", type=int, default=64)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--generated", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="image side in px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop(WEIGHTS_ENV, None)  # force the random-conv fallback
    extractor, info = build_extractor(None, seed=0)
    counter = CountingExtractor(extractor)
    settings = from_section(MetricSettings, load_params(DEFAULT_PARAMS_FILE)["metrics"], seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        real = write_images(root / "real", args.real, seed=0, size=args.size)
        generated = [write_images(root / f"gen{k}", args.generated, seed=k + 1, size=args.size)
                     for k in range(args.checkpoints)]

        scoring = [0.0]  # seconds inside score_checkpoint, to separate metric maths from feature extraction

        def score(*sets: FeatureSet) -> None:
            start = time.perf_counter()
            score_checkpoint(*sets, info, settings)
            scoring[0] += time.perf_counter() - start

        def cached(run: int) -> None:
            cache = FeatureCache(root / f"cache{run}", counter, info, settings.batch_size)
            for paths in generated:
                reference = cache.features(real)
                score(cache.features(paths), reference, cache.features(real))

        def naive(run: int) -> None:
            def extract(paths: list[Path]) -> FeatureSet:
                return FeatureSet(*extract_features(counter, (Image.open(p) for p in paths), settings.batch_size))

            for paths in generated:
                reference = extract(real)
                score(extract(paths), reference, reference)

        results: dict[str, tuple[list[float], list[float], int]] = {}
        for run in range(args.repeats):
            for label, evaluate in (("FeatureCache (pipeline)", cached), ("naive: real set every checkpoint", naive)):
                counter.images, scoring[0] = 0, 0.0
                start = time.perf_counter()
                evaluate(run)
                times, score_times, _ = results.setdefault(label, ([], [], counter.images))
                times.append(time.perf_counter() - start)
                score_times.append(scoring[0])

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    k, n_real, n_gen = args.checkpoints, args.real, args.generated
    print(f"{info.name} extractor ({info.feature_dim}-d, {info.input_size} px input), {args.size} px PNGs, "
          f"N_real {n_real}, K {k}, N_gen {n_gen}, feature batch {settings.batch_size}, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats} interleaved runs; load average {load}\n")
    print("| approach | feature passes (images) | expected | median s | fastest s | s per checkpoint | "
          "of which score_checkpoint s |")
    print("|---|---|---|---|---|---|---|")
    expected = {"FeatureCache (pipeline)": f"N_real + K·N_gen = {n_real + k * n_gen}",
                "naive: real set every checkpoint": f"K·(N_real + N_gen) = {k * (n_real + n_gen)}"}
    for label, (times, score_times, passes) in results.items():
        median = statistics.median(times)
        print(f"| {label} | {passes} | {expected[label]} | {median:.2f} | {min(times):.2f} | {median / k:.3f} | "
              f"{statistics.median(score_times):.2f} |")


if __name__ == "__main__":
    main()
