"""Dagster resources: thin, configurable handles on params and compute."""

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

    The device is a deployment choice, not a pipeline parameter, so it lives
    here; everything about *which* model lives in params, where its hash is
    part of every fingerprint.
    """

    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda[:N].")

    def load(self, p: Params):
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
