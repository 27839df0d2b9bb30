"""Params to typed settings: the one place a params section becomes the settings object a core function takes.

Core modules declare their settings as frozen dataclasses whose field names
are the keys of their params section, with no defaults of their own: the
defaults live in params.yaml, and overrides (`--set`, the launchpad's run
config) are already applied to the Params given here. ``from_section``
converts each value to its field's declared type, since YAML and `--set` may
give an int for a float or a list for a tuple. Seeds are derived here, per
purpose, from the master seed.

The settings of generation, of both trainings, of the hypernetwork and of the
utility classifier are defined beside code that imports torch or diffusers, so
their builders import them when called: importing this module stays cheap for
the CLI and the UI.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from histo_assets.core.augment import AugmentationRecipe, AugmentationSettings
from histo_assets.core.crops import CropSettings
from histo_assets.core.evaluation import MetricSettings
from histo_assets.core.holdout import SplitSettings, read_groups, source_groups
from histo_assets.core.seeding import derive_seed
from histo_assets.core.slides import IngestSettings
from histo_assets.params import Params, ParamsError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from histo_assets.core.base_model_training import BaseModelTrainingSettings
    from histo_assets.core.classifier_utility import UtilitySettings
    from histo_assets.core.hypernetwork import HypernetworkOptions
    from histo_assets.core.sampling import GenerationSettings
    from histo_assets.core.training import TrainingSettings

Settings = TypeVar("Settings")


def from_section(cls: type[Settings], section: Mapping[str, Any], **given: Any) -> Settings:
    """``cls`` with each field taken from ``given``, else from ``section`` under its own name.

    A nested dataclass field reads the sub-section of its name. A key the
    section lacks is an error naming it, unless the field has a default (only
    HypernetworkOptions has them: the AUTOMATIC1111 file format's, not params').
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            values[field.name] = given[field.name]
        elif field.name in section:
            values[field.name] = _typed(hints[field.name], section[field.name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params have no {field.name!r} for {cls.__name__}; the section has {', '.join(section)}")
    return cls(**values)


def _typed(kind: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(kind):
        return from_section(kind, value)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return tuple(_typed(args[0], item) for item in value)
    if origin in (typing.Union, types.UnionType):
        return _typed(next(arg for arg in args if arg is not type(None)), value)
    if kind in (int, float, str, bool):
        return kind(value)
    return value


def ingest_settings(p: Params) -> IngestSettings:
    return from_section(IngestSettings, p["ingest"])


def crop_settings(p: Params) -> CropSettings:
    ingest = ingest_settings(p)
    return from_section(CropSettings, p["crops"], resolution=p.resolution, max_image_pixels=ingest.max_image_pixels,
                        max_file_bytes=ingest.max_file_bytes)


def split_settings(p: Params) -> SplitSettings:
    return from_section(SplitSettings, p["split"])


def holdout_groups(p: Params, sources: typing.Iterable[str]) -> dict[str, str]:
    """Each crop source's holdout group: the lab's (split.groups_csv, beside the params file) or its own path."""
    groups_csv = p["split"]["groups_csv"]
    return source_groups(sources, read_groups(p.source.parent / groups_csv) if groups_csv else None)


def augmentation_recipe(p: Params) -> AugmentationRecipe:
    """The rudi recipe: its params are grouped by operation, unlike its fields, so it is mapped by hand."""
    section = p["augmentation"]
    rotate, distortion, skew, zoom = (section[key] for key in ("rotate", "distortion", "skew", "zoom"))
    return AugmentationRecipe(
        probability=float(section["probability"]),
        rotate=bool(rotate["enabled"]),
        max_left_rotation=int(rotate["max_left_rotation"]),
        max_right_rotation=int(rotate["max_right_rotation"]),
        distortion=bool(distortion["enabled"]),
        grid_width=int(distortion["grid_width"]),
        grid_height=int(distortion["grid_height"]),
        distortion_magnitude=int(distortion["magnitude"]),
        skew=bool(skew["enabled"]),
        skew_magnitude=float(skew["magnitude"]),
        zoom=bool(zoom["enabled"]),
        min_factor=float(zoom["min_factor"]),
        max_factor=float(zoom["max_factor"]),
        flip=bool(section["flip"]["enabled"]),
    )


def augmentation_settings(p: Params) -> AugmentationSettings:
    return from_section(AugmentationSettings, p["augmentation"], recipe=augmentation_recipe(p))


def hypernetwork_options(p: Params) -> HypernetworkOptions:
    from histo_assets.core.hypernetwork import HypernetworkOptions

    return from_section(HypernetworkOptions, p["hypernetwork"])


def training_settings(p: Params) -> TrainingSettings:
    from histo_assets.core.training import TrainingSettings

    return from_section(TrainingSettings, p["training"])


def generation_settings(p: Params) -> GenerationSettings:
    """``images_per_checkpoint`` is not among them: it is how many images a stage asks for."""
    from histo_assets.core.sampling import GenerationSettings

    section = p["generation"]
    return from_section(GenerationSettings, section, negative_prompt=str(section["negative_prompt"] or ""),
                        width=p.resolution, height=p.resolution)


def metric_settings(p: Params) -> MetricSettings:
    return from_section(MetricSettings, p["metrics"], seed=derive_seed(p.seed, "metrics"))


def utility_settings(p: Params) -> UtilitySettings:
    from histo_assets.core.classifier_utility import UtilitySettings

    return from_section(UtilitySettings, p["utility"], seed=derive_seed(p.seed, "utility"))


def base_model_training_settings(p: Params) -> BaseModelTrainingSettings:
    from histo_assets.core.base_model_training import BaseModelTrainingSettings

    settings = from_section(BaseModelTrainingSettings, p["base_model"]["training"])
    settings.validate()
    return settings
