"""Stage folders mirrored to an object store, so machines without a shared disk can hand data on.

On Kubernetes every step runs in its own pod with an empty scratch disk. Each
stage folder (one asset partition, e.g. ``square_crops/<class>``) is kept in
the store as content-addressed objects plus one manifest:

    <root>/objects/<sha256[:2]>/<sha256[2:]>   file contents, written once, never changed
    <root>/manifests/<folder>.json             {relative path: {sha256, size}} of the folder

The manifest is put last, in one write, so a reader sees the previous complete
folder or the new one, never a mix. Identical files (the originals kept among
the augmented crops, unchanged checkpoints) are stored once. Every download is
checked against its sha256, and manifest paths are validated, so a damaged or
hostile store cannot write outside the folder or hand over wrong bytes.

Any fsspec URL works: ``s3://bucket/prefix`` (with s3fs), ``gs://...`` (gcsfs),
``file:///shared/dir`` or a plain path. An S3-compatible server other than AWS
(MinIO, Ceph, moto) is reached with ``storage_options={"endpoint_url": ...}`` or,
where only the URL can be given (the CLI, a pod with ``HISTO_ASSETS_STORE_URL``),
with the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables, which
botocore reads.

Requests. On an object store every file is a request, so the store keeps their
number down and overlaps them: where one write is atomic (S3, GCS, Azure,
memory) an object or manifest is written in place with one PUT, with no
temporary name to move; elsewhere (a local or shared directory) it is written
beside the target and moved. On asynchronous filesystems (s3fs, gcsfs, adlfs)
the per-object checks, uploads and downloads of a folder run
``CONCURRENT_REQUESTS`` at a time instead of one after another.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
import fsspec.asyn

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import atomic_directory, sha256_file

MANIFEST_VERSION = 1
# Where the CLI and the Kubernetes deployment read the store URL from.
STORE_URL_ENV = "HISTO_ASSETS_STORE_URL"
# Protocols where a single write is atomic: readers see the whole new object or none of it.
ATOMIC_WRITE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})
# Requests in flight at once on an asynchronous filesystem (s3fs pools 10 connections by default).
CONCURRENT_REQUESTS = 32


class ObjectStoreError(HistoAssetsError, RuntimeError):
    """The store is missing an object, holds wrong bytes, or names an unsafe path."""


@dataclass(frozen=True)
class Transfer:
    """What one push or pull moved; files already in place are not counted."""

    folder: str
    files: int
    transferred: int
    transferred_bytes: int

    def describe(self, verb: str) -> str:
        return f"{verb} {self.folder}: {self.transferred} of {self.files} file(s), {self.transferred_bytes} bytes moved"


def safe_relative(path: str) -> str:
    """A relative POSIX path with no '..', absolute or empty parts; anything else is refused."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ObjectStoreError(f"unsafe path {path!r}: must be relative, without '..', '.' or empty parts")
    return pure.as_posix()


def folder_files(folder: Path) -> dict[str, Path]:
    """Files of a stage folder by relative path, leaving out dot-files (temporary and staging files)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    return files


class ObjectStore:
    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.atomic_writes = bool(protocols & ATOMIC_WRITE_PROTOCOLS)

    def _object(self, sha256: str) -> str:
        return f"{self.root}/objects/{sha256[:2]}/{sha256[2:]}"

    def _manifest(self, folder: str) -> str:
        return f"{self.root}/manifests/{safe_relative(folder)}.json"

    def _put_atomically(self, target: str, write: Callable[[str], None]) -> None:
        """Readers never see a partial object or manifest: written in place where a write is atomic,
        else beside the target and then moved."""
        if self.atomic_writes:
            write(target)
            return
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.incoming-{os.getpid()}-{target.rsplit('/', 1)[1]}"
        try:
            write(temporary)
            self.fs.mv(temporary, target)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise

    def _each(self, method: str, calls: list[tuple]) -> list:
        """``fs.<method>(*arguments)`` for each tuple of ``calls``: the results in order, an exception in
        place of a result where a call raised one.

        Asynchronous filesystems run up to CONCURRENT_REQUESTS calls at once on their event loop, so
        on S3 a folder's round trips overlap instead of adding up; others run them one by one.
        """
        if not getattr(self.fs, "async_impl", False) or len(calls) < 2:
            results = []
            for arguments in calls:
                try:
                    results.append(getattr(self.fs, method)(*arguments))
                except Exception as error:  # noqa: BLE001 - handed back to the caller, which raises it
                    results.append(error)
            return results
        call = getattr(self.fs, f"_{method}")

        async def all_calls() -> list:
            limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

            async def one(arguments: tuple):
                async with limit:
                    return await call(*arguments)

            return await asyncio.gather(*(one(arguments) for arguments in calls), return_exceptions=True)

        return fsspec.asyn.sync(self.fs.loop, all_calls)

    def _stored_sizes(self, paths: list[str]) -> list[int | None]:
        """One request per path (a HEAD on S3) for both "is it there" and "is it whole"; None where absent."""
        sizes = []
        for result in self._each("info", [(path,) for path in paths]):
            if isinstance(result, FileNotFoundError):
                sizes.append(None)
            elif isinstance(result, BaseException):
                raise result
            else:
                sizes.append(result["size"])
        return sizes

    def manifest(self, folder: str) -> dict[str, dict] | None:
        """The stored folder's files, or None if it was never pushed."""
        try:
            raw = self.fs.cat_file(self._manifest(folder))
        except FileNotFoundError:
            return None
        try:
            files = json.loads(raw)["files"]
        except (ValueError, KeyError, TypeError) as error:
            raise ObjectStoreError(f"manifest of {folder} in {self.url} is unreadable: {error}") from error
        for relative, entry in files.items():
            safe_relative(relative)
            if not isinstance(entry, dict) or len(str(entry.get("sha256", ""))) != 64:
                raise ObjectStoreError(f"manifest of {folder} in {self.url}: bad entry for {relative!r}")
        return files

    def push(self, local: Path, folder: str) -> Transfer:
        """Upload the objects the store lacks, then the manifest."""
        if not local.is_dir():
            raise ObjectStoreError(f"cannot push {local}: not a folder")
        files = {relative: (path, sha256_file(path), path.stat().st_size) for relative, path in folder_files(local).items()}
        manifest = {relative: {"sha256": sha, "size": size} for relative, (_, sha, size) in files.items()}
        objects = {sha: (path, size) for path, sha, size in files.values()}
        stored = self._stored_sizes([self._object(sha) for sha in objects])
        lacking = [sha for sha, size in zip(objects, stored) if size != objects[sha][1]]
        if self.atomic_writes:
            for result in self._each("put_file", [(str(objects[sha][0]), self._object(sha)) for sha in lacking]):
                if isinstance(result, BaseException):
                    raise result
        else:
            for sha in lacking:
                source = str(objects[sha][0])
                self._put_atomically(self._object(sha), lambda temporary, source=source: self.fs.put_file(source, temporary))
        moved, moved_bytes = len(lacking), sum(objects[sha][1] for sha in lacking)
        if self.manifest(folder) != manifest:
            document = json.dumps({"version": MANIFEST_VERSION, "files": manifest}, indent=1, sort_keys=True).encode()
            self._put_atomically(self._manifest(folder), lambda temporary: self.fs.pipe_file(temporary, document))
        return Transfer(folder, len(files), moved, moved_bytes)

    def pull(self, folder: str, local: Path) -> Transfer | None:
        """Make ``local`` hold exactly the stored folder; None (and ``local`` untouched) if it was never pushed.

        Files already present with the right bytes are reused; the folder is
        swapped in whole, so a failed download leaves the old one as it was.
        """
        manifest = self.manifest(folder)
        if manifest is None:
            return None
        present = folder_files(local) if local.is_dir() else {}
        present_hashes = {relative: sha256_file(path) for relative, path in present.items()}
        wanted = {relative: entry["sha256"] for relative, entry in manifest.items()}
        if present_hashes == wanted:
            return Transfer(folder, len(wanted), 0, 0)
        by_hash = {sha: present[relative] for relative, sha in present_hashes.items()}
        moved = moved_bytes = 0
        with atomic_directory(local) as staging:
            downloads: dict[str, tuple[str, Path]] = {}  # one download per object, to its first path
            copies: list[tuple[str, Path]] = []
            for relative, sha in sorted(wanted.items()):
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if sha in by_hash:
                    shutil.copyfile(by_hash[sha], target)
                elif sha in downloads:
                    copies.append((sha, target))
                else:
                    downloads[sha] = (relative, target)
            results = self._each("get_file", [(self._object(sha), str(target)) for sha, (_, target) in downloads.items()])
            for (sha, (relative, target)), result in zip(downloads.items(), results):
                if isinstance(result, FileNotFoundError):
                    raise ObjectStoreError(f"{self.url} lacks the object of {folder}/{relative} ({sha[:12]})")
                if isinstance(result, BaseException):
                    raise result
                if sha256_file(target) != sha:
                    raise ObjectStoreError(f"{folder}/{relative}: the stored object does not match its sha256 {sha[:12]}")
                moved, moved_bytes = moved + 1, moved_bytes + target.stat().st_size
            for sha, target in copies:
                shutil.copyfile(downloads[sha][1], target)
        return Transfer(folder, len(wanted), moved, moved_bytes)
