"""Synthetic images from a base model plus (optionally) one hypernetwork checkpoint.

Generation follows the thesis' A1111 txt2img settings (thesis.md §8) and
records them the way the WebUI does, in a PNG ``parameters`` text chunk, so
that every tile can be inspected in the WebUI's PNG Info tab and audited
against the index without trusting file names.

Each image has its own seed and its own ``torch.Generator``, so image ``i`` of
a checkpoint is the same whatever the batch size, and any single image can be
regenerated alone. "The same" means identical up to float rounding: CPU and
GPU kernels choose different summation orders for different batch shapes, so
the same image generated in batches of different sizes can differ by one grey
level in a few pixels; with equal batch sizes the PNG bytes are identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
)
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from histo_assets.core.a1111_text import PARAMETERS_KEY, SAMPLER_NAMES, SHORT_HASH_LENGTH, a1111_parameters
from histo_assets.core.base_model import BaseModel
from histo_assets.core.hypernetwork import apply_hypernetwork, load_hypernetwork
from histo_assets.core.io import atomic_save_png, atomic_write_parquet, sha256_file
from histo_assets.core.seeding import derive_seed

Log = Callable[[str], None]

# A1111 seeds are unsigned 32-bit numbers; staying in that range lets a seed be
# typed into the WebUI's seed box as printed.
SEED_MODULUS = 2**32
# Latents are 1/8 of the image side in SD 1.x, so sides must be multiples of 8.
VAE_SCALE = 8
_MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Sampler:
    """The diffusers scheduler closest to an A1111 sampler.

    ``overrides`` fix the timestep spacing to A1111's: its k-diffusion samplers
    (Euler, Euler a, LMS, DPM++) spread sigmas evenly from t=999 to 0
    ("linspace"), while its DDIM steps by ``1000 // steps`` from 1 ("leading").
    Without them the spacing would be inherited from whatever scheduler the base
    model folder ships (PNDM/"leading" for SD 1.5). A1111's (LDM's) DDIM neither
    clips the predicted image nor uses alpha=1 for the last step, hence the two
    DDIM flags. The images still differ from the WebUI's: k-diffusion
    interpolates log-sigmas, and the WebUI draws its noise differently from the
    same seed.
    """

    scheduler: type
    overrides: Mapping[str, Any]


# Keyed like SAMPLER_NAMES, which holds what A1111 calls each.
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
    """txt2img settings; the defaults are the thesis' (Euler, 20 steps, CFG 7, 512x512).

    Field names match the ``generation:`` section of ``params.yaml``; width and
    height come from its top-level ``resolution``. ``prompt`` may contain
    ``[name]`` (the hypernetwork's name, as in its training captions) and
    ``[filewords]`` (the tissue class, underscores as spaces).
    """

    prompt: str = "an H&E histology tile of [name]"
    negative_prompt: str = ""
    sampler: str = "euler"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    multiplier: float = 1.0

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

    @classmethod
    def from_params(cls, generation: Mapping[str, Any], resolution: int) -> GenerationSettings:
        """Settings from the ``generation:`` section; ``images_per_checkpoint`` is the caller's ``count``."""
        return cls(
            prompt=str(generation["prompt"]),
            negative_prompt=str(generation.get("negative_prompt") or ""),
            sampler=str(generation["sampler"]),
            steps=int(generation["steps"]),
            cfg_scale=float(generation["cfg_scale"]),
            width=int(resolution),
            height=int(resolution),
            batch_size=int(generation["batch_size"]),
            multiplier=float(generation["multiplier"]),
        )

    @property
    def sampler_display_name(self) -> str:
        return SAMPLER_NAMES[self.sampler]


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


def a1111_model_name(name: str) -> str:
    """The WebUI shows checkpoints without their file extension."""
    for suffix in _MODEL_FILE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pipeline_for(base: BaseModel, sampler: str) -> StableDiffusionPipeline:
    """A pipeline sharing the base model's modules, with its own scheduler, so the base stays untouched."""
    spec = SAMPLERS[sampler]
    scheduler = spec.scheduler.from_config(base.scheduler.config, **spec.overrides)
    pipeline = StableDiffusionPipeline.from_pipe(base.pipeline, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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
        hypernetwork.eval()  # the multiplier only applies in eval mode
        hypernetwork.requires_grad_(False)
        hn_name = hypernetwork.name
        hn_sha256 = sha256_file(hypernetwork_path)
        hn_short = hn_sha256[:SHORT_HASH_LENGTH]
        hn_file = hypernetwork_path.name
        # The WebUI lists (and resolves <hypernet:...> against) hypernetworks by file stem.
        hn_webui_name = hypernetwork_path.stem
    prompt = render_generation_prompt(settings.prompt, hn_name, tissue_class)
    negative = render_generation_prompt(settings.negative_prompt, hn_name, tissue_class)
    model_name = a1111_model_name(base.name)
    pipeline = _pipeline_for(base, settings.sampler)
    if log:
        source = hn_file or f"base model {base.name}"
        log(f"generating {count} images for {tissue_class} step {step} from {source}: {prompt!r}")

    records: list[GeneratedImage] = []
    starts = range(0, count, settings.batch_size)
    for start in tqdm(starts, desc=f"{tissue_class} s{step}", unit="batch", total=len(starts)):
        indices = list(range(start, min(start + settings.batch_size, count)))
        seeds = [image_seed(master_seed, tissue_class, step, index) for index in indices]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with torch.no_grad():
            if hypernetwork is None:
                images = _sample(pipeline, prompt, negative, settings, generators)
            else:
                with apply_hypernetwork(base.unet, hypernetwork, settings.multiplier):
                    images = _sample(pipeline, prompt, negative, settings, generators)
        for index, seed, image in zip(indices, seeds, images):
            info = PngInfo()
            info.add_text(PARAMETERS_KEY, a1111_parameters(prompt, negative, settings, seed, base.short_hash,
                                                           model_name, hn_webui_name, hn_short))
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


def _sample(pipeline: StableDiffusionPipeline, prompt: str, negative: str, settings: GenerationSettings,
            generators: Sequence[torch.Generator]) -> list:
    return pipeline(
        prompt=prompt,
        negative_prompt=negative or None,
        num_images_per_prompt=len(generators),
        generator=list(generators),
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg_scale,
        width=settings.width,
        height=settings.height,
        output_type="pil",
    ).images


def write_generation_index(records: Sequence[GeneratedImage], path: Path) -> Path:
    """One row per image, columns in :class:`GeneratedImage` order (also when there are no images)."""
    columns = [field.name for field in fields(GeneratedImage)]
    return atomic_write_parquet(path, pd.DataFrame([asdict(r) for r in records], columns=columns))
