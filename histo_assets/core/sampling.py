"""Synthetic images from a base model plus (optionally) one hypernetwork checkpoint.

Generation follows the thesis' A1111 txt2img settings (thesis.md §8) and
records them the way the WebUI does, in a PNG ``parameters`` text chunk, so
that every tile can be inspected in the WebUI's PNG Info tab and audited
against the index without trusting file names.

Sampling follows the WebUI's k-diffusion path so that a pasted PNG Info gives
the same image there: its sigma schedules (log-sigma interpolation, §8b of
``shared/reference/a1111-hypernetwork.md``), initial noise drawn per image as
``torch.manual_seed(seed); torch.randn(shape)`` in fp32 on the CPU (the
WebUI's ``RNG: CPU``), and latents kept in fp32 between U-Net calls whatever
the U-Net's dtype. The loop is written out here rather than left to
``StableDiffusionPipeline.__call__``, which offers neither.

Each image has its own seed and its own ``torch.Generator``, so image ``i`` of
a checkpoint is the same whatever the batch size, and any single image can be
regenerated alone. "The same" means identical up to float rounding: CPU and
GPU kernels choose different summation orders for different batch shapes, so
the same image generated in batches of different sizes can differ by one grey
level in a few pixels; with equal batch sizes the PNG bytes are identical.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    SchedulerMixin,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from histo_assets.core.a1111_text import PARAMETERS_KEY, WEBUI_SAMPLERS, a1111_parameters, short_hash
from histo_assets.core.base_model import BaseModel
from histo_assets.core.hypernetwork import apply_hypernetwork, load_hypernetwork
from histo_assets.core.io import Log, atomic_save_png, sha256_file, stable_hash
from histo_assets.core.layout import IMAGES, INDEX, PREVIEW
from histo_assets.core.previews import write_preview
from histo_assets.core.schemas import GENERATION_INDEX
from histo_assets.core.seeding import derive_seed


# A1111 seeds are unsigned 32-bit numbers; staying in that range lets a seed be
# typed into the WebUI's seed box as printed.
SEED_MODULUS = 2**32
# Latents are 1/8 of the image side in SD 1.x, so sides must be multiples of 8.
VAE_SCALE = 8
# k-diffusion's Karras schedule exponent, as the WebUI uses it.
KARRAS_RHO = 7.0


@dataclass(frozen=True)
class Sampler:
    """The diffusers scheduler that steps like an A1111 sampler.

    The sigma-based samplers get the WebUI's sigmas from :func:`webui_sigmas`
    in place of the scheduler's own; ``overrides`` only matter for DDIM, which
    steps by ``1000 // steps`` from 1 ("leading") as A1111's does, and, like
    LDM's, neither clips the predicted image nor uses alpha=1 for the last step.
    Without an override, settings would be inherited from whatever scheduler
    the base model folder ships (PNDM/"leading" for SD 1.5).
    """

    scheduler: type
    overrides: Mapping[str, Any]


# Keyed like WEBUI_SAMPLERS, which holds what A1111 calls each and its sigma schedule.
SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(EulerDiscreteScheduler, {"timestep_spacing": "linspace"}),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"}),
    "ddim": Sampler(DDIMScheduler, {"timestep_spacing": "leading", "steps_offset": 1,
                                    "clip_sample": False, "set_alpha_to_one": False}),
    "dpm++_2m": Sampler(DPMSolverMultistepScheduler, {"timestep_spacing": "linspace"}),
    "lms": Sampler(LMSDiscreteScheduler, {"timestep_spacing": "linspace"}),
}


@dataclass(frozen=True)
class GenerationSettings:
    """txt2img settings; params.yaml holds the thesis's (Euler, 20 steps, CFG 7, 512x512).

    Field names match the ``generation:`` section of ``params.yaml``; width and
    height come from its top-level ``resolution``. ``prompt`` may contain
    ``[name]`` (the hypernetwork's name, as in its training captions) and
    ``[filewords]`` (the tissue class, underscores as spaces).
    """

    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    multiplier: float

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must not be negative, got {self.cfg_scale}")
        for side in (self.width, self.height):
            if side < VAE_SCALE or side % VAE_SCALE:
                raise ValueError(f"width and height must be positive multiples of {VAE_SCALE}, got "
                                 f"{self.width}x{self.height}")

    @property
    def sampler_display_name(self) -> str:
        return WEBUI_SAMPLERS[self.sampler].name


@dataclass(frozen=True)
class GeneratedImage:
    """One written PNG and everything needed to regenerate or audit it.

    ``file`` is relative to the output folder. ``checkpoint_step`` is the
    training step of the hypernetwork checkpoint; ``steps`` the sampling steps.
    Hypernetwork fields are None for base-model images.
    """

    file: str
    sha256: str
    seed: int
    index: int
    tissue_class: str
    checkpoint_step: int
    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    multiplier: float
    hypernetwork_name: str | None
    hypernetwork_file: str | None
    hypernetwork_sha256: str | None
    hypernetwork_short_hash: str | None
    base_model_name: str
    base_model_sha256: str
    base_model_short_hash: str


def image_seed(master_seed: int, tissue_class: str, step: int, index: int) -> int:
    """The seed of image ``index`` of the checkpoint at ``step`` of ``tissue_class``, in A1111's 32-bit range."""
    return derive_seed(master_seed, "generation", tissue_class, int(step), int(index)) % SEED_MODULUS


def image_file_name(tissue_class: str, step: int, index: int, seed: int) -> str:
    """Sortable by class, step and index; carries the seed so a file alone says how to regenerate it."""
    return f"{tissue_class}-s{int(step):06d}-{int(index):05d}-{int(seed)}.png"


def render_generation_prompt(template: str, hypernetwork_name: str | None, tissue_class: str) -> str:
    """Fill ``[name]`` and ``[filewords]`` as the training captions were filled.

    Without a hypernetwork ``[name]`` becomes the class name, so a base-model
    baseline sees the same prompt as a hypernetwork named after its class.
    """
    name = tissue_class if hypernetwork_name is None else hypernetwork_name
    return template.replace("[filewords]", tissue_class.replace("_", " ")).replace("[name]", name)


def _model_sigmas(scheduler: SchedulerMixin) -> torch.Tensor:
    """The model's T discrete sigmas in float32, from ᾱ as LDM stores it for SD 1.x.

    LDM computes ᾱ in float64 and keeps a float32 buffer, from which k-diffusion
    derives float32 sigmas; diffusers computes ᾱ in float32 throughout, which
    moves the smallest sigmas by about 1e-5. Both roundings are mirrored here,
    because the WebUI's images come from its sigmas, not from exact ones.
    """
    config = scheduler.config
    if config.get("beta_schedule") == "scaled_linear" and config.get("trained_betas") is None:
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps,
                            dtype=np.float64) ** 2
        alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    else:
        alphas_cumprod = scheduler.alphas_cumprod.float()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def webui_sigmas(scheduler: SchedulerMixin, steps: int, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The WebUI's (k-diffusion's) float32 sigmas for ``steps`` steps, ending in 0, and the U-Net timestep of each.

    ``uniform`` interpolates log σ at ``t = linspace(T-1, 0, steps)`` over the
    model's T discrete sigmas; ``karras`` spaces σ^(1/ρ) evenly between the
    model's smallest and largest sigma. A timestep is the fractional t whose
    interpolated log σ is that sigma, as k-diffusion feeds the U-Net.
    """
    model_sigmas = _model_sigmas(scheduler)
    log_sigmas = model_sigmas.log()
    if schedule == "uniform":
        t = torch.linspace(len(log_sigmas) - 1, 0, steps)
        low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
        sigmas = ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()
    elif schedule == "karras":
        ramp = torch.linspace(0, 1, steps)
        low_root = model_sigmas[0].item() ** (1 / KARRAS_RHO)
        high_root = model_sigmas[-1].item() ** (1 / KARRAS_RHO)
        sigmas = (high_root + ramp * (low_root - high_root)) ** KARRAS_RHO
        indices = np.arange(len(log_sigmas), dtype=np.float64)
        t = torch.from_numpy(np.interp(sigmas.log().double().numpy(), log_sigmas.double().numpy(), indices)).float()
    else:
        raise ValueError(f"unknown sigma schedule {schedule!r}")
    return torch.cat([sigmas, sigmas.new_zeros(1)]), t


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Each image's noise as the WebUI draws it with ``RNG: CPU``: ``torch.manual_seed(seed); torch.randn(shape)``.

    fp32 on the CPU whatever the device, so images do not depend on the
    device's RNG or dtype. The generators are returned to draw the ancestral
    samplers' later noise from the same per-image streams.
    """
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


def _scheduler_for(base: BaseModel, sampler: str, steps: int) -> SchedulerMixin:
    """A fresh scheduler for one batch, with the WebUI's sigmas where the sampler uses sigmas."""
    spec, schedule = SAMPLERS[sampler], WEBUI_SAMPLERS[sampler].schedule
    scheduler = spec.scheduler.from_config(base.scheduler.config, **spec.overrides)
    scheduler.set_timesteps(steps, device=base.device)
    if schedule is not None:
        scheduler.sigmas, timesteps = webui_sigmas(scheduler, steps, schedule)
        scheduler.timesteps = timesteps.to(base.device)
    return scheduler


def generate_images(
    base: BaseModel,
    hypernetwork_path: Path | None,
    out_dir: Path,
    *,
    tissue_class: str,
    step: int,
    count: int,
    settings: GenerationSettings,
    master_seed: int,
    log: Log | None = None,
) -> list[GeneratedImage]:
    """Write ``count`` PNGs for one checkpoint into ``out_dir`` and return their records.

    ``hypernetwork_path`` None generates from the plain base model (baselines,
    benchmarks). Seeds come from :func:`image_seed` and the initial noise is
    drawn on the CPU, so the images do not depend on the device's RNG.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hypernetwork = None
    hn_name = hn_sha256 = hn_short = hn_webui_name = hn_file = None
    if hypernetwork_path is not None:
        hypernetwork_path = Path(hypernetwork_path)
        hypernetwork = load_hypernetwork(hypernetwork_path, map_location=base.device)
        hypernetwork.requires_grad_(False)
        hn_name = hypernetwork.name
        hn_sha256 = sha256_file(hypernetwork_path)
        hn_short = short_hash(hn_sha256)
        hn_file = hypernetwork_path.name
        # The WebUI lists (and resolves <hypernet:...> against) hypernetworks by file stem.
        hn_webui_name = hypernetwork_path.stem
    prompt = render_generation_prompt(settings.prompt, hn_name, tissue_class)
    negative = render_generation_prompt(settings.negative_prompt, hn_name, tissue_class)
    if log:
        source = hn_file or f"base model {base.name}"
        log(f"generating {count} images for {tissue_class} step {step} from {source}: {prompt!r}")

    records: list[GeneratedImage] = []
    starts = range(0, count, settings.batch_size)
    for start in tqdm(starts, desc=f"{tissue_class} s{step}", unit="batch", total=len(starts)):
        indices = list(range(start, min(start + settings.batch_size, count)))
        seeds = [image_seed(master_seed, tissue_class, step, index) for index in indices]
        if hypernetwork is None:
            images = _sample(base, prompt, negative, settings, seeds)
        else:
            with apply_hypernetwork(base.unet, hypernetwork, settings.multiplier):
                images = _sample(base, prompt, negative, settings, seeds)
        for index, seed, image in zip(indices, seeds, images):
            info = PngInfo()
            info.add_text(PARAMETERS_KEY, a1111_parameters(prompt, negative, settings, seed, base.short_hash,
                                                           base.name, hn_webui_name))
            name = image_file_name(tissue_class, step, index, seed)
            atomic_save_png(out_dir / name, image, pnginfo=info)
            records.append(GeneratedImage(
                file=name, sha256=sha256_file(out_dir / name), seed=seed, index=index, tissue_class=tissue_class,
                checkpoint_step=int(step), prompt=prompt, negative_prompt=negative, sampler=settings.sampler,
                steps=settings.steps, cfg_scale=float(settings.cfg_scale), width=settings.width,
                height=settings.height, batch_size=settings.batch_size, multiplier=float(settings.multiplier),
                hypernetwork_name=hn_name, hypernetwork_file=hn_file,
                hypernetwork_sha256=hn_sha256, hypernetwork_short_hash=hn_short, base_model_name=base.name,
                base_model_sha256=base.sha256, base_model_short_hash=base.short_hash,
            ))
    if log:
        log(f"wrote {len(records)} images to {out_dir}")
    return records


@torch.no_grad()
def _sample(base: BaseModel, prompt: str, negative: str, settings: GenerationSettings,
            seeds: Sequence[int]) -> list[Image.Image]:
    """txt2img for one batch: k-diffusion's loop, with classifier-free guidance as diffusers applies it."""
    pipeline, unet = base.pipeline, base.unet
    guided = settings.cfg_scale > 1
    cond, uncond = pipeline.encode_prompt(prompt, base.device, len(seeds), guided, negative_prompt=negative or None)
    context = torch.cat([uncond, cond]) if guided else cond
    latent_shape = (unet.config.in_channels, settings.height // VAE_SCALE, settings.width // VAE_SCALE)
    noise, generators = initial_noise(seeds, latent_shape)
    scheduler = _scheduler_for(base, settings.sampler, settings.steps)
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    latents = noise.to(base.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t).to(unet.dtype)
        eps = unet(model_input, t, encoder_hidden_states=context).sample.float()
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + settings.cfg_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample.float()
    decoded = base.vae.decode((latents / base.vae.config.scaling_factor).to(base.vae.dtype)).sample
    return pipeline.image_processor.postprocess(decoded, output_type="pil")


def write_generation_index(records: Sequence[GeneratedImage], path: Path) -> Path:
    """One row per image, columns in :class:`GeneratedImage` order (also when there are no images)."""
    columns = [field.name for field in fields(GeneratedImage)]
    return GENERATION_INDEX.write(path, pd.DataFrame([asdict(r) for r in records], columns=columns))


def write_checkpoint_images(
    out: Path, base: BaseModel, hypernetwork_path: Path | None, *, tissue_class: str, step: int, count: int,
    settings: GenerationSettings, master_seed: int, log: Log | None = None,
) -> dict[str, Any]:
    """One checkpoint's images, their index and a preview in ``out``; the summary fields that describe them."""
    records = generate_images(base, hypernetwork_path, out / IMAGES, tissue_class=tissue_class, step=step, count=count,
                              settings=settings, master_seed=master_seed, log=log)
    write_generation_index(records, out / INDEX)
    write_preview(out / IMAGES, out / PREVIEW)
    return {"count": len(records), "data_version": stable_hash(sorted((r.file, r.sha256) for r in records))}


def write_imported_images(
    out: Path, base: BaseModel | None, imported: pd.DataFrame, *, tissue_class: str, count: int,
    settings: GenerationSettings, master_seed: int, log: Log | None = None,
) -> dict[str, int]:
    """Images from each imported hypernetwork, one folder per file named by its stem; image counts by file."""
    counts = {}
    for row in imported.itertuples():
        folder = out / Path(row.file).stem
        records = generate_images(base, Path(row.path), folder / IMAGES, tissue_class=tissue_class, step=int(row.step),
                                  count=count, settings=settings, master_seed=master_seed, log=log)
        write_generation_index(records, folder / INDEX)
        counts[row.file] = len(records)
    return counts
