"""Atomic file output and content hashing.

Every file the pipeline writes goes through these helpers, so that a crash,
a bad input or an interrupted run never leaves a half-written file where a
later step (or a DVC commit) could pick it up.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Where a long step reports progress: a Dagster logger's info, print, or a list in a test.
Log = Callable[[str], None]

_CHUNK = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()
# tempfile makes private (0700) folders; a stage folder is shared like one made by mkdir.
_DIRECTORY_MODE = 0o777 & ~_current_umask()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(value: Any) -> str:
    """Hash of a JSON-serialisable value, independent of dict ordering."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(encoded.encode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` that replaces it only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: str | os.PathLike, frame) -> Path:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_save_png(path: str | os.PathLike, image, pnginfo=None, compress_level: int = -1) -> Path:
    """``compress_level`` is zlib's 0-9; -1 (Pillow's own default) means zlib's default, level 6."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo, compress_level=compress_level)
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in only on success.

    Readers never see a partial directory: the complete old one, then (for
    the instant between two renames) none, then the complete new one. On
    error the old directory is kept, or put back if the swap itself failed,
    and the partial one is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, _DIRECTORY_MODE)
        retired = None
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".retired", dir=target.parent))
            os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except OSError:
            if retired is not None:
                os.replace(retired / target.name, target)
            raise
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
