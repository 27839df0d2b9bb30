"""Partitions, built from the params the definitions are built from.

Per-class assets are partitioned by tissue class; per-checkpoint assets by
tissue class x checkpoint step, so every checkpoint of every class is its own
partition in the UI, as in the thesis's per-checkpoint tables; step 0 is the
base model without a hypernetwork (core/steps.py). They are built from a
Params object, not read at import, so one process can hold definitions for
several params files (tests, a lab's own file next to the thesis's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dagster as dg

from histo_assets.params import Params

with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    by_tissue_class = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="tissue_class")


@dataclass(frozen=True)
class Partitions:
    tissue_class: dg.StaticPartitionsDefinition
    class_and_step: dg.MultiPartitionsDefinition

    @classmethod
    def from_params(cls, p: Params) -> Partitions:
        tissue_class = dg.StaticPartitionsDefinition(p.classes)
        step = dg.StaticPartitionsDefinition([str(s) for s in p.steps])
        return cls(tissue_class, dg.MultiPartitionsDefinition({"tissue_class": tissue_class, "step": step}))
