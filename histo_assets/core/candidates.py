"""The release candidates (step 0, each checkpoint, each class's chosen one) and the image sets each is judged on.

Apart from the classifiers (core/classifier_utility.py), so that fingerprinting
the utility stage, which every refresh does, needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from histo_assets.core.evaluation import generated_files, held_out_crops, image_set_hash
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import IMAGES, INDEX, Layout
from histo_assets.core.schemas import AUGMENTED_INDEX

# The candidate made of each class's chosen checkpoint (metrics_summary's `best`), the release's default.
BEST_PER_CLASS = "best"

ClassPaths = Mapping[str, Sequence[Path]]


def step_candidate(step: int) -> str:
    return f"step-{step}"


def utility_inputs(
    layout: Layout, classes: Sequence[str], steps: Sequence[int], best: Mapping[str, int],
) -> tuple[dict[str, list[Path]], dict[str, list[Path]], dict[str, dict[str, list[Path]]]]:
    """(real training crops, held-out crops, synthetic images per candidate), each per class.

    The real training set is the original crops only: augmented crops are
    themselves a kind of synthetic data, and would blur the comparison.
    """
    train, test = {}, {}
    for tissue_class in classes:
        index = AUGMENTED_INDEX.read(layout.augmented_crops(tissue_class) / INDEX, columns=["file", "kind"])
        images = layout.augmented_crops(tissue_class) / IMAGES
        train[tissue_class] = [images / name for name in index.loc[index["kind"] == "original", "file"]]
        test[tissue_class] = held_out_crops(layout, tissue_class)
    candidates = {step_candidate(step): {c: generated_files(layout, c, step) for c in classes} for step in steps}
    candidates[BEST_PER_CLASS] = {c: generated_files(layout, c, best[c]) for c in classes}
    return train, test, candidates


def image_sets_hash(train: ClassPaths, test: ClassPaths, candidates: Mapping[str, ClassPaths]) -> str:
    """The content of every image set the candidates are scored on, for the stage's fingerprint."""
    return stable_hash({name: {c: image_set_hash(paths) for c, paths in sets.items()}
                        for name, sets in [("train", train), ("test", test), *candidates.items()]})
