"""The versioned synthetic dataset: images of the chosen checkpoints, their provenance, DVC and a git tag."""

import dagster as dg
import pandas as pd

from histo_assets import __version__
from histo_assets.assets.generation import synthetic_images
from histo_assets.assets.ingest import augmented_crops, square_crops
from histo_assets.assets.training import hypernetwork_checkpoints
from histo_assets.core.dvc import git_last_commit, git_toplevel
from histo_assets.core.evaluation import METRICS_TABLE_FILE
from histo_assets.core.lineage import training_lineage
from histo_assets.core.release import build_dataset_release, publish_dataset_release, release_inputs, selected_steps
from histo_assets.core.schemas import METRICS_TABLE, PUBLISHED_METRICS, ClassifierUtilitySummary, MetricsDetails
from histo_assets.core.stage import read_summary
from histo_assets.params import PROJECT_ROOT
from histo_assets.stage import Stage, stage_asset

# The package version and the code versions of the stages a released image's bytes come from.
CODE_VERSION = f"histo-assets {__version__}; " + ", ".join(
    f"{stage.name} {stage.spec.code_version}"
    for stage in [square_crops, augmented_crops, hypernetwork_checkpoints, synthetic_images])
# The last change to these paths is the code version a release records; later release commits don't count.
CODE_PATHS = ["histo_assets", "pyproject.toml"]


@stage_asset(deps=["metrics_summary", "checkpoint_metrics", "classifier_utility"], resources=["dvc"],
             kinds={"dvc", "parquet"})
def dataset_release(stage: Stage):
    """The versioned synthetic dataset: images of the selected checkpoints (release.checkpoints: best per class,
    the step that most helps a classifier (utility), all, or listed steps), manifest.parquet with full provenance
    per image, lineage.parquet back to the raw slides, metrics and a dataset card. Recorded with `dvc add`, pushed
    to the DVC remote, tagged release/<name>/<content hash>."""
    p, layout, object_store, section = stage.params, stage.layout, stage.object_store, stage.params["release"]
    object_store.pull(p.data_dir, layout.metrics_summary, layout.classifier_utility, log=stage.log)
    summary = read_summary(layout.metrics_details, MetricsDetails)
    utility = read_summary(layout.classifier_utility, ClassifierUtilitySummary)
    steps = selected_steps(section["checkpoints"], p["training"]["checkpoint_steps"], p.classes, summary, utility)
    object_store.pull(p.data_dir, *release_inputs(layout, steps), log=stage.log)
    repo = git_toplevel(p.data_dir)
    info = build_dataset_release(
        layout, steps, section=section, metrics_summary=summary, utility_summary=utility,
        metrics_table=METRICS_TABLE.read(layout.metrics_details / METRICS_TABLE_FILE, PUBLISHED_METRICS.columns),
        lineage=pd.concat([training_lineage(layout, tissue_class) for tissue_class in steps], ignore_index=True),
        code_version=CODE_VERSION, git_commit=git_last_commit(PROJECT_ROOT, CODE_PATHS), repo=repo,
        params_dir=p.source.parent,
    )
    metadata = {
        "path": layout.release(section["name"]),
        "images": sum(info.counts.values()),
        "per_class": info.counts,
        "checkpoints": steps,
        "tag": info.tag,
        "card": dg.MetadataValue.md(info.card.read_text()),
    }
    if repo is None:
        stage.context.log.warning(f"{p.data_dir} is not inside a git repository: the release was built but not versioned")
        return stage.result(info.content_hash, metadata | {"published": False})
    published = publish_dataset_release(stage.context.resources.dvc.cli(repo), repo, info, section, p.source.parent,
                                        log=stage.log)
    return stage.result(published.md5, metadata | {
        "published": True, "dvc_md5": published.md5, "git_commit": published.commit, "new_commit": published.new_commit,
        "dvc_file": published.dvc_file, "git_remote": section["git_remote"] or "none (tag kept in the local repository)",
    })
