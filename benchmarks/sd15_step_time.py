"""Seconds per hypernetwork training step with an SD 1.5-sized U-Net, against the thesis's 0.27 s/step.

The U-Net is `UNet2DConditionModel` with SD 1.5's configuration (block_out_channels
(320, 640, 1280, 1280), cross_attention_dim 768, attention_head_dim 8,
layers_per_block 2, sample_size 64) and random weights: the compute of SD 1.5,
not its outputs. The hypernetwork is the default SD 1.5 one (sizes
768/320/640/1280, [1, 2, 1], linear). A step is what `train_hypernetwork` does
at batch 1: `diffusion_loss` (fp16 weights as `load_base_model` loads them on
CUDA, run under fp16 autocast there), GradScaler backward, AdamW step. Latents
and conditioning are random tensors of the cached shapes (latent caching on).
For the overhead ratio a bare U-Net forward+backward is timed the same way
(gradient w.r.t. the input latents, nothing trained; see training_overhead.py).

Timing, on CUDA: `--warmup` untimed rounds of both variants, then `--steps`
rounds of (hypernetwork step, bare step), synchronised; medians. Without CUDA,
labelled CPU: one untimed hypernetwork step (it creates the same conv kernels
the bare step uses), then `--cpu-steps` rounds, at `--cpu-resolution` (default
256: on the shared 2-core machine one 256 px step already takes 20-60 s, and
512 px needs 4.7x the FLOPs, see benchmarks/README.md); `--no-cpu` only says
that there is no GPU.

Also, unless `--no-flops`: matmul/conv/bmm FLOPs of one forward+backward of each
variant at 256 and 512 px, counted by `torch.utils.flop_counter` on the meta
device (no data, so no time and no load dependence; AdamW is not counted).
Run:
    .venv/bin/python benchmarks/sd15_step_time.py [--steps 20 --warmup 5 --threads 2 --cpu-resolution 256]
Prints Markdown tables.
"""

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from histo_assets.core.hypernetwork import Hypernetwork, HypernetworkOptions, apply_hypernetwork
from histo_assets.core.training import WEIGHT_DECAY, diffusion_loss

THESIS_SECONDS_PER_STEP = 0.27  # A6000, 512x512, batch 1 (thesis.md)
HN, BARE = "hypernetwork training step", "bare U-Net fwd+bwd"


def sd15_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )


def step_functions(unet, device: torch.device, dtype: torch.dtype, resolution: int, train: bool) -> dict:
    """The two variants as zero-argument callables; ``train=False`` leaves out AdamW (for counting FLOPs)."""
    base = SimpleNamespace(unet=unet, device=device, dtype=dtype)  # all that diffusion_loss reads of a BaseModel
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    hn = Hypernetwork("sd15", HypernetworkOptions(), seed=0).to(device).train()
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-5, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, device=device)
    conditioning = torch.randn(1, 77, 768, device=device)

    def hn_step() -> None:
        with apply_hypernetwork(unet, hn):
            scaler.scale(diffusion_loss(base, scheduler, latents, conditioning, generator)).backward()
        if train:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def bare_step() -> None:
        diffusion_loss(base, scheduler, latents.clone().requires_grad_(True), conditioning, generator).backward()

    return {HN: hn_step, BARE: bare_step}


def time_steps(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    resolution, rounds = (args.resolution, args.steps) if cuda else (args.cpu_resolution, args.cpu_steps)
    started = time.perf_counter()
    unet = sd15_unet().to(device, dtype).requires_grad_(False).eval()
    build = time.perf_counter() - started
    steps = step_functions(unet, device, dtype, resolution, train=True)
    warmup = [step for _ in range(args.warmup) for step in steps.values()] if cuda else [steps[HN]]
    for step in warmup:
        step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)

    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    precision = "fp16 weights + autocast, GradScaler" if cuda else "fp32"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"SD 1.5-sized U-Net ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, built in "
          f"{build:.0f} s), default SD 1.5 hypernetwork; {where}, {precision}, torch threads "
          f"{torch.get_num_threads()}, {resolution}x{resolution}, batch 1, {len(warmup)} warm-up step(s) + {rounds} "
          f"timed round(s) of (hypernetwork step, bare step); load average at the end {load}\n")
    print("| device | px | variant | median s/step | fastest s/step | median / thesis 0.27 s/step (A6000, 512 px) |")
    print("|---|---|---|---|---|---|")
    for label, runs in times.items():
        median = statistics.median(runs)
        print(f"| {'CUDA' if cuda else 'CPU'} | {resolution} | {label} | {median:.3f} | {min(runs):.3f} | "
              f"{median / THESIS_SECONDS_PER_STEP:.1f}x |")
    ratio = statistics.median(times[HN]) / statistics.median(times[BARE])
    print(f"\nhypernetwork step / bare U-Net fwd+bwd (medians): {ratio:.2f}x; all timings (s): "
          + "; ".join(f"{label}: {', '.join(f'{t:.2f}' for t in runs)}" for label, runs in times.items()))


def count_flops(resolutions: list[int]) -> None:
    with torch.device("meta"):
        unet = sd15_unet().requires_grad_(False).eval()
    print("\n| px | variant | GFLOP per fwd+bwd (matmul, conv, attention bmm) | vs. bare |")
    print("|---|---|---|---|")
    for resolution in resolutions:
        flops = {}
        for label, step in step_functions(unet, torch.device("meta"), torch.float32, resolution, train=False).items():
            with FlopCounterMode(display=False) as counter:
                step()
            flops[label] = counter.get_total_flops() / 1e9
        for label, gflop in flops.items():
            name = label.replace("training step", "fwd+bwd")
            print(f"| {resolution} | {name} | {gflop:,.0f} | {gflop / flops[BARE]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, default=512, help="on CUDA")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds on CUDA")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds on CUDA")
    parser.add_argument("--cpu-resolution", type=int, default=256)
    parser.add_argument("--cpu-steps", type=int, default=1, help="timed rounds on CPU")
    parser.add_argument("--no-cpu", action="store_true", help="without CUDA, do not time CPU steps")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available() or not args.no_cpu:
        time_steps(args)
    else:
        print("No CUDA GPU available: SD 1.5 step time not measured.")
    if not args.no_flops:
        count_flops([256, 512])


if __name__ == "__main__":
    main()
