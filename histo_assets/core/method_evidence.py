"""Whether hypernetwork training does its job, read off a pipeline's own outputs.

Two observable effects, each compared with step 0 (the base model with the
same prompt and no hypernetwork): the generated images take on their class's
stain (the CIE Lab mean colour moves towards the class's real crops), and
they come closer to the held-out crops in feature space (KID falls). For an
IHC class among H&E ones, its final images must also end up nearer its own
crops' colour than either H&E class's final images do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from histo_assets.core.colour import lab_distance, mean_lab
from histo_assets.core.schemas import CheckpointMetricsSummary
from histo_assets.core.stage import read_summary
from histo_assets.core.steps import BASELINE_STEP
from histo_assets.core.layout import IMAGES, Layout


@dataclass(frozen=True)
class EvidenceCheck:
    name: str
    passed: bool
    detail: str


def evidence_table(layout: Layout, classes: Sequence[str], final_step: int) -> pd.DataFrame:
    """Per class and step (0 and final): ΔE to the class's real crops, ΔE to every class's crops, and KID."""
    real_lab = {c: mean_lab(sorted((layout.square_crops(c) / IMAGES).glob("*.png"))) for c in classes}
    rows = []
    for tissue_class in classes:
        for step in (BASELINE_STEP, final_step):
            lab = mean_lab(sorted((layout.synthetic_images(tissue_class, step) / IMAGES).glob("*.png")))
            metrics = read_summary(layout.checkpoint_metrics(tissue_class, step), CheckpointMetricsSummary)
            rows.append({
                "tissue_class": tissue_class, "step": step, "L": lab[0], "a": lab[1], "b": lab[2],
                **{f"delta_e_to_{other}": lab_distance(lab, real_lab[other]) for other in classes},
                "kid_mean": metrics["row"]["kid_mean"] if metrics else float("nan"),
            })
    return pd.DataFrame(rows)


def evidence_checks(table: pd.DataFrame, classes: Sequence[str], final_step: int, ihc_class: str | None) -> list[EvidenceCheck]:
    rows = table.set_index(["tissue_class", "step"])
    checks = []
    for c in classes:
        before, after = rows.loc[(c, BASELINE_STEP)], rows.loc[(c, final_step)]
        own = f"delta_e_to_{c}"
        checks.append(EvidenceCheck(f"{c}: stain nearer its real crops than the base model's",
                                    bool(after[own] < before[own]), f"ΔE {before[own]:.2f} at step 0 -> {after[own]:.2f} at step {final_step}"))
        checks.append(EvidenceCheck(f"{c}: KID against held-out crops below the base model's",
                                    bool(after["kid_mean"] < before["kid_mean"]),
                                    f"KID {before['kid_mean']:.4f} at step 0 -> {after['kid_mean']:.4f} at step {final_step}"))
    if ihc_class is not None:
        column = f"delta_e_to_{ihc_class}"
        own = rows.loc[(ihc_class, final_step), column]
        for c in classes:
            if c != ihc_class:
                other = rows.loc[(c, final_step), column]
                checks.append(EvidenceCheck(f"{ihc_class}: its images nearer its crops' colour than {c}'s images",
                                            bool(own < other), f"ΔE {own:.2f} against {other:.2f}"))
    return checks
