"""The held-out reference set: whole source groups, or spatially separate regions of a slide.

Crops of one slide (or one patient) share its stain, scanner and tissue.
Holding out crops of slides that training also saw would make the reference
set look like the training set, the classic leakage of pathology ML, and in
tiles mode with a stride below the tile size a held-out tile can even hold
training pixels. So the reference is chosen by source group, never by crop.

Whole groups are held out where some of them add up to about the wanted
fraction of the crops. Where they do not (the demo has one slide per class;
two slides would hold out half the crops), held-out tiles come from a band at
the edge of a slide instead, and the tiles within a guard band of whole tiles
from it are dropped from training, so no held-out tile overlaps or touches a
training tile. A class with no room for either holds nothing out and says so.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histo_assets.core.schemas import HELD_OUT_CROPS
from histo_assets.core.seeding import derive_seed

RULE_GROUP = "group"
RULE_SPATIAL = "spatial"
RULE_NONE = "none"
TRAIN, HELD_OUT, GUARD = "train", "held_out", "guard"
WHOLE_SOURCE = "whole source"
# The lab's optional grouping (split.groups_csv): each source file, by its path in the crop index, and its group.
GROUPS_COLUMNS = ("source_path", "group")
# HoldoutSplit.by_source(): one row per source, shown in the asset metadata.
BY_SOURCE_COLUMNS = ("source_path", "group", TRAIN, HELD_OUT, GUARD, "region")
# What the split reads of square_crops' index.parquet.
INDEX_COLUMNS = ("crop_file", "crop_sha256", "source_path", "x", "y", "size")


@dataclass(frozen=True)
class SplitSettings:
    holdout_fraction: float
    group_fraction_tolerance: float
    guard_tiles: int

    def __post_init__(self) -> None:
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"split.holdout_fraction must be at least 0 and below 1, not {self.holdout_fraction}")
        if self.group_fraction_tolerance < 0:
            raise ValueError(f"split.group_fraction_tolerance must not be negative, not {self.group_fraction_tolerance}")
        if self.guard_tiles < 1:
            raise ValueError(f"split.guard_tiles must be at least 1, so held-out tiles never touch training tiles, "
                             f"not {self.guard_tiles}")


@dataclass(frozen=True)
class HoldoutSplit:
    """Which crops train, which are held out and which the guard band drops, and why."""

    rule: str
    reason: str
    # Every crop of the class: INDEX_COLUMNS plus group, side (train, held_out or guard) and region.
    crops: pd.DataFrame

    def names(self, side: str) -> list[str]:
        return sorted(self.crops.loc[self.crops["side"] == side, "crop_file"])

    @property
    def train(self) -> list[str]:
        return self.names(TRAIN)

    @property
    def held_out(self) -> list[str]:
        return self.names(HELD_OUT)

    @property
    def guard(self) -> list[str]:
        return self.names(GUARD)

    def holdout_frame(self) -> pd.DataFrame:
        held = self.crops[self.crops["side"] == HELD_OUT].assign(rule=self.rule)
        return held[list(HELD_OUT_CROPS.columns)].sort_values("crop_file").reset_index(drop=True)

    def summary(self) -> dict:
        """The split as the stage's summary records it, so that a reused folder still says how it was split."""
        return {
            "train_crops": len(self.train),
            "held_out_crops": len(self.held_out),
            "holdout_rule": self.rule,
            "holdout_reason": self.reason,
            "guard_crops": self.guard,
            "holdout_by_source": self.by_source(),
        }

    def by_source(self) -> list[dict]:
        """Per source: its group, how many of its crops went to each side, and its held-out region."""
        rows = []
        for source, crops in self.crops.groupby("source_path", sort=True):
            sides = crops["side"].value_counts()
            regions = sorted(set(crops.loc[crops["side"] == HELD_OUT, "region"]))
            rows.append({"source_path": source, "group": crops["group"].iloc[0], TRAIN: int(sides.get(TRAIN, 0)),
                         HELD_OUT: int(sides.get(HELD_OUT, 0)), GUARD: int(sides.get(GUARD, 0)),
                         "region": ", ".join(regions)})
        return rows


def read_groups(path: Path) -> dict[str, str]:
    """The lab's source -> group mapping (a patient, a block, a scanner run) from a CSV with GROUPS_COLUMNS."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in GROUPS_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: needs the columns {', '.join(GROUPS_COLUMNS)}; missing {', '.join(missing)}")
    frame = frame[list(GROUPS_COLUMNS)].apply(lambda column: column.str.strip())
    empty = frame.loc[(frame["source_path"] == "") | (frame["group"] == ""), "source_path"].tolist()
    if empty:
        raise ValueError(f"{path}: {len(empty)} row(s) with an empty source_path or group")
    conflicting = sorted(frame.drop_duplicates().loc[lambda f: f["source_path"].duplicated(), "source_path"])
    if conflicting:
        raise ValueError(f"{path}: source(s) given more than one group: {', '.join(conflicting)}")
    return dict(zip(frame["source_path"], frame["group"]))


def source_groups(sources: Iterable[str], mapping: Mapping[str, str] | None) -> dict[str, str]:
    """Each source's group: its own path without a lab mapping; with one, every source must be in it."""
    sources = sorted(set(sources))
    if mapping is None:
        return {source: source for source in sources}
    unmapped = [source for source in sources if source not in mapping]
    if unmapped:
        raise ValueError(f"split.groups_csv gives no group for {len(unmapped)} source(s): {', '.join(unmapped)}")
    return {source: mapping[source] for source in sources}


def split_holdout(index: pd.DataFrame, settings: SplitSettings, seed: int, groups: Mapping[str, str]) -> HoldoutSplit:
    """The seeded, source-disjoint split of one class's crops (square_crops' index) into training and reference.

    Whole groups are held out when their share of the crops lies within
    ``group_fraction_tolerance`` of ``holdout_fraction``; otherwise bands at
    slide edges are; otherwise whole groups after all, if there are two or
    more (centre crops: one crop per source leaves no room for a band).
    """
    crops = index[list(INDEX_COLUMNS)].sort_values("crop_file").reset_index(drop=True)
    crops["group"] = crops["source_path"].map(groups)
    unmapped = sorted(set(crops.loc[crops["group"].isna(), "source_path"]))
    if unmapped:
        raise ValueError(f"no group for the source(s) {', '.join(unmapped)}")
    target = _target(len(crops), settings.holdout_fraction)
    if target == 0:
        why = "split.holdout_fraction is 0" if settings.holdout_fraction == 0 else "the class has fewer than 2 crops"
        return _split(crops, RULE_NONE, f"nothing held out: {why}", {}, set())
    sizes = crops.groupby("group").size().to_dict()
    held_groups = _choose_groups(sizes, target, derive_seed(seed, "groups"))
    share = sum(sizes[group] for group in held_groups) / len(crops)
    group_reason = (f"{len(held_groups)} of {len(sizes)} groups held out whole: {share:.0%} of the crops, "
                    f"for a wanted {settings.holdout_fraction:.0%}")
    if held_groups and abs(share - settings.holdout_fraction) <= settings.group_fraction_tolerance:
        return _group_split(crops, held_groups, group_reason)
    why_not_groups = ("the class has a single group" if not held_groups else
                      f"whole groups would hold out {share:.0%} of the crops, more than "
                      f"{settings.group_fraction_tolerance:.0%} from the wanted {settings.holdout_fraction:.0%}")
    bands = _choose_bands(crops, target, settings.guard_tiles, derive_seed(seed, "spatial"))
    if bands:
        held: dict[str, str] = {}
        guard: set[str] = set()
        for source, band in bands.items():
            band_held, band_guard = band.sides(crops[crops["source_path"] == source], settings.guard_tiles)
            held.update(dict.fromkeys(band_held, band.region))
            guard.update(band_guard)
        reason = (f"{why_not_groups}; held-out bands at the edge of {len(bands)} source(s), with a guard band of "
                  f"{settings.guard_tiles} tile(s) that drops {len(guard)} crop(s) from training")
        return _split(crops, RULE_SPATIAL, reason, held, guard)
    no_room = "no source has room for a held-out band, a guard band and training tiles"
    if held_groups:
        return _group_split(crops, held_groups, f"{group_reason}; {no_room}")
    return _split(crops, RULE_NONE, f"nothing held out: {why_not_groups} and {no_room}", {}, set())


def _target(count: int, fraction: float) -> int:
    """Crops to hold out: the fraction, rounded, but at least one and never all when there are two."""
    if fraction == 0 or count < 2:
        return 0
    return min(max(round(count * fraction), 1), count - 1)


def _choose_groups(sizes: Mapping[str, int], target: int, seed: int) -> list[str]:
    """Groups in seeded order, each taken if it brings the held-out count closer to the target.

    Random order rather than size order, so that which groups are held out
    does not depend on how many crops they have. At least one group stays in
    training; with fewer than two groups, none is held out.
    """
    if len(sizes) < 2:
        return []
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    total = sum(sizes.values())
    held: list[str] = []
    count = 0
    for group in order:
        if count + sizes[group] < total and abs(count + sizes[group] - target) < abs(count - target):
            held.append(group)
            count += sizes[group]
    if not held:
        held = [min(order, key=lambda group: abs(sizes[group] - target))]
    return sorted(held)


@dataclass(frozen=True)
class _Band:
    """Held-out tiles on one side of an edge of a source, training tiles a guard band beyond it."""

    axis: str
    edge: int
    low: bool
    held: int
    guard: int

    @property
    def region(self) -> str:
        return f"{self.axis} {'<' if self.low else '>='} {self.edge}"

    def sides(self, tiles: pd.DataFrame, guard_tiles: int) -> tuple[list[str], list[str]]:
        """(held-out crops, guard crops) of this source's tiles."""
        start, end, gap = _extent(tiles, self.axis, guard_tiles)
        if self.low:
            held, train = end <= self.edge, start >= self.edge + gap
        else:
            held, train = start >= self.edge, end <= self.edge - gap
        names = tiles["crop_file"].to_numpy()
        return list(names[held]), list(names[~held & ~train])


def _extent(tiles: pd.DataFrame, axis: str, guard_tiles: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Level-0 starts and ends of the tiles along an axis, and the guard band's width in level-0 pixels."""
    start = tiles[axis].to_numpy(dtype=np.int64)
    end = start + tiles["size"].to_numpy(dtype=np.int64)
    return start, end, guard_tiles * int(tiles["size"].max())


def _bands(tiles: pd.DataFrame, guard_tiles: int) -> list[_Band]:
    """Every band at an edge of a source that leaves at least one held-out and one training tile.

    Counted with sorted coordinates, not by listing tiles, so a slide of
    tens of thousands of tiles costs milliseconds.
    """
    bands = []
    count = len(tiles)
    for axis in ("x", "y"):
        start, end, gap = _extent(tiles, axis, guard_tiles)
        starts, ends = np.sort(start), np.sort(end)
        for edge in np.unique(end):
            held = int(np.searchsorted(ends, edge, side="right"))
            train = count - int(np.searchsorted(starts, edge + gap, side="left"))
            if held and train:
                bands.append(_Band(axis, int(edge), True, held, count - held - train))
        for edge in np.unique(start):
            held = count - int(np.searchsorted(starts, edge, side="left"))
            train = int(np.searchsorted(ends, edge - gap, side="right"))
            if held and train:
                bands.append(_Band(axis, int(edge), False, held, count - held - train))
    return bands


def _choose_bands(crops: pd.DataFrame, target: int, guard_tiles: int, seed: int) -> dict[str, _Band]:
    """At most one band per source, sources in seeded order, until the held-out count is near the target.

    A source gets a band only if that brings the count closer to the target,
    so one slide can give the whole reference set while the others keep all
    their tiles for training; among equally close bands, the one dropping
    fewest tiles wins, then the seeded order. If no source gets one that
    way, the band closest to the target anywhere is taken.
    """
    sources = sorted(crops["source_path"].unique())
    random.Random(seed).shuffle(sources)
    options = {}
    for source in sources:
        bands = _bands(crops[crops["source_path"] == source], guard_tiles)
        random.Random(derive_seed(seed, source)).shuffle(bands)
        options[source] = bands
    chosen: dict[str, _Band] = {}
    remaining = target
    for source in sources:
        if remaining <= 0:
            break
        best = min(options[source], key=lambda band: (abs(band.held - remaining), band.guard), default=None)
        if best is not None and abs(best.held - remaining) < remaining:
            chosen[source] = best
            remaining -= best.held
    if not chosen:
        candidates = [(source, band) for source in sources for band in options[source]]
        if candidates:
            source, band = min(candidates, key=lambda item: (abs(item[1].held - target), item[1].guard))
            chosen[source] = band
    return chosen


def _group_split(crops: pd.DataFrame, held_groups: list[str], reason: str) -> HoldoutSplit:
    held = crops.loc[crops["group"].isin(held_groups), "crop_file"]
    return _split(crops, RULE_GROUP, reason, dict.fromkeys(held, WHOLE_SOURCE), set())


def _split(crops: pd.DataFrame, rule: str, reason: str, held: Mapping[str, str], guard: set[str]) -> HoldoutSplit:
    names = crops["crop_file"]
    side = np.where(names.isin(list(held)), HELD_OUT, np.where(names.isin(list(guard)), GUARD, TRAIN))
    return HoldoutSplit(rule, reason, crops.assign(side=side, region=names.map(dict(held)).fillna("")))
