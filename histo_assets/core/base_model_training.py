"""A small Stable Diffusion trained here, on the training crops of every class, with one prompt.

Real SD 1.5 weights cannot be downloaded on the machines this project runs on,
and a randomly initialised miniature only makes coloured static, on which no
hypernetwork can show anything. This trains the same architecture family
(AutoencoderKL, UNet2DConditionModel, CLIP text encoder and tokenizer, the
scaled-linear ε-prediction schedule of SD 1.x) at toy scale on a CPU, in two
phases, as latent diffusion is trained:

1. the VAE, on L1 reconstruction plus a small KL term, downsampling by 8 like SD;
2. the U-Net, on ε-MSE over latents encoded once by that VAE and scaled to unit
   variance (the VAE's ``scaling_factor``, as SD's 0.18215 was found).

The text encoder is randomly initialised and frozen: with one class-agnostic
prompt it only has to tell that prompt from the empty one, which classifier-free
guidance needs. What tells the classes apart is left to the hypernetworks.

Every random draw of a step (batch, posterior noise, timesteps, diffusion
noise, prompt dropout) comes from a generator seeded by ``(seed, phase, step)``,
so no RNG state is saved: a run resumed from its periodic state ends with the
bytes of an uninterrupted run, on the same CPU with the same thread count.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from histo_assets.core.base_model import (
    TINY_MAX_LENGTH,
    folder_weights_sha256,
    load_base_model,
    tiny_tokenizer,
)
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import Log, atomic_directory, atomic_path, atomic_save_png, atomic_write_text, sha256_file, stable_hash
from histo_assets.core.layout import SUMMARY
from histo_assets.core.plots import phase_loss_curves
from histo_assets.core.previews import contact_sheet
from histo_assets.core.sampling import GenerationSettings, generate_images
from histo_assets.core.seeding import derive_seed
from histo_assets.core.training import list_images

# One optimisation step's loss, given the step and the generator seeded for it.
StepLoss = Callable[[int, torch.Generator], torch.Tensor]

PHASES = ("vae", "unet")
STATE_FILE = ".base-model-training-state.pt"
LOSS_CSV = "base-model-loss.csv"
LOSS_PLOT = "base-model-loss.png"
SAMPLES_PLOT = "base-model-samples.png"
# SD 1.x's noise schedule, which the hypernetwork trainer and the samplers read from the saved scheduler.
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "steps_offset": 1}
# Three halvings: 8x8 latents at 64 px, like SD's 64x64 at 512 px (sampling.VAE_SCALE).
VAE_BLOCKS = 4
LATENT_CHANNELS = 4
# Share of each phase spent warming the learning rate up before its cosine decay: Adam's first
# steps on freshly initialised GroupNorm networks are the ones that diverge.
WARMUP_FRACTION = 0.05
# Real crops shown above the generated ones in the sample grid, so the two can be compared by eye.
PREVIEW_COLUMNS = 8
# What the summary of a trained model says of the held-out crops, so an audit need not read the code.
HELD_OUT_CROPS = "never seen: only augmented_crops, the training share, are read"


class BaseModelTrainingError(HistoAssetsError, ValueError):
    """Training settings or inputs that cannot make a base model."""


@dataclass(frozen=True)
class VaeSettings:
    block_out_channels: tuple[int, ...]
    steps: int
    batch_size: int
    norm_num_groups: int
    learning_rate: float
    kl_weight: float


@dataclass(frozen=True)
class UnetSettings:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int
    norm_num_groups: int
    steps: int
    batch_size: int
    learning_rate: float
    uncond_probability: float


@dataclass(frozen=True)
class TextEncoderSettings:
    hidden_size: int
    layers: int
    heads: int
    token_embedding_scale: float


@dataclass(frozen=True)
class BaseModelTrainingSettings:
    """The ``base_model.training`` section of params; its values live only there."""

    prompt: str
    text_encoder: TextEncoderSettings
    vae: VaeSettings
    unet: UnetSettings
    checkpoint_every: int
    preview_images: int

    def validate(self) -> None:
        """Refuse settings diffusers would accept and then fail on, or train into a model hypernetworks cannot address."""
        problems = []
        if not self.prompt.strip():
            problems.append("prompt is empty")
        if len(self.vae.block_out_channels) != VAE_BLOCKS:
            problems.append(f"vae.block_out_channels needs {VAE_BLOCKS} entries (downsampling by 8, like SD), "
                            f"got {list(self.vae.block_out_channels)}")
        if len(self.unet.block_out_channels) < 2:
            problems.append("unet.block_out_channels needs at least 2 entries (one cross-attention level and the "
                            "plain bottom level)")
        if self.text_encoder.hidden_size in self.unet.block_out_channels:
            # A1111 hypernetworks key their modules by context width (a1111-hypernetwork.md §10).
            problems.append(f"text_encoder.hidden_size {self.text_encoder.hidden_size} equals a U-Net block width, "
                            "so hypernetwork modules for self- and cross-attention could not be told apart")
        for name, part in (("vae", self.vae), ("unet", self.unet)):
            if part.norm_num_groups < 1 or any(width % part.norm_num_groups for width in part.block_out_channels):
                problems.append(f"{name}.norm_num_groups {part.norm_num_groups} must divide every block width "
                                f"{list(part.block_out_channels)}")
        if self.text_encoder.hidden_size % self.text_encoder.heads:
            problems.append("text_encoder.hidden_size must be a multiple of text_encoder.heads")
        for name, value in (("unet.attention_head_dim", self.unet.attention_head_dim),
                            ("vae.steps", self.vae.steps), ("unet.steps", self.unet.steps),
                            ("vae.batch_size", self.vae.batch_size), ("unet.batch_size", self.unet.batch_size),
                            ("unet.layers_per_block", self.unet.layers_per_block),
                            ("checkpoint_every", self.checkpoint_every), ("text_encoder.layers", self.text_encoder.layers),
                            ("text_encoder.heads", self.text_encoder.heads)):
            if value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        if self.preview_images < 0:
            problems.append(f"preview_images must not be negative, got {self.preview_images}")
        if not 0 <= self.unet.uncond_probability < 1:
            problems.append(f"unet.uncond_probability must be in [0, 1), got {self.unet.uncond_probability}")
        for name, value in (("vae.learning_rate", self.vae.learning_rate), ("unet.learning_rate", self.unet.learning_rate)):
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be positive, got {value}")
        if not (math.isfinite(self.text_encoder.token_embedding_scale) and self.text_encoder.token_embedding_scale > 0):
            problems.append(f"text_encoder.token_embedding_scale must be positive, got {self.text_encoder.token_embedding_scale}")
        if not (math.isfinite(self.vae.kl_weight) and self.vae.kl_weight >= 0):
            problems.append(f"vae.kl_weight must be finite and non-negative, got {self.vae.kl_weight}")
        if problems:
            raise BaseModelTrainingError("base_model.training: " + "; ".join(problems))


@dataclass(frozen=True)
class BaseModelTrainingResult:
    """What the asset records: where the model is, its weights hash (as ``load_base_model`` computes it), and the curves."""

    model_dir: Path
    sha256: str
    vae_losses: list[float]
    unet_losses: list[float]
    loss_csv: Path
    loss_plot: Path
    samples_plot: Path | None
    scaling_factor: float
    images: int
    seconds: float
    resumed_from: str | None


def _build_components(settings: BaseModelTrainingSettings, resolution: int, seed: int):
    """Freshly initialised components; diffusers and transformers draw from the global RNG, forked and seeded here."""
    tokenizer = tiny_tokenizer()
    text, vae_s, unet_s = settings.text_encoder, settings.vae, settings.unet
    levels = len(unet_s.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", "text_encoder"))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=text.hidden_size, intermediate_size=4 * text.hidden_size, num_hidden_layers=text.layers,
            num_attention_heads=text.heads, max_position_embeddings=TINY_MAX_LENGTH, projection_dim=text.hidden_size,
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        torch.manual_seed(derive_seed(seed, "init", "vae"))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * VAE_BLOCKS,
            up_block_types=("UpDecoderBlock2D",) * VAE_BLOCKS, block_out_channels=vae_s.block_out_channels,
            latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=vae_s.norm_num_groups,
            sample_size=resolution,
        )
        torch.manual_seed(derive_seed(seed, "init", "unet"))
        unet = UNet2DConditionModel(
            sample_size=resolution // 2 ** (VAE_BLOCKS - 1), in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            layers_per_block=unet_s.layers_per_block, block_out_channels=unet_s.block_out_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=text.hidden_size, attention_head_dim=unet_s.attention_head_dim,
            norm_num_groups=unet_s.norm_num_groups,
        )
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.mul_(text.token_embedding_scale)
    text_encoder.requires_grad_(False).eval()
    return tokenizer, text_encoder, vae, unet


def _load_pixels(images: Sequence[Path], resolution: int) -> torch.Tensor:
    arrays = []
    for path in images:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (resolution, resolution):
                rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _learning_rate(base: float, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero: the last steps average out the noise of the first."""
    warmup = max(1, round(total * WARMUP_FRACTION))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(count, generator=generator)[: min(size, count)]


@torch.no_grad()
def _encode_prompts(tokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def _encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[start : start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Refuse nondeterministic kernels while training, and give the caller's setting back afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _fingerprint(settings: BaseModelTrainingSettings, images: Sequence[Path], resolution: int, seed: int) -> str:
    """What a saved state must match to be resumed: settings, seed, resolution, the bytes of every image, and threads.

    CPU kernels split their sums by thread count, so 1 and 2 threads give
    different weights: a state from another count would finish into bytes that
    neither an uninterrupted run at its count nor at this one gives.
    """
    return stable_hash({"settings": asdict(settings), "resolution": resolution, "seed": seed,
                        "threads": torch.get_num_threads(), "images": [sha256_file(path) for path in images]})


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, fingerprint: str, say: Log) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as error:
        say(f"ignoring unreadable training state {path.name}: {error}")
        return None
    if state.get("fingerprint") != fingerprint:
        say(f"ignoring {path.name}: it belongs to other settings, images or thread count")
        return None
    return state


def _write_loss_csv(path: Path, vae_losses: Sequence[float], unet_losses: Sequence[float]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["phase", "step", "loss"])
    for phase, losses in (("vae", vae_losses), ("unet", unet_losses)):
        writer.writerows([phase, step, repr(loss)] for step, loss in enumerate(losses, start=1))
    atomic_write_text(path, buffer.getvalue())


class _Run:
    """One training run's models, optimizers and losses, and the periodic state that lets it resume."""

    def __init__(self, state_path: Path, fingerprint: str, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 every: int, say: Log) -> None:
        self.state_path, self.fingerprint, self.every, self.say = state_path, fingerprint, every, say
        self.vae, self.unet = vae, unet
        self.losses: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.optimizer_states: dict[str, dict | None] = {phase: None for phase in PHASES}

    def resume(self) -> str | None:
        """Continue from the saved state when it belongs to this run; where it resumed from, or None."""
        state = _load_state(self.state_path, self.fingerprint, self.say)
        if state is None:
            return None
        self.vae.load_state_dict(state["vae"])
        if state["unet"] is not None:
            self.unet.load_state_dict(state["unet"])
        for phase in PHASES:
            self.losses[phase] = [float(loss) for loss in state[f"{phase}_losses"]]
            self.optimizer_states[phase] = state[f"{phase}_optimizer"]
        resumed_from = f"vae step {len(self.losses['vae'])}, unet step {len(self.losses['unet'])}"
        self.say(f"resuming base model training from {resumed_from}")
        return resumed_from

    def save(self, phase: str, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer_states[phase] = optimizer.state_dict()
        _save_state(self.state_path, {
            "fingerprint": self.fingerprint,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict() if self.losses["unet"] else None,
            **{f"{name}_losses": list(self.losses[name]) for name in PHASES},
            **{f"{name}_optimizer": self.optimizer_states[name] for name in PHASES},
        })

    def train(self, phase: str, module: torch.nn.Module, steps: int, learning_rate: float,
              loss_of_step: StepLoss, seed: int, stop_after: int | None) -> bool:
        """Run ``phase`` up to ``steps``; False when ``stop_after`` (counted over both phases) ended it first."""
        losses = self.losses[phase]
        if len(losses) >= steps:
            return True
        optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate)
        if self.optimizer_states[phase] is not None:
            optimizer.load_state_dict(self.optimizer_states[phase])
        module.train()
        started, first = time.perf_counter(), len(losses)
        for step in range(first, steps):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(learning_rate, step, steps)
            loss = loss_of_step(step, torch.Generator().manual_seed(derive_seed(seed, phase, step)))
            if not torch.isfinite(loss):
                raise BaseModelTrainingError(f"{phase} loss became {loss.item()} at step {step + 1}; lower "
                                             f"base_model.training.{phase}.learning_rate")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            done = step + 1
            if done % self.every == 0 or done == steps:
                self.save(phase, optimizer)
                elapsed = time.perf_counter() - started
                self.say(f"{phase} step {done}/{steps}: loss {np.mean(losses[-self.every:]):.4f}, "
                         f"{(done - first) / max(elapsed, 1e-9):.1f} steps/s")
            if stop_after is not None and len(self.losses["vae"]) + len(self.losses["unet"]) >= stop_after:
                self.say(f"stopped after {phase} step {done} (stop_after)")
                return False
        module.eval()
        return True


def train_base_model(
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: BaseModelTrainingSettings,
    *,
    model_folder: str,
    resolution: int,
    seed: int,
    preview: GenerationSettings,
    log: Log | None = None,
    stop_after: int | None = None,
) -> BaseModelTrainingResult | None:
    """Train a base model on ``images`` and write it to ``out_dir/model_folder`` as a diffusers folder.

    ``out_dir`` also receives the loss CSV and curve and a sample grid (real
    crops above generated ones, sampled with ``preview``'s sampler, steps, CFG
    and negative prompt from the training prompt), and, while training, the
    state it resumes from: every ``checkpoint_every`` steps of each phase, and
    at the end of the VAE phase. A rerun with the same images, settings, seed
    and thread count continues from that state and ends with the bytes of an
    uninterrupted run; otherwise it starts over. ``stop_after`` (steps over
    both phases) stops like a crash would, after the last saved state, and
    returns None. The state file is removed once the model is written.
    """
    say = log or (lambda _message: None)
    settings.validate()
    paths = sorted(Path(image) for image in images)
    if len(paths) < 2:
        raise BaseModelTrainingError(f"a base model needs at least 2 training images, got {len(paths)}")
    if resolution % 2 ** (VAE_BLOCKS - 1):
        raise BaseModelTrainingError(f"resolution must be a multiple of {2 ** (VAE_BLOCKS - 1)}, got {resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _deterministic():
        tokenizer, text_encoder, vae, unet = _build_components(settings, resolution, seed)
        run = _Run(out / STATE_FILE, _fingerprint(settings, paths, resolution, seed), vae, unet,
                   settings.checkpoint_every, say)
        resumed_from = run.resume()
        pixels = _load_pixels(paths, resolution)
        say(f"training a base model on {len(paths)} images at {resolution} px, {torch.get_num_threads()} thread(s)")
        vae_loss = _vae_loss(vae, pixels, settings.vae)
        if not run.train("vae", vae, settings.vae.steps, settings.vae.learning_rate, vae_loss, seed, stop_after):
            return None
        means, stds = _encode_latents(vae, pixels)
        # Unit-variance latents, as SD's 0.18215 makes them; the samplers and the hypernetwork trainer read it.
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        contexts = _encode_prompts(tokenizer, text_encoder, [settings.prompt, ""])
        unet_loss = _unet_loss(unet, means, stds, scaling, contexts, settings.unet)
        if not run.train("unet", unet, settings.unet.steps, settings.unet.learning_rate, unet_loss, seed, stop_after):
            return None
        model_dir = out / model_folder
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(**SCHEDULE), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        with atomic_directory(model_dir) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
    say(f"saved the base model to {model_dir}")
    loss_csv, loss_plot = out / LOSS_CSV, out / LOSS_PLOT
    _write_loss_csv(loss_csv, run.losses["vae"], run.losses["unet"])
    phase_loss_curves({"VAE": ("L1 + KL", run.losses["vae"]), "U-Net": ("ε-MSE", run.losses["unet"])}, loss_plot,
                      title=f"base model training on {len(paths)} crops")
    samples_plot = _write_samples(model_dir, out / SAMPLES_PLOT, paths, settings, preview, seed, say)
    run.state_path.unlink(missing_ok=True)
    return BaseModelTrainingResult(
        model_dir=model_dir, sha256=folder_weights_sha256(model_dir), vae_losses=run.losses["vae"],
        unet_losses=run.losses["unet"], loss_csv=loss_csv, loss_plot=loss_plot, samples_plot=samples_plot,
        scaling_factor=scaling, images=len(paths), seconds=time.perf_counter() - started, resumed_from=resumed_from,
    )


def _vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, settings: VaeSettings) -> StepLoss:
    """Phase 1: L1 reconstruction of a batch plus the KL term per latent element, so kl_weight is resolution-free."""

    def loss(_step: int, generator: torch.Generator) -> torch.Tensor:
        x = pixels[_batch(len(pixels), settings.batch_size, generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
        return F.l1_loss(reconstruction, x) + settings.kl_weight * kl_per_element

    return loss


def _unet_loss(unet: UNet2DConditionModel, means: torch.Tensor, stds: torch.Tensor, scaling: float,
               contexts: torch.Tensor, settings: UnetSettings) -> StepLoss:
    """Phase 2: ε-MSE on fresh posterior samples of the latents, the prompt dropped for classifier-free guidance."""
    noise_scheduler = DDPMScheduler(**SCHEDULE)

    def loss(_step: int, generator: torch.Generator) -> torch.Tensor:
        index = _batch(len(means), settings.batch_size, generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        unconditional = torch.rand(len(index), generator=generator) < settings.uncond_probability
        context = contexts[unconditional.long()]
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        return F.mse_loss(prediction, noise)

    return loss


def _write_samples(model_dir: Path, path: Path, real: Sequence[Path], settings: BaseModelTrainingSettings,
                   preview: GenerationSettings, seed: int, say: Log) -> Path | None:
    """Generated tiles below as many real crops, spread over the sorted list so every class shows."""
    count = settings.preview_images
    if count == 0:
        return None
    base = load_base_model("diffusers", model_dir, device="cpu", dtype="float32")
    sampling = GenerationSettings(**{**asdict(preview), "prompt": settings.prompt})
    with tempfile.TemporaryDirectory(prefix=".base-model-samples.", dir=path.parent) as scratch:
        records = generate_images(base, None, Path(scratch), tissue_class="base_model", step=0, count=count,
                                  settings=sampling, master_seed=seed, log=say)
        generated = [Image.open(Path(scratch) / record.file).convert("RGB") for record in records]
    shown = [real[round(i * (len(real) - 1) / max(1, count - 1))] for i in range(min(count, len(real)))]
    rows_real, rows_generated = -(-len(shown) // PREVIEW_COLUMNS), -(-count // PREVIEW_COLUMNS)
    padding = [Image.new("RGB", (preview.width, preview.height), (255, 255, 255))] * (
        rows_real * PREVIEW_COLUMNS - len(shown))
    sheet = contact_sheet([*shown, *padding, *generated], columns=PREVIEW_COLUMNS, thumb=96,
                          row_labels=["real"] * rows_real + ["generated"] * rows_generated)
    atomic_save_png(path, sheet)
    return path


def train_from_crops(
    out_dir: Path, image_folders: Sequence[Path], settings: BaseModelTrainingSettings, *, model_folder: str,
    resolution: int, master_seed: int, preview: GenerationSettings, log: Log,
) -> BaseModelTrainingResult:
    """Train on every class's augmented crops: the training share, since held-out crops are never augmented."""
    # The old summary would name weights that are about to be replaced.
    (out_dir / SUMMARY).unlink(missing_ok=True)
    images = [path for folder in image_folders for path in list_images(folder)]
    result = train_base_model(
        images, out_dir, settings, model_folder=model_folder,
        resolution=resolution, seed=derive_seed(master_seed, "base_model"), preview=preview, log=log,
    )
    if result.resumed_from:
        log(f"resumed from {result.resumed_from}")
    return result


def training_summary(result: BaseModelTrainingResult, classes: Sequence[str], prompt: str,
                     crops_data_versions: Mapping[str, str]) -> dict[str, Any]:
    """What a trained model's summary adds to its description: the data it learnt from, and the time it took."""
    return {
        "training_set": {"classes": list(classes), "images": result.images, "prompt": prompt,
                         "augmented_crops_data_versions": crops_data_versions, "held_out_crops": HELD_OUT_CROPS},
        "seconds": result.seconds,
    }
