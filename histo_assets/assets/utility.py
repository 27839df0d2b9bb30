"""Does adding a release candidate's synthetic images to a training set help a classifier on real held-out crops?"""

import dagster as dg
import pandas as pd

from histo_assets.assets import FOLLOW_UPSTREAM
from histo_assets.assets.evaluation import feature_cache, generated_files, metrics_summary
from histo_assets.core.classifier_utility import (
    BALANCED_ACCURACY,
    PLOT_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    UtilitySettings,
    best_candidate,
    candidates_notes,
    candidates_plot,
    candidates_table,
    classifier_utility,
    csv_bytes,
    write_utility,
)
from histo_assets.core.evaluation import image_set_hash
from histo_assets.core.io import atomic_directory, atomic_write_json, stable_hash
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.seeding import derive_seed
from histo_assets.core.stage import current_summary, fingerprint, read_summary
from histo_assets.core.steps import BASELINE_STEP, evaluated_steps
from histo_assets.core.layout import HOLDOUT, IMAGES, INDEX, SUMMARY, Layout
from histo_assets.resources import STAGE_CONFIG_SCHEMA, BaseModelResource, ObjectStoreResource, ParamsResource

CLASSIFIER_UTILITY_VERSION = "1"
# The candidate made of each class's chosen checkpoint (metrics_summary's `best`), the release's default.
BEST_PER_CLASS = "best"
# Per-candidate tables, confusion matrices and plots, below the overview files.
CANDIDATES = "candidates"


def step_candidate(step: int) -> str:
    return f"step-{step}"


def utility_inputs(layout: Layout, classes: list[str], steps: list[int], best: dict[str, int]):
    """(real training crops, held-out crops, synthetic images per candidate), each per class.

    The real training set is the original crops only: augmented crops are
    themselves a kind of synthetic data, and would blur the comparison.
    """
    train, test = {}, {}
    for tissue_class in classes:
        index = pd.read_parquet(layout.augmented_crops(tissue_class) / INDEX)
        images = layout.augmented_crops(tissue_class) / IMAGES
        train[tissue_class] = [images / name for name in index.loc[index["kind"] == "original", "file"]]
        holdout = pd.read_parquet(layout.augmented_crops(tissue_class) / HOLDOUT)
        test[tissue_class] = [layout.square_crops(tissue_class) / IMAGES / name for name in holdout["crop_file"]]
    candidates = {step_candidate(step): {c: generated_files(layout, c, step) for c in classes} for step in steps}
    candidates[BEST_PER_CLASS] = {c: generated_files(layout, c, best[c]) for c in classes}
    return train, test, candidates


@dg.asset(
    name="classifier_utility",
    config_schema=STAGE_CONFIG_SCHEMA,
    group_name="evaluation",
    code_version=CLASSIFIER_UTILITY_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[metrics_summary],
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
    p = params.load_for(context)
    layout = Layout(p.data_dir)
    out = layout.classifier_utility
    steps = evaluated_steps(p["training"]["checkpoint_steps"])
    object_store.pull(
        p.data_dir, layout.metrics_summary, out,
        *(folder for c in p.classes for folder in (layout.square_crops(c), layout.augmented_crops(c))),
        *(layout.synthetic_images(c, step) for c in p.classes for step in steps),
        log=context.log.info,
    )
    best = read_summary(layout.metrics_details)["best"]
    train, test, candidates = utility_inputs(layout, p.classes, steps, best)
    settings = UtilitySettings.from_params(p["utility"], derive_seed(p.seed, "utility"))
    cache = feature_cache(p)
    stage_fingerprint = fingerprint(
        sets=stable_hash({name: {c: image_set_hash(paths) for c, paths in sets.items()}
                          for name, sets in [("train", train), ("test", test), *candidates.items()]}),
        utility=p["utility"], features=cache.identity, code=CLASSIFIER_UTILITY_VERSION,
    )
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"images and utility settings unchanged, reusing {out}")
    else:
        results = {
            name: classifier_utility(train, synthetic, test, settings,
                                     featurize=lambda paths: cache.features(paths, log=context.log.info).features,
                                     features_label=cache.info.name, log=context.log.info)
            for name, synthetic in candidates.items()
        }
        trained = {step_candidate(step): step for step in steps if step != BASELINE_STEP}
        chosen_step = trained[best_candidate(results, settings.classifier, list(trained))]
        table = candidates_table(results)
        with atomic_directory(out) as staging:
            for name, result in results.items():
                write_utility(result, staging / CANDIDATES / name)
            (staging / RESULTS_FILE).write_bytes(csv_bytes(table))
            candidates_plot(results, settings.classifier, staging / PLOT_FILE)
            verdicts = {name: result.verdicts()[settings.classifier] for name, result in results.items()}
            atomic_write_json(staging / SUMMARY_FILE, {
                "classifier": settings.classifier, "features": cache.info.name, "verdict_metric": BALANCED_ACCURACY,
                "verdicts": verdicts, "best_step_by_utility": chosen_step,
            })
            summary = {"fingerprint": stage_fingerprint, "best_step_by_utility": chosen_step,
                       "verdicts": verdicts, "notes": candidates_notes(results, settings.classifier)}
            atomic_write_json(staging / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    table = pd.read_csv(out / RESULTS_FILE)
    shown = table[table["metric"].eq(BALANCED_ACCURACY)][["candidate", "classifier", "variant", "value", "ci_low", "ci_high",
                                                           "verdict"]].round(3)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "summary": dg.MetadataValue.md(summary["notes"]),
            "plot": dg.MetadataValue.md(markdown_png_file(out / PLOT_FILE, "classifier utility per release candidate")),
            "table": dg.MetadataValue.md(markdown_table(shown)),
            "verdicts": dg.MetadataValue.json(summary["verdicts"]),
            "best_step_by_utility": summary["best_step_by_utility"],
            "reused_unchanged_output": reused,
        },
        data_version=dg.DataVersion(stage_fingerprint),
    )
