"""Stage folders through an object store: what Kubernetes pods without a shared disk rely on.

The store is a real fsspec filesystem (a local directory, and fsspec's
in-memory filesystem); the Dagster tests run the real ingest assets in three
"pods", each with its own empty data folder, handing data on only through the store.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from histo_assets.core.io import sha256_file
from histo_assets.core.object_store import ObjectStore, ObjectStoreError, folder_files
from histo_assets.params import PROJECT_ROOT, load_params
from histo_assets.resources import ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import SMALL, THESIS_CLASSES, assets_by_name, write_params
from histo_assets_tests.tiny_pipeline import CLASSES, EVALUATED_STEPS, empty_pipeline, run_ok

FIRST = THESIS_CLASSES[0]


def hashes(folder: Path) -> dict[str, str]:
    return {relative: sha256_file(path) for relative, path in folder_files(folder).items()}


def make_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return folder


@pytest.fixture(params=["directory", "memory"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "directory":
        yield ObjectStore(f"file://{tmp_path / 'bucket'}")
        return
    store = ObjectStore(f"memory://histo-assets-test/{request.node.originalname}")
    yield store
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def test_push_then_pull_elsewhere_gives_identical_files_and_skips_dot_files(store, tmp_path):
    source = make_folder(tmp_path / "a" / "square_crops" / FIRST, {
        "images/c0.png": b"zero", "images/c1.png": b"one", "index.parquet": b"idx", ".index.parquet.1234.tmp": b"partial",
    })
    pushed = store.push(source, f"square_crops/{FIRST}")
    assert (pushed.files, pushed.transferred, pushed.transferred_bytes) == (3, 3, 10)
    target = tmp_path / "b" / "square_crops" / FIRST
    pulled = store.pull(f"square_crops/{FIRST}", target)
    assert (pulled.files, pulled.transferred) == (3, 3)
    assert hashes(target) == hashes(source) and not (target / ".index.parquet.1234.tmp").exists()
    assert store.push(source, f"square_crops/{FIRST}").transferred == 0
    assert store.pull(f"square_crops/{FIRST}", target).transferred == 0


def test_identical_files_are_stored_once(store, tmp_path):
    make_folder(tmp_path / "x", {"a.png": b"same", "b.png": b"same"})
    make_folder(tmp_path / "y", {"orig-a.png": b"same", "aug.png": b"new"})
    assert store.push(tmp_path / "x", "x").transferred == 1
    assert store.push(tmp_path / "y", "y").transferred == 1
    assert len(store.fs.find(f"{store.root}/objects")) == 2


def test_pull_of_a_folder_never_pushed_leaves_the_local_one_alone(store, tmp_path):
    local = make_folder(tmp_path / "raw" / FIRST, {"slide.png": b"lab data"})
    assert store.pull(f"raw/{FIRST}", local) is None
    assert (local / "slide.png").read_bytes() == b"lab data"


def test_pull_makes_the_local_folder_equal_to_the_store_reusing_matching_files(store, tmp_path):
    make_folder(tmp_path / "new", {"keep.png": b"keep", "changed.png": b"v2"})
    store.push(tmp_path / "new", "stage")
    local = make_folder(tmp_path / "local", {"keep.png": b"keep", "changed.png": b"v1", "stale.png": b"old"})
    pulled = store.pull("stage", local)
    assert (pulled.files, pulled.transferred) == (2, 1)
    assert hashes(local) == hashes(tmp_path / "new")


def test_a_corrupt_object_fails_the_pull_and_keeps_the_old_folder(store, tmp_path):
    make_folder(tmp_path / "new", {"a.png": b"good bytes"})
    store.push(tmp_path / "new", "stage")
    (obj,) = store.fs.find(f"{store.root}/objects")
    store.fs.pipe_file(obj, b"evil bytes")
    local = make_folder(tmp_path / "local", {"a.png": b"previous"})
    with pytest.raises(ObjectStoreError, match="does not match its sha256"):
        store.pull("stage", local)
    assert (local / "a.png").read_bytes() == b"previous"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_a_missing_object_fails_the_pull_with_its_name_and_keeps_the_old_folder(store, tmp_path):
    make_folder(tmp_path / "new", {"a.png": b"good bytes"})
    store.push(tmp_path / "new", "stage")
    (obj,) = store.fs.find(f"{store.root}/objects")
    store.fs.rm(obj)
    local = make_folder(tmp_path / "local", {"a.png": b"previous"})
    with pytest.raises(ObjectStoreError, match="lacks the object of stage/a.png"):
        store.pull("stage", local)
    assert (local / "a.png").read_bytes() == b"previous"


@pytest.mark.parametrize("bad", ["../escape.png", "/etc/passwd", "a/../../b", "./a", "a//b"])
def test_unsafe_paths_in_a_manifest_are_refused_before_anything_is_written(store, tmp_path, bad):
    manifest = {"version": 1, "files": {bad: {"sha256": "0" * 64, "size": 1}}}
    store.fs.makedirs(f"{store.root}/manifests", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/manifests/stage.json", json.dumps(manifest).encode())
    with pytest.raises(ObjectStoreError, match="unsafe path"):
        store.pull("stage", tmp_path / "local" / "stage")
    assert not (tmp_path / "local").exists() and not (tmp_path / "escape.png").exists()


def test_unsafe_folder_keys_and_missing_folders_are_refused(store, tmp_path):
    with pytest.raises(ObjectStoreError, match="unsafe path"):
        store.push(tmp_path, "../outside")
    with pytest.raises(ObjectStoreError, match="not a folder"):
        store.push(tmp_path / "missing", "missing")


# --- the assets, in three pods that share only the store ---------------------------------------------

INGEST = ["slide_inventory", "square_crops", "augmented_crops"]


def pod(tmp_path: Path, name: str) -> Path:
    data = tmp_path / name / "data"
    data.mkdir(parents=True)
    return write_params(tmp_path / name, data, **SMALL)


def materialize_in(params_file: Path, names: list[str], store_url: str | None):
    available = assets_by_name(load_params(params_file))
    return dg.materialize(
        [available[name] for name in names],
        partition_key=FIRST,
        resources={"params": ParamsResource(params_file=str(params_file)), "object_store": ObjectStoreResource(url=store_url)},
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {name: {"config": {}} for name in names}},
    )


def reused(result, node: str) -> bool:
    return result.asset_materializations_for_node(node)[0].metadata["reused_unchanged_output"].value


def test_pods_sharing_only_the_store_hand_data_on_and_skip_unchanged_work(small_dataset, tmp_path):
    url = f"file://{tmp_path / 'bucket'}"
    cli = [sys.executable, "-m", "histo_assets.cli", "store", "push", f"raw/{FIRST}", "--url", url, "--data-dir", str(small_dataset)]
    uploaded = subprocess.run(cli, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert uploaded.returncode == 0, uploaded.stderr
    assert f"pushed raw/{FIRST}: 2 of 2 file(s)" in uploaded.stdout

    first = pod(tmp_path, "pod-a")
    materialize_in(first, ["slide_inventory", "square_crops"], url)
    second = pod(tmp_path, "pod-b")
    result = materialize_in(second, ["augmented_crops"], url)
    data_b = second.parent / "data"
    assert not (data_b / "raw").exists(), "augmenting needs only the square crops"
    assert (data_b / "square_crops" / FIRST / "index.parquet").is_file()

    local_only = pod(tmp_path, "workstation")
    shutil.copytree(small_dataset / "raw" / FIRST, local_only.parent / "data" / "raw" / FIRST)
    assert materialize_in(local_only, INGEST, None).success
    for stage in ("square_crops", "augmented_crops"):
        expected = hashes(local_only.parent / "data" / stage / FIRST)
        assert hashes(data_b / stage / FIRST) == expected
    assert not reused(result, "augmented_crops")

    third = materialize_in(pod(tmp_path, "pod-c"), INGEST, url)
    assert reused(third, "square_crops") and reused(third, "augmented_crops")
    pulled = tmp_path / "pod-c" / "data" / "augmented_crops" / FIRST
    assert hashes(pulled) == hashes(local_only.parent / "data" / "augmented_crops" / FIRST)


def test_every_job_in_its_own_empty_pod_gives_the_bytes_of_one_machine(pipeline, tiny_model_cache, tmp_path):
    """The cluster's situation: each job in a fresh data folder, nothing shared but the store."""
    url = f"file://{tmp_path / 'bucket'}"
    store = ObjectStore(url)
    for tissue_class in CLASSES:
        store.push(pipeline.data / "raw" / tissue_class, f"raw/{tissue_class}")
    logs = {}
    for job in ("ingest_pipeline", "base_model_pipeline", "training_pipeline", "checkpoint_pipeline", "summary_pipeline",
                "release_pipeline"):
        pod = empty_pipeline(tmp_path / job, tiny_model_cache)
        logs[job] = run_ok(pod.materialize("--job", job, store_url=url))
    assert f"pulled hypernetwork_checkpoints/{CLASSES[0]}" in logs["checkpoint_pipeline"]
    assert "pushed metrics_summary" in logs["summary_pipeline"]

    folders = sorted(path.removeprefix(f"{store.root}/manifests/").removesuffix(".json")
                     for path in store.fs.find(f"{store.root}/manifests"))
    per_class = ["raw", "slide_inventory", "square_crops", "augmented_crops", "hypernetwork_checkpoints",
                 "imported_hypernetwork_index", "imported_synthetic_images"]
    unpartitioned = ["base_model", "metrics_summary", "classifier_utility"]
    assert len(folders) == len(CLASSES) * (len(per_class) + 2 * len(EVALUATED_STEPS)) + len(unpartitioned), folders
    assert set(unpartitioned) <= set(folders)
    for folder in folders:
        stored = {relative: entry["sha256"] for relative, entry in store.manifest(folder).items()}
        local = hashes(pipeline.data / folder)
        # summary.json records run ids and timings; everything else must be the same bytes.
        assert {k: v for k, v in stored.items() if k != "summary.json"} == {k: v for k, v in local.items() if k != "summary.json"}, folder

    name = load_params(pipeline.params)["release"]["name"]
    released = pd.read_parquet(tmp_path / "release_pipeline" / "data" / "releases" / name / "manifest.parquet")
    reference = pd.read_parquet(pipeline.data / "releases" / name / "manifest.parquet")
    assert sorted(released["sha256"]) == sorted(reference["sha256"])


def resume_a_lost_pod(pipeline, tiny_model_cache, tmp_path, store: ObjectStore, url: str, env=None) -> None:
    """A pod dies after pushing its step-3 checkpoint; the next pod, given only the store, resumes to the same weights."""
    first = CLASSES[0]
    store.push(pipeline.data / "augmented_crops" / first, f"augmented_crops/{first}")
    # What the step-3 checkpoint's push leaves in the store when the pod dies before step 6.
    partial = tmp_path / "lost-pod" / first
    shutil.copytree(pipeline.data / "hypernetwork_checkpoints" / first, partial)
    for name in (f"{first}-6.pt", f"{first}-6.pt.optim", f"{first}.pt", f"{first}.pt.optim", "summary.json", "loss.png"):
        (partial / name).unlink()
    store.push(partial, f"hypernetwork_checkpoints/{first}")

    pod = empty_pipeline(tmp_path / "next-pod", tiny_model_cache)
    log = run_ok(pod.materialize("--job", "training_pipeline", "--partition", first, store_url=url, env=env))

    assert f"resuming {first} from {first}-3.pt" in log
    assert log.count(f"pushed hypernetwork_checkpoints/{first}") == 2, "after the step-6 checkpoint, and at the end"
    stored = {k: v["sha256"] for k, v in store.manifest(f"hypernetwork_checkpoints/{first}").items()}
    reference = hashes(pipeline.data / "hypernetwork_checkpoints" / first)
    for name in (f"{first}-3.pt", f"{first}-6.pt", f"{first}.pt"):
        assert stored[name] == reference[name], f"{name} differs from the uninterrupted run's"


def test_a_pod_lost_mid_training_leaves_checkpoints_the_next_pod_resumes_from(pipeline, tiny_model_cache, tmp_path):
    url = f"file://{tmp_path / 'bucket'}"
    resume_a_lost_pod(pipeline, tiny_model_cache, tmp_path, ObjectStore(url), url)
