"""The steps every stage shares, so that an asset only says what is particular to it.

An asset is declared once, with ``stage_asset`` over its recipe: the folders
it reads, what decides its output, and its Dagster settings. definitions.py
builds every declaration into a Dagster asset for a params object. A
partition's run is: read params (with the launch's overrides), pull its
inputs and its own folder from the object store, fingerprint, build in a
staging folder or reuse, push, and report metadata and a data version (and,
for a stage that writes images, the image checks). The building itself is a
core function; the asset passes it the inputs and settings and chooses what
the UI shows. Any of the project's own errors fails the run with its message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from histo_assets.core.errors import HistoAssetsError
from histo_assets.checks import image_check_results, image_check_specs
from histo_assets.core.layout import IMAGES, SUMMARY, Layout
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.stage import build_or_reuse, current_summary, fingerprint
from histo_assets.params import Params
from histo_assets.partitions import Partitions
from histo_assets.resources import BaseModelResource, ObjectStoreResource, params_config_schema

# The pool of steps that need the GPU: one at a time (dagster.yaml), so concurrent runs never share it.
GPU_POOL = "gpu"
# On Kubernetes (dagster-k8s) these tags request one GPU for the step's pod; elsewhere they are inert.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
# Downstream assets follow their upstream through declarative automation, so a sensor or
# schedule only has to start the ingest job; unchanged inputs are reused by fingerprint.
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()


def table_value(frame: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(frame))


def png_value(file: Path, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_png_file(file, alt))


def skipped_files(problems: list[dict]) -> dg.MetadataValue:
    """The files a stage skipped and why, as the UI shows them."""
    return table_value(pd.DataFrame(problems)) if problems else dg.MetadataValue.md("No file was skipped.")


@contextlib.contextmanager
def refusals_as_failures() -> Iterator[None]:
    """The project's own errors fail the run as a Dagster failure, so the UI shows why, and the files skipped on the
    way, instead of a traceback: each names the input it refuses (core/errors.py)."""
    try:
        yield
    except HistoAssetsError as error:
        problems = getattr(error, "problems", None)
        raise dg.Failure(str(error), metadata=None if problems is None else {
            "skipped": skipped_files([vars(problem) for problem in problems])}) from error


@dataclass(frozen=True)
class Part:
    """The partition a run is for: a class, a class and a step, or neither for stages across everything."""

    tissue_class: str | None = None
    step: int | None = None

    @classmethod
    def of(cls, key: str | None) -> Part:
        if key is None:
            return cls()
        if isinstance(key, dg.MultiPartitionKey):
            return cls(key.keys_by_dimension["tissue_class"], int(key.keys_by_dimension["step"]))
        return cls(key)


@dataclass(frozen=True)
class StageSpec:
    """Where a stage writes, which folders it reads and what decides its output.

    Declared apart from the asset's body so that a launcher can tell, before
    starting a Dagster run, that the run would only confirm its reuse. The
    stage writes the Layout folder of its own name; ``reads`` names the Layout
    folders it reads (a stage across classes reads them for every class and
    step). ``inputs`` returns the inputs that decide the output; the build may
    use them too. The code version is fingerprinted with them, and is the
    asset's Dagster code version: bump it when a change to the stage's code
    changes what it writes. ``summary`` is the TypedDict (core/schemas.py) its
    summary.json must match.
    """

    name: str
    reads: tuple[str, ...]
    inputs: Callable[[Params, Part, BaseModelResource | None], dict[str, Any]]
    summary: type
    code_version: str

    def output(self, layout: Layout, part: Part) -> Path:
        return layout.folder(self.name, part.tissue_class, part.step)

    def read_folders(self, p: Params, part: Part) -> list[Path]:
        parts = [part] if part.tissue_class is not None else [Part(c, step) for c in p.classes for step in p.steps]
        layout = Layout(p.data_dir)
        return list(dict.fromkeys(layout.folder(name, at.tissue_class, at.step) for name in self.reads for at in parts))

    def fingerprinted(self, p: Params, part: Part, base_model: BaseModelResource | None) -> dict[str, Any]:
        return self.inputs(p, part, base_model) | {"code": self.code_version}

    def is_current(self, p: Params, part: Part, base_model: BaseModelResource) -> bool:
        """Whether the output folder was built from exactly the inputs a run would see now."""
        try:
            expected = fingerprint(**self.fingerprinted(p, part, base_model))
        except Exception:  # a missing or unreadable input: the run will report it properly
            return False
        return current_summary(self.output(Layout(p.data_dir), part), expected, self.summary) is not None


@dataclass(frozen=True)
class StageAsset:
    """An asset declared once: its recipe, its stage (None for an asset that always runs) and its Dagster settings.

    Built into a Dagster asset per params object, since the run-config schema,
    the partitions and (for the base model) the deps come from params. The
    recipe takes the running Stage; resources come from the run's context.
    ``min_images`` gives, from params, how many images the stage must write:
    then its images/ folder is checked (checks.py) after every run.
    """

    name: str
    recipe: Callable[[Stage], Any]
    spec: StageSpec | None
    partitioned: str | None
    deps: Sequence | Callable[[Params], Sequence]
    resources: frozenset[str]
    on_gpu: bool
    follows_upstream: bool
    min_images: Callable[[Params], int] | None
    asset_args: dict[str, Any]

    def build(self, p: Params, partitions: Partitions) -> dg.AssetsDefinition:
        """``dg.asset`` with what the stages share.

        Run config shaped like params, so the launchpad checks overrides
        before a run exists; its module's name as its group, so the UI's groups
        are the asset modules; the stage's declared code version; eager
        automation after the upstream, unless the stage reads files a lab drops
        in (then a sensor or a person starts it); and for GPU work the ``gpu``
        pool and the pod's GPU request.
        """
        shared: dict[str, Any] = {"config_schema": params_config_schema(p.values), "name": self.name,
                                  "group_name": self.recipe.__module__.rsplit(".", 1)[-1],
                                  "required_resource_keys": set(self.resources),
                                  "deps": self.deps(p) if callable(self.deps) else self.deps}
        if self.partitioned is not None:
            shared["partitions_def"] = getattr(partitions, self.partitioned)
        if self.spec is not None:
            shared["code_version"] = self.spec.code_version
        if self.follows_upstream:
            shared["automation_condition"] = FOLLOW_UPSTREAM
        if self.on_gpu:
            shared |= {"pool": GPU_POOL, "op_tags": GPU_TAGS}
        if self.min_images is not None:
            shared["check_specs"] = image_check_specs(self.name)
        name, recipe, spec, min_images = self.name, self.recipe, self.spec, self.min_images

        def compute(context):  # unannotated: this module postpones annotations, which Dagster reads as strings
            with refusals_as_failures():
                stage = Stage.start(context, spec)
                result = recipe(stage)
                yield from result if isinstance(result, Iterator) else [result]
                if min_images is not None:
                    yield from image_check_results(name, stage.out / IMAGES, stage.params.resolution,
                                                   min_images(stage.params))

        # The recipe's name, module and docstring: the asset's description, and where tools find its code.
        compute.__name__, compute.__qualname__ = recipe.__name__, recipe.__qualname__
        compute.__module__, compute.__doc__ = recipe.__module__, recipe.__doc__
        return dg.asset(**shared, **self.asset_args)(compute)


def stage_asset(*, reads: Iterable[str] = (), inputs: Callable | None = None, summary: type | None = None,
                code_version: str | None = None, partitioned: str | None = None,
                deps: Sequence | Callable[[Params], Sequence] = (), resources: Iterable[str] = (),
                on_gpu: bool = False, follows_upstream: bool = True, min_images: Callable[[Params], int] | None = None,
                **asset_args: Any):
    """Declare an asset by its recipe: with ``inputs``, a stage whose unchanged output is reused.

    ``partitioned`` names a field of Partitions; ``resources`` are those the
    recipe uses besides params and the object store (a stage using the base
    model runs torch, so its thread count is set before it starts).
    """
    if inputs is not None and (summary is None or code_version is None):
        raise TypeError("a stage with inputs needs its summary schema and its code version")
    if partitioned not in (None, *Partitions.__dataclass_fields__):
        raise TypeError(f"partitioned={partitioned!r}: expected one of {', '.join(Partitions.__dataclass_fields__)}")
    args = {key: value for key, value in asset_args.items() if key != "name"}

    def declare(recipe: Callable[[Stage], Any]) -> StageAsset:
        name = asset_args.get("name", recipe.__name__)
        spec = None if inputs is None else StageSpec(name, tuple(reads), inputs, summary, code_version)
        return StageAsset(name, recipe, spec, partitioned, deps, frozenset({"params", "object_store", *resources}),
                          on_gpu, follows_upstream, min_images, args)

    return declare


def launch_reason(instance: dg.DagsterInstance, stages: dict[str, StageSpec], assets: Iterable[str], p: Params,
                  partition_key: str | None, base_model: BaseModelResource) -> str | None:
    """Why a run of these assets for this partition is needed; None when it would only confirm their reuse.

    None only when every asset is a declared stage whose output folder was
    built from the inputs it would see now, and Dagster's latest
    materialisation of it came from a successful run after that folder's
    summary was written: so what the UI shows is what is on disk.
    """
    part, layout = Part.of(partition_key), Layout(p.data_dir)
    for asset in assets:
        spec = stages.get(asset)
        if spec is None:
            return f"{asset} always runs"
        if not spec.is_current(p, part, base_model):
            return f"{asset}: its inputs, params or code changed, or it was never built"
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(dg.AssetKey(asset), asset_partitions=None if partition_key is None else [partition_key]),
            limit=1,
        ).records
        if not records:
            return f"{asset}: built, but this Dagster instance has no record of it"
        if records[0].timestamp < (spec.output(layout, part) / SUMMARY).stat().st_mtime:
            return f"{asset}: its folder was written after Dagster's last record of it"
        run = instance.get_run_by_id(records[0].run_id)
        if run is None or run.status != dg.DagsterRunStatus.SUCCESS:
            return f"{asset}: its last run did not succeed"
    return None


@dataclass
class Stage:
    """One partition of one asset while it runs."""

    context: dg.AssetExecutionContext
    params: Params
    spec: StageSpec | None
    part: Part
    reused: bool = field(default=False, init=False)

    @classmethod
    def start(cls, context: dg.AssetExecutionContext, spec: StageSpec | None) -> Stage:
        """Read params with the launch's overrides, and pull the folders the stage reads and its previous output."""
        p = context.resources.params.load_for(context)
        stage = cls(context, p, spec, Part.of(context.partition_key if context.has_partition_key else None))
        if stage.base_model is not None:
            stage.base_model.apply_threads()
        if spec is not None:
            stage.object_store.pull(p.data_dir, *spec.read_folders(p, stage.part), stage.out, log=stage.log)
        return stage

    @property
    def object_store(self) -> ObjectStoreResource:
        return self.context.resources.object_store

    @property
    def base_model(self) -> BaseModelResource | None:
        return getattr(self.context.resources, "base_model", None)

    @property
    def layout(self) -> Layout:
        return Layout(self.params.data_dir)

    @property
    def out(self) -> Path:
        return self.spec.output(self.layout, self.part)

    @cached_property
    def inputs(self) -> dict[str, Any]:
        return self.spec.fingerprinted(self.params, self.part, self.base_model)

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def build_or_reuse(self, build: Callable[[Path], dict[str, Any]], *, in_place: bool = False) -> dict[str, Any]:
        """The summary: ``build`` runs only when the fingerprint of the inputs changed; then the output is pushed."""
        summary, self.reused = build_or_reuse(self.out, fingerprint(**self.inputs), build, self.spec.summary,
                                              log=self.log, in_place=in_place)
        self.push()
        return summary

    def push(self) -> None:
        self.object_store.push(self.params.data_dir, self.out, log=self.log)

    def result(self, data_version: str, metadata: dict[str, Any]) -> dg.MaterializeResult:
        """A stage's metadata leads with its folder and ends with whether it was reused; an asset that always runs
        has neither."""
        if self.spec is not None:
            metadata = {"path": self.out, **metadata, "reused_unchanged_output": self.reused}
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version))
