"""Partitions, read from params at definition load time.

Per-class assets are partitioned by tissue class; per-checkpoint assets by
tissue class x checkpoint step, so every checkpoint of every class is its own
partition in the UI, as in the thesis's per-checkpoint tables; step 0 is the
base model without a hypernetwork (core/steps.py).
"""

import warnings

import dagster as dg

from histo_assets.core.steps import evaluated_steps
from histo_assets.params import load_params

# The params the definitions are built from (partitions, run-config schema, the base model's inputs), read once.
DEFINITION_PARAMS = load_params()

tissue_class_partitions = dg.StaticPartitionsDefinition(DEFINITION_PARAMS.classes)
checkpoint_step_partitions = dg.StaticPartitionsDefinition(
    [str(step) for step in evaluated_steps(DEFINITION_PARAMS["training"]["checkpoint_steps"])]
)
class_and_step_partitions = dg.MultiPartitionsDefinition({"tissue_class": tissue_class_partitions, "step": checkpoint_step_partitions})

with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    by_tissue_class = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="tissue_class")


def class_and_step(context) -> tuple[str, int]:
    keys = context.partition_key.keys_by_dimension
    return keys["tissue_class"], int(keys["step"])
