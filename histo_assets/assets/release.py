"""The versioned synthetic dataset: images of the chosen checkpoints, their provenance, DVC and a git tag."""

import os

import dagster as dg
import pandas as pd

from histo_assets import __version__
from histo_assets.assets import FOLLOW_UPSTREAM
from histo_assets.assets.evaluation import checkpoint_metrics, metrics_summary
from histo_assets.assets.generation import SYNTHETIC_IMAGES_VERSION
from histo_assets.assets.ingest import AUGMENTED_CROPS_VERSION, SQUARE_CROPS_VERSION
from histo_assets.assets.training import HYPERNETWORK_CHECKPOINTS_VERSION
from histo_assets.assets.utility import classifier_utility_asset
from histo_assets.core.dvc import (
    ensure_git_identity,
    git_last_commit,
    git_push_tag,
    git_remote_url,
    git_toplevel,
    is_local_url,
)
from histo_assets.core.evaluation import TABLE_COLUMNS
from histo_assets.core.lineage import training_lineage
from histo_assets.core.release import ReleaseImage, build_release, publish_release
from histo_assets.core.stage import read_summary
from histo_assets.core.layout import INDEX, Layout
from histo_assets.params import PROJECT_ROOT, Params
from histo_assets.resources import STAGE_CONFIG_SCHEMA, DvcResource, ObjectStoreResource, ParamsResource

GROUP = "release"
CODE_VERSION = (
    f"histo-assets {__version__}; square_crops {SQUARE_CROPS_VERSION}, augmented_crops {AUGMENTED_CROPS_VERSION}, "
    f"hypernetwork_checkpoints {HYPERNETWORK_CHECKPOINTS_VERSION}, synthetic_images {SYNTHETIC_IMAGES_VERSION}"
)
# The last change to these paths is the code version a release records; later release commits don't count.
CODE_PATHS = ["histo_assets", "pyproject.toml"]
PIPELINE_AUTHOR = ("histo-assets", "histo-assets@localhost")


def selected_steps(p: Params, best: dict[str, int], by_utility: int | None) -> dict[str, list[int]]:
    choice = p["release"]["checkpoints"]
    all_steps = sorted(int(s) for s in p["training"]["checkpoint_steps"])
    if choice == "best":
        return {c: [best[c]] for c in p.classes}
    if choice == "utility":
        if by_utility is None:
            raise dg.Failure("release.checkpoints is utility: materialise classifier_utility first")
        return {c: [by_utility] for c in p.classes}
    if choice == "all":
        return {c: all_steps for c in p.classes}
    unknown = sorted(set(map(int, choice)) - set(all_steps))
    if unknown:
        raise dg.Failure(f"release.checkpoints names steps that were not trained: {unknown}")
    return {c: sorted(map(int, choice)) for c in p.classes}


def release_repo_url(section: dict, repo) -> str | None:
    """Where downstream users fetch the release from, for the dataset card's commands.

    The tag's git remote when the tag is pushed (a pod's checkout is gone
    after the run), else this repository's own path.
    """
    if section["repo_url"]:
        return section["repo_url"]
    if repo is None:
        return None
    return git_remote_url(repo, section["git_remote"]) if section["git_remote"] else str(repo)


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    group_name=GROUP,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[metrics_summary, checkpoint_metrics, classifier_utility_asset],
    kinds={"dvc", "parquet"},
    description="The versioned synthetic dataset: images of the selected checkpoints (release.checkpoints: best per "
    "class, the step that most helps a classifier (utility), all, or listed steps), manifest.parquet with full provenance per image, lineage.parquet back to the raw "
    "slides, metrics and a dataset card. Recorded with `dvc add`, pushed to the DVC remote, tagged "
    "release/<name>/<content hash>.",
)
def dataset_release(
    context: dg.AssetExecutionContext,
    params: ParamsResource,
    dvc: DvcResource,
    object_store: ObjectStoreResource,
):
    p = params.load_for(context)
    layout = Layout(p.data_dir)
    section = p["release"]
    object_store.pull(p.data_dir, layout.metrics_summary, layout.classifier_utility, log=context.log.info)
    summary = read_summary(layout.metrics_details)
    if summary is None:
        raise dg.Failure("metrics_summary has not been materialised")
    utility = read_summary(layout.classifier_utility)
    steps = selected_steps(p, {c: int(s) for c, s in summary["best"].items()},
                           utility["best_step_by_utility"] if utility else None)
    for tissue_class, class_steps in steps.items():
        object_store.pull(
            p.data_dir, layout.raw_slides(tissue_class), layout.square_crops(tissue_class), layout.augmented_crops(tissue_class),
            layout.hypernetwork_checkpoints(tissue_class), *(layout.synthetic_images(tissue_class, s) for s in class_steps),
            log=context.log.info,
        )
    repo = git_toplevel(p.data_dir)
    commit = git_last_commit(PROJECT_ROOT, CODE_PATHS)
    images, lineage = [], []
    for tissue_class, class_steps in steps.items():
        hn = read_summary(layout.hypernetwork_checkpoints(tissue_class))
        for step in class_steps:
            folder = layout.synthetic_images(tissue_class, step)
            generated = read_summary(folder)
            for row in pd.read_parquet(folder / INDEX).itertuples():
                images.append(ReleaseImage(
                    source=folder / "images" / row.file,
                    tissue_class=tissue_class,
                    checkpoint_step=step,
                    provenance={
                        "checkpoint_file": generated["checkpoint_file"],
                        "checkpoint_sha256": generated["checkpoint_sha256"],
                        "hypernetwork_name": row.hypernetwork_name,
                        "base_model_sha256": row.base_model_sha256,
                        "base_model_short_hash": row.base_model_short_hash,
                        "seed": int(row.seed),
                        "prompt": row.prompt,
                        "negative_prompt": row.negative_prompt,
                        "sampler": row.sampler,
                        "steps": int(row.steps),
                        "cfg_scale": float(row.cfg_scale),
                        "width": int(row.width),
                        "height": int(row.height),
                        "hypernetwork_multiplier": float(row.multiplier),
                        "training_set_hash": hn["training_set"],
                        "code_version": CODE_VERSION,
                        "git_commit": commit,
                        "dagster_run_id": generated.get("run_id", ""),
                    },
                ))
        lineage.append(training_lineage(layout, tissue_class))
    metrics = pd.read_parquet(layout.metrics_details / "metrics.parquet")[TABLE_COLUMNS]
    plots = sorted(layout.metrics_details.glob("*.png"))
    out = layout.release(section["name"])
    relative = os.path.relpath(out, repo) if repo is not None else None
    remote = section["remote"]
    local_remote = (p.source.parent / remote["url"]).resolve() if is_local_url(remote["url"]) else None
    info = build_release(
        images, out, name=section["name"], metrics_table=metrics, metrics_notes=summary["metrics_notes"] + ("\n\n" + utility["notes"] if utility else ""),
        lineage=pd.concat(lineage, ignore_index=True),
        plots=plots, card_extra=f"Checkpoints: {section['checkpoints']} (by {summary['best_by']}). {summary['extractor_note']}",
        repo_url=release_repo_url(section, repo), repo_path=relative,
        local_remote=(remote["name"], str(local_remote)) if local_remote else None,
    )
    metadata = {
        "path": dg.MetadataValue.path(str(out)),
        "images": len(images),
        "per_class": dg.MetadataValue.json(info.counts),
        "checkpoints": dg.MetadataValue.json({c: s for c, s in steps.items()}),
        "tag": info.tag,
        "card": dg.MetadataValue.md(info.card.read_text()),
    }
    if repo is None:
        context.log.warning(f"{p.data_dir} is not inside a git repository: the release was built but not versioned")
        return dg.MaterializeResult(metadata=metadata | {"published": False}, data_version=dg.DataVersion(info.content_hash))
    ensure_git_identity(repo, *PIPELINE_AUTHOR)
    cli = dvc.cli(repo)
    cli.init()
    url = os.path.relpath(local_remote, repo) if local_remote else remote["url"]
    published = publish_release(cli, repo, out, info.tag, f"Release {section['name']} ({info.tag})",
                                (remote["name"], url))
    if section["git_remote"]:
        git_push_tag(repo, section["git_remote"], info.tag)
        context.log.info(f"pushed tag {info.tag} to git remote {section['git_remote']}")
    context.log.info(f"published {info.tag}: dvc md5 {published.md5}, commit {published.commit[:10]}")
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

