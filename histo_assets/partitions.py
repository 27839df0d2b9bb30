"""Partitions: one per tissue class, read from params at definition load time."""

from __future__ import annotations

import dagster as dg

from histo_assets.params import load_params

tissue_class_partitions = dg.StaticPartitionsDefinition(load_params().classes)
