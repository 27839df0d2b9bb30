"""resources.py: the run-config schema, and the params, base-model, dvc and object-store resources."""

import json
import shutil

import dagster as dg
import pytest
import yaml

from histo_assets.core.base_model import folder_weights_sha256, tiny_model_dir
from histo_assets.core.dvc import DvcNotFoundError
from histo_assets.core.errors import BaseModelError
from histo_assets.core.io import sha256_file
from histo_assets.core.layout import Layout
from histo_assets.core.object_store import ObjectStoreError
from histo_assets.params import DEFAULT_PARAMS_FILE, PARAMS_ENV, ParamsError, load_params
from histo_assets.resources import (
    TRAINED_MODEL_FOLDER,
    BaseModelResource,
    DvcResource,
    ObjectStoreResource,
    ParamsResource,
    params_config_schema,
    trained_model_dir,
)
from histo_assets_tests.conftest import THESIS_CLASSES, TINY_MODEL_SEED, write_params

# One key of every kind params holds, so the schema built from it has a field of every kind.
VALUES = {
    "seed": 1,
    "augmentation": {"total": 125, "probability": 0.7, "flip": {"enabled": True}},
    "training": {"learning_rate": "0.0005", "checkpoint_steps": [100, 200]},
    "crops": {"tiles": {"mpp": None}},
    "lists": {"words": ["a", "b"], "flags": [True, False], "empty": [], "mixed": [1, "a"]},
    "release": {"checkpoints": "best"},
}


def config_errors(config: dict) -> list[str]:
    """What Dagster's launchpad says about ``config`` for an op taking the schema built from VALUES."""
    @dg.op(config_schema=params_config_schema(VALUES))
    def probe():
        return None

    @dg.job
    def probe_job():
        probe()

    try:
        dg.validate_run_config(probe_job, {"ops": {"probe": {"config": config}}})
    except dg.DagsterInvalidConfigError as error:
        return [str(e.message) for e in error.errors]
    return []


# --- params_config_schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {},
    {"augmentation": {}},
    VALUES,
    {"augmentation": {"total": 50, "probability": 1, "flip": {"enabled": False}}},
    {"training": {"checkpoint_steps": [10, 30.0]}},
    {"crops": {"tiles": {"mpp": 0.5}}},
    {"crops": {"tiles": {"mpp": "any value: the key is off by default"}}},
    {"lists": {"empty": [1, "x"], "mixed": ["a", {"a": 1}]}},
    {"release": {"checkpoints": "all"}},
    {"release": {"checkpoints": [100, 200]}},
])
def test_the_run_config_schema_takes_any_subset_of_params_keys_with_values_of_their_kind(config):
    assert config_errors(config) == []


@pytest.mark.parametrize("config, path, expected", [
    ({"seed": "seven"}, "config:seed", '"Int"'),
    ({"augmentation": {"total": 1.5}}, "config:augmentation:total", '"Int"'),
    ({"augmentation": {"probability": "high"}}, "config:augmentation:probability", '"Float"'),
    ({"augmentation": {"flip": {"enabled": "yes"}}}, "config:augmentation:flip:enabled", '"Bool"'),
    ({"training": {"learning_rate": True}}, "config:training:learning_rate", '"String"'),
    ({"training": {"checkpoint_steps": ["a"]}}, "config:training:checkpoint_steps", '"Float"'),
    ({"lists": {"words": [1]}}, "config:lists:words", '"String"'),
    ({"lists": {"flags": ["x"]}}, "config:lists:flags", '"Bool"'),
])
def test_the_run_config_schema_refuses_a_value_of_another_kind_naming_the_key_and_its_type(config, path, expected):
    errors = config_errors(config)
    assert any(path in error and expected in error for error in errors), errors


def test_the_run_config_schema_refuses_unknown_keys_naming_where_they_are():
    errors = config_errors({"augmentation": {"totl": 50}})
    assert any('unexpected config entry "totl"' in e and "config:augmentation" in e for e in errors), errors
    assert config_errors({"augmentaton": {}}), "a misspelt section too"


def test_every_field_of_the_run_config_schema_is_optional_and_shows_its_params_value():
    schema = params_config_schema(VALUES)
    total = schema["augmentation"].config_type.fields["total"]
    assert (total.is_required, total.description) == (False, "params: 125")
    assert not schema["augmentation"].is_required and schema["augmentation"].description.startswith("params: {")
    long = params_config_schema({"text": "x" * 500})["text"]
    assert len(long.description) == 200


# --- ParamsResource --------------------------------------------------------------------------------------

def load_for(resource: ParamsResource, op_config: dict | None = None):
    """The params a step sees with this run config, through the context Dagster gives the step."""
    with dg.DagsterInstance.ephemeral() as instance:
        with dg.build_op_context(op_config=op_config, instance=instance) as context:
            return resource.load_for(context)


def test_the_params_resource_loads_its_file_with_set_style_overrides(small_params):
    resource = ParamsResource(params_file=str(small_params))
    assert resource.load().source == small_params and resource.load()["augmentation"]["total"] == 12
    assert resource.load(["augmentation.total=50"])["augmentation"]["total"] == 50
    with pytest.raises(ParamsError, match="unknown key augmentation.totl"):
        resource.load(["augmentation.totl=50"])


def test_the_params_resource_applies_a_steps_run_config_as_it_comes_from_dagster(small_params):
    resource = ParamsResource(params_file=str(small_params))
    p = load_for(resource, {"augmentation": {"total": 50}, "training": {"checkpoint_steps": [100.0, 200.0]}})
    assert p["augmentation"]["total"] == 50
    steps = p["training"]["checkpoint_steps"]
    assert steps == [100, 200] and all(type(step) is int for step in steps), "whole steps, as --set gives them"
    assert p["augmentation"]["probability"] == resource.load()["augmentation"]["probability"], "others as in the file"
    assert load_for(resource).values == resource.load().values


@pytest.mark.parametrize("op_config, message", [
    ({"augmentation": {"total": "abc"}}, "augmentation.total must be a whole number (params has 12), not 'abc'"),
    ({"augmentation": {"totl": 50}}, "unknown key augmentation.totl"),
    ({"augmentation": {"flip": {"enabled": 1}}}, "augmentation.flip.enabled must be true or false"),
])
def test_the_params_resource_refuses_a_bad_run_config_naming_the_key(small_params, op_config, message):
    with pytest.raises(ParamsError) as error:
        load_for(ParamsResource(params_file=str(small_params)), op_config)
    assert message in str(error.value)


def test_without_a_file_the_params_resource_reads_the_one_the_environment_names(tmp_path, monkeypatch):
    monkeypatch.delenv(PARAMS_ENV, raising=False)
    assert ParamsResource().load().source == DEFAULT_PARAMS_FILE
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "classes": ["x_one", "x_two"]}))
    monkeypatch.setenv(PARAMS_ENV, str(other))
    assert ParamsResource().load().classes == ["x_one", "x_two"]


def test_the_params_resource_layout_is_rooted_at_the_files_data_dir(small_params, small_dataset):
    layout = ParamsResource(params_file=str(small_params)).layout()
    assert layout == Layout(small_dataset.resolve())
    assert sorted(p.name for p in layout.raw(THESIS_CLASSES[0]).iterdir()) == ["slide0.png", "slide1.png"]


# --- BaseModelResource -----------------------------------------------------------------------------------

def params_with(tmp_path, base_model: dict, name: str = "params"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return load_params(write_params(folder, tmp_path / "data", base_model=base_model))


def write_base_model_summary(p, source: str, sha256: str) -> None:
    folder = Layout(p.data_dir).base_model
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"fingerprint": "f", "source": source, "name": TRAINED_MODEL_FOLDER, "sha256": sha256,
               "short_hash": sha256[:10], "path": str(folder / TRAINED_MODEL_FOLDER), "architecture": {}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_the_identity_of_a_named_model_is_its_params_section_and_changes_with_it(tmp_path):
    resource = BaseModelResource()
    seed_0 = params_with(tmp_path, {"tiny_seed": 0}, "seed0")
    seed_1 = params_with(tmp_path, {"tiny_seed": 1}, "seed1")
    folder = params_with(tmp_path, {"source": "diffusers", "path": "models/sd"}, "folder")
    assert resource.identity(seed_0) == seed_0["base_model"]
    identities = [resource.identity(p) for p in (seed_0, seed_1, folder)]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == 3
    assert resource.identity(seed_0) == BaseModelResource(device="cpu", threads=1).identity(seed_0), \
        "device and threads are deployment choices, not the model"


def test_a_trained_model_has_no_identity_until_the_base_model_asset_trained_one(tmp_path):
    p = params_with(tmp_path, {"source": "trained"})
    with pytest.raises(BaseModelError, match="materialise the base_model asset first"):
        BaseModelResource().identity(p)
    write_base_model_summary(p, "tiny", "a" * 64)
    with pytest.raises(BaseModelError, match="holds no trained model"):
        BaseModelResource().identity(p)


def test_the_identity_of_a_trained_model_is_the_weights_it_wrote(tmp_path):
    """The same params on new crops train another model, so its identity follows the weights."""
    p = params_with(tmp_path, {"source": "trained"})
    write_base_model_summary(p, "trained", "a" * 64)
    first = BaseModelResource().identity(p)
    assert first == {**p["base_model"], "weights_sha256": "a" * 64}
    write_base_model_summary(p, "trained", "b" * 64)
    assert BaseModelResource().identity(p)["weights_sha256"] == "b" * 64 != first["weights_sha256"]


def test_a_trained_model_is_loaded_from_its_folder_under_the_base_model_asset(tmp_path):
    p = params_with(tmp_path, {"source": "trained"})
    assert trained_model_dir(p) == Layout(p.data_dir).base_model / TRAINED_MODEL_FOLDER
    write_base_model_summary(p, "trained", "a" * 64)
    with pytest.raises(BaseModelError, match=f"{trained_model_dir(p)} is not a directory"):
        BaseModelResource(device="cpu", threads=1).load(p)


def test_model_paths_in_params_are_taken_relative_to_the_params_file(tmp_path, monkeypatch):
    p = params_with(tmp_path, {"source": "diffusers", "path": "models/sd"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(BaseModelError, match=f"{tmp_path / 'params' / 'models' / 'sd'} is not a directory"):
        BaseModelResource(device="cpu", threads=1).load(p)


@pytest.mark.usefixtures("one_torch_thread")
def test_the_tiny_model_loads_from_the_data_dirs_cache_checked_against_the_params_sha256(tmp_path, tiny_model_cache):
    cache = tmp_path / "data" / ".cache" / "tiny_sd"
    shutil.copytree(tiny_model_cache, cache)
    expected = folder_weights_sha256(tiny_model_dir(cache, TINY_MODEL_SEED))
    p = params_with(tmp_path, {"tiny_seed": TINY_MODEL_SEED, "sha256": expected})
    model = BaseModelResource(device="cpu", threads=1).load(p)
    assert model.sha256 == expected and model.name == f"tiny-sd-seed{TINY_MODEL_SEED}"
    wrong = params_with(tmp_path, {"tiny_seed": TINY_MODEL_SEED, "sha256": "0" * 64}, "wrong")
    with pytest.raises(BaseModelError, match=f"SHA-256 mismatch .* expected {'0' * 64}, got {expected}"):
        BaseModelResource(device="cpu", threads=1).load(wrong)


# --- DvcResource -----------------------------------------------------------------------------------------

def test_the_dvc_resource_runs_its_configured_executable_in_the_repository(tmp_path):
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "fake dvc $* in $(pwd)"\n')
    fake.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    cli = DvcResource(executable=str(fake)).cli(repo)
    assert cli.executable == fake and cli.repo == repo.resolve()
    assert cli.run("version").strip() == f"fake dvc version in {repo.resolve()}"
    with pytest.raises(DvcNotFoundError, match=f"dvc executable not found at {tmp_path / 'missing'}"):
        DvcResource(executable=str(tmp_path / "missing")).cli(repo)


# --- ObjectStoreResource ---------------------------------------------------------------------------------

def make_stage(data_dir, files: dict[str, bytes]):
    folder = data_dir / "square_crops" / "alpha"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_without_a_url_the_object_store_resource_moves_nothing(tmp_path):
    resource, logged = ObjectStoreResource(), []
    folder = make_stage(tmp_path / "data", {"a.png": b"a"})
    resource.push(tmp_path / "data", folder, log=logged.append)
    resource.pull(tmp_path / "other", tmp_path / "other" / "square_crops" / "alpha", log=logged.append)
    assert not resource.enabled and logged == []
    assert resource.stored_files(tmp_path / "data", folder) is None
    assert not (tmp_path / "other").exists()


def test_a_folder_pushed_from_one_data_dir_is_pulled_into_another_under_its_relative_path(tmp_path):
    resource, logged = ObjectStoreResource(url=f"file://{tmp_path / 'bucket'}"), []
    first, second = tmp_path / "machine-a" / "data", tmp_path / "machine-b" / "data"
    pushed = make_stage(first, {"a.png": b"alpha", "b.png": b"beta"})
    target = second / "square_crops" / "alpha"
    resource.pull(second, target, log=logged.append)
    assert logged == [] and not target.exists(), "a folder never pushed is left alone"

    resource.push(first, pushed, log=logged.append)
    assert logged == ["pushed square_crops/alpha: 2 of 2 file(s), 9 bytes moved"]
    stored = resource.stored_files(second, target)
    assert stored == {"a.png": {"sha256": sha256_file(pushed / "a.png"), "size": 5},
                      "b.png": {"sha256": sha256_file(pushed / "b.png"), "size": 4}}
    resource.pull(second, target, log=logged.append)
    assert logged[-1] == "pulled square_crops/alpha: 2 of 2 file(s), 9 bytes moved"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {"a.png": b"alpha", "b.png": b"beta"}


def test_the_object_store_resource_refuses_a_folder_outside_the_data_dir(tmp_path):
    resource = ObjectStoreResource(url=f"file://{tmp_path / 'bucket'}")
    outside = make_stage(tmp_path / "elsewhere", {"a.png": b"a"})
    with pytest.raises(ObjectStoreError, match=f"{outside} is not under the data folder {tmp_path / 'data'}"):
        resource.push(tmp_path / "data", outside)
    assert not (tmp_path / "bucket").exists()
