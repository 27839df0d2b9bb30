"""assets/training.py: hypernetwork checkpoints (A1111 files, retraining on a changed param, resuming), imported
hypernetworks and the blocking checkpoint check, on the tiny pipeline (conftest's ``pipeline``) and in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import torch
from PIL import Image

from histo_assets.core.a1111_text import parse_a1111_parameters
from histo_assets.core.hypernetwork import load_hypernetwork
from histo_assets.core.io import sha256_file
from histo_assets_tests.conftest import write_params
from histo_assets_tests.pipeline_reading import (
    a1111_file,
    all_asset_partitions,
    base_model_sha256,
    check_results,
    in_process_checks,
    materialize_in_process,
)
from histo_assets_tests.tiny_pipeline import (
    BASE_MODEL_NAME,
    CLASSES,
    FIRST,
    SECOND,
    STEPS,
    TINY,
    TINY_SIZES,
    Pipeline,
    data_version,
    latest,
    metadata,
    run_ok,
)


def test_checkpoints_are_a1111_files_for_every_step_with_the_base_model_hash(pipeline):
    short = base_model_sha256(pipeline.data)[:10]
    for tissue_class in CLASSES:
        folder = pipeline.data / "hypernetwork_checkpoints" / tissue_class
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["base_model_short_hash"] == short
        assert [row["step"] for row in summary["checkpoints"]] == STEPS
        for row in summary["checkpoints"]:
            path = folder / f"{tissue_class}-{row['step']}.pt"
            assert row["file"] == path.name and row["sha256"] == sha256_file(path)
            raw = torch.load(path, map_location="cpu", weights_only=True)
            assert {key for key in raw if isinstance(key, int)} == set(TINY_SIZES)
            assert all(isinstance(raw[w], tuple) and len(raw[w]) == 2 and "linear.0.weight" in raw[w][0] for w in TINY_SIZES)
            hn = load_hypernetwork(path)
            # A1111 numbering: <name>-N.pt is written after N - 1 updates.
            assert (hn.name, hn.step) == (tissue_class, row["step"] - 1)
            assert (hn.sd_checkpoint, hn.sd_checkpoint_name) == (short, BASE_MODEL_NAME)
            assert hn.options.sizes == TINY_SIZES
            assert all(torch.isfinite(t).all() for t in hn.state_dict().values())
        assert load_hypernetwork(folder / f"{tissue_class}.pt").step == 6
        assert (folder / "loss.png").is_file()


def test_changed_learning_rate_retrains_and_regenerates_but_reuses_ingest(pipeline, tmp_path):
    work = pipeline.copy(tmp_path / "project")
    with work.instance() as instance:
        before = {key: latest(instance, *key) for key in all_asset_partitions()}
    folder = work.data / "hypernetwork_checkpoints" / FIRST
    old = json.loads((folder / "summary.json").read_text())

    output = run_ok(work.materialize("--partition", FIRST, "--set", "training.learning_rate=0.0002", "--rerun-unchanged"))

    assert "resuming" not in output, "a changed learning rate must start over, not resume"
    assert json.loads((folder / f"{FIRST}-settings.json").read_text())["learning_rate"] == "0.0002"
    new = json.loads((folder / "summary.json").read_text())
    assert new["training_set"] == old["training_set"] and new["fingerprint"] != old["fingerprint"]
    assert [r["step"] for r in new["checkpoints"]] == STEPS
    assert {r["sha256"] for r in new["checkpoints"]}.isdisjoint({r["sha256"] for r in old["checkpoints"]})
    with work.instance() as instance:
        for asset in ("square_crops", "augmented_crops"):
            assert metadata(latest(instance, asset, FIRST))["reused_unchanged_output"] is True, asset
        trained = latest(instance, "hypernetwork_checkpoints", FIRST)
        assert metadata(trained)["reused_unchanged_output"] is False
        assert data_version(trained) != data_version(before[("hypernetwork_checkpoints", FIRST)])
        assert check_results(instance, trained.run_id) == {("hypernetwork_checkpoints", "all_checkpoints_load"): True}
        for step in STEPS:
            partition = dg.MultiPartitionKey({"tissue_class": FIRST, "step": str(step)})
            assert metadata(latest(instance, "synthetic_images", partition))["reused_unchanged_output"] is False
            assert metadata(latest(instance, "checkpoint_metrics", partition))["reused_unchanged_output"] is False
        baseline = dg.MultiPartitionKey({"tissue_class": FIRST, "step": "0"})
        assert metadata(latest(instance, "synthetic_images", baseline))["reused_unchanged_output"] is True, \
            "the base model's images do not depend on the hypernetwork's training"
        # The other class and the unpartitioned assets were not touched.
        for key, record in before.items():
            if key[1] is None or FIRST not in key[1]:
                assert latest(instance, *key).storage_id == record.storage_id, key
    for row in new["checkpoints"]:
        folder = work.data / "synthetic_images" / FIRST / str(row["step"])
        assert set(pd.read_parquet(folder / "index.parquet")["hypernetwork_sha256"]) == {row["sha256"]}
        png = sorted((folder / "images").glob("*.png"))[0]
        with Image.open(png) as image:
            assert f"<hypernet:{FIRST}-{row['step']}:1.0>" in parse_a1111_parameters(image.text["parameters"])["Prompt"]


def test_interrupted_training_resumes_to_the_same_weights(pipeline, tmp_path):
    work = pipeline.copy(tmp_path / "project")
    folder = work.data / "hypernetwork_checkpoints" / FIRST
    original_summary = json.loads((folder / "summary.json").read_text())
    # What a run killed between the step-3 and step-6 checkpoints leaves: run.json, settings, the
    # step-3 checkpoint and its optimizer sidecar, and a loss log; no later files and no summary.
    lost = [f"{FIRST}-6.pt", f"{FIRST}-6.pt.optim", f"{FIRST}.pt", f"{FIRST}.pt.optim", "summary.json", "loss.png"]
    originals = {name: (folder / name).read_bytes() for name in lost}
    for name in lost:
        (folder / name).unlink()
    assert (folder / "run.json").is_file() and (folder / f"{FIRST}-3.pt").is_file()

    result, logs = materialize_in_process(work, ["hypernetwork_checkpoints"], FIRST)

    assert result.success
    assert any("continuing the training run" in m for m in logs), logs
    assert any(f"resuming {FIRST} from {FIRST}-3.pt at step 2" in m for m in logs), logs
    assert result.asset_materializations_for_node("hypernetwork_checkpoints")[0].metadata["reused_unchanged_output"].value is False
    assert in_process_checks(result)["all_checkpoints_load"].passed
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_from"] == f"{FIRST}-3.pt"
    assert summary["checkpoints"] == original_summary["checkpoints"]
    for name in lost[:4]:
        assert (folder / name).read_bytes() == originals[name], f"{name} differs from the uninterrupted run's"


def test_resume_retrains_a_checkpoint_lost_before_the_final_file(pipeline, tmp_path):
    work = pipeline.copy(tmp_path / "project")
    folder = work.data / "hypernetwork_checkpoints" / FIRST
    original = (folder / f"{FIRST}-6.pt").read_bytes()
    for name in (f"{FIRST}-6.pt", f"{FIRST}-6.pt.optim", "summary.json"):
        (folder / name).unlink()

    result, _ = materialize_in_process(work, ["hypernetwork_checkpoints"], FIRST)

    assert in_process_checks(result)["all_checkpoints_load"].passed
    assert result.success
    assert (folder / f"{FIRST}-6.pt").read_bytes() == original


class NotAHypernetwork:
    """Pickled into a .pt to check that imports load in safe (weights-only) mode."""


def test_imported_hypernetworks_are_indexed_and_bad_files_skipped_with_reasons(tmp_path, tiny_model_cache):
    work = Pipeline(tmp_path)
    write_params(tmp_path, Path("data"), **TINY)
    shutil.copytree(tiny_model_cache, work.data / ".cache" / "tiny_sd")
    inbox = work.data / "imported_hypernetworks" / FIRST
    inbox.mkdir(parents=True)
    a1111_file(inbox / "lab_net.pt", (48, 32), "lab_net", 1234)
    a1111_file(inbox / "wider.pt", (48, 768), "wider", 500)
    a1111_file(inbox / "sd2_only.pt", (1024, 320), "sd2_only", 10)
    (inbox / "corrupt.pt").write_bytes(b"\x80\x02 definitely not a torch archive")
    torch.save({"payload": NotAHypernetwork()}, inbox / "pickled.pt")
    (inbox / "README.txt").write_text("not a hypernetwork")

    result, logs = materialize_in_process(work, ["imported_hypernetwork_index"], FIRST)

    assert result.success
    out = work.data / "imported_hypernetwork_index" / FIRST
    index = pd.read_parquet(out / "index.parquet").set_index("file")
    assert sorted(index.index) == ["lab_net.pt", "wider.pt"]
    assert (index.loc["lab_net.pt", "name"], index.loc["lab_net.pt", "step"]) == ("lab_net", 1234)
    assert (index.loc["lab_net.pt", "sizes"], index.loc["lab_net.pt", "unused_sizes"]) == ("48,32", "")
    assert index.loc["wider.pt", "unused_sizes"] == "768"
    assert index.loc["lab_net.pt", "sha256"] == sha256_file(inbox / "lab_net.pt")
    assert index.loc["lab_net.pt", "sd_checkpoint_name"] == "lab-model"
    problems = {p["file"]: p["reason"] for p in json.loads((out / "summary.json").read_text())["problems"]}
    assert sorted(problems) == ["corrupt.pt", "pickled.pt", "sd2_only.pt"]
    assert "not a loadable hypernetwork file" in problems["corrupt.pt"]
    assert "not a loadable hypernetwork file" in problems["pickled.pt"]
    assert "none of its sizes" in problems["sd2_only.pt"] and "[32, 48, 64]" in problems["sd2_only.pt"]
    shown = result.asset_materializations_for_node("imported_hypernetwork_index")[0].metadata
    assert shown["imported"].value == 2 and "corrupt.pt" in shown["skipped"].value
    assert sum("skipped imported hypernetwork" in m for m in logs) == 3

    empty, _ = materialize_in_process(work, ["imported_hypernetwork_index"], SECOND)
    assert empty.success
    assert len(pd.read_parquet(work.data / "imported_hypernetwork_index" / SECOND / "index.parquet")) == 0

    generated, _ = materialize_in_process(work, ["imported_synthetic_images"], FIRST)
    assert generated.success
    for stem, step in (("lab_net", 1234), ("wider", 500)):
        images = sorted((work.data / "imported_synthetic_images" / FIRST / stem / "images").glob("*.png"))
        assert len(images) == TINY["generation"]["images_per_checkpoint"]
        chunk = parse_a1111_parameters(Image.open(images[0]).text["parameters"])
        assert chunk["Prompt"].endswith(f"<hypernet:{stem}:1.0>") and "Hypernet" not in chunk
        index = pd.read_parquet(images[0].parent.parent / "index.parquet")
        assert set(index["hypernetwork_sha256"]) == {sha256_file(inbox / f"{stem}.pt")}
        assert f"-s{step:06d}-" in images[0].name


def test_corrupted_checkpoint_fails_the_blocking_check_on_rerun(pipeline, tmp_path):
    work = pipeline.copy(tmp_path / "project")
    path = work.data / "hypernetwork_checkpoints" / FIRST / f"{FIRST}-3.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    result, _ = materialize_in_process(work, ["hypernetwork_checkpoints"], FIRST)

    check = in_process_checks(result)["all_checkpoints_load"]
    assert check.passed is False
    assert f"{FIRST}-3.pt: missing or changed on disk" in check.metadata["problems"].value
    # Blocking: the run fails, so nothing downstream would consume the damaged folder.
    assert not result.success
    materialization = result.asset_materializations_for_node("hypernetwork_checkpoints")[0]
    assert materialization.metadata["reused_unchanged_output"].value is True


def test_checkpoint_that_does_not_load_fails_the_check_with_a_reason(pipeline, tmp_path):
    work = pipeline.copy(tmp_path / "project")
    folder = work.data / "hypernetwork_checkpoints" / FIRST
    path = folder / f"{FIRST}-3.pt"
    path.write_bytes(path.read_bytes()[:1000])
    # Interrupted after training, before the summary was written: the re-run resumes (nothing left to
    # train) and records the damaged file with its own hash, so only loading it can catch the damage.
    (folder / "summary.json").unlink()

    result, _ = materialize_in_process(work, ["hypernetwork_checkpoints"], FIRST)

    assert not result.success
    check = in_process_checks(result)["all_checkpoints_load"]
    assert check.passed is False
    assert f"{FIRST}-3.pt" in check.metadata["problems"].value
