"""One AUTOMATIC1111-compatible hypernetwork per tissue class, trained on its augmented crops."""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.assets.stage import Stage, stage_asset
from histo_assets.core.base_model import attention_context_widths
from histo_assets.core.hypernetwork import HypernetworkOptions, checkpoint_problems, write_imported_index
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, LOSS_PLOT
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.stage import read_summary
from histo_assets.core.training import resume_key, write_hypernetwork_checkpoints
from histo_assets.params import Params
from histo_assets.partitions import Partitions
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource

GROUP = "training"
HYPERNETWORK_CHECKPOINTS_VERSION = "2"
IMPORTED_HYPERNETWORK_INDEX_VERSION = "1"


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    @stage_asset(
        p, on_gpu=True,
        partitions_def=partitions.tissue_class,
        group_name=GROUP,
        code_version=HYPERNETWORK_CHECKPOINTS_VERSION,
        deps=["augmented_crops", BASE_MODEL_ASSET],
        kinds={"pytorch", "diffusers"},
        check_specs=[
            dg.AssetCheckSpec("all_checkpoints_load", asset="hypernetwork_checkpoints", blocking=True,
                              description="Every checkpoint step in params exists, loads in safe mode, and has finite weights."),
        ],
        description="A Stable Diffusion hypernetwork per tissue class, trained AUTOMATIC1111-style on the "
        "class's augmented crops (training share only), with an A1111 .pt checkpoint at every step listed in "
        "training.checkpoint_steps. Interrupted training resumes from the latest checkpoint.",
    )
    def hypernetwork_checkpoints(
        context: dg.AssetExecutionContext,
        params: ParamsResource,
        base_model: BaseModelResource,
        object_store: ObjectStoreResource,
    ):
        tissue_class = context.partition_key
        stage = Stage.start(context, params, object_store, lambda at: at.hypernetwork_checkpoints(tissue_class),
                            lambda at: at.augmented_crops(tissue_class))
        p = stage.params
        crops_dir = stage.layout.augmented_crops(tissue_class)
        inputs = dict(training_set=read_summary(crops_dir)["data_version"], base_model=base_model.identity(p),
                      hypernetwork=p["hypernetwork"], resolution=p.resolution, seed=p.seed,
                      code=HYPERNETWORK_CHECKPOINTS_VERSION)

        def build(out: Path) -> dict:
            return write_hypernetwork_checkpoints(
                out, base_model.load(p), crops_dir / IMAGES, tissue_class=tissue_class,
                options=HypernetworkOptions.from_params(p["hypernetwork"]), training=p["training"],
                resolution=p.resolution, master_seed=p.seed, training_set=inputs["training_set"],
                resume=resume_key(training=p["training"], **inputs), log=stage.log,
                # With an object store, a pod lost mid-run leaves its checkpoints for the next one to resume from.
                on_checkpoint=lambda _path: stage.push(),
            )

        summary = stage.build_or_reuse(build, in_place=True, training=p["training"], **inputs)
        checkpoints = summary["checkpoints"]
        yield stage.result(stable_hash(checkpoints), {
            "loss_curve": dg.MetadataValue.md(markdown_png_file(stage.out / LOSS_PLOT, "loss curve")),
            "final_loss": float(summary["final_loss"] if summary["final_loss"] is not None else "nan"),
            "steps_per_second": summary["steps_per_second"],
            "device": summary["device"],
            "base_model_sha256": summary["base_model_sha256"],
            "checkpoints": dg.MetadataValue.md(markdown_table(pd.DataFrame(checkpoints).sort_values("step"))),
            "training_set": summary["training_set"][:16],
        })
        problems = checkpoint_problems(stage.out, checkpoints, p["training"]["checkpoint_steps"])
        yield dg.AssetCheckResult(asset_key="hypernetwork_checkpoints", check_name="all_checkpoints_load",
                                  passed=not problems,
                                  metadata={"checkpoints": len(checkpoints), "problems": "; ".join(problems) or "none"})

    @stage_asset(
        p, follows_upstream=False,
        partitions_def=partitions.tissue_class,
        group_name=GROUP,
        code_version=IMPORTED_HYPERNETWORK_INDEX_VERSION,
        kinds={"pytorch"},
        description="AUTOMATIC1111 hypernetworks a lab already has: .pt files dropped into "
        "data/imported_hypernetworks/<class>/ are validated (safe loading, spec defaults, sizes against the "
        "base model) and indexed, so synthetic images can be generated from them like from our own checkpoints.",
    )
    def imported_hypernetwork_index(
        context: dg.AssetExecutionContext,
        params: ParamsResource,
        base_model: BaseModelResource,
        object_store: ObjectStoreResource,
    ):
        tissue_class = context.partition_key
        stage = Stage.start(context, params, object_store, lambda at: at.imported_hypernetwork_index(tissue_class),
                            lambda at: at.imported_hypernetworks_inbox(tissue_class))
        inbox = stage.layout.imported_hypernetworks_inbox(tissue_class)
        frame, problems = write_imported_index(
            stage.out, inbox, lambda: attention_context_widths(base_model.load(stage.params).unet), warn=context.log.warning)
        stage.push()
        return dg.MaterializeResult(
            metadata={
                "inbox": dg.MetadataValue.path(str(inbox)),
                "imported": len(frame),
                "hypernetworks": dg.MetadataValue.md(markdown_table(frame.drop(columns=["path"])) if len(frame) else "none"),
                "skipped": dg.MetadataValue.md(markdown_table(pd.DataFrame(problems)) if problems else "none"),
            },
            data_version=dg.DataVersion(stable_hash(sorted(frame["sha256"]))),
        )

    return [hypernetwork_checkpoints, imported_hypernetwork_index]
