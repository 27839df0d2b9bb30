"""Dagster resources: thin, configurable handles on params and compute."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from histo_assets.layout import Layout
from histo_assets.params import Params, load_params


class ParamsResource(dg.ConfigurableResource):
    """The params file every asset reads; defaults to HISTO_ASSETS_PARAMS or ./params.yaml."""

    params_file: str | None = Field(default=None, description="Path of the params file; None uses HISTO_ASSETS_PARAMS or the project's params.yaml.")

    def load(self, overrides: list[str] | None = None) -> Params:
        return load_params(self.params_file, overrides or [])

    def layout(self) -> Layout:
        return Layout(self.load().data_dir)


class StageConfig(dg.Config):
    """Run config for one asset: single-key overrides of params, like `dvc exp run -S`."""

    overrides: list[str] = Field(
        default_factory=list,
        description='Overrides of params keys, e.g. ["augmentation.total=50", "crops.mode=tiles"].',
    )


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
