"""Seconds per hypernetwork training step with an SD 1.5-sized U-Net, against the thesis's 0.27 s/step.

The U-Net is `UNet2DConditionModel` with SD 1.5's configuration (block_out_channels
(320, 640, 1280, 1280), cross_attention_dim 768, attention_head_dim 8,
layers_per_block 2, sample_size 64) and random weights: the compute is that of
SD 1.5, the numbers it produces are not. The hypernetwork is the default SD 1.5
one (sizes 768/320/640/1280, [1, 2, 1], linear). A step is what
`train_hypernetwork` does at batch 1: `diffusion_loss` (which runs the U-Net
under fp16 autocast on CUDA, with fp16 weights as `load_base_model` loads them),
GradScaler backward, AdamW step. Latents and text conditioning are random
tensors of the cached shapes, i.e. latent caching is assumed. For the overhead
ratio, a bare U-Net forward+backward (gradient w.r.t. the input latents, nothing
trained; see training_overhead.py) is timed the same way.

On CUDA: `--warmup` untimed steps, then `--steps` timed ones, synchronised,
median reported. Without CUDA it runs `--cpu-steps` timed steps after one
warm-up, clearly labelled CPU, at `--cpu-resolution` (default 256 px: on the
shared 2-core benchmark machine a 512 px step takes longer than the ~2 minute
budget, see benchmarks/README.md). `--no-cpu` only reports that no GPU is there.
Run:
    .venv/bin/python benchmarks/sd15_step_time.py [--steps 20 --warmup 5 --threads 2 --cpu-resolution 256]
Prints a Markdown table.
"""

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from histo_assets.core.hypernetwork import Hypernetwork, HypernetworkOptions, apply_hypernetwork
from histo_assets.core.training import WEIGHT_DECAY, diffusion_loss

THESIS_SECONDS_PER_STEP = 0.27  # A6000, 512x512, batch 1 (thesis.md)


def sd15_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, default=512, help="on CUDA")
    parser.add_argument("--steps", type=int, default=20, help="timed steps on CUDA")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps on CUDA")
    parser.add_argument("--cpu-resolution", type=int, default=256)
    parser.add_argument("--cpu-steps", type=int, default=2)
    parser.add_argument("--no-cpu", action="store_true", help="without CUDA, only say so")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if not cuda and args.no_cpu:
        print("No CUDA GPU available: SD 1.5 step time not measured.")
        return
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    resolution, warmup, steps = (args.resolution, args.warmup, args.steps) if cuda else (args.cpu_resolution, 1,
                                                                                         args.cpu_steps)

    started = time.perf_counter()
    unet = sd15_unet().to(device, dtype).requires_grad_(False).eval()
    base = SimpleNamespace(unet=unet, device=device, dtype=dtype)  # all diffusion_loss reads of a BaseModel
    build_seconds = time.perf_counter() - started
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    hn = Hypernetwork("sd15", HypernetworkOptions(), seed=0).to(device).train()
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-5, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, generator=generator)
    conditioning = torch.randn(1, 77, 768, generator=generator)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def hn_step() -> None:
        with apply_hypernetwork(unet, hn):
            scaler.scale(diffusion_loss(base, scheduler, latents, conditioning, generator)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def bare_step() -> None:
        diffusion_loss(base, scheduler, latents.clone().requires_grad_(True), conditioning, generator).backward()

    results = {}
    for label, step in (("hypernetwork training step", hn_step), ("bare U-Net fwd+bwd", bare_step)):
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        results[label] = times

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({args.threads} torch threads)"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    precision = "fp16 weights + autocast, GradScaler" if cuda else "fp32"
    print(f"SD 1.5-sized U-Net ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, built in "
          f"{build_seconds:.1f} s), hypernetwork {sum(p.numel() for p in hn.parameters()) / 1e6:.1f} M parameters; "
          f"{name}, {precision}, {resolution}x{resolution}, batch 1, {warmup} warm-up + {steps} timed steps; "
          f"load average {load}\n")
    print("| device | px | variant | median s/step | fastest s/step | vs. thesis 0.27 s/step (A6000, 512 px) |")
    print("|---|---|---|---|---|---|")
    for label, times in results.items():
        median = statistics.median(times)
        print(f"| {'CUDA' if cuda else 'CPU'} | {resolution} | {label} | {median:.3f} | {min(times):.3f} | "
              f"{median / THESIS_SECONDS_PER_STEP:.2f}x |")
    hn_median, bare_median = (statistics.median(t) for t in results.values())
    print(f"\nhypernetwork step / bare U-Net fwd+bwd: {hn_median / bare_median:.2f}x")


if __name__ == "__main__":
    main()
