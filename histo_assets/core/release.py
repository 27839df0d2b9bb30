"""Versioned releases of the synthetic dataset: one folder, one DVC output, one git tag.

A release folder is a pure function of its inputs (no timestamps, sorted
rows, fixed file names), so rebuilding from unchanged inputs gives the same
bytes, the same DVC md5 and the same tag. That is what makes publishing
idempotent and lets downstream teams pull an exact dataset by tag.
"""

from __future__ import annotations

import configparser
import contextlib
import numbers
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histo_assets.core.dvc import (
    DvcCli,
    TagConflictError,
    git_check_tag_name,
    git_commit_beside_head,
    git_file_at,
    git_is_repo,
    git_path,
    git_push_tag,
    git_remote_url,
    git_tag,
    ensure_git_identity,
    git_tag_target,
    is_local_url,
    md5_from_dvc_text,
)
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import (
    Log,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_text,
    sha256_file,
    stable_hash,
)
from histo_assets.core.layout import IMAGES as STAGE_IMAGES
from histo_assets.core.layout import INDEX, Layout
from histo_assets.core.schemas import (
    GENERATION_INDEX,
    PUBLISHED_METRICS,
    RELEASE_LINEAGE,
    RELEASE_MANIFEST,
    HypernetworkCheckpointsSummary,
    SyntheticImagesSummary,
)
from histo_assets.core.stage import read_summary

MANIFEST = "manifest.parquet"
METRICS = "metrics.parquet"
LINEAGE = "lineage.parquet"
CARD = "README.md"
IMAGES = "images"
PLOTS = "plots"
TAG_PREFIX = "release"
TAG_HASH_LENGTH = 12
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Folder, file and release names: safe in paths, Markdown links, URLs and git refs.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The nullable pandas dtype of a provenance column, by the kind of its values.
_DTYPES = {"bool": "boolean", "int": "Int64", "float": "Float64", "str": "string"}

Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class ReleaseImage:
    """One generated image and where it came from.

    ``provenance`` is free-form; every key becomes a manifest column, so use
    the same keys for every image. Suggested keys: checkpoint_sha256,
    hypernetwork, base_model_sha256, seed, prompt, negative_prompt, sampler,
    steps, cfg_scale, width, height, training_set_hash, code_version,
    git_commit, dagster_run_id. Values must be scalars (str, int, float,
    bool or None) so the manifest has one plain type per column.
    """

    source: Path
    tissue_class: str
    checkpoint_step: int
    provenance: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class ReleaseInfo:
    """A built release folder; ``tag`` is the tag :func:`publish_release` should get."""

    path: Path
    name: str
    tag: str
    content_hash: str
    counts: dict[str, int]
    manifest: Path
    card: Path


@dataclass(frozen=True)
class PublishedRelease:
    """What a publish left behind; ``commit`` is the commit the tag names."""

    tag: str
    commit: str
    md5: str
    dvc_file: Path
    new_commit: bool
    new_tag: bool


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and use only letters, digits, '.', '_', '-'"
        )
    return value


def release_tag(name: str, version_hash: str) -> str:
    """The git tag of a release: ``release/<name>/<first 12 hex digits of its content hash>``.

    The hash part makes the tag a function of the content, so the same
    content always maps to the same tag and different content never reuses
    one; 12 hex digits (48 bits) keep tags short with negligible collision risk
    between releases of one name.
    """
    _check_name(name, "release name")
    if ".." in name or name.endswith((".", ".lock")):
        raise ValueError(f"release name {name!r} cannot be part of a git tag")
    if not re.fullmatch(r"[0-9a-f]+", version_hash or "") or len(version_hash) < TAG_HASH_LENGTH:
        raise ValueError(f"version hash {version_hash!r} must be at least {TAG_HASH_LENGTH} lowercase hex digits")
    return f"{TAG_PREFIX}/{name}/{version_hash[:TAG_HASH_LENGTH]}"


def content_hash(release_dir: str | os.PathLike) -> str:
    """SHA-256 over the sorted (relative path, file SHA-256) pairs of a release folder.

    The dataset card is left out because it quotes the tag derived from this
    hash; nearly all it says is rendered from the hashed files and the
    release name. Changing only the card (``card_extra``, ``repo_url``) keeps
    the tag but changes the DVC md5, so publishing that under the old tag is
    refused as a tag conflict.
    """
    root = Path(release_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"release folder {root} does not exist")
    entries = sorted(
        (path.relative_to(root).as_posix(), sha256_file(path))
        for path in root.rglob("*")
        if path.is_file() and path.relative_to(root).as_posix() != CARD
    )
    if not entries:
        raise ValueError(f"release folder {root} holds no files")
    return stable_hash(entries)


def _kind(value: object, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, str):
        return "str"
    raise TypeError(f"{where} is a {type(value).__name__}; provenance values must be str, int, float, bool or None")


def _column_dtype(name: str, values: list[object]) -> str:
    kinds = {_kind(value, f"provenance[{name!r}] of image {index}") for index, value in enumerate(values)} - {None}
    if kinds == {"int", "float"}:
        return _DTYPES["float"]
    if len(kinds) > 1:
        raise TypeError(f"provenance[{name!r}] mixes {sorted(kinds)} across images; use one type per key")
    return _DTYPES[kinds.pop()] if kinds else _DTYPES["str"]


def _is_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


def _plan_images(images: Sequence[ReleaseImage]) -> list[tuple[str, ReleaseImage]]:
    """Validate the images and give each its path inside the release, sorted by that path."""
    if not images:
        raise ValueError("a release needs at least one image")
    planned: dict[str, ReleaseImage] = {}
    for image in images:
        source = Path(image.source)
        _check_name(image.tissue_class, "tissue class")
        _check_name(source.name, "image file name")
        step = image.checkpoint_step
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"checkpoint step of {source} must be a non-negative integer, got {step!r}")
        if not source.is_file():
            raise FileNotFoundError(f"release image {source} does not exist")
        if not _is_png(source):
            raise ValueError(f"release image {source} is not a PNG file")
        for key in image.provenance:
            if not isinstance(key, str) or not key or key in RELEASE_MANIFEST.columns:
                raise ValueError(f"provenance key {key!r} of {source} is empty or clashes with the columns "
                                 f"{RELEASE_MANIFEST.columns}")
        relative = f"{IMAGES}/{image.tissue_class}/{source.name}"
        if relative in planned:
            raise ValueError(
                f"{source} and {planned[relative].source} would both be {relative}; "
                "give images of one class distinct file names"
            )
        planned[relative] = image
    return sorted(planned.items())


def _manifest(rows: list[tuple[str, ReleaseImage, str]]) -> pd.DataFrame:
    keys = sorted({key for _, image, _ in rows for key in image.provenance})
    columns: dict[str, pd.api.extensions.ExtensionArray | np.ndarray] = {
        "path": pd.array([relative for relative, _, _ in rows], dtype="string"),
        "tissue_class": pd.array([image.tissue_class for _, image, _ in rows], dtype="string"),
        "checkpoint_step": np.array([int(image.checkpoint_step) for _, image, _ in rows], dtype=np.int64),
        "sha256": pd.array([digest for _, _, digest in rows], dtype="string"),
    }
    for key in keys:
        values = [image.provenance.get(key) for _, image, _ in rows]
        columns[key] = pd.array(values, dtype=_column_dtype(key, values))
    return pd.DataFrame(columns)


def _cell(value: object) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_, numbers.Integral)):
        text = format(float(value), ".6g")
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats to 6 significant digits, pipes escaped.

    Hand-written because tabulate (pandas' to_markdown backend) is not installed.
    """
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a meaningful index kept as columns and string column names, as parquet needs."""
    frame = table if isinstance(table.index, pd.RangeIndex) else table.reset_index()
    frame = frame.reset_index(drop=True)
    frame.columns = [str(column) for column in frame.columns]
    return frame


def _card(
    *,
    name: str,
    tag: str,
    digest: str,
    manifest: pd.DataFrame,
    metrics: pd.DataFrame | None,
    metrics_notes: str,
    plot_names: list[str],
    card_extra: str,
    repo_url: str,
    repo_path: str,
    local_remote: tuple[str, str] | None,
) -> str:
    lines = [
        *_card_contents(name=name, tag=tag, digest=digest, manifest=manifest, metrics=metrics,
                        metrics_notes=metrics_notes, plot_names=plot_names),
        *_card_getting_it(tag=tag, repo_url=repo_url, repo_path=repo_path, local_remote=local_remote),
    ]
    if card_extra.strip():
        lines += ["", card_extra.strip()]
    return "\n".join(lines) + "\n"


def _card_contents(
    *,
    name: str,
    tag: str,
    digest: str,
    manifest: pd.DataFrame,
    metrics: pd.DataFrame | None,
    metrics_notes: str,
    plot_names: list[str],
) -> list[str]:
    per_class = manifest.groupby("tissue_class", sort=True)["checkpoint_step"]
    count_rows = [
        [tissue_class, len(steps), ", ".join(str(s) for s in sorted(set(steps)))] for tissue_class, steps in per_class
    ]
    count_rows.append(["**total**", len(manifest), ""])
    provenance = [c for c in manifest.columns if c not in RELEASE_MANIFEST.columns]
    provenance_text = ", ".join(f"`{c}`" for c in provenance) if provenance else "none"
    lines = [
        f"# Synthetic H&E tissue images: {name}",
        "",
        f"- Release tag: `{tag}`",
        f"- Content hash: `{digest}` (SHA-256 over the sorted (path, SHA-256) pairs of every file but this card)",
        "",
        "## What this is",
        "",
        "Synthetic H&E histology tiles made by Stable Diffusion with one hypernetwork per tissue class, "
        "reproducing a 2024 thesis. Each image was generated from a hypernetwork checkpoint trained on "
        "augmented crops of one class; `manifest.parquet` records for every image its class, checkpoint "
        "step, SHA-256 and generation provenance.",
        "",
        "**Class names are the sample tissue sources the training crops came from, not diagnoses.** "
        "The images are synthetic and not for diagnostic use.",
        "",
        "## Contents",
        "",
        _markdown_table(["class", "images", "checkpoint steps"], count_rows),
        "",
        f"- `{IMAGES}/<class>/<file>.png`: the images.",
        f"- `{MANIFEST}`: one row per image, sorted by `path`: `path` (relative to this folder), `tissue_class`, "
        f"`checkpoint_step`, `sha256` (of the file), and the provenance columns {provenance_text}.",
    ]
    if metrics is not None:
        lines.append(f"- `{METRICS}`: the metrics table below.")
    if plot_names:
        lines.append(f"- `{PLOTS}/`: the plots below.")
    lines += ["", "## Metrics", ""]
    if metrics is not None:
        lines.append(_markdown_table(list(metrics.columns), list(metrics.itertuples(index=False, name=None))))
        if metrics_notes.strip():
            lines += ["", metrics_notes.strip()]
    else:
        lines.append("No metrics table was supplied with this release.")
    if plot_names:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(plot).stem}]({PLOTS}/{plot})" for plot in plot_names]
    return lines


def _card_getting_it(*, tag: str, repo_url: str, repo_path: str, local_remote: tuple[str, str] | None) -> list[str]:
    """Fetch commands; they name a local DVC remote, since only a clone beside it resolves its relative path."""
    remote_name, remote_url = local_remote or (None, None)
    folder = repo_path.rstrip("/").rsplit("/", 1)[-1]
    python_remote = f', remote_config={{"url": "{remote_url}"}})' if remote_url else ")"
    return [
        "",
        "## Getting this release",
        "",
        "A plain copy of this folder, with DVC installed:",
        "",
        "```sh",
        f"dvc get {repo_url} {repo_path} --rev {tag} -o {folder}" + (f" --remote-config url={remote_url}"
                                                                     if remote_url else ""),
        "```",
        "",
        "In a clone of the repository (naming the `.dvc` file pulls just this release):",
        "",
        "```sh",
        f"git checkout {tag}",
        *([f"dvc remote modify --local {remote_name} url {remote_url}"] if remote_url else []),
        f"dvc pull {repo_path}.dvc",
        "```",
        "",
        "From Python, with the `dvc` package:",
        "",
        "```python",
        "import dvc.api",
        "",
        f'fs = dvc.api.DVCFileSystem("{repo_url}", rev="{tag}"' + python_remote,
        f'fs.get("{repo_path}", "{folder}", recursive=True)',
        "```",
        "",
        "or just the manifest, with pandas too:",
        "",
        "```python",
        "import io",
        "",
        "import dvc.api",
        "import pandas",
        "",
        f'raw = dvc.api.read("{repo_path}/{MANIFEST}", repo="{repo_url}", rev="{tag}", mode="rb"' + python_remote,
        "manifest = pandas.read_parquet(io.BytesIO(raw))",
        "```",
        "",
        "Check a copy against the `sha256` column of the manifest before use.",
        "",
        DATASET_HEADING,
        "",
        f"With torch and Pillow, from the folder `dvc get` made (in a clone: `{repo_path}`), the labels "
        "numbered in sorted class order:",
        "",
        "```python",
        *dataset_snippet(folder).splitlines(),
        "```",
    ]


DATASET_HEADING = "## Loading it as an image-classification dataset"


def dataset_snippet(folder: str) -> str:
    """The card's PyTorch ``Dataset`` over the manifest; the tests run it on a pulled release."""
    return f'''from pathlib import Path

import numpy as np
import pandas
import torch
from PIL import Image
from torch.utils.data import Dataset


class SyntheticTissue(Dataset):
    """This release's images as (3 x H x W float tensor in [0, 1], label); classes[label] is the tissue class."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = pandas.read_parquet(self.root / "{MANIFEST}")
        self.classes = sorted(self.manifest["tissue_class"].unique())
        self.labels = [self.classes.index(name) for name in self.manifest["tissue_class"]]

    def __len__(self):
        return len(self.manifest)

    def __getitem__(self, index):
        with Image.open(self.root / self.manifest["path"].iloc[index]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1), self.labels[index]


dataset = SyntheticTissue("{folder}")
loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)'''


def build_release(
    images: Sequence[ReleaseImage],
    out_dir: str | os.PathLike,
    *,
    name: str,
    metrics_table: pd.DataFrame | None = None,
    metrics_notes: str = "",
    lineage: pd.DataFrame | None = None,
    plots: Sequence[str | os.PathLike] = (),
    card_extra: str = "",
    repo_url: str | None = None,
    repo_path: str | None = None,
    local_remote: tuple[str, str] | None = None,
) -> ReleaseInfo:
    """Assemble a release folder at ``out_dir``, replacing any previous one atomically.

    Layout: ``images/<class>/<file>``, ``manifest.parquet``, optional
    ``metrics.parquet``, ``lineage.parquet`` (training images back to raw
    slides, so an audit works from the release alone) and ``plots/``, and the
    dataset card ``README.md``. ``metrics_notes`` (Markdown) follows the
    metrics table in the card: how to read its labels, intervals and flags.
    ``repo_url`` and ``repo_path`` (the folder's path inside the git repo)
    fill the card's pull instructions; placeholders stand in when they are
    not known yet. ``local_remote`` (name, absolute path) is a DVC remote on
    this machine's disk: git records it relative to the repository, which
    only a clone beside it resolves, so the card tells every other copy where
    it is. The same inputs give a byte-identical folder.
    """
    _check_name(name, "release name")
    planned = _plan_images(images)
    plot_paths = _plan_plots(plots)
    if metrics_table is not None and not isinstance(metrics_table, pd.DataFrame):
        raise TypeError(f"metrics_table must be a pandas DataFrame or None, got {type(metrics_table).__name__}")
    target = Path(out_dir).resolve()
    for source in [image.source for _, image in planned] + plot_paths:
        if Path(source).resolve().is_relative_to(target):
            raise ValueError(f"{source} lies inside the release folder {target}, which is replaced on build")

    with atomic_directory(target) as staging:
        manifest, metrics = _write_contents(staging, planned, metrics_table, lineage, plot_paths)
        digest = content_hash(staging)
        tag = release_tag(name, digest)
        card = _card(
            name=name,
            tag=tag,
            digest=digest,
            manifest=manifest,
            metrics=metrics,
            metrics_notes=metrics_notes,
            plot_names=sorted(plot.name for plot in plot_paths),
            card_extra=card_extra,
            repo_url=repo_url or "<repo-url>",
            repo_path=repo_path or "<path-in-repo>",
            local_remote=local_remote,
        )
        atomic_write_text(staging / CARD, card)
    counts = {str(k): int(v) for k, v in manifest["tissue_class"].value_counts().sort_index().items()}
    return ReleaseInfo(
        path=target,
        name=name,
        tag=tag,
        content_hash=digest,
        counts=counts,
        manifest=target / MANIFEST,
        card=target / CARD,
    )


def _plan_plots(plots: Sequence[str | os.PathLike]) -> list[Path]:
    """Validate the plots: each keeps its file name under ``plots/``, so names must be safe and distinct."""
    plot_paths = [Path(plot) for plot in plots]
    plot_names = sorted(plot.name for plot in plot_paths)
    for plot in plot_paths:
        _check_name(plot.name, "plot file name")
        if not plot.is_file():
            raise FileNotFoundError(f"plot {plot} does not exist")
    if len(set(plot_names)) != len(plot_names):
        raise ValueError(f"plot file names must be distinct, got {plot_names}")
    return plot_paths


def _write_contents(
    staging: Path, planned: list[tuple[str, ReleaseImage]], metrics_table: pd.DataFrame | None,
    lineage: pd.DataFrame | None, plot_paths: list[Path],
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Every file of the release but its card (which quotes the hash of these); the manifest and metrics written."""
    rows = []
    for relative, image in planned:
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.source, destination)
        rows.append((relative, image, sha256_file(destination)))
    manifest = _manifest(rows)
    RELEASE_MANIFEST.write(staging / MANIFEST, manifest)
    metrics = None if metrics_table is None else _metrics_frame(metrics_table)
    if metrics is not None:
        atomic_write_parquet(staging / METRICS, metrics)
    if lineage is not None:
        RELEASE_LINEAGE.write(staging / LINEAGE, lineage.sort_values(list(lineage.columns)).reset_index(drop=True))
    for plot in plot_paths:
        (staging / PLOTS).mkdir(exist_ok=True)
        shutil.copyfile(plot, staging / PLOTS / plot.name)
    return manifest, metrics


def read_manifest(path_or_release_dir: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a release, given the folder or the parquet file itself."""
    path = Path(path_or_release_dir)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no release manifest at {path}")
    return RELEASE_MANIFEST.read(path)


def publish_release(
    dvc: DvcCli, repo: str | os.PathLike, release_dir: str | os.PathLike, tag: str, message: str,
    remote: tuple[str, str],
) -> PublishedRelease:
    """Version a release folder: dvc add, a commit beside the branch, dvc push, then tag.

    The commit's parent is HEAD and it holds only the ``.dvc`` file, the
    ``.gitignore`` dvc writes next to the folder and ``.dvc/config`` naming
    ``remote`` (name, url) portably, so a clone of the tag knows where to pull
    from. It is made without touching the checked-out branch, the index or the
    working tree, and only the tag points to it: the repository stays the
    user's. The working copy pushes through ``.dvc/config.local``. The tag
    comes last, after the push, so a tag always means "data on the remote".
    Publishing identical content again makes no commit and reuses the tag; a
    tag that already names other content raises :class:`TagConflictError`
    before anything is committed. Git pushes of the tag are left to the caller.
    """
    root = Path(repo).resolve()
    if not git_is_repo(root):
        raise ValueError(f"{root} is not the top level of a git repository")
    if dvc.repo != root:
        raise ValueError(f"the DvcCli runs in {dvc.repo}, not in the release repository {root}")
    if not (root / ".dvc").is_dir():
        raise ValueError(f"{root} is not a DVC repository; run DvcCli.init() first")
    folder = Path(release_dir).resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise ValueError(f"release folder {folder} must lie inside the repository {root}")
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{folder} is not a release folder (no {MANIFEST}); build it with build_release")
    git_check_tag_name(tag)
    relative_dvc = folder.relative_to(root).with_name(folder.name + ".dvc")
    relative_ignore = folder.relative_to(root).parent / ".gitignore"
    tagged = git_tag_target(root, tag)

    name, url = remote
    dvc.remote_add_default(name, url, level="local")
    with _left_as_found(root / relative_dvc, root / relative_ignore):
        (dvc_file,) = dvc.add([folder])
        md5 = dvc.md5_of(dvc_file)
        if tagged is not None:
            previous_md5 = _md5_at_tag(root, tagged, relative_dvc, tag)
            if previous_md5 != md5:
                raise TagConflictError(
                    f"git tag {tag!r} already marks commit {tagged}, where {relative_dvc} "
                    f"{'is absent' if previous_md5 is None else f'has md5 {previous_md5}'}; this content has md5 "
                    f"{md5}. Tags are never moved: publish under another tag (release_tag() derives one from the "
                    "content)."
                )
            commit = None
        else:
            files = {relative_dvc.as_posix(): dvc_file.read_bytes(), ".dvc/config": dvc.committed_config(name, url)}
            # DVC's own ignore files go in too where the branch lacks them, so a clone of the tag is a DVC repo.
            for extra in (relative_ignore, Path(".dvc/.gitignore"), Path(".dvcignore")):
                if (root / extra).is_file() and git_file_at(root, "HEAD", extra) != (root / extra).read_bytes():
                    files[extra.as_posix()] = (root / extra).read_bytes()
            commit = git_commit_beside_head(root, files, message)
        dvc.push([dvc_file])
    _exclude_locally(root, folder)
    tag_commit = tagged if tagged is not None else git_tag(root, tag, message, commit)
    return PublishedRelease(
        tag=tag,
        commit=tag_commit,
        md5=md5,
        dvc_file=dvc_file,
        new_commit=commit is not None,
        new_tag=tagged is None,
    )


def _md5_at_tag(root: Path, tagged: str, relative_dvc: Path, tag: str) -> str | None:
    """The md5 the ``.dvc`` file records in the tagged commit; None where that commit lacks it."""
    text = git_file_at(root, tagged, relative_dvc)
    return None if text is None else md5_from_dvc_text(text.decode(), f"{relative_dvc} at {tag}")


@contextlib.contextmanager
def _left_as_found(*paths: Path) -> Iterator[None]:
    """Put these working-tree files back as they were (or absent) afterwards, whatever dvc wrote to them."""
    before = {path: path.read_bytes() if path.is_file() else None for path in paths}
    try:
        yield
    finally:
        for path, content in before.items():
            if content is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != content:
                atomic_write_bytes(path, content)


def _exclude_locally(root: Path, folder: Path) -> None:
    """Keep the release folder out of ``git status`` through ``.git/info/exclude``, which is never committed.

    The folder is DVC's; its ``.dvc`` file lives in the release commit only.
    """
    exclude = Path(git_path(root, "info/exclude"))
    pattern = "/" + folder.relative_to(root).as_posix() + "/"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if pattern not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(exclude, "\n".join([*lines, pattern]) + "\n")


# --- The pipeline's release: its checkpoints, images and card text from the stage folders -----------


# Who the release commits and tags name, where the repository has no git identity of its own.
PIPELINE_AUTHOR = ("histo-assets", "histo-assets@localhost")


class ReleaseSelectionError(HistoAssetsError, ValueError):
    """``release.checkpoints`` asks for checkpoints the pipeline has not made or ranked."""


def selected_steps(
    choice: str | Sequence[int], trained_steps: Sequence[int], classes: Sequence[str],
    metrics_summary: Mapping[str, Any] | None, utility_summary: Mapping[str, Any] | None,
) -> dict[str, list[int]]:
    """The steps released per class: the best by metrics, the most useful to a classifier, all, or listed ones."""
    if metrics_summary is None:
        raise ReleaseSelectionError("metrics_summary has not been materialised")
    best = {c: int(s) for c, s in metrics_summary["best"].items()}
    by_utility = utility_summary["best_step_by_utility"] if utility_summary else None
    all_steps = sorted(int(s) for s in trained_steps)
    if choice == "best":
        return {c: [best[c]] for c in classes}
    if choice == "utility":
        if by_utility is None:
            raise ReleaseSelectionError("release.checkpoints is utility: materialise classifier_utility first")
        return {c: [by_utility] for c in classes}
    if choice == "all":
        return {c: all_steps for c in classes}
    unknown = sorted(set(map(int, choice)) - set(all_steps))
    if unknown:
        raise ReleaseSelectionError(f"release.checkpoints names steps that were not trained: {unknown}")
    return {c: sorted(map(int, choice)) for c in classes}


def release_inputs(layout: Layout, steps: Mapping[str, Sequence[int]]) -> list[Path]:
    """The stage folders a release reads besides the metrics: per class, its chain from raw slides to images."""
    return [
        folder
        for tissue_class, class_steps in steps.items()
        for folder in (layout.slide_inventory(tissue_class), layout.square_crops(tissue_class),
                       layout.augmented_crops(tissue_class), layout.hypernetwork_checkpoints(tissue_class),
                       *(layout.synthetic_images(tissue_class, step) for step in class_steps))
    ]


def release_images(
    layout: Layout, steps: Mapping[str, Sequence[int]], *, code_version: str, git_commit: str,
) -> list[ReleaseImage]:
    """Every image of the selected checkpoints, with the provenance its manifest row records."""
    images = []
    for tissue_class, class_steps in steps.items():
        hypernetwork = read_summary(layout.hypernetwork_checkpoints(tissue_class), HypernetworkCheckpointsSummary)
        for step in class_steps:
            folder = layout.synthetic_images(tissue_class, step)
            generated = read_summary(folder, SyntheticImagesSummary)
            for row in GENERATION_INDEX.read(folder / INDEX).itertuples():
                images.append(ReleaseImage(
                    source=folder / STAGE_IMAGES / row.file,
                    tissue_class=tissue_class,
                    checkpoint_step=step,
                    provenance={
                        "checkpoint_file": generated["checkpoint_file"],
                        "checkpoint_sha256": generated["checkpoint_sha256"],
                        "hypernetwork_name": row.hypernetwork_name,
                        "base_model_sha256": row.base_model_sha256,
                        "base_model_short_hash": row.base_model_short_hash,
                        "seed": int(row.seed),
                        "prompt": row.prompt,
                        "negative_prompt": row.negative_prompt,
                        "sampler": row.sampler,
                        "steps": int(row.steps),
                        "cfg_scale": float(row.cfg_scale),
                        "width": int(row.width),
                        "height": int(row.height),
                        "hypernetwork_multiplier": float(row.multiplier),
                        "training_set_hash": hypernetwork["training_set"],
                        "code_version": code_version,
                        "git_commit": git_commit,
                        "dagster_run_id": generated.get("run_id", ""),
                    },
                ))
    return images


def release_repo_url(section: Mapping[str, Any], repo: Path | None) -> str | None:
    """Where downstream users fetch the release from, for the dataset card's commands.

    The tag's git remote when the tag is pushed (a pod's checkout is gone
    after the run), else this repository's own path.
    """
    if section["repo_url"]:
        return section["repo_url"]
    if repo is None:
        return None
    return git_remote_url(repo, section["git_remote"]) if section["git_remote"] else str(repo)


def local_remote_path(url: str, params_dir: Path) -> Path | None:
    """A DVC remote without a URL scheme is a folder named relative to the params file, which may lie anywhere."""
    return (params_dir / url).resolve() if is_local_url(url) else None


def build_dataset_release(
    layout: Layout, steps: Mapping[str, Sequence[int]], *, section: Mapping[str, Any],
    metrics_summary: Mapping[str, Any], utility_summary: Mapping[str, Any] | None, metrics_table: pd.DataFrame,
    lineage: pd.DataFrame, code_version: str, git_commit: str, repo: Path | None, params_dir: Path,
) -> ReleaseInfo:
    """The ``release`` params section's folder, from the stage folders of ``layout``.

    The card's notes come from the metrics and utility summaries, so the card
    explains the labels and flags of the tables it shows; its pull commands
    name the repository and folder when the data folder lies inside git.
    """
    out = layout.release(section["name"])
    utility_notes = "\n\n" + utility_summary["notes"] if utility_summary else ""
    checkpoints = f"Checkpoints: {section['checkpoints']} (by {metrics_summary['best_by']})."
    local_remote = local_remote_path(section["remote"]["url"], params_dir)
    return build_release(
        release_images(layout, steps, code_version=code_version, git_commit=git_commit), out, name=section["name"],
        metrics_table=PUBLISHED_METRICS.check(metrics_table),
        metrics_notes=metrics_summary["metrics_notes"] + utility_notes, lineage=lineage,
        plots=sorted(layout.metrics_details.glob("*.png")),
        card_extra=f"{checkpoints} {metrics_summary['extractor_note']}",
        repo_url=release_repo_url(section, repo), repo_path=os.path.relpath(out, repo) if repo is not None else None,
        local_remote=(section["remote"]["name"], str(local_remote)) if local_remote else None,
    )


def already_published(repo: Path, info: ReleaseInfo, remote_name: str, remote: str | Path) -> PublishedRelease | None:
    """The release as published before, when ``info.tag`` exists and its commit names ``remote`` as its DVC remote.

    ``remote`` is a URL, or for a local remote its folder. DVC records a local
    remote relative to ``.dvc/``, where its config lives.
    """
    root, folder = repo.resolve(), info.path.resolve()
    tagged = git_tag_target(root, info.tag)
    if tagged is None or not folder.is_relative_to(root):
        return None
    relative_dvc = folder.relative_to(root).with_name(folder.name + ".dvc")
    config_text, md5 = git_file_at(root, tagged, ".dvc/config"), _md5_at_tag(root, tagged, relative_dvc, info.tag)
    if config_text is None or md5 is None:
        return None
    config = configparser.ConfigParser()
    try:
        config.read_string(config_text.decode())
    except configparser.Error:  # a config this parser cannot read: publish the usual way, with dvc
        return None
    recorded = config.get(f"'remote \"{remote_name}\"'", "url", fallback=None)
    if config.get("core", "remote", fallback=None) != remote_name or recorded is None:
        return None
    same = ((root / ".dvc" / recorded).resolve() == remote.resolve() if isinstance(remote, Path)
            else recorded == remote)
    if not same:
        return None
    return PublishedRelease(tag=info.tag, commit=tagged, md5=md5, dvc_file=root / relative_dvc, new_commit=False,
                            new_tag=False)


def publish_dataset_release(
    dvc: DvcCli, repo: Path, info: ReleaseInfo, section: Mapping[str, Any], params_dir: Path, log: Log,
) -> PublishedRelease:
    """:func:`publish_release` into ``repo`` made a DVC repository, then the tag pushed where ``git_remote`` says.

    A local remote is recorded relative to the repository, so a clone beside
    it resolves it without the path of this machine. Content already tagged
    for this remote is not published again: its tag names the content (its
    hash) and was made only after the push, so a refresh with nothing changed
    runs no dvc command.
    """
    ensure_git_identity(repo, *PIPELINE_AUTHOR)
    remote = section["remote"]
    local_remote = local_remote_path(remote["url"], params_dir)
    published = already_published(repo, info, remote["name"], local_remote or remote["url"])
    if published is None:
        dvc.init()
        url = os.path.relpath(local_remote, repo) if local_remote else remote["url"]
        published = publish_release(dvc, repo, info.path, info.tag, f"Release {section['name']} ({info.tag})",
                                    (remote["name"], url))
    if section["git_remote"]:
        git_push_tag(repo, section["git_remote"], info.tag)
        log(f"pushed tag {info.tag} to git remote {section['git_remote']}")
    log(f"published {info.tag}: dvc md5 {published.md5}, commit {published.commit[:10]}")
    return published
