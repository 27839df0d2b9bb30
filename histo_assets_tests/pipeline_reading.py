"""Reading what the tiny pipeline wrote and what its Dagster instance recorded, for the asset and CLI tests."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import dagster as dg
import torch

from histo_assets.core.base_model import folder_weights_sha256, tiny_model_dir
from histo_assets.core.io import sha256_file
from histo_assets.params import load_params
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import TINY_MODEL_SEED, assets_by_name
from histo_assets_tests.tiny_pipeline import CLASSES, EVALUATED_STEPS, Pipeline


# Stages that skip work when their inputs are unchanged, and report it.
REUSING_ASSETS = {"slide_inventory", "square_crops", "augmented_crops", "hypernetwork_checkpoints",
                  "imported_hypernetwork_index", "synthetic_images", "checkpoint_metrics", "metrics_summary"}


# The one output folder rewritten on every run (with identical bytes: see
# test_release_is_unchanged_by_a_refresh_with_nothing_changed).
ALWAYS_REWRITTEN = ("releases/",)


def base_model_sha256(data: Path) -> str:
    return folder_weights_sha256(tiny_model_dir(data / ".cache" / "tiny_sd", TINY_MODEL_SEED))


def expected_partitions(spec: dg.AssetSpec) -> list[str | None]:
    if spec.partitions_def is None:
        return [None]
    if isinstance(spec.partitions_def, dg.MultiPartitionsDefinition):
        return [dg.MultiPartitionKey({"tissue_class": c, "step": str(s)}) for c in CLASSES for s in EVALUATED_STEPS]
    return list(CLASSES)


def all_asset_partitions() -> list[tuple[str, str | None]]:
    """Every (asset, partition) the CLI materialises with the tiny params, from the project's definitions."""
    from histo_assets.definitions import defs

    return [(spec.key.to_user_string(), partition) for spec in defs.resolve_all_asset_specs()
            for partition in expected_partitions(spec)]


def check_results(instance: dg.DagsterInstance, run_id: str) -> dict[tuple[str, str], bool]:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {
        (e.dagster_event.event_specific_data.asset_key.to_user_string(), e.dagster_event.event_specific_data.check_name):
            e.dagster_event.event_specific_data.passed
        for e in events
    }


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(folder).as_posix(): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def materialize_in_process(pipeline: Pipeline, names: list[str], partition: str, overrides: list[str] | None = None):
    """Per-class assets in this process, built from the pipeline's params."""
    instance = dg.DagsterInstance.ephemeral()
    available = assets_by_name(load_params(pipeline.params))
    result = dg.materialize(
        [available[name] for name in names],
        partition_key=partition,
        resources={"params": ParamsResource(params_file=str(pipeline.params)), "base_model": BaseModelResource(device="cpu"),
                   "object_store": ObjectStoreResource()},
        run_config={"ops": {name: {"config": load_params(pipeline.params, overrides or []).nested_overrides(overrides or [])} for name in names}},
        instance=instance,
        raise_on_error=False,
    )
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    return result, logs


def in_process_checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def a1111_file(path: Path, widths: tuple[int, ...], name: str, step: int) -> Path:
    """An AUTOMATIC1111 .pt written by hand (§2 layout): int width keys holding (k, v) state dicts."""
    g = torch.Generator().manual_seed(step)

    def state(width: int) -> OrderedDict:
        return OrderedDict([
            ("linear.0.weight", torch.randn(2 * width, width, generator=g) * 0.01),
            ("linear.0.bias", torch.zeros(2 * width)),
            ("linear.1.weight", torch.randn(width, 2 * width, generator=g) * 0.01),
            ("linear.1.bias", torch.zeros(width)),
        ])

    contents = {width: (state(width), state(width)) for width in widths}
    contents.update(step=step, name=name, layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=False,
                    weight_initialization="Normal", sd_checkpoint="0123456789", sd_checkpoint_name="lab-model",
                    activate_output=False, use_dropout=False, dropout_structure=[0, 0, 0], last_layer_dropout=False,
                    optional_info=None)
    torch.save(contents, path)
    return path
