"""The steps every stage shares, so that an asset only says what is particular to it.

A partition's run is: read params (with the launch's overrides), pull its
inputs and its own folder from the object store, fingerprint, build in a
staging folder or reuse, push, and report metadata and a data version. The
building itself is a core function; the asset passes it the inputs and
settings and chooses what the UI shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from histo_assets.assets import FOLLOW_UPSTREAM, GPU_TAGS
from histo_assets.core.layout import Layout
from histo_assets.core.stage import build_or_reuse, fingerprint
from histo_assets.params import Params
from histo_assets.resources import ObjectStoreResource, ParamsResource, params_config_schema

# The pool of steps that need the GPU: one at a time (dagster.yaml), so concurrent runs never share it.
GPU_POOL = "gpu"


def stage_asset(p: Params, *, on_gpu: bool = False, follows_upstream: bool = True, **asset_args: Any):
    """``dg.asset`` with what the stages share.

    Run config shaped like params, so the launchpad checks overrides before a
    run exists; eager automation after the upstream, unless the stage reads
    files a lab drops in (then a sensor or a person starts it); and for GPU
    work the ``gpu`` pool and the pod's GPU request.
    """
    shared: dict[str, Any] = {"config_schema": params_config_schema(p.values)}
    if follows_upstream:
        shared["automation_condition"] = FOLLOW_UPSTREAM
    if on_gpu:
        shared |= {"pool": GPU_POOL, "op_tags": GPU_TAGS}
    return dg.asset(**shared, **asset_args)


@dataclass
class Stage:
    """One partition of one stage while it runs."""

    context: dg.AssetExecutionContext
    params: Params
    object_store: ObjectStoreResource
    out: Path
    reused: bool = field(default=False, init=False)

    @classmethod
    def start(
        cls, context: dg.AssetExecutionContext, params: ParamsResource, object_store: ObjectStoreResource,
        output: Callable[[Layout], Path], *inputs: Callable[[Layout], Path],
    ) -> Stage:
        """Read params and pull the stage's inputs and its previous output; folders are given as layout lookups."""
        p = params.load_for(context)
        layout = Layout(p.data_dir)
        stage = cls(context, p, object_store, output(layout))
        object_store.pull(p.data_dir, *(folder(layout) for folder in inputs), stage.out, log=context.log.info)
        return stage

    @property
    def layout(self) -> Layout:
        return Layout(self.params.data_dir)

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def build_or_reuse(self, build: Callable[[Path], dict[str, Any]], *, in_place: bool = False,
                       **inputs: Any) -> dict[str, Any]:
        """The summary: ``build`` runs only when the fingerprint of ``inputs`` changed; then the output is pushed."""
        summary, self.reused = build_or_reuse(self.out, fingerprint(**inputs), build, log=self.log, in_place=in_place)
        self.push()
        return summary

    def push(self) -> None:
        self.object_store.push(self.params.data_dir, self.out, log=self.log)

    def result(self, data_version: str, metadata: dict[str, Any]) -> dg.MaterializeResult:
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(self.out)), **metadata, "reused_unchanged_output": self.reused},
            data_version=dg.DataVersion(data_version),
        )
