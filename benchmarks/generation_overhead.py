"""Cost of generating through a hypernetwork and of the project's wrapper, against plain diffusers.

Four variants at the same settings on the tiny model: the bare diffusers
pipeline, the same with the hypernetwork attention processor installed, and
`generate_images` (PNG info, atomic PNG writes, hashing) without and with a
hypernetwork. After one warm-up each, the variants run in turn for
`--repeats` rounds, so that load from other processes on a shared machine
falls on all of them alike; the median and the fastest round are reported.
Torch uses one thread by default: on a busy machine, more threads than free
cores make timings swing several-fold. Run:
    .venv/bin/python benchmarks/generation_overhead.py [--images 8 --steps 20 --resolution 64]
Prints a Markdown table.
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from histo_assets.core.base_model import TINY_HYPERNETWORK_SIZES, load_base_model
from histo_assets.core.hypernetwork import (
    Hypernetwork,
    HypernetworkOptions,
    apply_hypernetwork,
    load_hypernetwork,
    save_hypernetwork,
)
from histo_assets.core.sampling import generate_images, image_seed
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import generation_settings


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = replace(generation_settings(load_params(DEFAULT_PARAMS_FILE)), prompt="an H&E histology tile of [name]",
                       negative_prompt="grainy, blurry, low quality", steps=args.steps, width=args.resolution,
                       height=args.resolution, batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_base_model("tiny", tiny_cache_dir=root / "cache", seed=0, device=args.device)
        hn_path = save_hypernetwork(
            Hypernetwork("fibrocystic", HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES), seed=0),
            root / "fibrocystic-5000.pt",
        )
        hypernetwork = load_hypernetwork(hn_path, map_location=base.device).eval().requires_grad_(False)
        # The tiny model ships an Euler scheduler, so its own pipeline is the plain-diffusers reference.
        pipeline = base.pipeline
        pipeline.set_progress_bar_config(disable=True)
        prompt = "an H&E histology tile of fibrocystic"

        def bare() -> None:
            for start in range(0, args.images, args.batch_size):
                indices = range(start, min(start + args.batch_size, args.images))
                generators = [torch.Generator("cpu").manual_seed(image_seed(0, "b", 0, i)) for i in indices]
                pipeline(prompt=prompt, negative_prompt=settings.negative_prompt, generator=generators,
                         num_images_per_prompt=len(generators), num_inference_steps=settings.steps,
                         guidance_scale=settings.cfg_scale, width=settings.width, height=settings.height)

        def with_processor() -> None:
            with apply_hypernetwork(base.unet, hypernetwork, settings.multiplier):
                bare()

        def wrapper(path: Path | None) -> Callable[[], object]:
            return lambda: generate_images(base, path, root / "out", tissue_class="fibrocystic", step=5000,
                                           count=args.images, settings=settings, master_seed=0)

        variants = [
            ("diffusers pipeline, no hypernetwork", bare),
            ("diffusers pipeline + hypernetwork processor", with_processor),
            ("generate_images, no hypernetwork", wrapper(None)),
            ("generate_images, hypernetwork", wrapper(hn_path)),
        ]
        for _, run in variants:
            run()  # warm-up: first calls pay for allocator growth and kernel selection
        times: dict[str, list[float]] = {label: [] for label, _ in variants}
        for _ in range(args.repeats):
            for label, run in variants:
                times[label].append(seconds(run))

    reference = statistics.median(times[variants[0][0]])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{args.images} images, {args.resolution}x{args.resolution}, {args.steps} Euler steps, CFG "
          f"{settings.cfg_scale:g}, batch {args.batch_size}, device {base.device}, torch threads "
          f"{torch.get_num_threads()}, load average {load}; {args.repeats} interleaved rounds after one warm-up\n")
    print("| variant | median s | fastest s | median s/image | median vs. plain diffusers |")
    print("|---|---|---|---|---|")
    for label, runs in times.items():
        median = statistics.median(runs)
        print(f"| {label} | {median:.3f} | {min(runs):.3f} | {median / args.images:.3f} | "
              f"{median / reference:.2f}x |")


if __name__ == "__main__":
    main()
