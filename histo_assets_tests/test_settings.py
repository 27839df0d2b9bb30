"""histo_assets/settings.py: params (with overrides) to the typed settings core functions take."""

import dataclasses

import pytest

from histo_assets import settings as builders
from histo_assets.core.crops import TileSettings
from histo_assets.core.holdout import SplitSettings
from histo_assets.core.seeding import derive_seed
from histo_assets.params import DEFAULT_PARAMS_FILE, PROJECT_ROOT, ParamsError, load_params
from histo_assets.settings import from_section

BUILDERS = [getattr(builders, name) for name in dir(builders)
            if name.endswith(("_settings", "_recipe", "_options")) and callable(getattr(builders, name))]


@pytest.mark.parametrize("params_file", ["params.yaml", "params.demo.yaml"])
def test_every_params_file_builds_every_settings_object(params_file):
    p = load_params(PROJECT_ROOT / params_file)
    built = {builder.__name__: builder(p) for builder in BUILDERS}
    assert len(built) == 11 and all(dataclasses.is_dataclass(value) for value in built.values())


def test_values_take_their_fields_types_and_nested_sections_become_nested_settings():
    p = load_params(DEFAULT_PARAMS_FILE, ["crops.mode=tiles", "crops.tiles.min_tissue_fraction=1", "resolution=64"])
    crops = builders.crop_settings(p)
    assert crops.resolution == 64 and crops.mode == "tiles"
    assert isinstance(crops.tiles, TileSettings) and crops.tiles.min_tissue_fraction == 1.0
    assert isinstance(crops.tiles.min_tissue_fraction, float) and crops.tiles.mpp is None
    assert crops.max_file_bytes == p["ingest"]["max_file_bytes"]
    training = builders.training_settings(load_params(DEFAULT_PARAMS_FILE))
    assert isinstance(training.checkpoint_steps, tuple) and isinstance(training.templates, tuple)


def test_overrides_reach_the_settings_and_seeds_are_derived_per_purpose():
    p = load_params(DEFAULT_PARAMS_FILE, ["generation.steps=7", "seed=5"])
    generation = builders.generation_settings(p)
    assert generation.steps == 7 and generation.width == generation.height == p.resolution
    assert builders.metric_settings(p).seed == derive_seed(5, "metrics")
    assert builders.utility_settings(p).seed == derive_seed(5, "utility")


def test_a_missing_key_is_an_error_naming_it_and_the_settings_class():
    with pytest.raises(ParamsError, match="params have no 'guard_tiles' for SplitSettings"):
        from_section(SplitSettings, {"holdout_fraction": 0.2, "group_fraction_tolerance": 0.1})


def test_given_values_win_over_the_section():
    split = from_section(SplitSettings, {"holdout_fraction": 0.2, "group_fraction_tolerance": 0.1, "guard_tiles": 1},
                         guard_tiles=3)
    assert split == SplitSettings(holdout_fraction=0.2, group_fraction_tolerance=0.1, guard_tiles=3)
