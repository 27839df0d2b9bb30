"""Trace a synthetic image back to the slides, code, parameters and checkpoint that made it.

An auditor holds an image (or only its sha256) and needs the whole chain
without a running Dagster: a release folder alone is enough (its manifest and
lineage table exist for this), the data folder alone is enough, and with both
the report says the same thing. Every link is followed by content hash, never
by file name, and every link that can be re-checked against files at hand is
re-checked, so the report separates what was verified from what is recorded.

No dagster import: this runs in a plain clone of a release tag.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from histo_assets.core.a1111_text import (
    LEGACY_HYPERNET_KEYS,
    PARAMETERS_KEY,
    RNG_SOURCE,
    SAMPLER_NAMES,
    hypernetwork_token,
    parse_a1111_parameters,
    short_hash,
)
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import sha256_file, stable_hash
from histo_assets.core.release import CARD, LINEAGE, MANIFEST, read_manifest
from histo_assets.core.schemas import (
    AUGMENTED_INDEX,
    CROP_INDEX,
    GENERATION_INDEX,
    HELD_OUT_CROPS,
    RELEASE_LINEAGE,
    SLIDE_INVENTORY,
    BaseModelSummary,
    HypernetworkCheckpointsSummary,
    SyntheticImagesSummary,
)
from histo_assets.core.stage import read_summary
from histo_assets.core.training_files import settings_path
from histo_assets.core.layout import BASE_MODEL_ASSET, HOLDOUT, IMAGES, INDEX, INVENTORY, Layout

MIN_PREFIX = 8
_SHA_QUERY = re.compile(rf"[0-9a-fA-F]{{{MIN_PREFIX},64}}")
# The dataset card states the tag it was published under; the tag is not stored anywhere else in the folder.
_CARD_TAG = re.compile(r"^- Release tag: `([^`]+)`", re.MULTILINE)

# Report field -> (column of the data folder's generation index, column of a release manifest).
GENERATION_FIELDS = {
    "prompt": ("prompt", "prompt"),
    "negative_prompt": ("negative_prompt", "negative_prompt"),
    "seed": ("seed", "seed"),
    "sampler": ("sampler", "sampler"),
    "steps": ("steps", "steps"),
    "cfg_scale": ("cfg_scale", "cfg_scale"),
    "width": ("width", "width"),
    "height": ("height", "height"),
    "multiplier": ("multiplier", "hypernetwork_multiplier"),
}
CHECKPOINT_FIELDS = {
    "file": ("hypernetwork_file", "checkpoint_file"),
    "sha256": ("hypernetwork_sha256", "checkpoint_sha256"),
    "hypernetwork_name": ("hypernetwork_name", "hypernetwork_name"),
    "base_model_sha256": ("base_model_sha256", "base_model_sha256"),
    "base_model_short_hash": ("base_model_short_hash", "base_model_short_hash"),
}
# Generation-index columns the manifest does not carry, worth showing when the data folder has them.
INDEX_ONLY_FIELDS = ("index", "batch_size", "base_model_name")
# Training-run facts in the checkpoint folder's summary.json that the settings file lacks.
RUN_SUMMARY_FIELDS = ("final_loss", "device", "steps_per_second", "resumed_from")
INVENTORY_FIELDS = ("bytes", "width", "height", "levels", "mpp", "reader")


class LineageNotFound(HistoAssetsError, LookupError):
    """No release or data folder searched records the image."""


class AmbiguousImage(HistoAssetsError, LookupError):
    """A sha256 prefix matches more than one recorded image."""


@dataclass(frozen=True)
class Check:
    """One link re-verified against files at hand; ``passed`` None means it could not be checked here."""

    name: str
    passed: bool | None
    detail: str


@dataclass(frozen=True)
class ReleaseHit:
    name: str
    folder: str
    tag: str | None
    image: str


@dataclass(frozen=True)
class LineageReport:
    """The chain of one image; ``render()`` for people, ``to_dict()`` for tools."""

    query: str
    sha256: str
    tissue_class: str
    checkpoint_step: int
    file: str
    locations: tuple[str, ...]
    releases: tuple[ReleaseHit, ...]
    generation: dict[str, Any]
    png_parameters: dict[str, str] | None
    checkpoint: dict[str, Any]
    base_model: dict[str, Any]
    training: dict[str, Any]
    training_images: dict[str, Any]
    square_crops: tuple[dict[str, Any], ...]
    raw_slides: tuple[dict[str, Any], ...]
    code: dict[str, Any]
    checks: tuple[Check, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return "\n".join(_render(self)) + "\n"

    __str__ = render


def release_folders(data_dir: Path) -> list[Path]:
    """The built releases under ``<data_dir>/releases/``; a folder still to be ``dvc pull``-ed has no manifest yet."""
    return sorted(path.parent for path in Path(data_dir).glob(f"releases/*/{MANIFEST}"))


def trace_image(query: str, *, data_dir: Path | None, release_dirs: Sequence[Path]) -> LineageReport:
    """The lineage of the image at path ``query``, or with sha256 (or unique prefix of >= 8 hex digits) ``query``.

    Searches the manifests of ``release_dirs`` and the generation indexes
    under ``data_dir`` (either may be missing). Raises :class:`LineageNotFound`
    when none records the image and :class:`AmbiguousImage` when a prefix
    matches several.
    """
    query_file, prefix = _parse_query(query)
    releases = [(Path(folder), _records(read_manifest(folder))) for folder in release_dirs]
    layout = Layout(Path(data_dir)) if data_dir is not None and Path(data_dir).is_dir() else None
    generated = _generated_images(layout) if layout is not None else []

    release_hits = [(folder, row) for folder, rows in releases for row in rows if row["sha256"].startswith(prefix)]
    data_hits = [(folder, row) for folder, row in generated if row["sha256"].startswith(prefix)]
    found = sorted({row["sha256"] for _, row in release_hits + data_hits})
    if not found:
        raise LineageNotFound(_not_found(query, query_file, prefix, releases, generated, layout))
    if len(found) > 1:
        raise AmbiguousImage(f"{query!r} matches {len(found)} images: {', '.join(found)}; give more digits")
    return _Tracer(query, query_file, found[0], release_hits, data_hits, layout).report()


def _parse_query(query: str) -> tuple[Path | None, str]:
    path = Path(query)
    if path.is_file():
        return path.resolve(), sha256_file(path)
    if _SHA_QUERY.fullmatch(query):
        return None, query.lower()
    raise LineageNotFound(f"{query!r} is neither an image file nor a sha256 ({MIN_PREFIX} to 64 hex digits)")


def _plain(value: Any) -> Any:
    """Parquet cells as JSON-ready Python values (pandas NA -> None, numpy scalars -> int/float/bool)."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{key: _plain(value) for key, value in row.items()} for row in frame.to_dict("records")]


def _generated_images(layout: Layout) -> list[tuple[Path, dict[str, Any]]]:
    return [
        (index.parent, row)
        for index in sorted(layout.data_dir.glob(f"synthetic_images/*/*/{INDEX}"))
        for row in _records(GENERATION_INDEX.read(index))
    ]


def _not_found(query: str, query_file: Path | None, prefix: str, releases: list[tuple[Path, list[dict]]],
               generated: list[tuple[Path, dict]], layout: Layout | None) -> str:
    searched = [f"release {folder}" for folder, _ in releases]
    if layout is not None:
        searched.append(f"{layout.data_dir / 'synthetic_images'} ({len(generated)} images)")
    where = "; ".join(searched) or "nowhere (no release folder and no data folder given)"
    what = f"sha256 {prefix}" if len(prefix) == 64 else f"a sha256 starting with {prefix}"
    message = f"no synthetic image with {what} is recorded in: {where}"
    if query_file is not None:
        same_name = sorted(
            {row["sha256"] for _, rows in releases for row in rows if Path(row["path"]).name == query_file.name}
            | {row["sha256"] for _, row in generated if row["file"] == query_file.name}
        )
        if same_name:
            message += (f". An image named {query_file.name} was recorded with sha256 {', '.join(same_name)}: "
                        f"{query} is a modified or re-encoded copy")
    return message


def _release_tag(folder: Path) -> str | None:
    card = folder / CARD
    match = _CARD_TAG.search(card.read_text()) if card.is_file() else None
    return match.group(1) if match else None


def _pick(fields: Mapping[str, tuple[str, str]], index_row: dict | None, manifest_row: dict | None) -> dict[str, Any]:
    """Each field from the data folder's index where there is one, else from the manifest."""
    picked = {}
    for name, (index_key, manifest_key) in fields.items():
        if index_row is not None and index_key in index_row:
            picked[name] = index_row[index_key]
        elif manifest_row is not None:
            picked[name] = manifest_row.get(manifest_key)
    return picked


def _disagreements(fields: Mapping[str, tuple[str, str]], index_row: dict, manifest_row: dict) -> list[str]:
    return [
        f"{name}: index {index_row[index_key]!r}, manifest {manifest_row[manifest_key]!r}"
        for name, (index_key, manifest_key) in fields.items()
        if index_key in index_row and manifest_key in manifest_row and index_row[index_key] != manifest_row[manifest_key]
    ]


def training_lineage(layout: Layout, tissue_class: str) -> pd.DataFrame | None:
    """A class's training images back to square crops and raw slide files: a release's lineage table.

    None when the data folder does not hold both indexes.
    """
    augmented_index = layout.augmented_crops(tissue_class) / INDEX
    crops_index = layout.square_crops(tissue_class) / INDEX
    if not (augmented_index.is_file() and crops_index.is_file()):
        return None
    augmented = AUGMENTED_INDEX.read(augmented_index)
    crops = CROP_INDEX.read(crops_index)
    merged = augmented.merge(crops, left_on="source_crop", right_on="crop_file", how="left")
    return RELEASE_LINEAGE.check(pd.DataFrame({
        "tissue_class": tissue_class,
        "training_image": merged["file"],
        "training_image_sha256": merged["sha256"],
        "kind": merged["kind"],
        "operations": merged["operations"],
        "augmentation_seed": merged["seed"].astype("Int64"),
        "square_crop": merged["source_crop"],
        "square_crop_sha256": merged["source_crop_sha256"],
        "raw_slide": merged["source_path"],
        "raw_slide_sha256": merged["source_sha256"],
        "level": merged["level"],
        "x": merged["x"],
        "y": merged["y"],
        "size": merged["size"],
    }))


def _training_set_hash(lineage: pd.DataFrame) -> str:
    """What augmented_crops records as its data_version, so the table can be matched to a checkpoint's training set."""
    return stable_hash(sorted(zip(lineage["training_image"], lineage["training_image_sha256"])))


def _png_parameters(path: Path) -> dict[str, str] | None:
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(PARAMETERS_KEY)
    return parse_a1111_parameters(text) if text else None


def _same(recorded: Any, written: str) -> bool:
    if isinstance(recorded, numbers.Real) and not isinstance(recorded, bool):
        try:
            return float(written) == float(recorded)
        except ValueError:
            return False
    return written == str(recorded)


def png_text_disagreements(parsed: dict[str, str], generation: dict, checkpoint: dict) -> list[str]:
    """Where an image's ``parameters`` text contradicts its record, in the current format and the legacy one.

    The WebUI names a hypernetwork by its file stem in the prompt's
    ``<hypernet:...>`` token. Images written before the current format also
    carry the legacy ``Hypernet`` keys; they are checked where present, so
    those images still trace.
    """
    hypernet = Path(checkpoint["file"]).stem if checkpoint.get("file") else None
    multiplier = generation.get("multiplier")
    prompt = generation.get("prompt")
    if hypernet and prompt is not None and multiplier is not None:
        prompt = f"{prompt} {hypernetwork_token(hypernet, multiplier)}"
    expected = {
        "Prompt": prompt,
        "Negative prompt": generation.get("negative_prompt"),
        "Steps": generation.get("steps"),
        "Sampler": SAMPLER_NAMES.get(generation.get("sampler"), generation.get("sampler")),
        "CFG scale": generation.get("cfg_scale"),
        "Seed": generation.get("seed"),
        "Size": f"{generation.get('width')}x{generation.get('height')}",
        "Model hash": checkpoint.get("base_model_short_hash"),
    }
    if "RNG" in parsed:
        expected["RNG"] = RNG_SOURCE
    if LEGACY_HYPERNET_KEYS[0] in parsed:
        expected.update(zip(LEGACY_HYPERNET_KEYS, (
            hypernet,
            short_hash(checkpoint["sha256"]) if checkpoint.get("sha256") else None,
            multiplier if hypernet else None,
        )))
    return [f"{key}: png {parsed.get(key)!r}, record {value!r}" for key, value in expected.items()
            if value is not None and not _same(value, parsed.get(key, ""))]


class _Tracer:
    """Assembles one report from the rows recording one image, so each section can draw on releases, data folder or both."""

    def __init__(self, query: str, query_file: Path | None, sha256: str,
                 release_hits: list[tuple[Path, dict]], data_hits: list[tuple[Path, dict]], layout: Layout | None):
        self.query = query
        self.query_file = query_file
        self.sha256 = sha256
        self.release_hits = release_hits
        self.data_hits = data_hits
        self.layout = layout
        self.manifest_row = self.release_hits[0][1] if self.release_hits else None
        self.index_row = self.data_hits[0][1] if self.data_hits else None
        first = self.index_row or self.manifest_row
        self.tissue_class = str(first["tissue_class"])
        self.step = int(first["checkpoint_step"])
        self.checks: list[Check] = []

    def report(self) -> LineageReport:
        intact = self._intact_copies()
        generation = _pick(GENERATION_FIELDS, self.index_row, self.manifest_row)
        if self.index_row is not None:
            generation.update({key: self.index_row[key] for key in INDEX_ONLY_FIELDS if key in self.index_row})
        checkpoint = self._checkpoint()
        if self.index_row is not None and self.manifest_row is not None:
            differ = _disagreements(GENERATION_FIELDS | CHECKPOINT_FIELDS, self.index_row, self.manifest_row)
            self.checks.append(Check("release manifest = data folder index", not differ,
                                     "; ".join(differ) or "generation and checkpoint fields agree"))
        png = self._png(intact, generation, checkpoint)
        base_model = self._base_model(checkpoint, generation, png)
        training = self._training(checkpoint)
        lineage, training_images = self._training_images(training["training_set_hash"])
        square_crops, raw_slides = self._crops_and_slides(lineage)
        file = Path(self.manifest_row["path"]).name if self.manifest_row else self.index_row["file"]
        return LineageReport(
            query=self.query,
            sha256=self.sha256,
            tissue_class=self.tissue_class,
            checkpoint_step=self.step,
            file=file,
            locations=tuple(str(path) for path in intact),
            releases=tuple(
                ReleaseHit(folder.name, str(folder), _release_tag(folder), row["path"]) for folder, row in self.release_hits
            ),
            generation=generation,
            png_parameters=png,
            checkpoint=checkpoint,
            base_model=base_model,
            training=training,
            training_images=training_images,
            square_crops=square_crops,
            raw_slides=raw_slides,
            code=self._code(),
            checks=tuple(self.checks),
        )

    def _intact_copies(self) -> list[Path]:
        """The recorded copies on disk that still have the recorded sha256: a copy can be edited in place."""
        recorded = [folder / row["path"] for folder, row in self.release_hits]
        recorded += [folder / IMAGES / row["file"] for folder, row in self.data_hits]
        copies = [self.query_file] if self.query_file is not None else []
        intact = list(copies)
        for path in recorded:
            path = path.resolve()
            if path in copies:
                continue
            copies.append(path)
            if not path.is_file():
                self.checks.append(Check(f"copy {path}", None, "recorded but not on disk"))
                continue
            digest = sha256_file(path)
            if digest == self.sha256:
                intact.append(path)
            self.checks.append(Check(f"copy {path}", digest == self.sha256,
                                     "sha256 matches" if digest == self.sha256 else f"sha256 is {digest}"))
        return intact

    def _checkpoint(self) -> dict[str, Any]:
        """The checkpoint, re-hashed where the data folder keeps it.

        A different file there is a failure only if the data folder itself
        records the image; otherwise the release is simply older than the
        folder's current training run.
        """
        checkpoint = _pick(CHECKPOINT_FIELDS, self.index_row, self.manifest_row)
        checkpoint["step"] = self.step
        checkpoint["path"] = None
        checkpoint["on_disk_sha256_matches"] = None
        if self.layout is not None and checkpoint.get("file"):
            path = self.layout.hypernetwork_checkpoints(self.tissue_class) / checkpoint["file"]
            if path.is_file():
                matches = sha256_file(path) == checkpoint["sha256"]
                checkpoint["path"] = str(path)
                checkpoint["on_disk_sha256_matches"] = matches
                if matches:
                    self.checks.append(Check("checkpoint file on disk", True, f"{path} has the recorded sha256"))
                elif self.data_hits:
                    self.checks.append(Check("checkpoint file on disk", False, f"{path} no longer has the recorded sha256"))
                else:
                    self.checks.append(Check("checkpoint file on disk", None,
                                             f"{path} is another checkpoint: the data folder was retrained since this release"))
                return checkpoint
        self.checks.append(Check("checkpoint file on disk", None, "no data folder holds it here"))
        return checkpoint

    def _png(self, intact: list[Path], generation: dict, checkpoint: dict) -> dict[str, str] | None:
        """The PNG's own ``parameters`` chunk, compared with the record: the file must say what the index says."""
        if not intact:
            self.checks.append(Check("PNG parameters chunk", None, "no intact copy of the image at hand"))
            return None
        at_hand = intact[0]
        parsed = _png_parameters(at_hand)
        if parsed is None:
            self.checks.append(Check("PNG parameters chunk", False, f"{at_hand} has no {PARAMETERS_KEY!r} text chunk"))
            return None
        differ = png_text_disagreements(parsed, generation, checkpoint)
        self.checks.append(Check("PNG parameters chunk", not differ,
                                 "; ".join(differ) or f"{at_hand.name} says what the record says"))
        return parsed

    def _base_model(self, checkpoint: dict, generation: dict, png: dict[str, str] | None) -> dict[str, Any]:
        """The base_model asset behind the image: what it was, and for a model trained here, what it was trained on."""
        base = {"asset": BASE_MODEL_ASSET, "name": generation.get("base_model_name") or (png or {}).get("Model"),
                "sha256": checkpoint.get("base_model_sha256"), "source": None, "path": None, "training_set": None}
        summary = read_summary(self.layout.base_model, BaseModelSummary) if self.layout is not None else None
        if summary is None:
            self.checks.append(Check("base model", None, "no base_model asset folder at hand; only the recorded hash is known"))
        elif summary.get("sha256") != base["sha256"]:
            self.checks.append(Check("base model", None, f"the base_model asset now holds {summary.get('sha256')}, "
                                                         "not this image's model"))
        else:
            base.update({key: summary.get(key) for key in ("name", "source", "path", "training_set")})
            self.checks.append(Check("base model", True, f"{self.layout.base_model} holds the recorded model"))
        return base

    def _training(self, checkpoint: dict) -> dict[str, Any]:
        recorded_hash = self.manifest_row.get("training_set_hash") if self.manifest_row else None
        summary = read_summary(self.data_hits[0][0], SyntheticImagesSummary) if self.data_hits else None
        data_hash = summary.get("training_set") if summary else None
        if recorded_hash and data_hash and recorded_hash != data_hash:
            self.checks.append(Check("training set hash", False,
                                     f"manifest records {recorded_hash}, data folder records {data_hash}"))
        training = {
            "hypernetwork_name": checkpoint.get("hypernetwork_name"),
            "training_set_hash": recorded_hash or data_hash,
            "base_model_sha256": checkpoint.get("base_model_sha256"),
            "settings_file": None,
            "settings": None,
            "run": None,
        }
        run_dir = self.layout.hypernetwork_checkpoints(self.tissue_class) if self.layout is not None else None
        run = read_summary(run_dir, HypernetworkCheckpointsSummary) if run_dir is not None else None
        # The folder holds one training run at a time; its files describe this checkpoint only if it lists it.
        if run is None or not any(entry["sha256"] == checkpoint.get("sha256") for entry in run.get("checkpoints", [])):
            detail = "no data folder holds the run" if run is None else f"{run_dir} now holds another training run"
            self.checks.append(Check("training settings", None, f"{detail}; only the recorded hashes are known"))
            return training
        training["run"] = {key: run.get(key) for key in RUN_SUMMARY_FIELDS}
        path = settings_path(run_dir, run["name"])
        if path.is_file():
            settings = json.loads(path.read_text())
            training.update(settings_file=str(path), settings=settings)
            same_base = settings.get("base_model_sha256") == checkpoint.get("base_model_sha256")
            self.checks.append(Check("training settings", same_base, f"{path.name} of the run that wrote this checkpoint"
                                     + ("" if same_base else f", but it names base model {settings.get('base_model_sha256')}")))
        else:
            self.checks.append(Check("training settings", None, f"{path} is missing"))
        return training

    def _training_tables(self) -> list[tuple[str, pd.DataFrame]]:
        """Candidate training-image tables, releases holding the image first: the frozen record beats a live folder."""
        tables = []
        for folder in dict.fromkeys(folder for folder, _ in self.release_hits):
            if (folder / LINEAGE).is_file():
                table = RELEASE_LINEAGE.read(folder / LINEAGE)
                tables.append((str(folder / LINEAGE), table[table["tissue_class"] == self.tissue_class]))
        if self.layout is not None:
            table = training_lineage(self.layout, self.tissue_class)
            if table is not None:
                tables.append((str(self.layout.augmented_crops(self.tissue_class) / INDEX), table))
        return [(source, table) for source, table in tables if len(table)]

    def _training_images(self, training_set_hash: str | None) -> tuple[pd.DataFrame | None, dict[str, Any]]:
        tables = self._training_tables()
        if not tables:
            self.checks.append(Check("training images", None, "no lineage table or augmented_crops index at hand"))
            return None, {"count": None, "kinds": {}, "source": None, "held_out_crops": None}
        matching = [(source, table) for source, table in tables if _training_set_hash(table) == training_set_hash]
        source, table = (matching or tables)[0]
        self.checks.append(Check(
            "training images", bool(matching),
            f"the {len(table)} images of {source} hash to the checkpoint's training set {training_set_hash}" if matching
            else f"no table at hand hashes to the checkpoint's training set {training_set_hash} (the crops were "
                 f"rebuilt since); showing {source}, which may not be what it was trained on",
        ))
        held_out = None
        # The held-out split lives only in the data folder, and belongs to this checkpoint only if its training set does.
        if self.layout is not None:
            crops_dir = self.layout.augmented_crops(self.tissue_class)
            if (crops_dir / HOLDOUT).is_file() and str(crops_dir / INDEX) in [source for source, _ in matching]:
                held_out = len(HELD_OUT_CROPS.read(crops_dir / HOLDOUT))
        kinds = {str(kind): int(count) for kind, count in table["kind"].value_counts().sort_index().items()}
        return table, {"count": len(table), "kinds": kinds, "source": source, "held_out_crops": held_out}

    def _crops_and_slides(self, lineage: pd.DataFrame | None) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
        if lineage is None:
            return (), ()
        crop_columns = ["square_crop", "square_crop_sha256", "raw_slide", "raw_slide_sha256", "level", "x", "y", "size"]
        crops = lineage.groupby(crop_columns, dropna=False).size().rename("training_images").reset_index()
        crops = crops.sort_values("square_crop")
        slides = (crops.groupby(["raw_slide", "raw_slide_sha256"], dropna=False)
                  .agg(square_crops=("square_crop", "size"), training_images=("training_images", "sum"))
                  .reset_index().sort_values("raw_slide"))
        inventory = {}
        inventory_file = self.layout.slide_inventory(self.tissue_class) / INVENTORY if self.layout is not None else None
        if inventory_file is not None and inventory_file.is_file():
            inventory = {row["sha256"]: row for row in _records(SLIDE_INVENTORY.read(inventory_file))}
        raw_slides = []
        for slide in _records(slides):
            entry = {"path": slide["raw_slide"], "sha256": slide["raw_slide_sha256"],
                     "square_crops": slide["square_crops"], "training_images": slide["training_images"]}
            known = inventory.get(slide["raw_slide_sha256"])
            if known is not None:
                entry.update({key: known.get(key) for key in INVENTORY_FIELDS})
            # Not re-hashed (whole-slide images run to gigabytes): on disk means the file is there and the
            # slide_inventory, which hashed it, records this sha256 for it.
            entry["on_disk"] = (None if self.layout is None else (self.layout.data_dir / slide["raw_slide"]).is_file()
                                and known is not None and known.get("path") == slide["raw_slide"])
            raw_slides.append(entry)
        return tuple(_records(crops)), tuple(raw_slides)

    def _code(self) -> dict[str, Any]:
        rows = [row for _, row in self.release_hits]
        return {
            "code_version": next((row["code_version"] for row in rows if row.get("code_version")), None),
            "git_commit": next((row["git_commit"] for row in rows if row.get("git_commit")), None),
            "dagster_run_ids": sorted({row["dagster_run_id"] for row in rows if row.get("dagster_run_id")}),
        }


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _render(report: LineageReport) -> list[str]:
    g, c, t = report.generation, report.checkpoint, report.training
    lines = [
        f"Synthetic image {report.file}",
        f"  sha256            {report.sha256}",
        f"  class             {report.tissue_class}",
        f"  checkpoint step   {report.checkpoint_step}",
    ]
    lines += [f"  file              {path}" for path in report.locations]
    lines += [f"  release           {hit.name} (tag {hit.tag or 'unknown'}): {hit.image}" for hit in report.releases]
    lines += ["", "Generation"]
    lines += [f"  {key:<17} {_value(value)}" for key, value in g.items()]
    if report.png_parameters is not None:
        lines.append("  PNG parameters chunk:")
        lines += [f"    {key}: {value}" for key, value in report.png_parameters.items()]
    lines += ["", "Checkpoint"]
    lines += [f"  {key:<22} {_value(c.get(key))}" for key in
              ("file", "sha256", "step", "hypernetwork_name", "base_model_sha256", "path", "on_disk_sha256_matches")]
    b = report.base_model
    lines += ["", f"Base model (asset {b['asset']})"]
    lines += [f"  {key:<22} {_value(b.get(key))}" for key in ("name", "sha256", "source", "path")]
    if b["training_set"] is not None:
        lines.append("  trained here on:")
        lines += [f"    {key}: {_value(value)}" for key, value in _flatten(b["training_set"])]
    lines += ["", "Training run",
              f"  training set hash      {_value(t['training_set_hash'])}",
              f"  base model sha256      {_value(t['base_model_sha256'])}"]
    if t["run"] is not None:
        lines += [f"  {key:<22} {_value(value)}" for key, value in t["run"].items()]
    if t["settings"] is not None:
        lines.append(f"  settings ({t['settings_file']}):")
        lines += [f"    {key}: {_value(value)}" for key, value in _flatten(t["settings"])]
    else:
        lines.append("  settings: not at hand (no data folder holding this run); the hashes above are what the release records")
    ti = report.training_images
    kinds = ", ".join(f"{count} {kind}" for kind, count in ti["kinds"].items())
    lines += ["", f"Training images (augmented crops): {_value(ti['count'])}" + (f" ({kinds})" if kinds else ""),
              f"  from {_value(ti['source'])}"]
    if ti["held_out_crops"] is not None:
        lines.append(f"  held-out square crops (never trained on): {ti['held_out_crops']}")
    lines += ["", f"Square crops used: {len(report.square_crops)}",
              f"  {'crop':<52} {'sha256':<16} {'level':>5} {'x':>7} {'y':>7} {'size':>6} {'images':>6}"]
    lines += [f"  {crop['square_crop']:<52} {str(crop['square_crop_sha256'])[:16]:<16} {_value(crop['level']):>5} "
              f"{_value(crop['x']):>7} {_value(crop['y']):>7} {_value(crop['size']):>6} {crop['training_images']:>6}"
              for crop in report.square_crops]
    lines += ["", f"Raw slides: {len(report.raw_slides)}"]
    for slide in report.raw_slides:
        lines += [f"  {slide['path']}", f"    sha256 {slide['sha256']}",
                  f"    {slide['square_crops']} crops, {slide['training_images']} training images"
                  + (f"; {slide['width']}x{slide['height']} px, {slide['levels']} level(s), mpp {_value(slide['mpp'])}, "
                     f"{slide['bytes']} bytes, read by {slide['reader']}" if "bytes" in slide else "")
                  + ("" if slide["on_disk"] is None
                     else "; on disk, inventoried with this sha256" if slide["on_disk"] else "; not on disk with this sha256")]
    lines += ["", "Code and runs" + ("" if report.releases else " (recorded only in release manifests)"),
              f"  code version      {_value(report.code['code_version'])}",
              f"  git commit        {_value(report.code['git_commit'])}",
              f"  dagster run ids   {', '.join(report.code['dagster_run_ids']) or '-'}",
              "", "Checks"]
    marks = {True: "ok  ", False: "FAIL", None: "--  "}
    lines += [f"  {marks[check.passed]} {check.name}: {check.detail}" for check in report.checks]
    return lines
