"""Seconds per training step with a hypernetwork against a bare U-Net forward+backward, on CPU.

Five variants on the tiny model, for each resolution and batch size:

* **bare U-Net fwd+bwd, cached**: `diffusion_loss` on cached latents and
  conditioning, no hypernetwork, backward into the noisy input latents;
* **hypernetwork step, cached**: what `train_hypernetwork` does per step:
  `diffusion_loss` under `apply_hypernetwork`, backward, AdamW step, zero_grad
  (also timed without the AdamW step, to show the optimizer's share);
* the bare and full hypernetwork steps **uncached**: each step first VAE-encodes the images (pixels
  already in memory, a fresh latent sample) and tokenises and text-encodes the
  prompts, as would happen if `build_dataset` cached nothing.

Why backward into the input latents: the base model is frozen, so a bare U-Net
has nothing to train. Asking for the gradient of the loss w.r.t. the input makes
autograd run the activation-gradient pass through every layer, with no weight
gradients, which is the backward a hypernetwork step also runs (the U-Net
weights stay frozen there too; gradients flow down to the first attention
layer's K/V contexts). A dummy scalar parameter on the loss would time almost
no backward at all and make the ratio meaningless.

Variants run in turn for `--repeats` rounds of `--steps` steps after one warm-up
round, so that load from other processes falls on all alike; the median round is
reported. Then `train_hypernetwork` runs end to end (`--train-steps` on
`--images` generated H&E-like images, checkpoints at half way and at the end);
its own steps/s covers the loop (with checkpoint writes), not the encoding.
Run:
    .venv/bin/python benchmarks/training_overhead.py [--resolution 64 128 --batch 1 --threads 1]
    .venv/bin/python benchmarks/training_overhead.py --batch 4 --train-repeats 0   # batch 4, per-step part only
Prints Markdown tables.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from histo_assets.core.base_model import TINY_HYPERNETWORK_SIZES, load_base_model
from histo_assets.core.hypernetwork import Hypernetwork, HypernetworkOptions, apply_hypernetwork
from histo_assets.core.training import TrainingSettings, diffusion_loss, train_hypernetwork

PROMPT = "an H&E histology tile of fibrocystic, hn"


def load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def write_images(folder: Path, count: int, size: int = 256) -> None:
    """Pink stroma with purple nuclei-like blobs: enough texture for the VAE to do real work."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        image = np.empty((size, size, 3), np.float32)
        image[:] = (235, 170, 200)
        for _ in range(40):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [rng.integers(3, 9)]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (110, 60, 150)
        image += rng.normal(0, 12, image.shape)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}-fibrocystic.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--train-repeats", type=int, default=3, help="0 skips the end-to-end runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_base_model("tiny", tiny_cache_dir=root / "cache", seed=0, device="cpu")
        write_images(root / "images", args.images)
        noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        scaling = float(base.vae.config.scaling_factor)
        hn = Hypernetwork("hn", HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES), seed=0).train()
        optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-5, weight_decay=0.01)
        print(f"tiny model on CPU, torch threads {torch.get_num_threads()}, hypernetwork "
              f"{sum(p.numel() for p in hn.parameters()):,} parameters (sizes {TINY_HYPERNETWORK_SIZES}, [1, 2, 1]); "
              f"median of {args.repeats} interleaved rounds of {args.steps} steps after one warm-up round\n")
        print("| px | batch | variant | median ms/step | fastest ms/step | vs. bare U-Net (same caching) | load avg |")
        print("|---|---|---|---|---|---|---|")

        for resolution in args.resolution:
            for batch in args.batch:
                shape = (batch, 3, resolution, resolution)
                pixels = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1  # in memory, [-1, 1]

                @torch.no_grad()
                def encode(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
                    latents = base.vae.encode(pixels).latent_dist.sample(generator) * scaling
                    ids = base.tokenizer([PROMPT] * batch, padding="max_length", truncation=True,
                                         max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
                    return latents, base.text_encoder(ids)[0]

                cached_latents, cached_cond = encode(torch.Generator().manual_seed(0))  # as build_dataset's "once"

                def bare_steps(cached: bool, generator: torch.Generator) -> None:
                    for _ in range(args.steps):
                        latents, cond = (cached_latents, cached_cond) if cached else encode(generator)
                        latents = latents.clone().requires_grad_(True)
                        diffusion_loss(base, noise_scheduler, latents, cond, generator).backward()

                def hn_steps(cached: bool, generator: torch.Generator, update: bool = True) -> None:
                    with apply_hypernetwork(base.unet, hn):  # once per block, as train_hypernetwork does per run
                        for _ in range(args.steps):
                            latents, cond = (cached_latents, cached_cond) if cached else encode(generator)
                            diffusion_loss(base, noise_scheduler, latents, cond, generator).backward()
                            if update:
                                optimizer.step()
                            optimizer.zero_grad(set_to_none=True)

                variants = {
                    "bare U-Net fwd+bwd, cached": lambda g: bare_steps(True, g),
                    "hypernetwork fwd+bwd (no AdamW), cached": lambda g: hn_steps(True, g, update=False),
                    "hypernetwork step, cached": lambda g: hn_steps(True, g),
                    "bare U-Net fwd+bwd, uncached": lambda g: bare_steps(False, g),
                    "hypernetwork step, uncached": lambda g: hn_steps(False, g),
                }
                times: dict[str, list[float]] = {label: [] for label in variants}
                for round_ in range(args.repeats + 1):
                    for label, run in variants.items():
                        start = time.perf_counter()
                        run(torch.Generator().manual_seed(round_))
                        if round_:  # round 0 is the warm-up
                            times[label].append((time.perf_counter() - start) / args.steps * 1000)
                for label, runs in times.items():
                    reference = statistics.median(times[f"bare U-Net fwd+bwd, {label.rsplit(', ', 1)[1]}"])
                    print(f"| {resolution} | {batch} | {label} | {statistics.median(runs):.1f} | {min(runs):.1f} | "
                          f"{statistics.median(runs) / reference:.2f}x | {load()} |")

        if not args.train_repeats:
            return
        print(f"\n`train_hypernetwork`, {args.train_steps} steps, batch 1, {args.images} images, checkpoints at "
              f"{args.train_steps // 2} and {args.train_steps}, median of {args.train_repeats} runs\n")
        print("| px | steps/s (training loop) | ms/step | whole call s (encode + loop + saves) | load avg |")
        print("|---|---|---|---|---|")
        for resolution in args.resolution:
            rates, walls = [], []
            for run in range(args.train_repeats):
                start = time.perf_counter()
                settings = TrainingSettings(
                    templates=("an H&E histology tile of [filewords], [name]",), max_steps=args.train_steps,
                    learning_rate="1e-5", batch_size=1, gradient_accumulation=1,
                    checkpoint_steps=(args.train_steps // 2, args.train_steps), clip_mode="disabled",
                    clip_value="0.1", latent_sampling="once", loss_log_every=10,
                )
                result = train_hypernetwork(base, root / "images", root / f"train-{resolution}-{run}", settings,
                                            name="hn", options=HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES),
                                            resolution=resolution, seed=run)
                walls.append(time.perf_counter() - start)
                rates.append(result.steps_per_second)
            rate = statistics.median(rates)
            print(f"| {resolution} | {rate:.1f} | {1000 / rate:.1f} | {statistics.median(walls):.2f} | {load()} |")


if __name__ == "__main__":
    main()
