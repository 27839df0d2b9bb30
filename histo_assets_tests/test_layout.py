"""core/layout.py: every asset's folder is fixed, nested under data_dir, and shared by no other asset, class or step."""

import dataclasses
import itertools
from pathlib import Path

import pytest
import yaml

from histo_assets.core.layout import (
    BASE_MODEL_ASSET,
    HOLDOUT,
    IMAGES,
    INDEX,
    INVENTORY,
    LOSS_PLOT,
    PREVIEW,
    SUMMARY,
    Layout,
)
from histo_assets.params import PROJECT_ROOT

CLASSES = ("tumour", "stroma")
STEPS = (100, 1000)


def class_folders(layout: Layout, tissue_class: str) -> dict[str, Path]:
    """Every per-class folder, by asset, for one class (per step for the stepped ones)."""
    folders = {
        "raw": layout.raw(tissue_class),
        "slide_inventory": layout.slide_inventory(tissue_class),
        "square_crops": layout.square_crops(tissue_class),
        "augmented_crops": layout.augmented_crops(tissue_class),
        "hypernetwork_checkpoints": layout.hypernetwork_checkpoints(tissue_class),
        "imported_hypernetworks": layout.imported_hypernetworks_inbox(tissue_class),
        "imported_hypernetwork_index": layout.imported_hypernetwork_index(tissue_class),
        "imported_synthetic_images": layout.imported_synthetic_images(tissue_class),
    }
    for step in STEPS:
        folders[f"synthetic_images/{step}"] = layout.synthetic_images(tissue_class, step)
        folders[f"checkpoint_metrics/{step}"] = layout.checkpoint_metrics(tissue_class, step)
    return folders


def all_folders(layout: Layout) -> dict[str, Path]:
    folders = {f"{tissue_class}:{name}": path
               for tissue_class in CLASSES for name, path in class_folders(layout, tissue_class).items()}
    return folders | {
        "base_model": layout.base_model,
        "metrics_summary": layout.metrics_summary,
        "classifier_utility": layout.classifier_utility,
        "release": layout.release("v1"),
        "cache": layout.cache,
    }


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "data")


def test_a_folder_is_found_by_its_name_for_the_class_and_step_it_is_kept_per(layout):
    for name, path in class_folders(layout, "tumour").items():
        name, _, step = name.partition("/")
        if name == "imported_hypernetworks":
            name = "imported_hypernetworks_inbox"
        assert layout.folder(name, "tumour", int(step) if step else None) == path, name
    assert layout.folder("augmented_crops", "tumour", 100) == layout.augmented_crops("tumour"), "a step it is not kept per"
    assert layout.folder("metrics_summary") == layout.metrics_summary
    with pytest.raises(AttributeError):
        layout.folder("no_such_folder", "tumour")


def test_every_folder_is_inside_the_data_dir(layout):
    for name, path in all_folders(layout).items():
        assert path.is_relative_to(layout.data_dir) and path != layout.data_dir, name
    assert layout.raw_root.parent == layout.data_dir
    assert layout.metrics_details.is_relative_to(layout.data_dir)


def test_per_class_folders_are_named_asset_then_class(layout):
    """One folder per asset and class: the class is the last part, the asset the one before it."""
    for tissue_class in CLASSES:
        for name, path in class_folders(layout, tissue_class).items():
            if "/" in name:
                continue
            assert path == layout.data_dir / name / tissue_class


def test_stepped_folders_are_nested_under_class_then_step(layout):
    assert layout.synthetic_images("tumour", 1000) == layout.data_dir / "synthetic_images" / "tumour" / "1000"
    assert layout.checkpoint_metrics("stroma", 100) == layout.data_dir / "checkpoint_metrics" / "stroma" / "100"


def test_the_documented_top_level_folders(layout):
    data = layout.data_dir
    assert layout.raw_root == data / "raw"
    assert layout.base_model == data / BASE_MODEL_ASSET == data / "base_model"
    assert layout.metrics_summary == data / "metrics_summary"
    assert layout.metrics_details == layout.metrics_summary / "details"
    assert layout.classifier_utility == data / "classifier_utility"
    assert layout.release("thesis-2024") == data / "releases" / "thesis-2024"
    assert layout.cache == data / ".cache"


def test_raw_class_folders_are_inside_the_raw_root(layout):
    for tissue_class in CLASSES:
        assert layout.raw(tissue_class).parent == layout.raw_root


def test_no_two_assets_classes_or_steps_share_a_folder(layout):
    folders = all_folders(layout)
    assert len(set(folders.values())) == len(folders)


def test_no_asset_folder_lies_inside_another(layout):
    """So a DVC out, or a rebuilt folder, of one asset never holds or replaces another's files."""
    folders = all_folders(layout)
    for (name, path), (other_name, other) in itertools.permutations(folders.items(), 2):
        assert not path.is_relative_to(other), f"{name} is inside {other_name}"


def test_paths_depend_only_on_the_data_dir(tmp_path):
    """Two layouts of one data_dir agree (and are equal); another data_dir moves every folder with it."""
    first, again, other = Layout(tmp_path / "a"), Layout(tmp_path / "a"), Layout(tmp_path / "b")
    assert first == again and hash(first) == hash(again)
    assert all_folders(first) == all_folders(again)
    for name, path in all_folders(first).items():
        assert all_folders(other)[name] == other.data_dir / path.relative_to(first.data_dir)


def test_paths_are_computed_without_touching_the_disk(layout):
    all_folders(layout)
    assert not layout.data_dir.exists()


def test_a_layout_cannot_be_pointed_elsewhere_once_made(layout):
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.data_dir = Path("/elsewhere")


def test_file_names_are_distinct_and_say_their_format():
    assert len({INDEX, INVENTORY, HOLDOUT, PREVIEW, SUMMARY, LOSS_PLOT, IMAGES}) == 7
    assert {Path(name).suffix for name in (INDEX, INVENTORY, HOLDOUT)} == {".parquet"}
    assert {Path(name).suffix for name in (PREVIEW, LOSS_PLOT)} == {".png"}
    assert Path(SUMMARY).suffix == ".json" and Path(IMAGES).suffix == ""


def test_every_dvc_yaml_out_under_the_data_dir_is_a_layout_folder_or_inside_one():
    """dvc.yaml's outs are the asset folders (data_dir is `data` in params.yaml)."""
    layout = Layout(Path("data"))
    tops = {path.relative_to(layout.data_dir).parts[0] for path in all_folders(layout).values()}
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    outs = [Path(next(iter(out)) if isinstance(out, dict) else out)
            for stage in stages.values() for out in stage.get("outs", [])]
    data_outs = [out for out in outs if out.is_relative_to(layout.data_dir)]
    assert data_outs, "dvc.yaml has no outs under data/"
    for out in data_outs:
        assert out.relative_to(layout.data_dir).parts[0] in tops, out
