"""Training, generation and evaluation assets, end to end through `histo-assets materialize`.

The graph runs on the tiny dataset of ``tiny_pipeline`` (conftest's
``pipeline`` fixture), in a subprocess whose partitions come from tiny params.

Per-class assets (training, imported hypernetworks, the checkpoint check) are
also materialised in-process with ``dg.materialize``, built from the same tiny
params (conftest's ``assets_by_name``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from PIL import Image

from histo_assets.core.a1111_text import parse_a1111_parameters
from histo_assets.core.base_model import folder_weights_sha256, tiny_model_dir
from histo_assets.core.evaluation import FID_RANK_DEFICIENT, SMALL_REFERENCE, TABLE_COLUMNS
from histo_assets.core.features import FALLBACK_NAME
from histo_assets.core.hypernetwork import load_hypernetwork
from histo_assets.core.io import sha256_file
from histo_assets.core.sampling import image_seed
from histo_assets.core.layout import Layout
from histo_assets.params import PROJECT_ROOT, load_params
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets_tests.conftest import TINY_MODEL_SEED, assets_by_name, write_params
from histo_assets_tests.tiny_pipeline import (
    BASE_MODEL_NAME,
    CLASSES,
    EVALUATED_STEPS,
    FIRST,
    IMAGES_PER_CHECKPOINT,
    SECOND,
    SEED,
    STEPS,
    TINY,
    TINY_SIZES,
    Pipeline,
    data_version,
    latest,
    metadata,
    run_ok,
)

# Stages that skip work when their inputs are unchanged, and report it.
REUSING_ASSETS = {"slide_inventory", "square_crops", "augmented_crops", "hypernetwork_checkpoints",
                  "imported_hypernetwork_index", "synthetic_images", "checkpoint_metrics", "metrics_summary"}
# The one output folder rewritten on every run (with identical bytes: see
# test_release_is_unchanged_by_a_refresh_with_nothing_changed).
ALWAYS_REWRITTEN = ("releases/",)


def base_model_sha256(data: Path) -> str:
    return folder_weights_sha256(tiny_model_dir(data / ".cache" / "tiny_sd", TINY_MODEL_SEED))


# --- reading the Dagster instance ---------------------------------------------------------------------


def expected_partitions(spec: dg.AssetSpec) -> list[str | None]:
    if spec.partitions_def is None:
        return [None]
    if isinstance(spec.partitions_def, dg.MultiPartitionsDefinition):
        return [dg.MultiPartitionKey({"tissue_class": c, "step": str(s)}) for c in CLASSES for s in EVALUATED_STEPS]
    return list(CLASSES)


def all_asset_partitions() -> list[tuple[str, str | None]]:
    """Every (asset, partition) the CLI materialises with the tiny params, from the project's definitions."""
    from histo_assets.definitions import defs

    return [(spec.key.to_user_string(), partition) for spec in defs.resolve_all_asset_specs()
            for partition in expected_partitions(spec)]


def check_results(instance: dg.DagsterInstance, run_id: str) -> dict[tuple[str, str], bool]:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return {
        (e.dagster_event.event_specific_data.asset_key.to_user_string(), e.dagster_event.event_specific_data.check_name):
            e.dagster_event.event_specific_data.passed
        for e in events
    }


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(folder).as_posix(): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def materialize_in_process(pipeline: Pipeline, names: list[str], partition: str, overrides: list[str] | None = None):
    """Per-class assets in this process, built from the pipeline's params."""
    instance = dg.DagsterInstance.ephemeral()
    available = assets_by_name(load_params(pipeline.params))
    result = dg.materialize(
        [available[name] for name in names],
        partition_key=partition,
        resources={"params": ParamsResource(params_file=str(pipeline.params)), "base_model": BaseModelResource(device="cpu"),
                   "object_store": ObjectStoreResource()},
        run_config={"ops": {name: {"config": load_params(pipeline.params, overrides or []).nested_overrides(overrides or [])} for name in names}},
        instance=instance,
        raise_on_error=False,
    )
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    return result, logs


def in_process_checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


# --- 1. end to end ---------------------------------------------------------------------------------


def test_every_asset_materialises_for_every_partition(pipeline):
    log = (pipeline.root / "first_run.log").read_text()
    for work_done in (" from step ", "generating ", "extracted "):  # what a no-change refresh must not log
        assert work_done in log, work_done
    with pipeline.instance() as instance:
        missing = [(asset, partition) for asset, partition in all_asset_partitions() if latest(instance, asset, partition) is None]
        assert missing == []
        for tissue_class in CLASSES:
            run_id = latest(instance, "hypernetwork_checkpoints", tissue_class).run_id
            assert check_results(instance, run_id) == {("hypernetwork_checkpoints", "all_checkpoints_load"): True}
    assert not list(pipeline.data.rglob("*.staging")), "staging folders left behind"


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


def test_synthetic_images_carry_a1111_parameters_naming_hypernetwork_and_seed(pipeline):
    short = base_model_sha256(pipeline.data)[:10]
    for tissue_class in CLASSES:
        for step in STEPS:
            checkpoint = pipeline.data / "hypernetwork_checkpoints" / tissue_class / f"{tissue_class}-{step}.pt"
            folder = pipeline.data / "synthetic_images" / tissue_class / str(step)
            index = pd.read_parquet(folder / "index.parquet")
            assert list(index["index"]) == list(range(IMAGES_PER_CHECKPOINT))
            files = sorted((folder / "images").glob("*.png"))
            assert [p.name for p in files] == sorted(index["file"])
            for row in index.itertuples():
                with Image.open(folder / "images" / row.file) as image:
                    assert (image.size, image.mode) == ((64, 64), "RGB")
                    parameters = parse_a1111_parameters(image.text["parameters"])
                seed = image_seed(SEED, tissue_class, step, row.index)
                assert row.seed == seed and row.file.endswith(f"-{seed}.png")
                assert row.sha256 == sha256_file(folder / "images" / row.file)
                assert parameters["Seed"] == str(seed)
                assert "Hypernet" not in parameters and parameters["RNG"] == "CPU"
                assert parameters["Prompt"].count("<hypernet:") == 1
                assert f"<hypernet:{checkpoint.stem}:1.0>" in parameters["Prompt"]
                assert parameters["Model hash"] == short
                assert (parameters["Steps"], parameters["Sampler"], parameters["Size"]) == ("2", "Euler", "64x64")
                assert parameters["Negative prompt"] == "grainy, blurry, low quality"


def test_step_0_is_the_base_model_with_the_same_prompt_scored_but_never_released(pipeline):
    for tissue_class in CLASSES:
        baseline = pd.read_parquet(pipeline.data / "synthetic_images" / tissue_class / "0" / "index.parquet")
        trained = pd.read_parquet(pipeline.data / "synthetic_images" / tissue_class / str(STEPS[-1]) / "index.parquet")
        assert len(baseline) == IMAGES_PER_CHECKPOINT and baseline["hypernetwork_sha256"].isna().all()
        with Image.open(pipeline.data / "synthetic_images" / tissue_class / "0" / "images" / baseline["file"].iloc[0]) as image:
            parameters = parse_a1111_parameters(image.text["parameters"])
        assert "<hypernet:" not in parameters["Prompt"] and parameters["Prompt"] == baseline["prompt"].iloc[0]
        assert baseline["prompt"].iloc[0] == trained["prompt"].iloc[0], "the same prompt as the checkpoints"
    summary = json.loads((pipeline.data / "metrics_summary" / "details" / "summary.json").read_text())
    assert set(summary["against_base_model"]) == set(CLASSES)
    assert all(v["verdict"] in {"better", "worse", "indistinguishable", "unknown"} for v in summary["against_base_model"].values())
    assert all(step != 0 for step in summary["best"].values())
    metrics = json.loads((pipeline.data / "metrics_summary" / "metrics.json").read_text())
    assert all("against_base_model" in metrics["classes"][c] for c in CLASSES)
    csv = pd.read_csv(pipeline.data / "metrics_summary" / "metrics.csv")
    assert {(c, 0) for c in CLASSES} <= set(zip(csv["tissue_class"], csv["step"]))

def test_checkpoint_metrics_are_finite_and_labelled_as_fallback_features(pipeline):
    with pipeline.instance() as instance:
        for tissue_class in CLASSES:
            for step in EVALUATED_STEPS:
                row = json.loads((pipeline.data / "checkpoint_metrics" / tissue_class / str(step) / "summary.json").read_text())["row"]
                assert (row["tissue_class"], row["step"]) == (tissue_class, step)
                assert math.isfinite(row["fid"]) and math.isfinite(row["kid_mean"]) and math.isfinite(row["fid_vs_train"])
                assert row["extractor"] == FALLBACK_NAME == "random-conv-fallback"
                assert row["comparable_with"] == "none" and "antialias" in row["preprocessing"]
                assert "not comparable" in row["extractor_note"]
                assert row["is_mean"] is None and row["is_std"] is None and "logits" in row["is_note"]
                assert row["n_generated"] == IMAGES_PER_CHECKPOINT and row["n_reference"] >= 2
                assert row["feature_dim"] == 256
                assert row["fid_ci_low"] <= row["fid"] <= row["fid_ci_high"]
                assert row["kid_ci_low"] <= row["kid_mean"] <= row["kid_ci_high"]
                # A tiny reference set against 256-d features: every row says so.
                assert {SMALL_REFERENCE, FID_RANK_DEFICIENT} <= set(row["flags"].split(";"))
                shown = metadata(latest(instance, "checkpoint_metrics", dg.MultiPartitionKey({"tissue_class": tissue_class, "step": str(step)})))
                assert shown["fid"] == row["fid"] and shown["extractor"] == FALLBACK_NAME
                assert shown["flags"] == row["flags"] and shown["comparable_with"] == "none"


def test_metrics_summary_has_every_class_and_step_plus_pooled_rows_and_its_files(pipeline):
    layout = Layout(pipeline.data)
    table = pd.read_parquet(layout.metrics_details / "metrics.parquet")
    expected = {(c, s) for c in [*CLASSES, "all"] for s in EVALUATED_STEPS}
    assert set(zip(table["tissue_class"], table["step"])) == expected and len(table) == len(expected)
    pooled = table[table["tissue_class"] == "all"]
    assert (pooled["n_generated"] == IMAGES_PER_CHECKPOINT * len(CLASSES)).all()
    assert pooled["fid"].map(math.isfinite).all()
    csv = pd.read_csv(layout.metrics_summary / "metrics.csv", keep_default_na=False)
    assert list(csv.columns) == TABLE_COLUMNS and len(csv) == len(expected)
    assert (csv["flags"] != "").all() and (csv["comparable_with"] == "none").all()
    assert (csv["fid_ci_low"].astype(float) <= csv["fid"].astype(float)).all()
    for name in [*CLASSES, "all"]:
        plot = pd.read_csv(layout.metrics_summary / "plots" / f"{name}.csv")
        assert list(plot.columns) == TABLE_COLUMNS[1:] and (plot["extractor"] == FALLBACK_NAME).all()
    dvc_metrics = json.loads((layout.metrics_summary / "metrics.json").read_text())
    assert dvc_metrics["best_by"] == "kid" and dvc_metrics["extractor"] == FALLBACK_NAME
    assert (dvc_metrics["comparable_with"], dvc_metrics["confidence_level"]) == ("none", 0.95)
    assert set(dvc_metrics["classes"]) == set(CLASSES)
    for tissue_class in CLASSES:
        rows = table[table["tissue_class"] == tissue_class]
        best = int(rows.sort_values(["kid_mean", "step"]).iloc[0]["step"])
        entry = dvc_metrics["classes"][tissue_class]
        assert entry["best_step"] == best and str(best) in entry["indistinguishable_steps"].split(";")
        assert entry["kid_mean"] == pytest.approx(float(rows[rows["step"] == best]["kid_mean"].iloc[0]))
        assert entry["kid_ci_low"] <= entry["kid_mean"] <= entry["kid_ci_high"] and entry["flags"]
    for name in ["curves.png", *(f"grid_{c}.png" for c in CLASSES)]:
        with Image.open(layout.metrics_details / name) as image:
            image.verify()


# --- 2. a no-change refresh ----------------------------------------------------------------------


@dataclass(frozen=True)
class Refresh:
    """The pipeline's state before a second `materialize` with nothing changed, and that run's output."""

    files: dict[str, tuple[str, int]]
    records: dict[tuple[str, str | None], dg.EventLogRecord]
    output: str


@pytest.fixture(scope="module")
def refresh(pipeline) -> Refresh:
    files = snapshot(pipeline.data)
    with pipeline.instance() as instance:
        records = {key: latest(instance, *key) for key in all_asset_partitions()}
    # Every run launched, as the UI or a schedule would, so that each must confirm its reuse itself.
    return Refresh(files, records, run_ok(pipeline.materialize("--rerun-unchanged")))


def test_second_materialize_with_nothing_changed_recomputes_nothing(pipeline, refresh):
    for work_done in (" from step ", "generating ", "extracted "):  # training, generation, feature extraction
        assert work_done not in refresh.output, work_done
    before, after = refresh.files, snapshot(pipeline.data)
    assert after.keys() == before.keys()
    # The release is checked on its own below.
    changed = sorted(k for k in after if after[k][0] != before[k][0] and not k.startswith("releases/"))
    assert changed == []
    rewritten = sorted(k for k in after if after[k][1] != before[k][1])
    assert [k for k in rewritten if not k.startswith(ALWAYS_REWRITTEN)] == []
    reporting = set()
    with pipeline.instance() as instance:
        for key, old in refresh.records.items():
            new = latest(instance, *key)
            assert new.storage_id > old.storage_id, f"{key} was not materialised again"
            if key[0] != "dataset_release":
                assert data_version(new) == data_version(old), key
            if "reused_unchanged_output" in metadata(new):
                reporting.add(key[0])
                assert metadata(new)["reused_unchanged_output"] is True, key
    assert reporting >= REUSING_ASSETS


def test_release_is_unchanged_by_a_refresh_with_nothing_changed(pipeline, refresh):
    with pipeline.instance() as instance:
        new = latest(instance, "dataset_release")
    old = refresh.records[("dataset_release", None)]
    assert metadata(new)["tag"] == metadata(old)["tag"]
    assert data_version(new) == data_version(old)


def test_a_default_materialize_with_nothing_changed_launches_only_the_release(pipeline, refresh):
    files = snapshot(pipeline.data)
    with pipeline.instance() as instance:
        before = {key: latest(instance, *key) for key in all_asset_partitions()}

    output = run_ok(pipeline.materialize())

    assert [line for line in output.splitlines() if line.endswith(": materialising")] == \
        ["release_pipeline [1/1]: materialising"]
    assert "release_pipeline [1/1]: launched because dataset_release always runs" in output
    per_class_runs = 2 * len(CLASSES) + len(CLASSES) * len(EVALUATED_STEPS)  # ingest, training, class x step
    assert output.count("unchanged since its last successful run, not launched") == per_class_runs + 2
    after = snapshot(pipeline.data)
    assert {k: v for k, v in after.items() if not k.startswith(ALWAYS_REWRITTEN)} == \
        {k: v for k, v in files.items() if not k.startswith(ALWAYS_REWRITTEN)}
    with pipeline.instance() as instance:
        for key, record in before.items():
            if key[0] != "dataset_release":
                assert latest(instance, *key).storage_id == record.storage_id, key


# --- 3. a changed training param -----------------------------------------------------------------


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


# --- 4. resuming an interrupted training run ---------------------------------------------------------


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


# --- 5. imported hypernetworks ----------------------------------------------------------------------


def a1111_file(path: Path, widths: tuple[int, ...], name: str, step: int) -> Path:
    """An AUTOMATIC1111 .pt written by hand (§2 layout): int width keys holding (k, v) state dicts."""
    g = torch.Generator().manual_seed(step)

    def state(width: int) -> OrderedDict:
        return OrderedDict([
            ("linear.0.weight", torch.randn(2 * width, width, generator=g) * 0.01),
            ("linear.0.bias", torch.zeros(2 * width)),
            ("linear.1.weight", torch.randn(width, 2 * width, generator=g) * 0.01),
            ("linear.1.bias", torch.zeros(width)),
        ])

    contents = {width: (state(width), state(width)) for width in widths}
    contents.update(step=step, name=name, layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=False,
                    weight_initialization="Normal", sd_checkpoint="0123456789", sd_checkpoint_name="lab-model",
                    activate_output=False, use_dropout=False, dropout_structure=[0, 0, 0], last_layer_dropout=False,
                    optional_info=None)
    torch.save(contents, path)
    return path


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


# --- 6. the blocking checkpoint check -----------------------------------------------------------------


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


def test_classifier_utility_scores_every_release_candidate_with_intervals(pipeline):
    folder = pipeline.data / "classifier_utility"
    table = pd.read_csv(folder / "utility.csv")
    candidates = {f"step-{s}" for s in EVALUATED_STEPS} | {"best"}
    assert set(table["candidate"]) == candidates
    for (candidate, variant), rows in table[table["metric"] == "balanced_accuracy"].groupby(["candidate", "variant"]):
        row = rows.iloc[0]
        assert row["ci_low"] <= row["value"] <= row["ci_high"], (candidate, variant)
    assert {"real", "real+synthetic", "synthetic"} <= set(table["variant"])
    overview = json.loads((folder / "utility.json").read_text())
    assert set(overview["verdicts"]) == candidates and overview["best_step_by_utility"] in STEPS
    assert all(set(v.values()) <= {"helps", "hurts", "no_detectable_effect"} for v in overview["verdicts"].values())
    for candidate in candidates:
        assert (folder / "candidates" / candidate / "confusion.csv").is_file()
    card = next((pipeline.data / "releases").glob("*/README.md")).read_text()
    assert "Classifier utility (logistic" in card and "| step-0 |" in card
    with pipeline.instance() as instance:
        shown = metadata(latest(instance, "classifier_utility", None))
        assert "real+synthetic" in shown["table"] and shown["best_step_by_utility"] in STEPS


def test_every_folder_the_pipeline_writes_is_ignored_by_git(pipeline):
    """The demo must leave a clone's `git status` as it was: every asset folder under data/ is ignored.

    Releases are the exception by design: their .dvc files are committed beside an ignored folder.
    """
    written = sorted(path.name for path in pipeline.data.iterdir() if path.is_dir() and path.name != "releases")
    assert "base_model" in written and "classifier_utility" in written
    unignored = [name for name in written
                 if subprocess.run(["git", "check-ignore", "-q", f"data/{name}/"], cwd=PROJECT_ROOT).returncode != 0]
    assert unignored == []
