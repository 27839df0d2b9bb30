"""The held-out reference set is source-disjoint, or spatially separated with a guard band where it has to be."""

import re
from pathlib import Path

import pandas as pd
import pytest

from histo_assets.core.holdout import (
    GUARD,
    HELD_OUT,
    RULE_GROUP,
    RULE_NONE,
    RULE_SPATIAL,
    TRAIN,
    SplitSettings,
    _bands,
    read_groups,
    source_groups,
    split_holdout,
)
from histo_assets.core.layout import HOLDOUT, INDEX
from histo_assets.core.schemas import HELD_OUT_CROPS
from histo_assets_tests.conftest import SMALL, THESIS_CLASSES, tissue_image, write_params
from histo_assets_tests.test_assets_ingest import materialize

CLASS = THESIS_CLASSES[0]
SETTINGS = SplitSettings(holdout_fraction=0.2, group_fraction_tolerance=0.15, guard_tiles=1)


def grid(source: str, columns: int, rows: int, size: int = 64, stride: int = 32) -> list[dict]:
    return [{"crop_file": f"{Path(source).stem}_x{x * stride}_y{y * stride}.png", "crop_sha256": f"{source}{x}{y}",
             "source_path": source, "x": x * stride, "y": y * stride, "size": size}
            for y in range(rows) for x in range(columns)]


def index_of(*grids: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for rows in grids for row in rows])


def gap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    """Level-0 pixels between two (x, y, size) squares along the axis that separates them most; <= 0 when they touch."""
    (ax, ay, asize), (bx, by, bsize) = a, b
    return max(bx - (ax + asize), ax - (bx + bsize), by - (ay + asize), ay - (by + bsize))


def assert_guarded(held: pd.DataFrame, trained: pd.DataFrame, guard_tiles: int) -> None:
    """No held-out square overlaps, touches or comes within the guard band of a trained square of its source."""
    pairs = held.merge(trained, on="source_path", suffixes=("_h", "_t"))
    assert not pairs.empty, "nothing to compare: no held-out and trained crops from one source"
    for row in pairs.itertuples():
        a, b = (row.x_h, row.y_h, row.size_h), (row.x_t, row.y_t, row.size_t)
        assert gap(a, b) >= guard_tiles * max(row.size_h, row.size_t), (row.crop_file_h, row.crop_file_t)


def test_the_guard_check_catches_overlapping_touching_and_too_close_tiles():
    tile = index_of(grid("s", 1, 1))
    for offset in (32, 64, 96):
        with pytest.raises(AssertionError):
            assert_guarded(tile, tile.assign(x=offset), guard_tiles=1)
    assert_guarded(tile, tile.assign(x=128), guard_tiles=1)


def test_one_slide_is_split_into_a_band_a_guard_and_training_tiles():
    index = index_of(grid("raw/c/a.png", 11, 7))
    split = split_holdout(index, SETTINGS, seed=1, groups=source_groups(index["source_path"], None))
    assert split.rule == RULE_SPATIAL and "single group" in split.reason
    crops = split.crops
    assert_guarded(crops[crops["side"] == HELD_OUT], crops[crops["side"] == TRAIN], 1)
    assert abs(len(split.held_out) - 0.2 * len(index)) <= 7 and len(split.train) > len(split.held_out)
    assert len(split.held_out) + len(split.train) + len(split.guard) == len(index)
    assert re.fullmatch(r"[xy] (<|>=) \d+", split.by_source()[0]["region"])
    again = split_holdout(index, SETTINGS, seed=1, groups=source_groups(index["source_path"], None))
    assert again.crops.equals(split.crops)


@pytest.mark.parametrize("guard_tiles", [1, 2, 3])
def test_band_counts_match_the_tiles_each_band_assigns(guard_tiles):
    tiles = index_of(grid("s", 9, 6, size=64, stride=16))
    for band in _bands(tiles, guard_tiles):
        held, guard = band.sides(tiles, guard_tiles)
        assert (len(held), len(guard)) == (band.held, band.guard)
        train = tiles[~tiles["crop_file"].isin(held + guard)]
        assert len(train) and len(held)
        assert_guarded(tiles[tiles["crop_file"].isin(held)], train, guard_tiles)


def test_many_slides_are_held_out_whole_and_never_shared():
    index = index_of(*(grid(f"raw/c/s{i}.png", 3, 3) for i in range(10)))
    split = split_holdout(index, SETTINGS, seed=3, groups=source_groups(index["source_path"], None))
    assert split.rule == RULE_GROUP and split.guard == []
    held = set(split.crops.loc[split.crops["side"] == HELD_OUT, "group"])
    trained = set(split.crops.loc[split.crops["side"] == TRAIN, "group"])
    assert len(held) == 2 and not held & trained
    frame = split.holdout_frame()
    assert tuple(frame.columns) == HELD_OUT_CROPS.columns and set(frame["rule"]) == {RULE_GROUP}
    assert set(frame["region"]) == {"whole source"}
    other = split_holdout(index, SETTINGS, seed=4, groups=source_groups(index["source_path"], None))
    assert other.rule == RULE_GROUP


def test_two_slides_fall_back_to_one_band_rather_than_holding_out_half():
    index = index_of(grid("raw/c/a.png", 5, 5, stride=64), grid("raw/c/b.png", 5, 5, stride=64))
    split = split_holdout(index, SETTINGS, seed=5, groups=source_groups(index["source_path"], None))
    assert split.rule == RULE_SPATIAL and "50%" in split.reason
    rows = split.by_source()
    assert sorted(row[HELD_OUT] for row in rows) == [0, 10] and sorted(row[GUARD] for row in rows) == [0, 5]


def test_one_crop_per_source_is_split_by_source_even_beyond_the_tolerance():
    index = index_of(grid("raw/c/a.png", 1, 1), grid("raw/c/b.png", 1, 1))
    split = split_holdout(index, SETTINGS, seed=6, groups=source_groups(index["source_path"], None))
    assert split.rule == RULE_GROUP and len(split.held_out) == len(split.train) == 1 and "no source has room" in split.reason


def test_nothing_is_held_out_where_nothing_can_be_held_out_safely():
    adjacent = index_of(grid("raw/c/a.png", 2, 1, stride=64))
    split = split_holdout(adjacent, SETTINGS, seed=7, groups=source_groups(adjacent["source_path"], None))
    assert split.rule == RULE_NONE and split.held_out == [] and len(split.train) == 2
    assert split.holdout_frame().empty and tuple(split.holdout_frame().columns) == HELD_OUT_CROPS.columns
    none = SplitSettings(holdout_fraction=0.0, group_fraction_tolerance=0.15, guard_tiles=1)
    assert split_holdout(adjacent, none, seed=7, groups=source_groups(adjacent["source_path"], None)).rule == RULE_NONE


def test_lab_groups_keep_a_patients_slides_on_one_side(tmp_path):
    sources = [f"raw/c/s{i}.png" for i in range(6)]
    csv = tmp_path / "groups.csv"
    pd.DataFrame({"source_path": sources, "group": [f"patient{i // 2}" for i in range(6)]}).to_csv(csv, index=False)
    index = index_of(*(grid(source, 3, 3) for source in sources))
    groups = source_groups(index["source_path"], read_groups(csv))
    split = split_holdout(index, SETTINGS, seed=8, groups=groups)
    assert split.rule == RULE_GROUP
    held = set(split.crops.loc[split.crops["side"] == HELD_OUT, "group"])
    assert len(held) == 1 and not held & set(split.crops.loc[split.crops["side"] == TRAIN, "group"])
    with pytest.raises(ValueError, match="no group for 1 source"):
        source_groups([*sources, "raw/c/new.png"], read_groups(csv))


@pytest.mark.parametrize(("text", "message"), [
    ("source_path,patient\na.png,p1\n", "missing group"),
    ("source_path,group\na.png,\n", "empty"),
    ("source_path,group\na.png,p1\na.png,p2\n", "more than one group"),
])
def test_bad_group_files_are_refused(tmp_path, text, message):
    (tmp_path / "g.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_groups(tmp_path / "g.csv")


def test_guard_band_of_less_than_a_tile_is_refused():
    with pytest.raises(ValueError, match="guard_tiles must be at least 1"):
        SplitSettings(holdout_fraction=0.2, group_fraction_tolerance=0.15, guard_tiles=0)


# --- real materialisations: what went into augmentation (and so training) against what was held out ------


OVERLAPPING_TILES = SMALL | {"crops": {"mode": "tiles", "tiles": {"tile_size": 64, "stride": 32, "min_tissue_fraction": 0.5}}}


def dataset(tmp_path: Path, slides: int, **split) -> Path:
    data = tmp_path / "data"
    folder = data / "raw" / CLASS
    folder.mkdir(parents=True)
    for index in range(slides):
        tissue_image((384, 256), seed=index, tissue=0.9).save(folder / f"slide{index}.png")
    return write_params(tmp_path, data, **OVERLAPPING_TILES, split={"holdout_fraction": 0.2} | split)


def materialised_split(params: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(held-out crops, crops that went into augmentation, every square crop, augmented_crops metadata)."""
    result = materialize(params, CLASS)
    assert result.success
    data = params.parent / "data"
    crops = pd.read_parquet(data / "square_crops" / CLASS / INDEX)
    holdout = pd.read_parquet(data / "augmented_crops" / CLASS / HOLDOUT)
    augmented = pd.read_parquet(data / "augmented_crops" / CLASS / INDEX)
    trained = crops[crops["crop_file"].isin(set(augmented["source_crop"]))]
    metadata = {key: value.value for key, value in result.asset_materializations_for_node("augmented_crops")[0].metadata.items()}
    return holdout, trained, crops, metadata


def test_materialised_spatial_split_keeps_held_out_pixels_out_of_training(tmp_path):
    holdout, trained, crops, metadata = materialised_split(dataset(tmp_path, slides=1))
    assert (crops["size"] > 32).all() and crops["x"].diff().abs().min() == 32, "tiles overlap: stride < tile size"
    assert metadata["holdout_rule"] == RULE_SPATIAL and set(holdout["rule"]) == {RULE_SPATIAL}
    assert tuple(holdout.columns) == HELD_OUT_CROPS.columns
    assert len(holdout) >= 2 and len(trained) > len(holdout)
    assert metadata["held_out_crops"] == len(holdout) and metadata["guard_crops"] > 0
    assert not set(holdout["crop_file"]) & set(trained["crop_file"])
    held = holdout[["crop_file"]].merge(crops, on="crop_file")
    assert held[["x", "y", "size"]].equals(holdout[["x", "y", "size"]])
    assert_guarded(held, trained, guard_tiles=1)
    assert len(holdout) + len(trained) + metadata["guard_crops"] == len(crops)


def test_materialised_group_split_never_shares_a_group(tmp_path):
    holdout, trained, _, metadata = materialised_split(dataset(tmp_path, slides=5))
    assert metadata["holdout_rule"] == RULE_GROUP and set(holdout["rule"]) == {RULE_GROUP}
    assert holdout["source_path"].nunique() == 1 and not set(holdout["source_path"]) & set(trained["source_path"])
    assert metadata["guard_crops"] == 0


def test_materialised_lab_groups_never_share_a_patient(tmp_path):
    sources = [f"raw/{CLASS}/slide{i}.png" for i in range(6)]
    params = dataset(tmp_path, slides=6, groups_csv="patients.csv")
    patients = {source: f"patient{i // 2}" for i, source in enumerate(sources)}
    pd.DataFrame({"source_path": sources, "group": [patients[s] for s in sources]}).to_csv(tmp_path / "patients.csv", index=False)
    holdout, trained, _, metadata = materialised_split(params)
    assert metadata["holdout_rule"] == RULE_GROUP
    assert set(holdout["group"]) == {patients[s] for s in holdout["source_path"]}
    assert holdout["group"].nunique() == 1 and not set(holdout["group"]) & set(trained["source_path"].map(patients))
    assert set(holdout["source_path"]) == {s for s in sources if patients[s] in set(holdout["group"])}


def test_the_summary_records_the_split_as_it_was_made():
    index = index_of(grid("a.tif", 4, 1), grid("b.tif", 4, 1), grid("c.tif", 4, 1))
    split = split_holdout(index, SplitSettings(0.3, 0.1, 1), seed=1, groups=source_groups(index["source_path"], None))
    summary = split.summary()
    assert summary == {
        "train_crops": 8, "held_out_crops": 4, "holdout_rule": RULE_GROUP, "holdout_reason": split.reason,
        "guard_crops": [], "holdout_by_source": split.by_source(),
    }
    assert sorted(row[HELD_OUT] for row in summary["holdout_by_source"]) == [0, 0, 4]
