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
