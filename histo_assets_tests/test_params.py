"""params.yaml: one source of defaults, inheritance, env var and dvc-style overrides."""

import subprocess
import sys

import pytest
import yaml

from histo_assets.params import DEFAULT_PARAMS_FILE, PARAMS_ENV, ParamsError, load_params


def test_project_params_hold_the_thesis_defaults():
    p = load_params(DEFAULT_PARAMS_FILE)
    assert p.classes == ["fibrocystic", "non_proliferative", "proliferative"]
    assert p.resolution == 512
    aug = p["augmentation"]
    assert (aug["total"], aug["probability"], aug["rotate"]["max_left_rotation"], aug["zoom"]["max_factor"]) == (125, 0.7, 15, 1.2)
    assert p["training"]["max_steps"] == 40000 and p["training"]["checkpoint_steps"][0] == 5000
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


def test_env_var_points_the_project_at_another_file(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "classes": ["x_one", "x_two"]}))
    code = "from histo_assets.partitions import tissue_class_partitions as p; print(p.get_partition_keys())"
    out = subprocess.run([sys.executable, "-c", code], env={PARAMS_ENV: str(other), "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['x_one', 'x_two']"
