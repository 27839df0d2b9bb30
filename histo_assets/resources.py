"""Dagster resources: thin, configurable handles on params and compute."""

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from histo_assets.core.errors import BaseModelError
from histo_assets.core.layout import Layout
from histo_assets.params import Params, load_params, value_kind

# base_model.source for a model the base_model asset trains on the training crops (core/base_model_training.py).
TRAINED_SOURCE = "trained"
# Its diffusers folder under the base_model asset's folder; the folder name is the WebUI's model name by default.
TRAINED_MODEL_FOLDER = "histo-sd"


def trained_model_dir(p: Params) -> Path:
    return Layout(p.data_dir).base_model / TRAINED_MODEL_FOLDER


_SCALAR_CONFIG_TYPES = {"bool": dg.Bool, "int": dg.Int, "float": dg.Float, "text": dg.String, "mapping": dg.Permissive()}


def _list_config_type(items: list) -> list:
    if items and all(isinstance(item, bool) for item in items):
        return [dg.Bool]
    if items and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
        return [dg.Float]
    if items and all(isinstance(item, str) for item in items):
        return [dg.String]
    return [dg.Any]


def params_config_schema(values: Mapping[str, Any], prefix: str = "") -> dict[str, dg.Field]:
    """Dagster run config shaped like params, every key optional and typed by its params value.

    Every asset takes it, so a launch can set any params key, e.g.
    {augmentation: {total: 50}}, like `dvc exp run -S augmentation.total=50`.
    The launchpad validates run config against this before a run starts, so a
    misspelt key or a value of the wrong type is refused there, naming the
    key's path, the value and the expected type, as ``--set`` refuses it.
    """
    schema = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            config_type: Any = params_config_schema(value, f"{dotted}.")
        else:
            kind = value_kind(dotted, value)
            config_type = dg.Any if kind is None else _list_config_type(value) if kind == "list" else _SCALAR_CONFIG_TYPES[kind]
        schema[str(key)] = dg.Field(config_type, is_required=False, description=f"params: {value!r}"[:200])
    return schema


class ParamsResource(dg.ConfigurableResource):
    """The params file every asset reads; defaults to HISTO_ASSETS_PARAMS or ./params.yaml."""

    params_file: str | None = Field(default=None, description="Path of the params file; None uses HISTO_ASSETS_PARAMS or the project's params.yaml.")

    def load(self, overrides: list[str] | None = None) -> Params:
        return load_params(self.params_file, overrides or [])

    def load_for(self, context) -> Params:
        """Params with this step's run config applied: the same keys as params, checked like ``--set``."""
        return load_params(self.params_file).with_nested_overrides(context.op_execution_context.op_config or {})

    def layout(self) -> Layout:
        return Layout(self.load().data_dir)


class BaseModelResource(dg.ConfigurableResource):
    """Stable Diffusion loaded offline from the `base_model` section of params, on a chosen device.

    The device and its CPU threads (histo_assets.core.threads) are deployment
    choices, not pipeline parameters, so they live here; everything about
    *which* model lives in params, where its hash is part of every fingerprint.
    """

    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda[:N].")
    threads: int | None = Field(
        default=None, ge=1,
        description="torch CPU threads for the step; None: $OMP_NUM_THREADS if set, else the cores available divided among concurrent_steps.",
    )
    concurrent_steps: int | None = Field(
        default=None, ge=1, description="Steps that may run at once on this host (the executor's max_concurrent); None: one per core."
    )

    def apply_threads(self) -> None:
        """Size torch's thread pools for this step; every step that computes with torch calls it first.

        Thread counts change float summation order, so a step whose pools were
        left as an earlier step in the same process set them would not give the
        same bytes as the step run alone.
        """
        from histo_assets.core.threads import apply_threads, thread_count

        apply_threads(thread_count(self.threads, self.concurrent_steps))

    def load(self, p: Params):
        # Before base_model imports torch, in case nothing has yet.
        self.apply_threads()
        from histo_assets.core.base_model import load_base_model

        section = p["base_model"]
        if section["source"] == TRAINED_SOURCE:
            return self.load_folder(trained_model_dir(p), self._trained_sha256(p), section["name"])

        def local(value):
            return None if value is None else str((p.source.parent / value).resolve())

        return load_base_model(
            section["source"],
            local(section["path"]),
            local(section["config"]),
            expected_sha256=section["sha256"],
            name=section["name"],
            tiny_cache_dir=str(Layout(p.data_dir).cache / "tiny_sd"),
            seed=int(section["tiny_seed"]),
            device=self.device,
        )

    def load_folder(self, folder: Path, sha256: str, name: str | None):
        """A diffusers folder this pipeline wrote, checked against the hash it recorded."""
        self.apply_threads()
        from histo_assets.core.base_model import load_base_model

        return load_base_model("diffusers", folder, expected_sha256=sha256, name=name, device=self.device)

    def identity(self, p: Params) -> dict:
        """What fingerprints downstream of the base model know of it, without loading it.

        A file or folder named in params is known by its params; a model the
        base_model asset trained is known by the weights it wrote, since the
        same params on new crops train a different model.
        """
        section = copy.deepcopy(p["base_model"])  # the caller's to keep: never the live params section
        if section["source"] != TRAINED_SOURCE:
            return section
        return {**section, "weights_sha256": self._trained_sha256(p)}

    @staticmethod
    def _trained_sha256(p: Params) -> str:
        from histo_assets.core.schemas import BaseModelSummary
        from histo_assets.core.stage import read_summary

        folder = Layout(p.data_dir).base_model
        summary = read_summary(folder, BaseModelSummary)
        if summary is None or summary["source"] != TRAINED_SOURCE:
            raise BaseModelError(f"base_model.source is {TRAINED_SOURCE!r}: materialise the base_model asset first; "
                                 f"{folder} holds no trained model")
        return summary["sha256"]


class DvcResource(dg.ConfigurableResource):
    """The dvc CLI, run from its own venv (dvc and dagster need different antlr4 runtimes)."""

    executable: str | None = Field(default=None, description="dvc executable; None uses $HISTO_ASSETS_DVC, then .venv-dvc/bin/dvc.")

    def cli(self, repo):
        from histo_assets.core.dvc import DvcCli

        return DvcCli(self.executable, repo)


class ObjectStoreResource(dg.ConfigurableResource):
    """Stage folders kept in an object store, for machines that share no disk (Kubernetes pods).

    Unset, everything stays in the local data_dir, as on one workstation. With
    a URL the store is the source of truth and data_dir a working copy: an
    asset pulls the folders it reads and its own previous output (so unchanged
    work is still skipped), and pushes its output when it succeeds.
    """

    url: str | None = Field(default=None, description="fsspec URL, e.g. s3://bucket/histo-assets, gs://..., file:///shared; None: local only.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Passed to fsspec, e.g. {endpoint_url: ...}; credentials come from the environment."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def _store(self):
        from histo_assets.core.object_store import ObjectStore

        return ObjectStore(self.url, self.storage_options)

    @staticmethod
    def _key(data_dir: Path, folder: Path) -> str:
        """A folder's name in the store: its path under data_dir, the same on every machine."""
        from histo_assets.core.object_store import ObjectStoreError

        try:
            return folder.resolve().relative_to(data_dir.resolve()).as_posix()
        except ValueError:
            raise ObjectStoreError(f"{folder} is not under the data folder {data_dir}") from None

    def pull(self, data_dir: Path, *folders: Path, log=print) -> None:
        """Bring the stored copies of these folders into data_dir; folders never pushed are left alone."""
        if not self.enabled:
            return
        store = self._store()
        for folder in folders:
            transfer = store.pull(self._key(data_dir, folder), folder)
            if transfer is not None:
                log(transfer.describe("pulled"))

    def push(self, data_dir: Path, *folders: Path, log=print) -> None:
        if not self.enabled:
            return
        store = self._store()
        for folder in folders:
            log(store.push(folder, self._key(data_dir, folder)).describe("pushed"))

    def stored_files(self, data_dir: Path, folder: Path) -> dict | None:
        """The stored folder's manifest (path -> sha256 and size); None if never pushed or no store is set."""
        if not self.enabled:
            return None
        return self._store().manifest(self._key(data_dir, folder))
