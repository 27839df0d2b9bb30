"""Does adding a release candidate's synthetic images to a training set help a classifier on real held-out crops?"""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.assets.stage import Part, Stage, StageSpec, stage_asset
from histo_assets.core.classifier_utility import (
    BALANCED_ACCURACY,
    PLOT_FILE,
    RESULTS_FILE,
    image_sets_hash,
    utility_inputs,
    write_candidates,
)
from histo_assets.core.evaluation import feature_cache
from histo_assets.core.layout import Layout
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.schemas import ClassifierUtilitySummary, MetricsDetails
from histo_assets.core.stage import read_summary
from histo_assets.core.steps import evaluated_steps
from histo_assets.params import Params
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets.settings import utility_settings

CLASSIFIER_UTILITY_VERSION = "1"
SHOWN_COLUMNS = ["candidate", "classifier", "variant", "value", "ci_low", "ci_high", "verdict"]


def _utility_sets(p: Params) -> tuple:
    layout = Layout(p.data_dir)
    return utility_inputs(layout, p.classes, evaluated_steps(p["training"]["checkpoint_steps"]),
                          read_summary(layout.metrics_details, MetricsDetails)["best"])


def _classifier_utility_inputs(p: Params, _part: Part, _base_model) -> dict:
    cache = feature_cache(p["metrics"], Layout(p.data_dir), p.source.parent, p.seed)
    return dict(sets=image_sets_hash(*_utility_sets(p)), utility=p["utility"], features=cache.identity,
                code=CLASSIFIER_UTILITY_VERSION)


# The image folders it reads depend on params' classes and steps, so the asset pulls them itself.
STAGES = {"classifier_utility": StageSpec(lambda at, _part: at.classifier_utility, lambda at, _part: [at.metrics_summary],
                                          _classifier_utility_inputs, ClassifierUtilitySummary)}


def build_assets(p: Params) -> list[dg.AssetsDefinition]:
    @stage_asset(
        p,
        name="classifier_utility",
        group_name="evaluation",
        code_version=CLASSIFIER_UTILITY_VERSION,
        deps=["metrics_summary"],
        kinds={"pytorch", "csv"},
        description="The question downstream teams ask: does adding these synthetic images to a training set make a "
        "classifier better on real slides? For every release candidate (step 0, every checkpoint, and each class's chosen "
        "checkpoint), the same classifier (utility.classifier) is trained with fixed seeds and budget on the real training "
        "crops, on real plus synthetic, and on synthetic only, and scored on the held-out, source-disjoint real crops: "
        "balanced accuracy, macro-F1 and the confusion matrix, each with a bootstrap interval.",
    )
    def classifier_utility_asset(
        context: dg.AssetExecutionContext,
        params: ParamsResource,
        base_model: BaseModelResource,
        object_store: ObjectStoreResource,
    ):
        base_model.apply_threads()
        stage = Stage.start(context, params, object_store, STAGES["classifier_utility"])
        p, layout = stage.params, stage.layout
        steps = evaluated_steps(p["training"]["checkpoint_steps"])
        object_store.pull(
            p.data_dir, *(folder for c in p.classes for folder in (layout.square_crops(c), layout.augmented_crops(c))),
            *(layout.synthetic_images(c, step) for c in p.classes for step in steps), log=stage.log,
        )
        settings = utility_settings(p)
        cache = feature_cache(p["metrics"], layout, p.source.parent, p.seed)

        def build(staging: Path) -> dict:
            return write_candidates(staging, *_utility_sets(p), settings, steps,
                                    featurize=lambda paths: cache.features(paths, log=stage.log).features,
                                    features_label=cache.info.name, log=stage.log)

        summary = stage.build_or_reuse(build)
        table = pd.read_csv(stage.out / RESULTS_FILE)
        return stage.result(summary["fingerprint"], {
            "summary": dg.MetadataValue.md(summary["notes"]),
            "plot": dg.MetadataValue.md(markdown_png_file(stage.out / PLOT_FILE, "classifier utility per release candidate")),
            "table": dg.MetadataValue.md(markdown_table(table[table["metric"].eq(BALANCED_ACCURACY)][SHOWN_COLUMNS].round(3))),
            "verdicts": dg.MetadataValue.json(summary["verdicts"]),
            "best_step_by_utility": summary["best_step_by_utility"],
        })

    return [classifier_utility_asset]
