"""core/io.py: atomic writes replace their target only on success, leaving no temporaries; hashes match hashlib."""

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

from histo_assets.core.io import (
    atomic_directory,
    atomic_path,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    sha256_bytes,
    sha256_file,
    stable_hash,
)
from histo_assets_tests.conftest import tissue_image


def names_in(folder: Path) -> set[str]:
    """Every entry of a folder, hidden temporaries included."""
    return {path.name for path in folder.iterdir()}


def test_sha256_bytes_agrees_with_hashlib():
    for data in (b"", b"abc", bytes(range(256)) * 100):
        assert sha256_bytes(data) == hashlib.sha256(data).hexdigest()


def test_sha256_file_agrees_with_hashlib_across_chunk_boundaries(tmp_path):
    """Files of several MiB are read in chunks; the digest is the whole file's however it splits."""
    rng = np.random.default_rng(0)
    for size in (0, 1, (1 << 20) - 1, 1 << 20, (5 << 19) + 7):
        path = tmp_path / f"blob{size}.bin"
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        assert sha256_file(path) == sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_stable_hash_does_not_depend_on_dict_key_order():
    first = {"b": 2, "a": {"y": [1, 2], "x": None}, "c": "text"}
    second = {"c": "text", "a": {"x": None, "y": [1, 2]}, "b": 2}
    assert list(first) != list(second)
    assert stable_hash(first) == stable_hash(second)


def test_stable_hash_is_the_sha256_of_compact_sorted_json():
    """The encoding is pinned: hashes stored by earlier runs stay valid."""
    value = {"seed": 7, "classes": ["b", "a"], "rate": 0.5}
    assert stable_hash(value) == hashlib.sha256(b'{"classes":["b","a"],"rate":0.5,"seed":7}').hexdigest()


def test_stable_hash_changes_with_any_value_and_with_list_order():
    base = {"seed": 7, "classes": ["a", "b"], "nested": {"steps": [100, 200]}}
    changed = [
        {**base, "seed": 8},
        {**base, "classes": ["b", "a"]},
        {**base, "nested": {"steps": [100, 201]}},
        {**base, "extra": None},
    ]
    hashes = {stable_hash(value) for value in [base, *changed]}
    assert len(hashes) == len(changed) + 1


def test_stable_hash_hashes_paths_as_their_text():
    assert stable_hash({"folder": Path("data/raw")}) == stable_hash({"folder": "data/raw"})


def test_an_atomic_write_replaces_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    assert atomic_write_text(target, "new ✓") == target
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert names_in(tmp_path) == {"out.txt"}


def test_an_atomic_write_creates_missing_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.bin"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert names_in(target.parent) == {"c.bin"}


def test_the_old_file_stays_readable_until_the_new_one_is_complete(tmp_path):
    """The temporary is a hidden sibling (same filesystem, so the swap is one rename), not the target itself."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp != target
        tmp.write_text("half")
        assert target.read_text() == "old"
    assert target.read_text() == "half"
    assert names_in(tmp_path) == {"out.txt"}


def test_a_failed_write_leaves_the_old_file_in_place(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert names_in(tmp_path) == {"out.txt"}


def test_a_failed_first_write_creates_no_file(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert names_in(tmp_path) == set()


def test_atomically_written_files_get_the_permissions_of_plainly_written_ones(tmp_path):
    """The temporary starts private (mkstemp's 0600); the result follows the umask like any new file."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_json_is_written_sorted_indented_and_newline_terminated(tmp_path):
    target = tmp_path / "summary.json"
    value = {"b": [1, 2], "a": {"folder": Path("data/raw")}}
    atomic_write_json(target, value)
    text = target.read_text()
    assert text.endswith("}\n")
    assert text == json.dumps({"a": {"folder": "data/raw"}, "b": [1, 2]}, indent=2, sort_keys=True) + "\n"
    assert json.loads(text) == {"a": {"folder": "data/raw"}, "b": [1, 2]}


def test_a_value_json_cannot_encode_leaves_the_old_json_in_place(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": True})
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        atomic_write_json(target, circular)
    assert json.loads(target.read_text()) == {"ok": True}
    assert names_in(tmp_path) == {"summary.json"}


def test_parquet_round_trips_without_the_frame_index(tmp_path):
    target = tmp_path / "index.parquet"
    frame = pd.DataFrame({"crop_file": ["a.png", "b.png"], "size": [64, 128]}, index=[10, 20])
    atomic_write_parquet(target, frame)
    read = pd.read_parquet(target)
    assert list(read.columns) == ["crop_file", "size"]
    assert list(read.index) == [0, 1]
    assert read["crop_file"].tolist() == ["a.png", "b.png"] and read["size"].tolist() == [64, 128]
    assert names_in(tmp_path) == {"index.parquet"}


def test_a_frame_parquet_cannot_store_leaves_the_old_parquet_in_place(tmp_path):
    target = tmp_path / "index.parquet"
    atomic_write_parquet(target, pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="Conversion failed"):
        atomic_write_parquet(target, pd.DataFrame({"x": [1, object()]}))
    assert pd.read_parquet(target)["x"].tolist() == [1]
    assert names_in(tmp_path) == {"index.parquet"}


def test_png_keeps_its_pixels_and_text_at_every_compression_level(tmp_path):
    image = tissue_image((48, 32), seed=3)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "pink tissue, Steps: 20")
    sizes = {}
    for level in (0, 9, -1):
        path = atomic_save_png(tmp_path / f"level{level}.png", image, pnginfo=info, compress_level=level)
        with Image.open(path) as read:
            assert read.text["parameters"] == "pink tissue, Steps: 20"
            assert np.array_equal(np.asarray(read.convert("RGB")), np.asarray(image))
        sizes[level] = path.stat().st_size
    assert sizes[0] > sizes[9]
    assert not any(name.startswith(".") for name in names_in(tmp_path))


def test_a_new_directory_is_swapped_in_whole_and_leaves_no_staging(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging != target
        (staging / "weights.bin").write_bytes(b"w")
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
        assert not target.exists()
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "sub", "sub/config.json", "weights.bin"]
    assert names_in(tmp_path) == {"model"}


def test_a_rebuilt_directory_holds_only_the_new_files(tmp_path):
    """The old directory is replaced, not merged into: files it had that the new one lacks are gone."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    (target / "weights.bin").write_bytes(b"old")
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"new")
        assert (target / "stale.bin").read_bytes() == b"old"
    assert names_in(target) == {"weights.bin"}
    assert (target / "weights.bin").read_bytes() == b"new"
    assert names_in(tmp_path) == {"model"}


def test_a_failed_directory_build_leaves_the_old_directory_untouched(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_bytes(b"partial")
            raise RuntimeError("crash")
    assert names_in(target) == {"weights.bin"}
    assert (target / "weights.bin").read_bytes() == b"old"
    assert names_in(tmp_path) == {"model"}


def test_a_failed_first_directory_build_creates_nothing(tmp_path):
    target = tmp_path / "nested" / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_bytes(b"partial")
            raise RuntimeError("crash")
    assert not target.exists()
    assert names_in(target.parent) == set()
    assert os.listdir(tmp_path) == ["nested"]


def test_a_directory_built_atomically_has_the_mode_a_plain_mkdir_gives(tmp_path):
    (tmp_path / "plain").mkdir()
    with atomic_directory(tmp_path / "built") as staging:
        (staging / "file.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "built").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert mode & stat.S_IRGRP, "a stage folder others in the lab may read is not private to its writer"
