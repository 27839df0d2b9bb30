"""Which training steps are evaluated: every checkpoint, and step 0, the plain base model.

Step 0 is the baseline a lab asks about first: with the same prompt and no
hypernetwork, does the base model already make these images? It is generated
and scored like a checkpoint, so it sits in every table, plot and grid, but it
is never released: its images carry no class-specific training.
"""

from collections.abc import Iterable
from typing import Any

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.layout import Layout
from histo_assets.core.schemas import HypernetworkCheckpointsSummary
from histo_assets.core.stage import read_summary

BASELINE_STEP = 0


def evaluated_steps(checkpoint_steps: Iterable[int]) -> list[int]:
    steps = sorted({int(step) for step in checkpoint_steps})
    if steps and steps[0] <= BASELINE_STEP:
        raise ValueError(f"checkpoint steps must be positive: step {BASELINE_STEP} is the base model itself, got {steps[0]}")
    return [BASELINE_STEP, *steps]


class MissingCheckpointError(HistoAssetsError, LookupError):
    """The checkpoint a step's images come from was never trained with these params."""


# Step 0 is generated from the base model alone: no checkpoint file, and no training set behind it.
BASELINE_CHECKPOINT = {"file": None, "sha256": None, "training_set": None}


def checkpoint_at(layout: Layout, tissue_class: str, step: int) -> dict[str, Any]:
    """The checkpoint entry (file, sha256, step) behind a class's step, with its run's name and training set."""
    if step == BASELINE_STEP:
        return dict(BASELINE_CHECKPOINT)  # the caller's own: never the shared constant
    summary = read_summary(layout.hypernetwork_checkpoints(tissue_class), HypernetworkCheckpointsSummary)
    if summary is None:
        raise MissingCheckpointError(f"class {tissue_class!r}: hypernetwork_checkpoints has not been materialised")
    for entry in summary["checkpoints"]:
        if int(entry["step"]) == step:
            return entry | {"name": summary["name"], "training_set": summary["training_set"]}
    raise MissingCheckpointError(
        f"class {tissue_class!r}: no checkpoint for step {step}; materialise hypernetwork_checkpoints with these params")
