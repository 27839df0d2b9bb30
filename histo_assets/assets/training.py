"""One AUTOMATIC1111-compatible hypernetwork per tissue class, trained on its augmented crops."""

import dagster as dg
import pandas as pd

from histo_assets.core.hypernetwork import checkpoint_problems, write_imported_index
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, INDEX, LOSS_PLOT, Layout
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.schemas import IMPORTED_HYPERNETWORK_INDEX, AugmentedCropsSummary
from histo_assets.core.schemas import HypernetworkCheckpointsSummary, ImportedHypernetworkIndexSummary
from histo_assets.core.stage import file_stats, read_summary
from histo_assets.params import Params
from histo_assets.partitions import Partitions
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets.settings import hypernetwork_options, training_settings
from histo_assets.stage import Part, Stage, StageSpec, skipped_files, stage_asset

# core.training and core.base_model import diffusers, so asset bodies import them when a run needs them:
# loading and unloading diffusers takes seconds that every CLI start and UI reload would otherwise pay.
GROUP = "training"


def _hypernetwork_checkpoints_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    crops = read_summary(Layout(p.data_dir).augmented_crops(part.tissue_class), AugmentedCropsSummary)
    return dict(training_set=crops["data_version"], base_model=base_model.identity(p), hypernetwork=p["hypernetwork"],
                training=p["training"], resolution=p.resolution, seed=p.seed)


def _imported_hypernetwork_index_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    return dict(files=file_stats(Layout(p.data_dir).imported_hypernetworks_inbox(part.tissue_class)),
                base_model=base_model.identity(p))


STAGES = {
    "hypernetwork_checkpoints": StageSpec(lambda at, part: at.hypernetwork_checkpoints(part.tissue_class),
                                          lambda at, part: [at.augmented_crops(part.tissue_class)],
                                          _hypernetwork_checkpoints_inputs, HypernetworkCheckpointsSummary,
                                          code_version="2"),
    "imported_hypernetwork_index": StageSpec(lambda at, part: at.imported_hypernetwork_index(part.tissue_class),
                                             lambda at, part: [at.imported_hypernetworks_inbox(part.tissue_class)],
                                             _imported_hypernetwork_index_inputs, ImportedHypernetworkIndexSummary,
                                             code_version="1"),
}
ALL_CHECKPOINTS_LOAD = dg.AssetCheckSpec(
    "all_checkpoints_load", asset="hypernetwork_checkpoints", blocking=True,
    description="Every checkpoint step in params exists, loads in safe mode, and has finite weights.")


def _hypernetwork_checkpoints(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
    @stage_asset(p, STAGES["hypernetwork_checkpoints"], on_gpu=True, partitions_def=partitions.tissue_class,
                 group_name=GROUP, deps=["augmented_crops", BASE_MODEL_ASSET], kinds={"pytorch", "diffusers"},
                 check_specs=[ALL_CHECKPOINTS_LOAD])
    def hypernetwork_checkpoints(context: dg.AssetExecutionContext, params: ParamsResource,
                                 base_model: BaseModelResource, object_store: ObjectStoreResource):
        """A Stable Diffusion hypernetwork per tissue class, trained AUTOMATIC1111-style on the class's augmented
        crops (training share only), with an A1111 .pt checkpoint at every step listed in training.checkpoint_steps.
        Interrupted training resumes from the latest checkpoint."""
        from histo_assets.core.training import resume_key, write_hypernetwork_checkpoints

        stage = Stage.start(context, params, object_store, STAGES["hypernetwork_checkpoints"], base_model)
        p, tissue_class = stage.params, stage.part.tissue_class
        summary = stage.build_or_reuse(lambda out: write_hypernetwork_checkpoints(
            out, base_model.load(p), stage.layout.augmented_crops(tissue_class) / IMAGES, tissue_class=tissue_class,
            options=hypernetwork_options(p), training=training_settings(p), resolution=p.resolution,
            master_seed=p.seed, training_set=stage.inputs["training_set"], resume=resume_key(**stage.inputs),
            # With an object store, a pod lost mid-run leaves its checkpoints for the next one to resume from.
            log=stage.log, on_checkpoint=lambda _path: stage.push()), in_place=True)
        checkpoints = summary["checkpoints"]
        yield stage.result(stable_hash(checkpoints), {
            "loss_curve": dg.MetadataValue.md(markdown_png_file(stage.out / LOSS_PLOT, "loss curve")),
            "final_loss": float(summary["final_loss"] if summary["final_loss"] is not None else "nan"),
            **{key: summary[key] for key in ("steps_per_second", "device", "base_model_sha256")},
            "checkpoints": dg.MetadataValue.md(markdown_table(pd.DataFrame(checkpoints).sort_values("step"))),
            "training_set": summary["training_set"][:16],
        })
        problems = checkpoint_problems(stage.out, checkpoints, p["training"]["checkpoint_steps"])
        yield dg.AssetCheckResult(asset_key="hypernetwork_checkpoints", check_name=ALL_CHECKPOINTS_LOAD.name,
                                  passed=not problems,
                                  metadata={"checkpoints": len(checkpoints), "problems": "; ".join(problems) or "none"})

    return hypernetwork_checkpoints


def _imported_hypernetwork_index(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
    @stage_asset(p, STAGES["imported_hypernetwork_index"], follows_upstream=False,
                 partitions_def=partitions.tissue_class, group_name=GROUP, kinds={"pytorch"})
    def imported_hypernetwork_index(context: dg.AssetExecutionContext, params: ParamsResource,
                                    base_model: BaseModelResource, object_store: ObjectStoreResource):
        """AUTOMATIC1111 hypernetworks a lab already has: .pt files dropped into
        data/imported_hypernetworks/<class>/ are validated (safe loading, spec defaults, sizes against the base
        model) and indexed, so synthetic images can be generated from them like from our own checkpoints."""
        from histo_assets.core.base_model import attention_context_widths

        stage = Stage.start(context, params, object_store, STAGES["imported_hypernetwork_index"], base_model)
        inbox = stage.layout.imported_hypernetworks_inbox(stage.part.tissue_class)
        summary = stage.build_or_reuse(lambda staging: write_imported_index(
            staging, inbox, lambda: attention_context_widths(base_model.load(stage.params).unet), warn=context.log.warning))
        frame = IMPORTED_HYPERNETWORK_INDEX.read(stage.out / INDEX)
        return stage.result(summary["data_version"], {
            "inbox": dg.MetadataValue.path(str(inbox)),
            "imported": summary["count"],
            "hypernetworks": dg.MetadataValue.md(markdown_table(frame.drop(columns=["path"])) if len(frame) else "none"),
            "skipped": skipped_files(summary["problems"]),
        })

    return imported_hypernetwork_index


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    return [_hypernetwork_checkpoints(p, partitions), _imported_hypernetwork_index(p, partitions)]
