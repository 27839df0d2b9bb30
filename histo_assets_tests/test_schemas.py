"""Every parquet table's columns live in core/schemas.py: writers write exactly them, readers refuse files without."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from histo_assets.core.augment import write_augmented_crops
from histo_assets.core.crops import write_square_crops
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.evaluation import ALL_CLASSES, METRICS_TABLE_FILE, TABLE_COLUMNS, write_metrics_summary
from histo_assets.core.holdout import INDEX_COLUMNS, SplitSettings
from histo_assets.core.hypernetwork import Hypernetwork, HypernetworkOptions, save_hypernetwork, write_imported_index
from histo_assets.core.io import atomic_write_parquet, sha256_file
from histo_assets.core.layout import HOLDOUT, IMAGES, INDEX, INVENTORY, Layout
from histo_assets.core.lineage import GENERATION_FIELDS, INDEX_ONLY_FIELDS, INVENTORY_FIELDS, training_lineage
from histo_assets.core.release import LINEAGE, MANIFEST, ReleaseImage, build_release, read_manifest
from histo_assets.core.sampling import GeneratedImage, write_generation_index
from histo_assets.core.schemas import (
    AUGMENTED_INDEX,
    CROP_INDEX,
    GENERATION_INDEX,
    HELD_OUT_CROPS,
    IMPORTED_HYPERNETWORK_INDEX,
    METRICS_TABLE,
    PUBLISHED_METRICS,
    RELEASE_LINEAGE,
    RELEASE_MANIFEST,
    SLIDE_INVENTORY,
    BaseModelSummary,
    SchemaError,
    SquareCropsSummary,
    TableSchema,
    check_summary,
)
from histo_assets.core.stage import build_or_reuse, read_summary
from histo_assets.core.slides import IngestSettings, write_inventory
from histo_assets_tests.conftest import tissue_image
from histo_assets.settings import from_section
from histo_assets_tests.test_augment import augmentation
from histo_assets_tests.test_crops import PARAMS, settings
from histo_assets_tests.test_evaluation import _collapse_table, _write_pngs

CLASS = "alpha"
STEP = 3
RELEASE = "schemas"
HN_WIDTH = 32
PROVENANCE = {"seed": 1, "prompt": "an H&E tile"}
SCHEMA = TableSchema("test table", ("a", "b", "c"))
# Each table the stages fixture writes with a fixed set of columns, and where.
WRITTEN = {
    "inventory": (SLIDE_INVENTORY, lambda layout: layout.slide_inventory(CLASS) / INVENTORY),
    "crops": (CROP_INDEX, lambda layout: layout.square_crops(CLASS) / INDEX),
    "augmented": (AUGMENTED_INDEX, lambda layout: layout.augmented_crops(CLASS) / INDEX),
    "holdout": (HELD_OUT_CROPS, lambda layout: layout.augmented_crops(CLASS) / HOLDOUT),
    "imported": (IMPORTED_HYPERNETWORK_INDEX, lambda layout: layout.imported_hypernetwork_index(CLASS) / INDEX),
    "generated": (GENERATION_INDEX, lambda layout: layout.synthetic_images(CLASS, STEP) / INDEX),
    "lineage": (RELEASE_LINEAGE, lambda layout: layout.release(RELEASE) / LINEAGE),
}


def _generated_image(folder: Path) -> GeneratedImage:
    tissue_image((32, 32), seed=5, tissue=1.0).save(folder / "image.png")
    return GeneratedImage(
        file="image.png", sha256=sha256_file(folder / "image.png"), seed=1, index=0, tissue_class=CLASS,
        checkpoint_step=STEP, prompt="an H&E tile", negative_prompt="", sampler="euler", steps=2, cfg_scale=7.0,
        width=32, height=32, batch_size=1, multiplier=1.0, hypernetwork_name=CLASS, hypernetwork_file=f"{CLASS}.pt",
        hypernetwork_sha256="0" * 64, hypernetwork_short_hash="00000000", base_model_name="tiny",
        base_model_sha256="1" * 64, base_model_short_hash="11111111",
    )


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Layout:
    """A data folder written by the pipeline's own writers, from raw slides to a release."""
    layout = Layout(tmp_path_factory.mktemp("schemas") / "data")
    layout.raw(CLASS).mkdir(parents=True)
    for index in range(2):
        tissue_image((256, 192), seed=index).save(layout.raw(CLASS) / f"slide{index}.png")
    ingest = from_section(IngestSettings, PARAMS["ingest"] | {"extensions": [".png"]})
    write_inventory(layout.slide_inventory(CLASS), layout.raw(CLASS), layout.data_dir, ingest, tissue_class=CLASS)
    inventory = pd.read_parquet(layout.slide_inventory(CLASS) / INVENTORY)
    write_square_crops(layout.square_crops(CLASS), list(zip(inventory["path"], inventory["sha256"])), layout.data_dir,
                       settings("tiles", tile_size=64), tissue_class=CLASS)
    crops = pd.read_parquet(layout.square_crops(CLASS) / INDEX)
    write_augmented_crops(
        layout.augmented_crops(CLASS), layout.square_crops(CLASS) / IMAGES, crops,
        split_settings=SplitSettings(holdout_fraction=0.3, group_fraction_tolerance=0.5, guard_tiles=1),
        groups={source: source for source in crops["source_path"]},
        augmentation=augmentation(total=4, workers=1, captions="class"), tissue_class=CLASS,
        seed=7,
    )
    inbox = layout.imported_hypernetworks_inbox(CLASS)
    inbox.mkdir(parents=True)
    save_hypernetwork(Hypernetwork(CLASS, HypernetworkOptions(sizes=(HN_WIDTH,)), seed=0), inbox / f"{CLASS}.pt")
    write_imported_index(layout.imported_hypernetwork_index(CLASS), inbox, lambda: [HN_WIDTH], pytest.fail)
    images = layout.synthetic_images(CLASS, STEP) / IMAGES
    images.mkdir(parents=True)
    write_generation_index([_generated_image(images)], layout.synthetic_images(CLASS, STEP) / INDEX)
    build_release([ReleaseImage(images / "image.png", CLASS, STEP, PROVENANCE)], layout.release(RELEASE), name=RELEASE,
                  lineage=training_lineage(layout, CLASS))
    return layout


# ---- check, read and write -----------------------------------------------------------------------


def test_check_puts_the_columns_in_schema_order_and_passes_an_ordered_frame_through():
    shuffled = pd.DataFrame({"c": [3], "a": [1], "b": [2]})
    assert list(SCHEMA.check(shuffled).columns) == ["a", "b", "c"]
    ordered = shuffled[["a", "b", "c"]]
    assert SCHEMA.check(ordered) is ordered


def test_check_refuses_missing_and_unexpected_columns_naming_the_table_and_columns():
    with pytest.raises(SchemaError, match="wrong columns for the test table: missing b; unexpected d") as refused:
        SCHEMA.check(pd.DataFrame({"a": [1], "c": [3], "d": [4]}))
    assert isinstance(refused.value, HistoAssetsError) and isinstance(refused.value, ValueError)


def test_extra_columns_follow_the_declared_ones_and_an_unordered_table_keeps_its_order():
    manifest = pd.DataFrame({"seed": [1], **{column: ["x"] for column in RELEASE_MANIFEST.columns}})
    assert list(RELEASE_MANIFEST.check(manifest).columns) == [*RELEASE_MANIFEST.columns, "seed"]
    key_sorted = pd.DataFrame({column: [0] for column in sorted(METRICS_TABLE.columns)})
    assert METRICS_TABLE.check(key_sorted) is key_sorted
    with pytest.raises(SchemaError, match="missing libraries"):
        METRICS_TABLE.check(key_sorted.drop(columns="libraries"))


def test_reading_a_file_from_an_older_version_names_the_file_and_the_missing_column(tmp_path):
    path = tmp_path / INDEX
    pd.DataFrame({column: [0] for column in CROP_INDEX.columns if column != "read_size"}).to_parquet(path)
    refusal = re.escape(f"{path}: wrong columns for the crop index: missing read_size")
    with pytest.raises(SchemaError, match=refusal):
        CROP_INDEX.read(path)
    assert list(CROP_INDEX.read(path, columns=["crop_file", "x"]).columns) == ["crop_file", "x"]
    with pytest.raises(SchemaError, match=refusal):
        CROP_INDEX.read(path, columns=["crop_file", "read_size"])
    with pytest.raises(ValueError, match="the crop index has no columns kind"):
        CROP_INDEX.read(path, columns=["kind"])


def test_read_returns_the_checked_table_and_write_writes_the_plain_writers_bytes(tmp_path):
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": [0.5, None]})
    SCHEMA.write(tmp_path / "schema.parquet", frame)
    atomic_write_parquet(tmp_path / "plain.parquet", frame)
    assert (tmp_path / "schema.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
    pd.testing.assert_frame_equal(SCHEMA.read(tmp_path / "schema.parquet"), frame)
    with pytest.raises(SchemaError, match="unexpected d"):
        SCHEMA.write(tmp_path / "refused.parquet", frame.assign(d=1))
    assert not (tmp_path / "refused.parquet").exists()


# ---- every writer writes exactly its table's columns -------------------------------------------


@pytest.mark.parametrize("schema, where", WRITTEN.values(), ids=WRITTEN)
def test_each_stage_writes_exactly_its_tables_columns(stages, schema, where):
    frame = pd.read_parquet(where(stages))
    assert tuple(frame.columns) == schema.columns and len(frame)


def test_the_release_manifest_is_its_columns_then_the_provenance_keys_sorted(stages):
    manifest = pd.read_parquet(stages.release(RELEASE) / MANIFEST)
    assert tuple(manifest.columns) == RELEASE_MANIFEST.columns + tuple(sorted(PROVENANCE))
    pd.testing.assert_frame_equal(read_manifest(stages.release(RELEASE)), manifest)


def test_the_metrics_summary_writes_the_metrics_table_and_publishes_its_published_columns(tmp_path):
    layout = Layout(tmp_path)
    _write_pngs(layout.augmented_crops("c") / IMAGES, ["orig-1.png"])
    for step in (1, 2):
        _write_pngs(layout.synthetic_images("c", step) / IMAGES, ["0.png"])
    table = _collapse_table(n_reference=8)
    table = pd.concat([table, table.assign(tissue_class=ALL_CLASSES)], ignore_index=True)
    write_metrics_summary(layout, table, ["c"], [1, 2], "kid", "lowest")
    written = pd.read_parquet(layout.metrics_details / METRICS_TABLE_FILE)
    assert sorted(written.columns) == sorted(METRICS_TABLE.columns) and list(written.columns) == list(table.columns)
    assert list(pd.read_csv(layout.metrics_summary / "metrics.csv").columns) == list(PUBLISHED_METRICS.columns)
    assert TABLE_COLUMNS == list(PUBLISHED_METRICS.columns)


# ---- readers -------------------------------------------------------------------------------------


def test_the_columns_readers_pick_out_are_in_the_tables_they_read():
    assert set(INVENTORY_FIELDS) <= set(SLIDE_INVENTORY.columns)
    index_keys = {index_key for index_key, _ in GENERATION_FIELDS.values()}
    assert index_keys | set(INDEX_ONLY_FIELDS) <= set(GENERATION_INDEX.columns)
    assert set(INDEX_COLUMNS) <= set(CROP_INDEX.columns)


def test_lineage_refuses_a_crop_index_from_an_older_version_naming_it(stages, tmp_path):
    layout = Layout(tmp_path)
    for folder in (layout.square_crops(CLASS), layout.augmented_crops(CLASS)):
        folder.mkdir(parents=True)
    (layout.augmented_crops(CLASS) / INDEX).write_bytes((stages.augmented_crops(CLASS) / INDEX).read_bytes())
    older = pd.read_parquet(stages.square_crops(CLASS) / INDEX).drop(columns="level")
    older.to_parquet(layout.square_crops(CLASS) / INDEX)
    refusal = f"{layout.square_crops(CLASS) / INDEX}: wrong columns for the crop index: missing level"
    with pytest.raises(SchemaError, match=re.escape(refusal)):
        training_lineage(layout, CLASS)


def test_a_release_manifest_without_its_columns_is_refused_naming_it(tmp_path):
    path = tmp_path / MANIFEST
    pd.DataFrame({"path": ["images/a.png"], "seed": [1]}).to_parquet(path)
    refusal = f"{path}: wrong columns for the release manifest: missing tissue_class, checkpoint_step, sha256"
    with pytest.raises(SchemaError, match=re.escape(refusal)):
        read_manifest(tmp_path)


# --- summary.json --------------------------------------------------------------------------------


def test_a_summary_must_have_exactly_its_fields_and_the_error_names_the_file():
    summary = {"fingerprint": "f", "data_version": "d", "count": 1, "problems": []}
    assert check_summary(SquareCropsSummary, summary, "x/summary.json") is summary
    with pytest.raises(SchemaError, match=r"x/summary.json: wrong fields for a SquareCropsSummary: missing count; "
                                          r"unexpected total"):
        check_summary(SquareCropsSummary, {k: v for k, v in summary.items() if k != "count"} | {"total": 1},
                      "x/summary.json")


def test_optional_fields_may_be_absent_only_where_declared():
    described = {"fingerprint": "f", "source": "single_file", "name": "sd", "sha256": "s", "short_hash": "h",
                 "path": "p", "architecture": {}}
    assert check_summary(BaseModelSummary, described, "s") == described
    assert check_summary(BaseModelSummary, described | {"training_set": {}, "seconds": 1.0}, "s")
    with pytest.raises(SchemaError, match="missing sha256"):
        check_summary(BaseModelSummary, {k: v for k, v in described.items() if k != "sha256"}, "s")


def test_a_stage_folder_from_an_older_version_is_refused_when_read_naming_it(tmp_path):
    folder = tmp_path / "square_crops" / CLASS
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"fingerprint": "f", "count": 3, "problems": []}))
    assert read_summary(folder)["count"] == 3, "unchecked, as the skip-if-unchanged test reads it"
    with pytest.raises(SchemaError, match=f"{folder / 'summary.json'}: wrong fields for a SquareCropsSummary: "
                                          "missing data_version"):
        read_summary(folder, SquareCropsSummary)
    assert read_summary(tmp_path / "absent", SquareCropsSummary) is None


def test_a_build_whose_summary_has_an_undeclared_field_writes_nothing(tmp_path):
    out = tmp_path / "stage"

    def build(staging):
        (staging / "made.txt").write_text("work")
        return {"data_version": "d", "count": 1, "problems": [], "surprise": True}

    with pytest.raises(SchemaError, match="unexpected surprise"):
        build_or_reuse(out, "fingerprint", build, SquareCropsSummary)
    assert not out.exists()
    summary, reused = build_or_reuse(out, "fingerprint", lambda staging: {"data_version": "d", "count": 1,
                                                                          "problems": []}, SquareCropsSummary)
    assert not reused and read_summary(out, SquareCropsSummary) == summary


def test_a_summary_in_an_older_format_is_rebuilt_not_reused_even_with_the_same_fingerprint(tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"fingerprint": "same", "count": 1, "problems": []}))
    built = []

    def build(staging):
        built.append(staging)
        return {"data_version": "d", "count": 2, "problems": []}

    summary, reused = build_or_reuse(out, "same", build, SquareCropsSummary)
    assert not reused and len(built) == 1 and summary["count"] == 2
    assert build_or_reuse(out, "same", build, SquareCropsSummary) == (summary, True) and len(built) == 1
