"""The base_model asset with source `trained`: a real materialisation on a small dataset, reused when unchanged."""

import dagster as dg
import pandas as pd

from histo_assets.core.base_model import folder_weights_sha256
from histo_assets.core.layout import BASE_MODEL_ASSET, Layout
from histo_assets.params import load_params
from histo_assets.resources import TRAINED_MODEL_FOLDER, BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import SMALL, THESIS_CLASSES, assets_by_name, tree_hashes, write_params
from histo_assets_tests.test_assets_ingest import materialize as materialize_ingest

QUICK_TRAINING = {
    "vae": {"steps": 4, "batch_size": 4},
    "unet": {"steps": 4, "batch_size": 4},
    "checkpoint_every": 2,
    "preview_images": 4,
}


def materialize_base(params_file, instance):
    return dg.materialize(
        [assets_by_name(load_params(params_file))[BASE_MODEL_ASSET]],
        resources={"params": ParamsResource(params_file=str(params_file)),
                   "base_model": BaseModelResource(device="cpu", threads=1), "object_store": ObjectStoreResource()},
        instance=instance, raise_on_error=False,
    )


def test_trained_base_model_learns_from_every_class_training_share_and_is_reused(tmp_path, small_dataset):
    params_file = write_params(tmp_path, small_dataset, **SMALL, base_model={"source": "trained", "training": QUICK_TRAINING})
    for tissue_class in THESIS_CLASSES:
        assert materialize_ingest(params_file, tissue_class).success
    instance = dg.DagsterInstance.ephemeral()
    first = materialize_base(params_file, instance)
    assert first.success
    p = load_params(params_file)
    layout = Layout(p.data_dir)
    summary = pd.read_json(layout.base_model / "summary.json", typ="series")
    augmented = sum(len(pd.read_parquet(layout.augmented_crops(c) / "index.parquet")) for c in THESIS_CLASSES)
    assert summary["source"] == "trained" and summary["name"] == TRAINED_MODEL_FOLDER
    assert summary["training_set"]["images"] == augmented and summary["training_set"]["classes"] == THESIS_CLASSES
    assert summary["sha256"] == folder_weights_sha256(layout.base_model / TRAINED_MODEL_FOLDER)
    assert summary["architecture"]["attention_context_widths"] == [32, 48, 64]
    shown = {key: value.value for key, value in first.asset_materializations_for_node("base_model")[0].metadata.items()}
    assert "data:image/png;base64" in shown["loss_curve"] and "data:image/png;base64" in shown["samples"]
    assert shown["reused_unchanged_output"] is False

    before = tree_hashes(layout.base_model)
    second = materialize_base(params_file, instance)
    assert second.asset_materializations_for_node("base_model")[0].metadata["reused_unchanged_output"].value is True
    assert tree_hashes(layout.base_model) == before
    resource = BaseModelResource(device="cpu", threads=1)
    assert resource.identity(p)["weights_sha256"] == summary["sha256"]
    assert resource.load(p).sha256 == summary["sha256"]
