"""The thesis's `rudi augment` recipe, run through Augmentor deterministically.

Augmentor's own ``sample()`` names files with uuids, writes into the source
folder and is not reproducible when threaded. Here each output image gets its
own derived seed and is produced in memory by Augmentor's operations, in
rudi's order and with Augmentor's firing rule (an operation fires when
``round(uniform(0, 1), 1) <= p``, so p = 0.7 fires about 75% of the time).
The result is byte-identical however many worker processes share the work.
"""

from __future__ import annotations

import multiprocessing
import random
import shutil
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.holdout import RULE_NONE, SplitSettings, split_holdout
from histo_assets.core.io import Log, atomic_save_png, atomic_write_text, sha256_file, stable_hash
from histo_assets.core.layout import HOLDOUT, IMAGES, INDEX, PREVIEW
from histo_assets.core.previews import write_preview
from histo_assets.core.schemas import AUGMENTED_INDEX, HELD_OUT_CROPS
from histo_assets.core.seeding import derive_seed



class CaptionModeError(HistoAssetsError, ValueError):
    """augmentation.captions names no caption mode; the message says which there are."""


@dataclass(frozen=True)
class AugmentationRecipe:
    """rudi's options; every enabled operation shares one probability, as in rudi."""

    probability: float
    rotate: bool
    max_left_rotation: int
    max_right_rotation: int
    distortion: bool
    grid_width: int
    grid_height: int
    distortion_magnitude: int
    skew: bool
    skew_magnitude: float
    zoom: bool
    min_factor: float
    max_factor: float
    flip: bool

    def pipeline(self):
        """An Augmentor pipeline with no source folder, so nothing is scanned or written."""
        import Augmentor

        p = Augmentor.Pipeline()
        if self.rotate:
            p.rotate(self.probability, self.max_left_rotation, self.max_right_rotation)
        if self.distortion:
            p.random_distortion(self.probability, self.grid_width, self.grid_height, self.distortion_magnitude)
        if self.skew:
            p.skew(self.probability, self.skew_magnitude)
        if self.zoom:
            p.zoom(self.probability, self.min_factor, self.max_factor)
        if self.flip:
            p.flip_random(self.probability)
        return p


@dataclass(frozen=True)
class AugmentationSettings:
    """params' ``augmentation`` section: the recipe, how many images a class gets, and their captions."""

    recipe: AugmentationRecipe
    total: int
    keep_originals: bool
    captions: str
    workers: int


@dataclass(frozen=True)
class AugmentedRecord:
    """One image of the augmented set and the crop it came from."""

    file: str
    sha256: str
    kind: str
    source_crop: str
    source_crop_sha256: str
    operations: str
    seed: int | None

    def as_row(self) -> dict:
        return asdict(self)


def apply_recipe(image: Image.Image, recipe: AugmentationRecipe, seed: int) -> tuple[Image.Image, list[str]]:
    """Run the recipe on one image with Augmentor's firing rule; return the image and the operations that fired.

    Augmentor's operations draw from the global ``random`` and ``numpy.random``
    streams, so both are seeded here, immediately before use, in the process
    that does the work.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    fired = []
    for operation in recipe.pipeline().operations:
        if round(random.uniform(0, 1), 1) <= operation.probability:
            image = operation.perform_operation([image])[0]
            fired.append(type(operation).__name__)
    return image.convert("RGB"), fired


def _augment_task(task: tuple[Path, Path, AugmentationRecipe, int]) -> tuple[str, str, list[str]]:
    source, target, recipe, seed = task
    with Image.open(source) as handle:
        image = handle.convert("RGB")
    augmented, fired = apply_recipe(image, recipe, seed)
    if augmented.size != image.size:
        augmented = augmented.resize(image.size, Image.Resampling.BICUBIC)
    atomic_save_png(target, augmented)
    return target.name, sha256_file(target), fired


def augment_class(
    crops: list[tuple[Path, str]],
    out_dir: Path,
    *,
    recipe: AugmentationRecipe,
    total: int,
    keep_originals: bool,
    seed: int,
    workers: int,
    log: Log | None = None,
) -> list[AugmentedRecord]:
    """Write ``total`` augmented images (sources drawn with replacement, as rudi does) and the originals.

    ``crops`` are (path, sha256) of the crops to augment. Output names depend
    only on the output index and the source crop, never on timing.
    """
    if not crops:
        raise ValueError("no crops to augment")
    chooser = random.Random(derive_seed(seed, "sources"))
    picks = [chooser.randrange(len(crops)) for _ in range(total)]
    tasks = []
    for index, pick in enumerate(picks):
        source = crops[pick][0]
        target = out_dir / f"aug-{index:05d}-{source.stem}.png"
        tasks.append((source, target, recipe, derive_seed(seed, "augment", index)))
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[AugmentedRecord] = []
    if keep_originals:
        for path, sha in crops:
            target = out_dir / f"orig-{path.stem}.png"
            shutil.copyfile(path, target)
            records.append(AugmentedRecord(target.name, sha, "original", path.name, sha, "", None))
    results = _run_tasks(tasks, workers)
    for (source, _, _, task_seed), pick, (name, sha, fired) in zip(tasks, picks, results):
        records.append(AugmentedRecord(name, sha, "augmented", source.name, crops[pick][1], ",".join(fired), task_seed))
    if log:
        log(f"{total} augmented + {len(crops) if keep_originals else 0} original image(s) from {len(crops)} crop(s)")
    return records


def _run_tasks(tasks: list, workers: int) -> list[tuple[str, str, list[str]]]:
    progress = dict(total=len(tasks), desc="augmented crops", unit="img", disable=None)
    if workers <= 1 or len(tasks) < 2:
        return [_augment_task(task) for task in tqdm(tasks, **progress)]
    # fork reuses the parent's imports (start-up in milliseconds, not seconds); the
    # children only run Pillow/numpy code, and every task seeds itself.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    chunk = max(1, len(tasks) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(tqdm(pool.map(_augment_task, tasks, chunksize=chunk), **progress))


def write_captions(folder: Path, files: list[str], tissue_class: str, mode: str) -> None:
    """Caption sidecars for training: the class name, instead of A1111's file-name captions.

    A1111 takes [filewords] from the file name when no ``.txt`` sits beside
    the image; our stable names encode coordinates, which would make the
    captions noise (as they probably were in the thesis). ``filename`` keeps
    that A1111 behaviour.
    """
    if mode == "filename":
        return
    if mode != "class":
        raise CaptionModeError(f"augmentation.captions must be 'class' or 'filename', not {mode!r}")
    caption = tissue_class.replace("_", " ")
    for name in files:
        atomic_write_text(folder / f"{Path(name).stem}.txt", caption + "\n")


def write_augmented_crops(
    out: Path, crop_images: Path, index: pd.DataFrame, *, split_settings: SplitSettings, groups: Mapping[str, str],
    augmentation: AugmentationSettings, tissue_class: str, seed: int, log: Log | None = None, warn: Log | None = None,
) -> dict[str, Any]:
    """A class's training crops augmented and captioned, with their index and a preview, and its held-out list, in
    ``out``; the summary fields that describe them.

    ``index`` is square_crops' index of the crops in ``crop_images``. The held-out crops are
    never augmented: they are the reference set the metrics compare with, so
    a class that cannot hold any out is warned about.
    """
    split = split_holdout(index, split_settings, derive_seed(seed, "holdout"), groups)
    if split.rule == RULE_NONE:
        if warn:
            warn(f"{tissue_class}: {split.reason}; metrics will have no reference set")
    elif log:
        log(f"{tissue_class}: {split.rule} split, {split.reason}")
    hashes = dict(zip(index["crop_file"], index["crop_sha256"]))
    records = augment_class(
        [(crop_images / name, hashes[name]) for name in split.train],
        out / IMAGES,
        recipe=augmentation.recipe,
        total=augmentation.total,
        keep_originals=augmentation.keep_originals,
        seed=seed,
        workers=augmentation.workers,
        log=log,
    )
    write_captions(out / IMAGES, [r.file for r in records], tissue_class, augmentation.captions)
    frame = pd.DataFrame([r.as_row() for r in records])
    frame["seed"] = pd.array([r.seed for r in records], dtype="Int64")
    AUGMENTED_INDEX.write(out / INDEX, frame)
    HELD_OUT_CROPS.write(out / HOLDOUT, split.holdout_frame())
    write_preview(out / IMAGES, out / PREVIEW)
    return {
        "count": len(records),
        **split.summary(),
        "data_version": stable_hash(sorted((r.file, r.sha256) for r in records)),
    }
