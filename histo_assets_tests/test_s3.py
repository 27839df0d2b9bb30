"""S3 against a real S3-compatible server: moto in server mode on 127.0.0.1 (conftest's ``s3_server``).

Everything here goes over HTTP through the same clients a cluster uses: s3fs for the object store
(in this process, and in `histo-assets` subprocesses that know the server only from
``AWS_ENDPOINT_URL``), and DVC's own S3 remote (dvc-s3, in .venv-dvc) for releases. No external
service is needed; the server stops at the end of the module, also when a test fails.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from histo_assets.core.dvc import DvcCli
from histo_assets.core.io import sha256_file
from histo_assets.core.object_store import ObjectStore, folder_files
from histo_assets.core.release import build_release, publish_release, read_manifest
from histo_assets.definitions import raw_slides_sensor
from histo_assets.params import PROJECT_ROOT
from histo_assets.resources import ObjectStoreResource, ParamsResource
from histo_assets_tests import test_object_store as on_every_store
from histo_assets_tests.conftest import THESIS_CLASSES, dvc_executable, tissue_image, tree_hashes
from histo_assets_tests.test_release import RELEASE_PATH, git, isolate, make_extras, make_images, new_repo


@pytest.fixture
def store(s3_server, s3_bucket) -> ObjectStore:
    """What test_object_store.py's tests below run against here: a store in a fresh S3 bucket."""
    return ObjectStore(f"s3://{s3_bucket}/store", s3_server.storage_options)


# The store's semantics, as test_object_store.py states them for a directory and fsspec's memory
# store, run again here against S3 through the `store` fixture above.
test_push_then_pull_elsewhere_gives_identical_files_and_skips_dot_files = (
    on_every_store.test_push_then_pull_elsewhere_gives_identical_files_and_skips_dot_files)
test_identical_files_are_stored_once = on_every_store.test_identical_files_are_stored_once
test_pull_of_a_folder_never_pushed_leaves_the_local_one_alone = (
    on_every_store.test_pull_of_a_folder_never_pushed_leaves_the_local_one_alone)
test_pull_makes_the_local_folder_equal_to_the_store_reusing_matching_files = (
    on_every_store.test_pull_makes_the_local_folder_equal_to_the_store_reusing_matching_files)
test_a_corrupt_object_fails_the_pull_and_keeps_the_old_folder = (
    on_every_store.test_a_corrupt_object_fails_the_pull_and_keeps_the_old_folder)
test_a_missing_object_fails_the_pull_with_its_name_and_keeps_the_old_folder = (
    on_every_store.test_a_missing_object_fails_the_pull_with_its_name_and_keeps_the_old_folder)
test_unsafe_paths_in_a_manifest_are_refused_before_anything_is_written = (
    on_every_store.test_unsafe_paths_in_a_manifest_are_refused_before_anything_is_written)


def write_pngs(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(folder / f"aug-{index:03d}.png")


def test_a_stage_folder_round_trips_through_s3_byte_for_byte(s3_server, s3_bucket, tmp_path):
    source = tmp_path / "pod-a" / "augmented_crops" / "fibrocystic"
    write_pngs(source / "images", 40, seed=0)
    shutil.copyfile(source / "images" / "aug-000.png", source / "images" / "orig-000.png")  # stored once
    (source / "index.parquet").write_bytes(b"index")
    (source / ".index.parquet.99.tmp").write_bytes(b"half-written")
    url = f"s3://{s3_bucket}/store"
    before = len(s3_server.requests())

    pushed = ObjectStore(url, s3_server.storage_options).push(source, "augmented_crops/fibrocystic")

    files = folder_files(source)
    assert (pushed.files, pushed.transferred) == (42, 41)
    assert pushed.transferred_bytes == sum(p.stat().st_size for p in files.values()) - (source / "images/orig-000.png").stat().st_size
    assert s3_server.count(before)["PUT"] == 41 + 1, "one PUT per object and one for the manifest, nothing moved"
    keys = sorted(s3_server.filesystem().find(s3_bucket))
    objects = sorted({f"{s3_bucket}/store/objects/{sha[:2]}/{sha[2:]}" for sha in map(sha256_file, files.values())})
    assert keys == sorted([*objects, f"{s3_bucket}/store/manifests/augmented_crops/fibrocystic.json"]), "no temporary keys"
    stored = json.loads(s3_server.filesystem().cat_file(f"{s3_bucket}/store/manifests/augmented_crops/fibrocystic.json"))
    assert stored["files"] == {relative: {"sha256": sha256_file(path), "size": path.stat().st_size}
                               for relative, path in files.items()}

    # Another pod: its own s3fs client, an empty data folder.
    pod = ObjectStore(url, s3_server.storage_options | {"skip_instance_cache": True})
    target = tmp_path / "pod-b" / "augmented_crops" / "fibrocystic"
    before = len(s3_server.requests())
    pulled = pod.pull("augmented_crops/fibrocystic", target)
    assert (pulled.files, pulled.transferred) == (42, 41)
    assert s3_server.count(before)["GET"] == 41 + 1, "one GET per object and one for the manifest"
    assert tree_hashes(target) == {k: v for k, v in tree_hashes(source).items() if not k.startswith(".")}
    assert pod.push(target, "augmented_crops/fibrocystic").transferred == 0
    assert pod.pull("augmented_crops/fibrocystic", target).transferred == 0


def evaluate_sensor(params_file, store: ObjectStoreResource, cursor=None):
    resources = {"params": ParamsResource(params_file=str(params_file)), "object_store": store}
    context = dg.build_sensor_context(cursor=cursor, resources=resources)
    result = raw_slides_sensor(context)
    return ([] if isinstance(result, dg.SkipReason) else result), context.cursor


def test_the_raw_slides_sensor_watches_manifests_the_lab_pushed_to_s3(s3_server, s3_bucket, small_params, small_dataset):
    url = f"s3://{s3_bucket}/histo-assets"
    resource = ObjectStoreResource(url=url, storage_options=s3_server.storage_options)
    store = ObjectStore(url, s3_server.storage_options)
    for name in THESIS_CLASSES:
        store.push(small_dataset / "raw" / name, f"raw/{name}")
    _, cursor = evaluate_sensor(small_params, resource)
    unchanged, cursor = evaluate_sensor(small_params, resource, cursor)
    assert unchanged == []

    changed_class = THESIS_CLASSES[2]
    tissue_image((128, 128), seed=98).save(small_dataset / "raw" / changed_class / "new-slide.png")
    unpushed, cursor = evaluate_sensor(small_params, resource, cursor)
    assert unpushed == [], "a file only on the lab's machine is not what the cluster will read"

    # The lab uploads with the CLI, which knows the server only from AWS_ENDPOINT_URL.
    cli = [sys.executable, "-m", "histo_assets.cli", "store", "push", f"raw/{changed_class}", "--url", url,
           "--data-dir", str(small_dataset)]
    uploaded = subprocess.run(cli, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                              env=dict(os.environ) | s3_server.env())
    assert uploaded.returncode == 0, uploaded.stderr
    assert f"pushed raw/{changed_class}: 1 of 3 file(s)" in uploaded.stdout
    pushed, cursor = evaluate_sensor(small_params, resource, cursor)
    assert [r.partition_key for r in pushed] == [changed_class]
    assert pushed[0].run_key.startswith(changed_class)

    (small_dataset / "raw" / changed_class / "new-slide.png").unlink()
    store.push(small_dataset / "raw" / changed_class, f"raw/{changed_class}")
    removed, _ = evaluate_sensor(small_params, resource, cursor)
    assert [r.partition_key for r in removed] == [changed_class]


def test_a_pod_lost_mid_training_resumes_from_s3(pipeline, tiny_model_cache, s3_server, s3_bucket, tmp_path):
    """test_object_store.py's lost pod, with the store on S3: the next pod is a `histo-assets materialize`
    process given only HISTO_ASSETS_STORE_URL=s3://... and the endpoint in AWS_ENDPOINT_URL."""
    url = f"s3://{s3_bucket}/histo-assets"
    on_every_store.resume_a_lost_pod(pipeline, tiny_model_cache, tmp_path, ObjectStore(url, s3_server.storage_options),
                                     url, env=dict(os.environ) | s3_server.env())


def test_a_release_on_an_s3_dvc_remote_is_pulled_and_got_byte_for_byte(s3_server, tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path)
    executable = dvc_executable()
    supports = subprocess.run([str(executable), "version"], capture_output=True, text=True).stdout
    assert "s3 (s3fs" in supports, f"dvc has no S3 support: run scripts/setup.sh (dvc[s3] in requirements-dvc.txt)\n{supports}"
    bucket = s3_server.new_bucket("dvc")
    remote = ("store", f"s3://{bucket}/releases")
    repo = new_repo(tmp_path / "repo")
    dvc = DvcCli(executable, repo)
    assert dvc.init() is True
    # The endpoint goes into the project's DVC config, so every clone of a release tag reaches the server.
    dvc.run("remote", "add", "--project", "--default", *remote)
    dvc.run("remote", "modify", "--project", remote[0], "endpointurl", s3_server.endpoint_url)
    git(repo, "add", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
    git(repo, "commit", "--quiet", "-m", "DVC with an S3 remote")
    metrics, plots = make_extras(tmp_path / "plots")
    info = build_release(make_images(tmp_path / "generated", seed=1), repo / RELEASE_PATH, name="demo",
                         metrics_table=metrics, plots=plots, repo_url=str(repo), repo_path=RELEASE_PATH)
    expected = tree_hashes(info.path)

    release = publish_release(dvc, repo, info.path, info.tag, f"Release {info.tag}", remote)

    md5 = release.md5
    keys = s3_server.filesystem().find(f"{bucket}/releases")
    assert f"{bucket}/releases/files/md5/{md5[:2]}/{md5[2:]}" in keys, "the folder's .dir object is on S3"
    assert len(keys) == len(set(expected.values())) + 1, "every file, and the .dir listing"
    # From here on only S3 holds the data: no cache, no folder, in the publishing repository.
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(info.path)

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--branch", release.tag, str(repo), str(clone))
    before = len(s3_server.requests())
    DvcCli(executable, clone).pull([clone / f"{RELEASE_PATH}.dvc"])
    assert s3_server.count(before)["GET"] >= len(expected), "the files came from the S3 server"
    assert tree_hashes(clone / RELEASE_PATH) == expected

    before = len(s3_server.requests())
    out = DvcCli(executable, clone).get(str(repo), RELEASE_PATH, release.tag, tmp_path / "downstream" / "demo")
    assert s3_server.count(before)["GET"] >= len(expected), "dvc get fetched from the S3 server"
    assert tree_hashes(out) == expected
    assert len(read_manifest(out)) == len([path for path in expected if path.startswith("images/")])
