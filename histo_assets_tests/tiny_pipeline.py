"""The whole graph on a tiny dataset, materialised by `histo-assets materialize` in a subprocess.

The thesis's checkpoints (steps 5000..40000) cannot be trained on a CPU in a
test, so the graph runs on a tiny params file (two classes, checkpoints at
steps 3 and 6). End-to-end runs go through the CLI, as a lab runs them: a
subprocess whose HISTO_ASSETS_PARAMS names that file, with DAGSTER_HOME in a
temp folder. Tests then read the files and that Dagster instance. conftest's
``pipeline`` fixture builds it once per session; tests that change it work on
copies. Single assets run in the test's own process are built from the same
params by conftest's ``assets_by_name``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.core.steps import BASELINE_STEP
from histo_assets.params import DEFAULT_PARAMS_FILE, PROJECT_ROOT, load_params
from histo_assets_tests.conftest import THESIS_CLASSES, tissue_image, write_params

CLASSES = THESIS_CLASSES[:2]
FIRST, SECOND = CLASSES
STEPS = [3, 6]
# Generated and scored: the base model alone (step 0), then every checkpoint.
EVALUATED_STEPS = [BASELINE_STEP, *STEPS]
IMAGES_PER_CHECKPOINT = 4
SEED = load_params(DEFAULT_PARAMS_FILE).seed
TINY_SIZES = (48, 32, 64)
# params.yaml names no base model, so the WebUI name is the tiny model's folder name.
BASE_MODEL_NAME = "tiny-sd-seed0"
TINY = {
    "classes": CLASSES,
    "resolution": 64,
    "crops": {"mode": "tiles", "tiles": {"tile_size": 64, "min_tissue_fraction": 0.5}},
    "augmentation": {"total": 8, "workers": 1, "distortion": {"magnitude": 1}},
    "checks": {"min_square_crops": 2, "min_augmented_crops": 8},
    "hypernetwork": {"sizes": list(TINY_SIZES)},
    "training": {"max_steps": 6, "checkpoint_steps": STEPS, "learning_rate": "0.0005", "loss_log_every": 2},
    "generation": {"images_per_checkpoint": IMAGES_PER_CHECKPOINT, "steps": 2, "batch_size": 2},
    "metrics": {"kid_subset_size": 4, "kid_subsets": 5, "is_images_per_split": 2, "batch_size": 8,
                "bootstrap_resamples": 50},
}


# --- the pipeline folder: params, data and Dagster home --------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def home(self) -> Path:
        return self.root / "dagster_home"

    def materialize(self, *args: str, store_url: str | None = None, env: Mapping[str, str] | None = None,
                    git_ceiling: Path | None = None) -> subprocess.CompletedProcess:
        """`histo-assets materialize` in a subprocess whose partitions come from this pipeline's params.

        CPU only, so runs are bit-reproducible and comparable with in-process runs.
        The working directory is the project so that `histo_assets` is found as a
        regular package whatever state the editable install is in. Stage folders
        stay local unless ``store_url`` names an object store. ``env`` replaces
        this process's environment as the base.

        dataset_release versions the release in the git repository around
        data_dir, if any: git's ceiling (by default the pipeline root) keeps it
        from finding one above.
        """
        return subprocess.run(self.command(*args), env=self.environment(store_url, env, git_ceiling), cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=600)

    def popen(self, *args: str, output: Path) -> subprocess.Popen:
        """`histo-assets materialize` left running in its own process group, printing to ``output``, to be signalled."""
        with output.open("w") as sink:
            return subprocess.Popen(self.command(*args), env=self.environment(), cwd=PROJECT_ROOT, stdout=sink,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)

    @staticmethod
    def command(*args: str) -> list[str]:
        return [sys.executable, "-m", "histo_assets.cli", "materialize", "--log-level", "INFO", *args]

    def environment(self, store_url: str | None = None, env: Mapping[str, str] | None = None,
                    git_ceiling: Path | None = None) -> dict[str, str]:
        base = {k: v for k, v in (os.environ if env is None else env).items() if k != STORE_URL_ENV}
        return base | ({STORE_URL_ENV: store_url} if store_url else {}) | {
            "HISTO_ASSETS_PARAMS": str(self.params),
            "DAGSTER_HOME": str(self.home),
            "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "GIT_CEILING_DIRECTORIES": str(git_ceiling or self.root),
        }

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def copy(self, destination: Path) -> Pipeline:
        shutil.copytree(self.root, destination)
        return Pipeline(destination)


def empty_pipeline(root: Path, tiny_model_cache: Path) -> Pipeline:
    """Tiny params with a relative data_dir (so copies are independent) and no data yet.

    The session's tiny model goes where BaseModelResource looks for it, so no process rebuilds it.
    """
    pipeline = Pipeline(root)
    shutil.copytree(tiny_model_cache, pipeline.data / ".cache" / "tiny_sd")
    write_params(root, Path("data"), **TINY)
    return pipeline


def build_pipeline(root: Path, tiny_model_cache: Path) -> Pipeline:
    """Two tissue images per class."""
    pipeline = empty_pipeline(root, tiny_model_cache)
    for index, name in enumerate(CLASSES):
        folder = pipeline.data / "raw" / name
        folder.mkdir(parents=True)
        for image_index in range(2):
            tissue_image((256, 192), seed=10 * index + image_index).save(folder / f"slide{image_index}.png")
    return pipeline


def run_ok(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == 0, f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-6000:]}"
    assert "FAILED" not in completed.stdout, completed.stdout
    return completed.stdout + completed.stderr


def latest(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dg.EventLogRecord | None:
    records_filter = dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None)
    records = instance.fetch_materializations(records_filter, limit=1).records
    return records[0] if records else None


def metadata(record: dg.EventLogRecord) -> dict:
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


def data_version(record: dg.EventLogRecord) -> str:
    return record.asset_materialization.tags["dagster/data_version"]
