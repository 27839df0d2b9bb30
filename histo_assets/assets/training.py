"""One AUTOMATIC1111-compatible hypernetwork per tissue class, trained on its augmented crops."""

import dagster as dg
import pandas as pd

from histo_assets.checks import CHECKPOINTS_LOAD, checkpoint_check_result
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, INDEX, LOSS_PLOT, Layout
from histo_assets.core.schemas import IMPORTED_HYPERNETWORK_INDEX, AugmentedCropsSummary
from histo_assets.core.schemas import HypernetworkCheckpointsSummary, ImportedHypernetworkIndexSummary
from histo_assets.core.stage import file_stats, read_summary
from histo_assets.params import Params
from histo_assets.resources import BaseModelResource
from histo_assets.settings import hypernetwork_options, training_settings
from histo_assets.stage import Part, Stage, png_value, skipped_files, stage_asset, table_value


def _hypernetwork_checkpoints_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    crops = read_summary(Layout(p.data_dir).augmented_crops(part.tissue_class), AugmentedCropsSummary)
    return dict(training_set=crops["data_version"], base_model=base_model.identity(p), hypernetwork=p["hypernetwork"],
                training=p["training"], resolution=p.resolution, seed=p.seed)


@stage_asset(reads=["augmented_crops"], inputs=_hypernetwork_checkpoints_inputs, summary=HypernetworkCheckpointsSummary,
             code_version="2", partitioned="tissue_class", deps=["augmented_crops", BASE_MODEL_ASSET],
             resources=["base_model"], on_gpu=True, kinds={"pytorch", "diffusers"},
             check_specs=[CHECKPOINTS_LOAD])
def hypernetwork_checkpoints(stage: Stage):
    """A Stable Diffusion hypernetwork per tissue class, trained AUTOMATIC1111-style on the class's augmented
    crops (training share only), with an A1111 .pt checkpoint at every step listed in training.checkpoint_steps.
    Interrupted training resumes from the latest checkpoint."""
    from histo_assets.core.training import resume_key, write_hypernetwork_checkpoints

    p, tissue_class = stage.params, stage.part.tissue_class
    summary = stage.build_or_reuse(lambda out: write_hypernetwork_checkpoints(
        out, stage.base_model.load(p), stage.layout.augmented_crops(tissue_class) / IMAGES, tissue_class=tissue_class,
        options=hypernetwork_options(p), training=training_settings(p), resolution=p.resolution,
        master_seed=p.seed, training_set=stage.inputs["training_set"], resume=resume_key(**stage.inputs),
        # With an object store, a pod lost mid-run leaves its checkpoints for the next one to resume from.
        log=stage.log, on_checkpoint=lambda _path: stage.push()), in_place=True)
    checkpoints = summary["checkpoints"]
    yield stage.result(stable_hash(checkpoints), {
        "loss_curve": png_value(stage.out / LOSS_PLOT, "loss curve"),
        "final_loss": float(summary["final_loss"] if summary["final_loss"] is not None else "nan"),
        **{key: summary[key] for key in ("steps_per_second", "device", "base_model_sha256")},
        "checkpoints": table_value(pd.DataFrame(checkpoints).sort_values("step")),
        "training_set": summary["training_set"][:16],
    })
    yield checkpoint_check_result(stage.out, checkpoints, p["training"]["checkpoint_steps"])


def _imported_hypernetwork_index_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    return dict(files=file_stats(Layout(p.data_dir).imported_hypernetworks_inbox(part.tissue_class)),
                base_model=base_model.identity(p))


@stage_asset(reads=["imported_hypernetworks_inbox"], inputs=_imported_hypernetwork_index_inputs,
             summary=ImportedHypernetworkIndexSummary, code_version="1", partitioned="tissue_class",
             resources=["base_model"], follows_upstream=False, kinds={"pytorch"})
def imported_hypernetwork_index(stage: Stage):
    """AUTOMATIC1111 hypernetworks a lab already has: .pt files dropped into
    data/imported_hypernetworks/<class>/ are validated (safe loading, spec defaults, sizes against the base
    model) and indexed, so synthetic images can be generated from them like from our own checkpoints."""
    from histo_assets.core.base_model import attention_context_widths
    from histo_assets.core.hypernetwork import write_imported_index

    inbox = stage.layout.imported_hypernetworks_inbox(stage.part.tissue_class)
    summary = stage.build_or_reuse(lambda staging: write_imported_index(
        staging, inbox, lambda: attention_context_widths(stage.base_model.load(stage.params).unet),
        warn=stage.context.log.warning))
    frame = IMPORTED_HYPERNETWORK_INDEX.read(stage.out / INDEX)
    return stage.result(summary["data_version"], {
        "inbox": inbox,
        "imported": summary["count"],
        "hypernetworks": table_value(frame.drop(columns=["path"])) if len(frame) else dg.MetadataValue.md("none"),
        "skipped": skipped_files(summary["problems"]),
    })
