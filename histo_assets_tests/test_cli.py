"""cli.py: `histo-assets materialize` runs every asset for every partition, and a refresh with nothing changed
recomputes nothing, launches only the release and leaves every file as it was."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import dagster as dg
import pytest

from histo_assets.params import PROJECT_ROOT
from histo_assets_tests.pipeline_reading import (
    ALWAYS_REWRITTEN,
    REUSING_ASSETS,
    all_asset_partitions,
    check_results,
    snapshot,
)
from histo_assets_tests.tiny_pipeline import CLASSES, EVALUATED_STEPS, data_version, latest, metadata, run_ok


def test_every_asset_materialises_for_every_partition(pipeline):
    log = (pipeline.root / "first_run.log").read_text()
    for work_done in (" from step ", "generating ", "extracted "):  # what a no-change refresh must not log
        assert work_done in log, work_done
    for tissue_class in CLASSES:  # the first stage of the job that changed, not the first in the alphabet
        assert f" {tissue_class}: launched because slide_inventory: its inputs, params or code changed" in log
    with pipeline.instance() as instance:
        missing = [(asset, partition) for asset, partition in all_asset_partitions() if latest(instance, asset, partition) is None]
        assert missing == []
        for tissue_class in CLASSES:
            run_id = latest(instance, "hypernetwork_checkpoints", tissue_class).run_id
            assert check_results(instance, run_id) == {("hypernetwork_checkpoints", "all_checkpoints_load"): True}
    assert not list(pipeline.data.rglob("*.staging")), "staging folders left behind"


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


def test_every_folder_the_pipeline_writes_is_ignored_by_git(pipeline):
    """The demo must leave a clone's `git status` as it was: every asset folder under data/ is ignored.

    Releases are the exception by design: their .dvc files are committed beside an ignored folder.
    """
    written = sorted(path.name for path in pipeline.data.iterdir() if path.is_dir() and path.name != "releases")
    assert "base_model" in written and "classifier_utility" in written
    unignored = [name for name in written
                 if subprocess.run(["git", "check-ignore", "-q", f"data/{name}/"], cwd=PROJECT_ROOT).returncode != 0]
    assert unignored == []


CHECK_EVERY_STAGE = """
import sys
from histo_assets.definitions import ASSETS
from histo_assets.params import load_params
from histo_assets.resources import BaseModelResource
from histo_assets.stage import Part

p = load_params(sys.argv[1])
parts = {None: [Part()], "tissue_class": [Part(c) for c in p.classes],
         "class_and_step": [Part(c, step) for c in p.classes for step in p.steps]}
stale = [(asset.name, part) for asset in ASSETS if asset.spec is not None for part in parts[asset.partitioned]
         if not asset.spec.is_current(p, part, BaseModelResource())]
heavy = [m for m in ("torch", "scipy", "matplotlib", "skimage", "diffusers", "transformers") if m in sys.modules]
print(stale, heavy)
"""


def test_checking_that_every_stage_is_unchanged_imports_no_torch(pipeline):
    """Every refresh, CLI start and UI load pays for what loading the definitions and the fingerprint check import:
    torch, scipy, matplotlib and scikit-image took 4 of its 6 seconds. Only a run that computes imports them."""
    checked = subprocess.run([sys.executable, "-c", CHECK_EVERY_STAGE, str(pipeline.params)], cwd=PROJECT_ROOT,
                             env=pipeline.environment(), capture_output=True, text=True, timeout=300)
    run_ok(checked)
    assert checked.stdout.strip() == "[] []", "every stage of the pipeline is current, and nothing heavy was imported"
