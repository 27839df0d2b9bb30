"""The versioned synthetic dataset: images of the chosen checkpoints, their provenance, DVC and a git tag."""

import dagster as dg
import pandas as pd

from histo_assets import __version__
from histo_assets.assets import generation, ingest, training
from histo_assets.core.dvc import ensure_git_identity, git_last_commit, git_toplevel
from histo_assets.core.evaluation import METRICS_TABLE_FILE
from histo_assets.core.layout import Layout
from histo_assets.core.lineage import training_lineage
from histo_assets.core.release import ReleaseSelectionError, build_dataset_release, local_remote_path
from histo_assets.core.release import publish_dataset_release, release_inputs, selected_steps
from histo_assets.core.schemas import METRICS_TABLE, PUBLISHED_METRICS, ClassifierUtilitySummary, MetricsDetails
from histo_assets.core.stage import read_summary
from histo_assets.params import PROJECT_ROOT, Params
from histo_assets.resources import DvcResource, ObjectStoreResource, ParamsResource
from histo_assets.stage import refusals_as_failures, stage_asset

GROUP = "release"
# The package version and the code versions of the stages a released image's bytes come from.
CODE_VERSION = f"histo-assets {__version__}; " + ", ".join(
    f"{name} {stages[name].code_version}" for stages, name in [
        (ingest.STAGES, "square_crops"), (ingest.STAGES, "augmented_crops"),
        (training.STAGES, "hypernetwork_checkpoints"), (generation.STAGES, "synthetic_images")])
# The last change to these paths is the code version a release records; later release commits don't count.
CODE_PATHS = ["histo_assets", "pyproject.toml"]
PIPELINE_AUTHOR = ("histo-assets", "histo-assets@localhost")


def build_assets(p: Params) -> list[dg.AssetsDefinition]:
    @stage_asset(p, group_name=GROUP, deps=["metrics_summary", "checkpoint_metrics", "classifier_utility"],
                 kinds={"dvc", "parquet"})
    def dataset_release(context: dg.AssetExecutionContext, params: ParamsResource, dvc: DvcResource,
                        object_store: ObjectStoreResource):
        """The versioned synthetic dataset: images of the selected checkpoints (release.checkpoints: best per class,
        the step that most helps a classifier (utility), all, or listed steps), manifest.parquet with full provenance
        per image, lineage.parquet back to the raw slides, metrics and a dataset card. Recorded with `dvc add`, pushed
        to the DVC remote, tagged release/<name>/<content hash>."""
        p = params.load_for(context)
        layout, section = Layout(p.data_dir), p["release"]
        object_store.pull(p.data_dir, layout.metrics_summary, layout.classifier_utility, log=context.log.info)
        summary = read_summary(layout.metrics_details, MetricsDetails)
        utility = read_summary(layout.classifier_utility, ClassifierUtilitySummary)
        if summary is None:
            raise dg.Failure("metrics_summary has not been materialised")
        with refusals_as_failures(ReleaseSelectionError):
            steps = selected_steps(section["checkpoints"], p["training"]["checkpoint_steps"], p.classes, summary, utility)
        object_store.pull(p.data_dir, *release_inputs(layout, steps), log=context.log.info)
        repo, local_remote = git_toplevel(p.data_dir), local_remote_path(section["remote"]["url"], p.source.parent)
        info = build_dataset_release(
            layout, steps, section=section, metrics_summary=summary, utility_summary=utility,
            metrics_table=METRICS_TABLE.read(layout.metrics_details / METRICS_TABLE_FILE, PUBLISHED_METRICS.columns),
            lineage=pd.concat([training_lineage(layout, tissue_class) for tissue_class in steps], ignore_index=True),
            code_version=CODE_VERSION, git_commit=git_last_commit(PROJECT_ROOT, CODE_PATHS), repo=repo,
            local_remote=local_remote,
        )
        metadata = {
            "path": dg.MetadataValue.path(str(layout.release(section["name"]))),
            "images": sum(info.counts.values()),
            "per_class": dg.MetadataValue.json(info.counts),
            "checkpoints": dg.MetadataValue.json(steps),
            "tag": info.tag,
            "card": dg.MetadataValue.md(info.card.read_text()),
        }
        if repo is None:
            context.log.warning(f"{p.data_dir} is not inside a git repository: the release was built but not versioned")
            return dg.MaterializeResult(metadata=metadata | {"published": False}, data_version=dg.DataVersion(info.content_hash))
        ensure_git_identity(repo, *PIPELINE_AUTHOR)
        published = publish_dataset_release(dvc.cli(repo), repo, info, section, local_remote, log=context.log.info)
        return dg.MaterializeResult(
            metadata=metadata | {
                "published": True,
                "dvc_md5": published.md5,
                "git_commit": published.commit,
                "new_commit": published.new_commit,
                "dvc_file": dg.MetadataValue.path(str(published.dvc_file)),
                "git_remote": section["git_remote"] or "none (tag kept in the local repository)",
            },
            data_version=dg.DataVersion(published.md5),
        )

    return [dataset_release]
