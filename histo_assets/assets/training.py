"""One AUTOMATIC1111-compatible hypernetwork per tissue class, trained on its augmented crops."""

import pickle

import dagster as dg
import pandas as pd
import torch

from histo_assets.assets import FOLLOW_UPSTREAM, GPU_TAGS
from histo_assets.assets.base_model import base_model_asset
from histo_assets.assets.ingest import augmented_crops
from histo_assets.core.base_model import attention_context_widths, check_hypernetwork_sizes
from histo_assets.core.hypernetwork import HypernetworkFormatError, HypernetworkOptions, load_hypernetwork, sanitize_name
from histo_assets.core.io import atomic_directory, atomic_write_json, atomic_write_parquet, sha256_file, stable_hash
from histo_assets.core.plots import loss_curve
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.seeding import derive_seed
from histo_assets.core.stage import current_summary, fingerprint, prepare_resumable, read_summary
from histo_assets.core.training import train_hypernetwork
from histo_assets.core.layout import IMAGES, INDEX, LOSS_PLOT, SUMMARY, Layout
from histo_assets.params import Params
from histo_assets.partitions import tissue_class_partitions
from histo_assets.resources import STAGE_CONFIG_SCHEMA, BaseModelResource, ObjectStoreResource, ParamsResource

GROUP = "training"
HYPERNETWORK_CHECKPOINTS_VERSION = "2"
IMPORTED_HYPERNETWORKS_VERSION = "1"


def hypernetwork_options(p: Params) -> HypernetworkOptions:
    section = p["hypernetwork"]
    return HypernetworkOptions(
        sizes=tuple(int(s) for s in section["sizes"]),
        layer_structure=tuple(float(x) for x in section["layer_structure"]),
        activation=section["activation"],
        weight_init=section["weight_init"],
        layer_norm=bool(section["layer_norm"]),
        use_dropout=bool(section["use_dropout"]),
        dropout_structure=tuple(float(x) for x in section["dropout_structure"]),
        activate_output=bool(section["activate_output"]),
    )


def hypernetwork_name(tissue_class: str) -> str:
    return sanitize_name(tissue_class)


def resume_key(p: Params, training_set: str, base_identity: dict) -> str:
    """What a partial run must share with this one to be continued rather than restarted.

    Training can be extended (more steps, more checkpoints) without starting
    over, so those settings are left out; anything else changes the weights.
    """
    extendable = {"max_steps", "checkpoint_steps", "loss_log_every"}
    training = {k: v for k, v in p["training"].items() if k not in extendable}
    return fingerprint(training_set=training_set, base_model=base_identity, hypernetwork=p["hypernetwork"],
                       training=training, resolution=p.resolution, seed=p.seed, code=HYPERNETWORK_CHECKPOINTS_VERSION)


def checkpoint_rows(summary: dict) -> pd.DataFrame:
    return pd.DataFrame(summary["checkpoints"]).sort_values("step")


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=tissue_class_partitions,
    group_name=GROUP,
    code_version=HYPERNETWORK_CHECKPOINTS_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[augmented_crops, base_model_asset],
    pool="gpu",
    op_tags=GPU_TAGS,
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
    p = params.load_for(context)
    tissue_class = context.partition_key
    layout = Layout(p.data_dir)
    crops_dir = layout.augmented_crops(tissue_class)
    out = layout.hypernetwork_checkpoints(tissue_class)
    object_store.pull(p.data_dir, crops_dir, out, log=context.log.info)
    training_set = read_summary(crops_dir)["data_version"]
    base_identity = base_model.identity(p)
    stage_fingerprint = fingerprint(
        training_set=training_set, base_model=base_identity, hypernetwork=p["hypernetwork"], training=p["training"],
        resolution=p.resolution, seed=p.seed, code=HYPERNETWORK_CHECKPOINTS_VERSION,
    )
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"{tissue_class}: training set and params unchanged, reusing {out}")
    else:
        base = base_model.load(p)
        options = hypernetwork_options(p)
        check_hypernetwork_sizes(options.sizes, base.unet)
        if prepare_resumable(out, resume_key(p, training_set, base_identity)):
            context.log.info(f"{tissue_class}: continuing the training run in {out} (interrupted, extended or missing checkpoints)")
        training = p["training"]
        result = train_hypernetwork(
            base, crops_dir / IMAGES, out,
            name=hypernetwork_name(tissue_class),
            options=options,
            templates=list(training["templates"]),
            resolution=p.resolution,
            seed=derive_seed(p.seed, "hypernetwork", tissue_class),
            max_steps=int(training["max_steps"]),
            learning_rate=str(training["learning_rate"]),
            batch_size=int(training["batch_size"]),
            gradient_accumulation=int(training["gradient_accumulation"]),
            checkpoint_steps=[int(s) for s in training["checkpoint_steps"]],
            clip_mode=training["clip_mode"],
            clip_value=str(training["clip_value"]),
            latent_sampling=training["latent_sampling"],
            loss_log_every=int(training["loss_log_every"]),
            log=context.log.info,
            # With an object store, a pod lost mid-run leaves its checkpoints for the next one to resume from.
            on_checkpoint=lambda _path: object_store.push(p.data_dir, out, log=context.log.info),
        )
        history = result.loss_history
        loss_curve([r.step for r in history], [r.loss for r in history], out / LOSS_PLOT,
                   title=f"hypernetwork {result.name}: training loss", marks=sorted(result.checkpoints))
        summary = {
            "fingerprint": stage_fingerprint,
            "name": result.name,
            "training_set": training_set,
            "checkpoints": [
                {"step": step, "file": path.name, "sha256": sha256_file(path)} for step, path in sorted(result.checkpoints.items())
            ],
            "final_loss": result.final_loss,
            "steps_per_second": result.steps_per_second,
            "device": result.device,
            "base_model_sha256": result.base_model_sha256,
            "base_model_short_hash": result.base_model_short_hash,
            "resumed_from": result.resumed_from.name if result.resumed_from else None,
        }
        atomic_write_json(out / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    rows = checkpoint_rows(summary)
    loss_markdown = markdown_png_file(out / LOSS_PLOT, "loss curve")
    yield dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "loss_curve": dg.MetadataValue.md(loss_markdown),
            "final_loss": float(summary["final_loss"] if summary["final_loss"] is not None else "nan"),
            "steps_per_second": summary["steps_per_second"],
            "device": summary["device"],
            "base_model_sha256": summary["base_model_sha256"],
            "checkpoints": dg.MetadataValue.md(markdown_table(rows)),
            "training_set": summary["training_set"][:16],
            "reused_unchanged_output": reused,
        },
        data_version=dg.DataVersion(stable_hash(summary["checkpoints"])),
    )
    yield _checkpoints_check(p, out, rows)


def _checkpoints_check(p: Params, out, rows: pd.DataFrame) -> dg.AssetCheckResult:
    wanted = {int(s) for s in p["training"]["checkpoint_steps"]}
    problems = []
    missing = sorted(wanted - set(rows["step"]))
    if missing:
        problems.append(f"missing steps {missing}")
    for row in rows.itertuples():
        path = out / row.file
        if not path.is_file() or sha256_file(path) != row.sha256:
            problems.append(f"{row.file}: missing or changed on disk")
            continue
        try:
            hn = load_hypernetwork(path)
        except (HypernetworkFormatError, RuntimeError, OSError, pickle.UnpicklingError) as error:
            problems.append(f"{row.file}: does not load ({error})")
            continue
        if not all(torch.isfinite(t).all() for t in hn.state_dict().values()):
            problems.append(f"{row.file}: non-finite weights")
    return dg.AssetCheckResult(
        asset_key="hypernetwork_checkpoints",
        check_name="all_checkpoints_load",
        passed=not problems,
        metadata={"checkpoints": len(rows), "problems": "; ".join(problems) or "none"},
    )


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=tissue_class_partitions,
    group_name=GROUP,
    code_version=IMPORTED_HYPERNETWORKS_VERSION,
    kinds={"pytorch"},
    description="AUTOMATIC1111 hypernetworks a lab already has: .pt files dropped into "
    "data/imported_hypernetworks/<class>/ are validated (safe loading, spec defaults, sizes against the "
    "base model) and indexed, so synthetic images can be generated from them like from our own checkpoints.",
)
def imported_hypernetworks(
    context: dg.AssetExecutionContext,
    params: ParamsResource,
    base_model: BaseModelResource,
    object_store: ObjectStoreResource,
):
    p = params.load_for(context)
    tissue_class = context.partition_key
    layout = Layout(p.data_dir)
    inbox = layout.imported_hypernetworks_inbox(tissue_class)
    object_store.pull(p.data_dir, inbox, log=context.log.info)
    files = sorted(inbox.glob("*.pt")) if inbox.is_dir() else []
    rows, problems = [], []
    widths = None
    for path in files:
        try:
            hn = load_hypernetwork(path)
            if widths is None:
                widths = set(attention_context_widths(base_model.load(p).unet))
            unused = sorted(set(hn.options.sizes) - widths)
            if not set(hn.options.sizes) & widths:
                raise ValueError(f"none of its sizes {list(hn.options.sizes)} match the base model's attention widths {sorted(widths)}")
        except Exception as error:
            problems.append({"file": path.name, "reason": str(error)})
            context.log.warning(f"skipped imported hypernetwork {path.name}: {error}")
            continue
        rows.append({
            "file": path.name, "path": str(path), "sha256": sha256_file(path), "name": hn.name, "step": hn.step,
            "sizes": ",".join(map(str, hn.options.sizes)), "unused_sizes": ",".join(map(str, unused)),
            "activation": str(hn.options.activation), "layer_structure": ",".join(map(str, hn.options.layer_structure)),
            "sd_checkpoint": hn.sd_checkpoint, "sd_checkpoint_name": hn.sd_checkpoint_name,
        })
    frame = pd.DataFrame(rows, columns=["file", "path", "sha256", "name", "step", "sizes", "unused_sizes", "activation",
                                        "layer_structure", "sd_checkpoint", "sd_checkpoint_name"])
    out = layout.imported_hypernetworks(tissue_class)
    with atomic_directory(out) as staging:
        atomic_write_parquet(staging / INDEX, frame)
        atomic_write_json(staging / SUMMARY, {"count": len(rows), "problems": problems})
    object_store.push(p.data_dir, out, log=context.log.info)
    return dg.MaterializeResult(
        metadata={
            "inbox": dg.MetadataValue.path(str(inbox)),
            "imported": len(rows),
            "hypernetworks": dg.MetadataValue.md(markdown_table(frame.drop(columns=["path"])) if rows else "none"),
            "skipped": dg.MetadataValue.md(markdown_table(pd.DataFrame(problems)) if problems else "none"),
        },
        data_version=dg.DataVersion(stable_hash(sorted(frame["sha256"]))),
    )
