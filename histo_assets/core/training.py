"""Hypernetwork training with AUTOMATIC1111's semantics on the diffusers stack.

Implemented clean-room from ``shared/reference/a1111-hypernetwork.md`` §7; the
section numbers in comments refer to it. The base model stays frozen and only
the hypernetwork's K/V modules train, on the ε-prediction MSE with latents and
text conditioning computed once per image when the dataset is built.

Every random draw of step ``s`` (batch order, timesteps, noise, resampled
latents, dropout) comes from generators seeded by ``(seed, s)``, so no RNG
state has to be saved: a run resumed from a checkpoint and its optimizer
sidecar ends, on CPU, with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from histo_assets.core.base_model import BaseModel, check_hypernetwork_sizes
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.hypernetwork import (
    Hypernetwork,
    HypernetworkOptions,
    apply_hypernetwork,
    load_hypernetwork,
    load_optimizer_state,
    sanitize_name,
    save_hypernetwork,
)
from histo_assets.core.io import Log, atomic_write_json, atomic_write_text, sha256_file, stable_hash
from histo_assets.core.layout import LOSS_PLOT
from histo_assets.core.plots import loss_curve
from histo_assets.core.seeding import derive_seed
from histo_assets.core.stage import fingerprint, prepare_resumable
from histo_assets.core.training_files import (
    checkpoint_path,
    existing_checkpoints,
    final_path,
    loss_csv_path,
    settings_path,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_MODES = ("disabled", "value", "norm")
# "correct" clips true gradients; "a1111" clips the loss-scaled ones like A1111 (§7.7 step 5).
CLIP_COMPAT = ("correct", "a1111")
# §7.2: leading digits, dashes and spaces of a file stem are not caption words.
CAPTION_PREFIX = re.compile(r"^[-\d]+\s*")
# §7.5: torch's AdamW defaults, written out because A1111 relies on them.
WEIGHT_DECAY = 0.01
# Names become file names and the A1111 ``name`` field (§2).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9._\- ]*$")
_ENCODE_BATCH = 8
# Settings that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("max_steps", "checkpoint_steps", "loss_log_every")



class TrainingError(HistoAssetsError, ValueError):
    """A training setting or output folder that cannot be used."""


class NonFiniteLossError(HistoAssetsError, RuntimeError):
    """The loss (or the weights) became NaN or infinite.

    ``step`` is the 1-based number of the update being computed, as in the
    loss CSV. Checkpoints written earlier are complete and loadable (every
    write is atomic), so training can restart from one with other settings.
    """

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


def parse_schedule(text: str, max_steps: int, current_step: int = 0) -> list[tuple[float, int]]:
    """Segments ``(value, end_step)`` of an A1111 schedule string (§7.6).

    ``"v1:s1, v2:s2, ..."``: v_i applies until optimizer step s_i. Entries
    ending at or before ``current_step`` are skipped, which is how a resumed
    run picks up mid-schedule; ends are clamped to ``max_steps`` and the first
    entry beyond it ends parsing; ``s = -1`` and a bare value mean "until
    ``max_steps``" and also end parsing. Steps are parsed as integers, so
    ``1e4`` is an error. The result may be empty when every entry is skipped.
    """
    if max_steps < 1:
        raise TrainingError(f"max_steps must be at least 1, got {max_steps}")
    entries = [entry.strip() for entry in str(text).split(",")]
    if not any(entries):
        raise TrainingError(f"schedule {text!r} is empty")
    segments: list[tuple[float, int]] = []
    for entry in entries:
        if not entry:
            continue
        parts = [part.strip() for part in entry.split(":")]
        if len(parts) > 2:
            raise TrainingError(f"schedule entry {entry!r} in {text!r} must be 'value' or 'value:step'")
        value = _schedule_value(parts[0], text)
        if len(parts) == 1:
            segments.append((value, max_steps))
            break
        try:
            end = int(parts[1])
        except ValueError:
            raise TrainingError(f"schedule entry {entry!r} in {text!r}: step {parts[1]!r} is not an integer") from None
        if end == -1:
            segments.append((value, max_steps))
            break
        if end <= current_step:
            continue
        segments.append((value, min(end, max_steps)))
        if end > max_steps:
            break
    return segments


def _schedule_value(raw: str, text: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise TrainingError(f"schedule {text!r}: value {raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise TrainingError(f"schedule {text!r}: value {raw!r} must be finite and non-negative")
    return value


class Schedule:
    """A cursor over a schedule's segments, advanced once per optimizer step.

    Resuming by re-parsing at the resumed step (skipping ended segments) gives
    the same values as running through, provided segment ends strictly
    increase, which every sensible schedule does.
    """

    def __init__(self, text: str, max_steps: int, current_step: int = 0) -> None:
        full = parse_schedule(text, max_steps, 0)
        if not full:
            raise TrainingError(f"schedule {text!r} has no segment ending after step 0")
        self.segments = parse_schedule(text, max_steps, current_step)
        self._index = 0
        # When everything is behind us the last value stays in force (it matters
        # for the clip value, which never stops training).
        self.value = self.segments[0][0] if self.segments else full[-1][0]

    @property
    def finished(self) -> bool:
        return self._index >= len(self.segments)

    def advance(self, step: int) -> bool:
        """Move to the next segment once ``step`` reaches the current one's end; True if the value changed."""
        if self.finished or step < self.segments[self._index][1]:
            return False
        self._index += 1
        if self.finished:
            return False
        self.value = self.segments[self._index][0]
        return True


@dataclass(frozen=True)
class LossRecord:
    """Loss of one optimizer update: ``step`` counts updates done (1-based), ``lr`` is the rate used."""

    step: int
    loss: float
    lr: float


@dataclass
class TrainingResult:
    """What a training call produced; ``checkpoints`` maps the file number N of ``<name>-N.pt`` to its path."""

    name: str
    checkpoints: dict[int, Path]
    final_path: Path | None
    final_step: int
    loss_history: list[LossRecord]
    final_loss: float | None
    steps_per_second: float | None
    device: str
    base_model_sha256: str
    base_model_short_hash: str
    loss_csv: Path
    resumed_from: Path | None = None
    interrupted: bool = False


@dataclass
class TrainingDataset:
    """Images reduced to what training needs: latents and text conditioning, computed once (§7.2)."""

    files: list[Path]
    captions: list[str]
    prompts: list[str]
    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None
    conditioning: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)

    def latents(self, indices: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``random`` draws a new sample on every fetch; the other methods return the fixed latents."""
        mean = self.latent_mean[list(indices)]
        if self.latent_std is None:
            return mean
        std = self.latent_std[list(indices)]
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def list_images(images_dir: str | Path) -> list[Path]:
    """Image files directly in ``images_dir``, sorted so that index i is the same image on every run."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise TrainingError(f"training images folder {folder} does not exist or is not a directory")
    files = sorted(
        path for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise TrainingError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def caption_for(image: Path) -> str:
    """§7.2: the ``<stem>.txt`` sidecar if there is one, else the file stem without leading digits and dashes."""
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    return CAPTION_PREFIX.sub("", image.stem)


def render_prompt(template: str, caption: str, name: str) -> str:
    return template.replace("[filewords]", caption).replace("[name]", name)


def _load_pixels(path: Path, resolution: int) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def build_dataset(
    base: BaseModel,
    images_dir: str | Path,
    *,
    name: str,
    templates: Sequence[str],
    resolution: int,
    latent_sampling: str,
    seed: int,
    log: Log | None = None,
) -> TrainingDataset:
    """Encode every image and prompt once, so the VAE and text encoder never run in the training loop.

    ``once`` fixes one seeded latent sample per image, ``deterministic`` uses
    the posterior mean, ``random`` keeps mean and std to resample per fetch;
    all are scaled by the VAE's ``scaling_factor``. Each image gets one
    template line, chosen with a seeded RNG, for the whole run (§7.2).
    """
    say = log or (lambda _message: None)
    if latent_sampling not in LATENT_SAMPLING:
        raise TrainingError(f"latent_sampling must be one of {LATENT_SAMPLING}, got {latent_sampling!r}")
    lines = [line.strip() for line in templates if line and line.strip()]
    if not lines:
        raise TrainingError("templates must hold at least one non-empty prompt template line")
    files = list_images(images_dir)
    captions = [caption_for(path) for path in files]
    choices = np.random.default_rng(derive_seed(seed, "template")).integers(0, len(lines), size=len(files))
    prompts = [render_prompt(lines[choice], caption, name) for choice, caption in zip(choices, captions)]

    vae, device = base.vae, base.device
    scaling = float(vae.config.scaling_factor)
    means, stds = [], []
    for start in tqdm(range(0, len(files), _ENCODE_BATCH), desc="encode images", unit="batch", disable=None):
        batch = [_load_pixels(path, resolution) for path in files[start : start + _ENCODE_BATCH]]
        posterior = vae.encode(torch.stack(batch).to(device, vae.dtype)).latent_dist
        means.append(posterior.mean.float().cpu() * scaling)
        stds.append(posterior.std.float().cpu() * scaling)
    mean, std = torch.cat(means), torch.cat(stds)
    if latent_sampling == "once":
        generator = torch.Generator().manual_seed(derive_seed(seed, "latent-once"))
        mean = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    kept_std = std if latent_sampling == "random" else None

    tokenizer = base.tokenizer
    limit = tokenizer.model_max_length
    too_long = [prompt for prompt in prompts if len(tokenizer(prompt).input_ids) > limit]
    if too_long:
        say(f"{len(too_long)} of {len(prompts)} prompts exceed {limit} tokens and are truncated, e.g. {too_long[0]!r}")
    conditioning = []
    for start in range(0, len(prompts), _ENCODE_BATCH):
        ids = tokenizer(prompts[start : start + _ENCODE_BATCH], padding="max_length", max_length=limit,
                        truncation=True, return_tensors="pt").input_ids
        conditioning.append(base.text_encoder(ids.to(device))[0].float().cpu())
    say(f"dataset: {len(files)} images at {resolution}px from {images_dir}, latent sampling {latent_sampling}")
    return TrainingDataset(files=files, captions=captions, prompts=prompts, latent_mean=mean, latent_std=kept_std,
                           conditioning=torch.cat(conditioning))


def diffusion_loss(base: BaseModel, noise_scheduler: DDPMScheduler, latents: torch.Tensor,
                   conditioning: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ε-prediction MSE over all elements with t ~ U{0, …, T−1} per sample (§7.4).

    Timesteps and noise come from ``generator`` on the CPU, so they are the
    same whatever device the model runs on. On CUDA with a half-precision
    model the U-Net runs under autocast; the loss is computed in fp32.
    """
    device, dtype = base.device, base.dtype
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    latents, noise, t = latents.to(device), noise.to(device), t.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext():
        prediction = base.unet(noisy.to(dtype), t, encoder_hidden_states=conditioning.to(device, dtype)).sample
    return F.mse_loss(prediction.float(), noise.float())


def _write_loss_csv(path: Path, history: Sequence[LossRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss", "lr"])
    writer.writerows([record.step, repr(record.loss), repr(record.lr)] for record in history)
    atomic_write_text(path, buffer.getvalue())


def _read_loss_csv(path: Path, up_to_step: int) -> list[LossRecord]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = [LossRecord(int(row["step"]), float(row["loss"]), float(row["lr"])) for row in rows]
    return [record for record in records if record.step <= up_to_step]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(name: str, batch_size: int, gradient_accumulation: int, max_steps: int, checkpoint_steps: Sequence[int],
              clip_mode: str, clip_compat: str, resolution: int, loss_log_every: int, stop_after: int | None) -> None:
    if not NAME_PATTERN.match(name):
        raise TrainingError(f"hypernetwork name {name!r} must be letters, digits and ._- or spaces, not start with '.'")
    for label, value in (("batch_size", batch_size), ("gradient_accumulation", gradient_accumulation),
                         ("max_steps", max_steps), ("loss_log_every", loss_log_every)):
        if not _is_int(value) or value < 1:
            raise TrainingError(f"{label} must be a positive integer, got {value!r}")
    if clip_mode not in CLIP_MODES:
        raise TrainingError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if clip_compat not in CLIP_COMPAT:
        raise TrainingError(f"clip_compat must be one of {CLIP_COMPAT}, got {clip_compat!r}")
    if resolution < 8 or resolution % 8:
        raise TrainingError(f"resolution must be a positive multiple of 8 (the VAE's factor), got {resolution}")
    # §7.7: file N is written when step + 1 == N after an update, so N runs from 2 to max_steps.
    bad = [steps for steps in checkpoint_steps if not _is_int(steps) or not 2 <= steps <= max_steps]
    if bad:
        raise TrainingError(f"checkpoint_steps {bad} are outside 2..max_steps ({max_steps}); "
                            "file <name>-N.pt is written after N-1 updates")
    if stop_after is not None and (not _is_int(stop_after) or stop_after < 1):
        raise TrainingError(f"stop_after must be a positive number of steps, got {stop_after}")


def _dataset_fingerprint(files: Sequence[Path]) -> str:
    """Names and contents of images and caption sidecars: resuming on changed data is refused."""
    entries = []
    for path in files:
        sidecar = path.with_suffix(".txt")
        entries.append([path.name, sha256_file(path), sha256_file(sidecar) if sidecar.is_file() else None])
    return stable_hash(entries)


def _check_settings(path: Path, settings: dict, resuming: bool) -> None:
    settings = json.loads(json.dumps(settings))  # compare in the JSON form the file holds (tuples -> lists)
    if not resuming:
        atomic_write_json(path, settings)
        return
    if not path.is_file():
        raise TrainingError(f"{path.parent} holds checkpoints of {settings['name']!r} but no {path.name}, so they "
                            "cannot be resumed safely; use an empty output folder")
    recorded = json.loads(path.read_text())
    changed = sorted(key for key in set(recorded) | set(settings)
                     if key not in _RESUMABLE_CHANGES and recorded.get(key) != settings.get(key))
    if changed:
        raise TrainingError(f"{path.parent} holds checkpoints trained with other settings ({', '.join(changed)} "
                            "differ); use another output folder to train with these settings")
    atomic_write_json(path, settings)


def _resume_point(out_dir: Path, name: str, checkpoint_steps: Sequence[int], log: Log) -> tuple[Path, int, dict | None] | None:
    """The latest checkpoint, preferring one whose optimizer sidecar is valid (exact resume needs it).

    A requested checkpoint that is missing (lost, or added to the list later) must be
    rebuilt, so only states from before it qualify; training is deterministic, so
    the checkpoints after it come out identical again.
    """
    existing = existing_checkpoints(out_dir, name)
    candidates = [(steps - 1, path) for steps, path in existing.items()]
    final = final_path(out_dir, name)
    if final.is_file():
        candidates.append((load_hypernetwork(final).step, final))
    missing = [steps for steps in checkpoint_steps if steps not in existing]
    if missing:
        candidates = [(step, path) for step, path in candidates if step < min(missing) - 1]
    if not candidates:
        return None
    candidates.sort(key=lambda item: item[0], reverse=True)
    for step, path in candidates:
        state = load_optimizer_state(path)
        if state is not None:
            return path, step, state
    step, path = candidates[0]
    log(f"no valid optimizer state next to any checkpoint; resuming from {path.name} with a fresh optimizer")
    return path, step, None


def _starting_point(resume: tuple[Path, int, dict | None] | None, name: str, options: HypernetworkOptions,
                    seed: int, base: BaseModel, log: Log) -> tuple[Hypernetwork, dict | None, Path | None]:
    """A new seeded hypernetwork, or the one to resume with its optimizer state, checked against this run."""
    if resume is None:
        hn = Hypernetwork(name, options, seed=derive_seed(seed, "hypernetwork-init"))
        hn.sd_checkpoint, hn.sd_checkpoint_name = base.short_hash, base.name
        return hn, None, None
    path, expected_step, optimizer_state = resume
    hn = load_hypernetwork(path)
    if hn.step != expected_step or hn.options != options:
        raise TrainingError(f"{path} stores step {hn.step} (expected {expected_step}) or other hypernetwork options "
                            "than these; use another output folder")
    if hn.sd_checkpoint != base.short_hash:
        raise TrainingError(f"{path} was trained on base model {hn.sd_checkpoint}, not {base.short_hash}")
    log(f"resuming {name} from {path.name} at step {hn.step}")
    return hn, optimizer_state, path


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout draws from torch's global RNG; seed it per step and restore the caller's state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _require_finite_weights(hn: Hypernetwork, step: int) -> None:
    if not all(torch.isfinite(parameter).all() for parameter in hn.parameters()):
        raise NonFiniteLossError(step, f"hypernetwork weights became non-finite at step {step}; nothing was saved "
                                       "for this step, earlier checkpoints are intact")


@dataclass(frozen=True)
class TrainingSettings:
    """params' ``training:`` section, typed (§7).

    ``max_steps``, ``checkpoint_steps`` and ``loss_log_every`` may grow between
    runs of one training, which then resumes; any other change starts over.
    """

    templates: tuple[str, ...]
    max_steps: int
    learning_rate: str
    batch_size: int
    gradient_accumulation: int
    checkpoint_steps: tuple[int, ...]
    clip_mode: str
    clip_value: str
    latent_sampling: str
    loss_log_every: int


def train_hypernetwork(
    base: BaseModel,
    images_dir: str | Path,
    out_dir: str | Path,
    settings: TrainingSettings,
    *,
    name: str,
    options: HypernetworkOptions,
    resolution: int,
    seed: int,
    clip_compat: str = "correct",
    log: Log | None = None,
    stop_after: int | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainingResult:
    """Train (or resume training) a hypernetwork on the images in ``images_dir`` (§7).

    **Steps** are optimizer updates, each using ``batch_size × gradient_accumulation``
    images; both are clamped to the dataset size and an epoch is truncated so
    that accumulation windows never straddle epochs (§7.2, §7.7).

    **Checkpoints follow A1111's numbering** (§7.7): after each update A1111
    computes ``steps_done = step + 1`` and saves ``<name>-<steps_done>.pt``, so
    ``<name>-5000.pt`` is written after 4,999 updates and stores ``step = 4999``.
    A file is written for every N in ``checkpoint_steps``, with its ``.optim``
    sidecar so that training can resume from it. When the learning-rate
    schedule finishes (normally at ``max_steps``) the final ``<name>.pt`` is
    written, storing the number of updates done.

    **Resume:** if ``out_dir`` already holds checkpoints of ``name`` trained with
    the same settings (``<name>-settings.json``; only ``max_steps``,
    ``checkpoint_steps`` and ``loss_log_every`` may change), training continues
    from the latest one with its optimizer state. ``stop_after`` stops once
    the step count reaches it, without writing the final file, as a crash or
    cancelled run would; resuming then restarts from the latest checkpoint.
    ``on_checkpoint`` is called with each checkpoint's path once it is on
    disk, e.g. to copy the folder somewhere that outlives the machine.

    The loss CSV ``<name>-loss.csv`` (one row per update) is rewritten
    atomically every ``loss_log_every`` updates, at every checkpoint and at the
    end. A NaN or infinite loss raises :class:`NonFiniteLossError`.
    """
    say = log or (lambda _message: None)
    noise_scheduler = _checked_scheduler(base, settings, name, options, resolution, clip_compat, stop_after)
    record = {
        "name": name, "options": asdict(options), "templates": list(settings.templates), "resolution": resolution,
        "seed": seed, "learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
        "gradient_accumulation": settings.gradient_accumulation, "clip_mode": settings.clip_mode,
        "clip_value": settings.clip_value, "clip_compat": clip_compat, "latent_sampling": settings.latent_sampling,
        "max_steps": settings.max_steps, "checkpoint_steps": sorted(set(settings.checkpoint_steps)),
        "loss_log_every": settings.loss_log_every, "base_model_sha256": base.sha256, "base_model_name": base.name,
        "dataset": _dataset_fingerprint(list_images(images_dir)),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = _resume_point(out, name, settings.checkpoint_steps, say)
    _check_settings(settings_path(out, name), record, resuming=resume is not None)
    hn, optimizer_state, resumed_from = _starting_point(resume, name, options, seed, base, say)
    hn.to(base.device).train()
    history = _read_loss_csv(loss_csv_path(out, name), hn.step)
    lr_schedule = Schedule(settings.learning_rate, settings.max_steps, hn.step)
    optimizer = torch.optim.AdamW(hn.parameters(), lr=lr_schedule.value, weight_decay=WEIGHT_DECAY)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    for group in optimizer.param_groups:
        group["lr"] = lr_schedule.value
    if lr_schedule.finished or hn.step >= settings.max_steps:
        say(f"{name}: nothing to train at step {hn.step} (max_steps {settings.max_steps})")
        if resumed_from != final_path(out, name):
            save_hypernetwork(hn, final_path(out, name), optimizer=optimizer)
        return _finish(name, out, hn, 0.0, 0, history, base, resumed_from, interrupted=False)
    dataset = build_dataset(base, images_dir, name=name, templates=settings.templates, resolution=resolution,
                            latent_sampling=settings.latent_sampling, seed=seed, log=say)
    run = _TrainingRun(name, base, hn, optimizer, lr_schedule, noise_scheduler, dataset, settings, seed, clip_compat,
                       out, history, say, on_checkpoint)
    interrupted, elapsed, steps_run = run.train(stop_after)
    if not interrupted:
        _require_finite_weights(hn, hn.step)
        save_hypernetwork(hn, final_path(out, name), optimizer=optimizer)
        say(f"step {hn.step}: saved final {final_path(out, name).name}")
    return _finish(name, out, hn, elapsed, steps_run, history, base, resumed_from, interrupted)


def _checked_scheduler(base: BaseModel, settings: TrainingSettings, name: str, options: HypernetworkOptions,
                       resolution: int, clip_compat: str, stop_after: int | None) -> DDPMScheduler:
    """Every setting checked before anything is written; the training noise scheduler of the base model."""
    _validate(name, settings.batch_size, settings.gradient_accumulation, settings.max_steps,
              list(settings.checkpoint_steps), settings.clip_mode, clip_compat, resolution, settings.loss_log_every,
              stop_after)
    if settings.latent_sampling not in LATENT_SAMPLING:
        raise TrainingError(f"latent_sampling must be one of {LATENT_SAMPLING}, got {settings.latent_sampling!r}")
    if not any(line.strip() for line in settings.templates):
        raise TrainingError("templates must hold at least one non-empty prompt template line")
    check_hypernetwork_sizes(options.sizes, base.unet)
    Schedule(settings.learning_rate, settings.max_steps)
    if settings.clip_mode != "disabled":
        Schedule(settings.clip_value, settings.max_steps)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise TrainingError(f"only ε-prediction models are supported (SD 1.x); this one predicts "
                            f"{noise_scheduler.config.prediction_type!r}")
    return noise_scheduler


class _TrainingRun:
    """The state one training call moves forward: a method per optimizer update and per after-update chore."""

    def __init__(self, name: str, base: BaseModel, hn: Hypernetwork, optimizer: torch.optim.Optimizer, lr_schedule: Schedule,
                 noise_scheduler: DDPMScheduler, dataset: TrainingDataset, settings: TrainingSettings, seed: int,
                 clip_compat: str, out: Path, history: list[LossRecord], say: Log,
                 on_checkpoint: Callable[[Path], None] | None) -> None:
        self.name, self.base, self.hn, self.optimizer, self.lr_schedule = name, base, hn, optimizer, lr_schedule
        self.noise_scheduler, self.dataset, self.settings, self.seed = noise_scheduler, dataset, settings, seed
        self.clip_compat, self.out, self.history, self.say = clip_compat, out, history, say
        self.on_checkpoint = on_checkpoint
        self.checkpoint_set = sorted(set(settings.checkpoint_steps))
        self.csv_path = loss_csv_path(out, name)
        n_images = len(dataset)
        self.batch = min(settings.batch_size, n_images)
        self.accumulation = min(settings.gradient_accumulation, n_images // self.batch)
        if (self.batch, self.accumulation) != (settings.batch_size, settings.gradient_accumulation):
            say(f"{n_images} images: batch size {settings.batch_size} -> {self.batch}, gradient accumulation "
                f"{settings.gradient_accumulation} -> {self.accumulation}")
        self.batches_per_epoch = n_images // self.batch - (n_images // self.batch) % self.accumulation
        self.clip_schedule = (Schedule(settings.clip_value, settings.max_steps, hn.step)
                              if settings.clip_mode != "disabled" else None)
        device = base.device
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and base.dtype == torch.float16)
        self.orders: dict[int, np.ndarray] = {}

    def batch_indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        if epoch not in self.orders:
            self.orders.clear()
            self.orders[epoch] = np.random.default_rng(derive_seed(self.seed, "epoch", epoch)).permutation(len(self.dataset))
        return self.orders[epoch][position * self.batch : (position + 1) * self.batch].tolist()

    def train(self, stop_after: int | None) -> tuple[bool, float, int]:
        """Updates until the schedule or ``stop_after`` ends them: (interrupted, seconds, updates run)."""
        settings, hn = self.settings, self.hn
        start_step, started, interrupted = hn.step, time.perf_counter(), False
        self.say(f"training {self.name} on {self.base.device} from step {hn.step} to {settings.max_steps}: "
                 f"{len(self.dataset)} images, batch {self.batch} x {self.accumulation}, lr {settings.learning_rate!r}, "
                 f"clip {settings.clip_mode}")
        progress = tqdm(total=settings.max_steps, initial=hn.step, desc=f"train {self.name}", unit="step", disable=None)
        try:
            with apply_hypernetwork(self.base.unet, hn):
                while True:
                    if self.lr_schedule.advance(hn.step):
                        for group in self.optimizer.param_groups:
                            group["lr"] = self.lr_schedule.value
                    if self.lr_schedule.finished or hn.step >= settings.max_steps:
                        break
                    record = self.update()
                    progress.update(1)
                    progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.3g}")
                    self.after_update(record.lr, start_step, started)
                    if stop_after is not None and hn.step >= stop_after:
                        interrupted = True
                        self.say(f"stopped after step {hn.step} (stop_after)")
                        break
        finally:
            progress.close()
        return interrupted, time.perf_counter() - started, hn.step - start_step

    def update(self) -> LossRecord:
        """One optimizer update over ``accumulation`` micro-batches; its mean loss and rate, added to the history."""
        hn, step, accumulation = self.hn, self.hn.step, self.accumulation
        window_loss = 0.0
        for micro in range(accumulation):
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "step", step, micro))
            indices = self.batch_indices(step * accumulation + micro)
            rng = (_seeded_global_rng(derive_seed(self.seed, "dropout", step, micro), self.base.device)
                   if hn.options.use_dropout else contextlib.nullcontext())
            with rng:
                loss = diffusion_loss(self.base, self.noise_scheduler, self.dataset.latents(indices, generator),
                                      self.dataset.conditioning[indices], generator)
            if not torch.isfinite(loss):
                _write_loss_csv(self.csv_path, self.history)
                raise NonFiniteLossError(step + 1, f"non-finite loss ({loss.item()}) at step {step + 1} of "
                                                   f"{self.name}; earlier checkpoints are intact")
            self.scaler.scale(loss / accumulation).backward()
            window_loss += loss.item() / accumulation
        if self.clip_schedule is not None:
            self.clip_schedule.advance(step)
            if self.clip_compat == "correct":
                self.scaler.unscale_(self.optimizer)
            if self.settings.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(hn.parameters(), self.clip_schedule.value)
            else:
                torch.nn.utils.clip_grad_norm_(hn.parameters(), self.clip_schedule.value)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        hn.step = step + 1
        self.history.append(LossRecord(hn.step, window_loss, lr))
        return self.history[-1]

    def after_update(self, lr: float, start_step: int, started: float) -> None:
        """A checkpoint when A1111 would write one (after step N-1, §7.7), and the loss log every few steps."""
        hn, every = self.hn, self.settings.loss_log_every
        steps_done = hn.step + 1
        if steps_done in self.checkpoint_set:
            _require_finite_weights(hn, hn.step)
            path = save_hypernetwork(hn, checkpoint_path(self.out, self.name, steps_done), optimizer=self.optimizer)
            _write_loss_csv(self.csv_path, self.history)
            self.say(f"step {hn.step}: saved {path.name}")
            if self.on_checkpoint is not None:
                self.on_checkpoint(path)
        if hn.step % every == 0:
            window = self.history[-every:]
            rate = (hn.step - start_step) / max(time.perf_counter() - started, 1e-9)
            self.say(f"step {hn.step}/{self.settings.max_steps}: mean loss "
                     f"{sum(r.loss for r in window) / len(window):.5f}, lr {lr:.3g}, {rate:.2f} steps/s")
            _write_loss_csv(self.csv_path, self.history)


def _finish(name: str, out: Path, hn: Hypernetwork, elapsed: float, steps_run: int,
            history: list[LossRecord], base: BaseModel, resumed_from: Path | None, interrupted: bool) -> TrainingResult:
    _write_loss_csv(loss_csv_path(out, name), history)
    final = final_path(out, name)
    return TrainingResult(
        name=name,
        checkpoints=existing_checkpoints(out, name),
        final_path=final if final.is_file() and not interrupted else None,
        final_step=hn.step,
        loss_history=history,
        final_loss=history[-1].loss if history else None,
        steps_per_second=steps_run / elapsed if steps_run else None,
        device=str(base.device),
        base_model_sha256=base.sha256,
        base_model_short_hash=base.short_hash,
        loss_csv=loss_csv_path(out, name),
        resumed_from=resumed_from,
        interrupted=interrupted,
    )


def resume_key(*, training: Mapping[str, Any], **inputs: Any) -> str:
    """What a partial run must share with this one to be continued rather than restarted.

    The stage's fingerprint inputs, less the settings training can be extended
    by (more steps, more checkpoints) without starting over; anything else
    changes the weights.
    """
    kept = {key: value for key, value in training.items() if key not in _RESUMABLE_CHANGES}
    return fingerprint(training=kept, **inputs)


def checkpoints_summary(result: TrainingResult, training_set: str) -> dict[str, Any]:
    """A run's summary fields; the checkpoint hashes let later stages and lineage trust the files."""
    return {
        "name": result.name,
        "training_set": training_set,
        "checkpoints": [{"step": step, "file": path.name, "sha256": sha256_file(path)}
                        for step, path in sorted(result.checkpoints.items())],
        "final_loss": result.final_loss,
        "steps_per_second": result.steps_per_second,
        "device": result.device,
        "base_model_sha256": result.base_model_sha256,
        "base_model_short_hash": result.base_model_short_hash,
        "resumed_from": result.resumed_from.name if result.resumed_from else None,
    }


def write_hypernetwork_checkpoints(
    out: Path, base: BaseModel, images_dir: Path, *, tissue_class: str, options: HypernetworkOptions,
    training: TrainingSettings, resolution: int, master_seed: int, training_set: str, resume: str,
    log: Log, on_checkpoint: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train one class's hypernetwork into ``out``; the summary's fields.

    ``out`` is written as training goes, so a run with the same ``resume`` key
    (see :func:`resume_key`) left there is continued. The sizes are checked
    before the folder is touched, so a wrong setting never clears such a run.
    """
    check_hypernetwork_sizes(options.sizes, base.unet)
    if prepare_resumable(out, resume):
        log(f"{tissue_class}: continuing the training run in {out} (interrupted, extended or missing checkpoints)")
    result = train_hypernetwork(
        base, images_dir, out, training, name=sanitize_name(tissue_class),
        options=options, resolution=resolution, seed=derive_seed(master_seed, "hypernetwork", tissue_class), log=log,
        on_checkpoint=on_checkpoint,
    )
    history = result.loss_history
    loss_curve([r.step for r in history], [r.loss for r in history], out / LOSS_PLOT,
               title=f"hypernetwork {result.name}: training loss", marks=sorted(result.checkpoints))
    return checkpoints_summary(result, training_set)
