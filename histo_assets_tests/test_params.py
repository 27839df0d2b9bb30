"""params.yaml: one source of defaults, inheritance, env var and dvc-style overrides."""

import subprocess
import sys

import dagster as dg
import pytest
import yaml

from histo_assets.definitions import build_definitions
from histo_assets.params import DEFAULT_PARAMS_FILE, PARAMS_ENV, ParamsError, load_params, write_resolved


def test_project_params_hold_the_thesis_defaults():
    p = load_params(DEFAULT_PARAMS_FILE)
    assert p.classes == ["fibrocystic", "non_proliferative", "proliferative"]
    assert p.resolution == 512
    aug = p["augmentation"]
    assert (aug["total"], aug["probability"], aug["rotate"]["max_left_rotation"], aug["zoom"]["max_factor"]) == (125, 0.7, 15, 1.2)
    assert p["training"]["max_steps"] == 40000 and p["training"]["checkpoint_steps"][0] == 5000
    assert p.steps == [0, 5000, 10000, 15000, 20000, 25000, 30000, 35000, 40000], "the base model, then each checkpoint"
    assert (p["generation"]["steps"], p["generation"]["cfg_scale"], p["generation"]["sampler"]) == (20, 7.0, "euler")
    assert p.data_dir == (DEFAULT_PARAMS_FILE.parent / "data").resolve()


def test_extends_merges_deeply_and_resolves_data_dir_relative_to_the_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "data_dir": "here", "augmentation": {"total": 3}}))
    p = load_params(child)
    assert p["augmentation"]["total"] == 3 and p["augmentation"]["probability"] == 0.7
    assert p.data_dir == (tmp_path / "here").resolve()


def test_demo_params_extend_the_thesis_file():
    p = load_params(DEFAULT_PARAMS_FILE.parent / "params.demo.yaml")
    assert len(p.classes) >= 2 and p.resolution == 64 and p["augmentation"]["total"] == 125


def test_overrides_use_dvc_syntax_and_reject_unknown_keys():
    p = load_params(DEFAULT_PARAMS_FILE, ["augmentation.total=50", "crops.mode=tiles", "seed=7"])
    assert (p["augmentation"]["total"], p["crops"]["mode"], p.seed) == (50, "tiles", 7)
    with pytest.raises(ParamsError, match="unknown key"):
        load_params(DEFAULT_PARAMS_FILE, ["augmentation.totl=50"])
    with pytest.raises(ParamsError, match="section.key=value"):
        load_params(DEFAULT_PARAMS_FILE, ["augmentation.total"])


@pytest.mark.parametrize("override, message", [
    ("augmentation.total=abc", "augmentation.total must be a whole number (params has 125), not 'abc'"),
    ("augmentation.flip.enabled=1", "augmentation.flip.enabled must be true or false"),
    ("generation.cfg_scale=high", "generation.cfg_scale must be a number"),
    ("training.checkpoint_steps=5000", "training.checkpoint_steps must be a list"),
    ("augmentation.totl=50", "unknown key augmentation.totl; known here: captions"),
])
def test_overrides_are_checked_against_the_params_types_naming_key_value_and_expectation(override, message):
    with pytest.raises(ParamsError) as error:
        load_params(DEFAULT_PARAMS_FILE, [override])
    assert message in str(error.value)


def test_numbers_for_text_keys_keep_the_text_typed_and_optional_keys_take_any_value():
    p = load_params(DEFAULT_PARAMS_FILE, ["training.learning_rate=0.00050", "crops.tiles.mpp=0.5", "generation.cfg_scale=7"])
    assert p["training"]["learning_rate"] == "0.00050"
    assert (p["crops"]["tiles"]["mpp"], p["generation"]["cfg_scale"]) == (0.5, 7)


def test_materialize_refuses_a_bad_override_before_any_run(tmp_path):
    env = {"DAGSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    completed = subprocess.run([sys.executable, "-m", "histo_assets.cli", "materialize", "--set", "augmentation.total=abc"],
                               capture_output=True, text=True, env=env, timeout=120)
    assert completed.returncode == 2
    assert "augmentation.total must be a whole number (params has 125), not 'abc'" in completed.stderr
    assert "materialising" not in completed.stdout and not list((tmp_path / "home").glob("storage/*"))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ParamsError, match="loop"):
        load_params(loop)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "classes": ["ok", "../escape"]}))
    with pytest.raises(ParamsError, match="class name"):
        load_params(bad)


def test_env_var_points_the_project_at_another_file(tmp_path, monkeypatch):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "classes": ["x_one", "x_two"]}))
    monkeypatch.setenv(PARAMS_ENV, str(other))
    defs = build_definitions(load_params())
    assert defs.resolve_assets_def("slide_inventory").partitions_def.get_partition_keys() == ["x_one", "x_two"]


def test_two_params_files_give_two_pipelines_in_one_process(tmp_path):
    """Definitions take their partitions from the Params they are built from, so one process can hold both."""
    def built(name: str, classes: list[str], steps: list[int]) -> dg.Definitions:
        path = tmp_path / f"params.{name}.yaml"
        path.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "classes": classes,
                                        "training": {"checkpoint_steps": steps}}))
        return build_definitions(load_params(path))

    def partitions(defs: dg.Definitions, asset: str) -> set:
        keys = defs.resolve_assets_def(asset).partitions_def.get_partition_keys()
        return {tuple(key.keys_by_dimension[d] for d in ("tissue_class", "step")) if isinstance(key, dg.MultiPartitionKey) else key
                for key in keys}

    lab, tiny = built("lab", ["alpha", "beta", "gamma"], [100, 200]), built("tiny", ["x_one", "x_two"], [3])
    for asset in ("slide_inventory", "hypernetwork_checkpoints", "imported_synthetic_images"):
        assert partitions(lab, asset) == {"alpha", "beta", "gamma"}
        assert partitions(tiny, asset) == {"x_one", "x_two"}
    for asset in ("synthetic_images", "checkpoint_metrics"):
        assert partitions(lab, asset) == {(c, s) for c in ("alpha", "beta", "gamma") for s in ("0", "100", "200")}
        assert partitions(tiny, asset) == {(c, s) for c in ("x_one", "x_two") for s in ("0", "3")}
    assert lab.resolve_job_def("checkpoint_pipeline").partitions_def.get_partition_keys() != \
        tiny.resolve_job_def("checkpoint_pipeline").partitions_def.get_partition_keys()
    with dg.build_resources({"params": tiny.resolve_job_def("ingest_pipeline").resource_defs["params"]}) as resources:
        assert resources.params.load().classes == ["x_one", "x_two"], "runs read the params the definitions were built from"


def _launch_errors(job_name: str, op_config: dict) -> list[str]:
    """What the launchpad says about this config for every asset of a job, before any run exists."""
    import dagster as dg

    from histo_assets.definitions import defs

    job = defs.resolve_job_def(job_name)
    try:
        dg.validate_run_config(job, {"ops": {node: {"config": op_config} for node in job.graph.node_dict}})
    except dg.DagsterInvalidConfigError as error:
        return [str(e.message) for e in error.errors]
    return []


@pytest.mark.parametrize("op_config, message", [
    ({"augmentation": {"total": "abc"}}, 'config:augmentation:total. Value "abc" of type "<class \'str\'>" is not valid for expected type "Int"'),
    ({"augmentation": {"totl": 50}}, 'unexpected config entry "totl" at path root:ops:augmented_crops:config:augmentation'),
    ({"augmentation": {"flip": {"enabled": 1}}}, 'config:augmentation:flip:enabled. Value "1" of type "<class \'int\'>" is not valid for expected type "Bool"'),
    ({"training": {"checkpoint_steps": 5000}}, "config:training:checkpoint_steps"),
])
def test_the_launchpad_refuses_bad_overrides_naming_key_value_and_expected_type(op_config, message):
    errors = _launch_errors("ingest_pipeline", op_config)
    assert errors and any(message in error for error in errors), errors


def test_the_launchpad_accepts_every_key_of_params_with_its_own_value():
    """Run config shaped like params.yaml itself is valid: the schema covers every key, of every kind."""
    values = load_params(DEFAULT_PARAMS_FILE).values
    assert _launch_errors("ingest_pipeline", values) == []
    assert _launch_errors("release_pipeline", {"release": {"checkpoints": [100, 200]}}) == []


def test_run_config_overrides_are_checked_like_set_and_give_the_same_params():
    base = load_params(DEFAULT_PARAMS_FILE)
    assignments = ["augmentation.total=50", "training.learning_rate=0.00050", "training.checkpoint_steps=[100, 200]"]
    by_set = load_params(DEFAULT_PARAMS_FILE, assignments)
    nested = by_set.nested_overrides(assignments)
    assert nested == {"augmentation": {"total": 50}, "training": {"learning_rate": "0.00050", "checkpoint_steps": [100, 200]}}
    assert base.with_nested_overrides(nested).values == by_set.values
    as_dagster_gives_floats = {"training": {"checkpoint_steps": [100.0, 200.0]}}
    assert base.with_nested_overrides(as_dagster_gives_floats)["training"]["checkpoint_steps"] == [100, 200]
    with pytest.raises(ParamsError, match="augmentation.total must be a whole number"):
        base.with_nested_overrides({"augmentation": {"total": "abc"}})


def test_a_bad_launch_creates_no_run(tmp_path):
    import dagster as dg

    from histo_assets.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def("ingest_pipeline")
    with pytest.raises(dg.DagsterInvalidConfigError, match="augmentation:total"):
        job.execute_in_process(partition_key="fibrocystic", instance=instance,
                               run_config={"ops": {"augmented_crops": {"config": {"augmentation": {"total": "abc"}}}}})
    assert instance.get_runs() == []


LAUNCHPAD_CHECK = """
query ($selector: PipelineSelector!, $runConfigData: RunConfigData!) {
  isPipelineConfigValid(pipeline: $selector, runConfigData: $runConfigData, mode: "default") {
    __typename
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


@pytest.mark.slow
def test_the_running_ui_flags_a_bad_override_as_the_launchpad_asks_it(tmp_path):
    """The GraphQL query the launchpad sends while the user types, against `histo-assets ui`."""
    import json
    import os
    import signal
    import urllib.request

    from histo_assets_tests.test_run_health import free_port, kill_group, start_ui

    port = free_port()
    ui = start_ui(os.environ | {"DAGSTER_HOME": str(tmp_path / "home")}, port)

    def check(op_config: dict) -> dict:
        variables = {"selector": {"repositoryLocationName": "histo_assets", "repositoryName": "__repository__",
                                  "pipelineName": "ingest_pipeline"},
                     "runConfigData": {"ops": {"augmented_crops": {"config": op_config}}}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", method="POST",
                                         data=json.dumps({"query": LAUNCHPAD_CHECK, "variables": variables}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["data"]["isPipelineConfigValid"]

    try:
        bad = check({"augmentation": {"total": "abc"}})
        assert bad["__typename"] == "RunConfigValidationInvalid"
        assert any('augmentation:total. Value "abc"' in error["message"] and '"Int"' in error["message"] for error in bad["errors"])
        assert check({"augmentation": {"total": 50}})["__typename"] == "PipelineConfigValidationValid"
    finally:
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(ui)


def test_the_resolved_params_file_holds_the_merged_chain_and_loads_to_the_same_values(tmp_path):
    child = tmp_path / "params.lab.yaml"
    child.write_text(f"extends: {DEFAULT_PARAMS_FILE}\nclasses: [a, b]\ntraining:\n  max_steps: 7\n")
    resolved = write_resolved(load_params(child), tmp_path / "params.resolved.yaml")
    assert "extends" not in yaml.safe_load(resolved.read_text())
    assert load_params(resolved).values == load_params(child).values
    assert load_params(resolved).data_dir == load_params(child).data_dir


def test_resolving_into_another_folder_is_refused_naming_the_file(tmp_path):
    """Relative paths in params are relative to the file's folder: a copy elsewhere would move them."""
    child = tmp_path / "lab" / "params.lab.yaml"
    child.parent.mkdir()
    child.write_text(f"extends: {DEFAULT_PARAMS_FILE}\n")
    with pytest.raises(ParamsError, match="params.lab.yaml is not in"):
        write_resolved(load_params(child), tmp_path / "params.resolved.yaml")
    assert not (tmp_path / "params.resolved.yaml").exists()


def test_materialize_runs_the_partitions_of_the_overridden_params(tmp_path):
    """`--set` reaches the partitions too: one per new step (the first fails, nothing being ingested; the rest wait)."""
    lab = tmp_path / "params.lab.yaml"
    lab.write_text(f"extends: {DEFAULT_PARAMS_FILE}\ndata_dir: data\nclasses: [only_class]\nresolution: 64\n"
                   "generation: {images_per_checkpoint: 1, steps: 2}\n")
    env = {"DAGSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", PARAMS_ENV: str(lab)}
    completed = subprocess.run(
        [sys.executable, "-m", "histo_assets.cli", "materialize", "--job", "checkpoint_pipeline",
         "--set", "training.max_steps=30", "--set", "training.checkpoint_steps=[10, 30]"],
        capture_output=True, text=True, env=env, timeout=300)
    labels = sorted({line.split(":")[0] for line in completed.stdout.splitlines() if line.startswith("checkpoint_pipeline [")})
    assert [label.split("]")[0] for label in labels] == [f"checkpoint_pipeline [{n}/3" for n in (1, 2, 3)]
    assert [label.split("] ")[1] for label in labels] == ["0|only_class", "10|only_class", "30|only_class"]
    assert completed.returncode == 1
