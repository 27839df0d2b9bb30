"""dvc.yaml's deps and params cover what each stage's code and fingerprints use, so `dvc repro` reruns a stage
whose code or params changed.

Each dvc.yaml stage materialises one Dagster job (`--job <name>`). The modules a
stage runs are the asset modules of that job's assets plus every
``histo_assets.core`` module they import, directly or through each other
(imports inside functions count: torch-heavy modules are imported lazily). The
params a stage depends on are those its assets' fingerprints read, recorded on
the tiny pipeline's data.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from histo_assets.params import PARAMS_ENV, PROJECT_ROOT, RESOLVED_PARAMS_FILE, Params, load_params

PACKAGE = "histo_assets"
SETTINGS = f"{PACKAGE}.settings"
CORE = f"{PACKAGE}.core"


def module_path(module: str) -> Path:
    path = PROJECT_ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(module: str) -> set[str]:
    """The project modules one module imports anywhere in its body."""
    tree = ast.parse(module_path(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if module_path(candidate).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(PACKAGE)}
    return found


def core_closure(modules: set[str]) -> set[str]:
    """Every core module reachable from these modules by imports."""
    seen, frontier = set(), set(modules)
    while frontier:
        module = frontier.pop()
        for imported in imported_modules(module):
            if imported.startswith(CORE) and imported not in seen:
                seen.add(imported)
                frontier.add(imported)
    return seen


def stage_modules(job_name: str) -> set[str]:
    from histo_assets.definitions import defs

    job = defs.resolve_job_def(job_name)
    asset_modules = {inspect.getmodule(node.definition.compute_fn.decorated_fn).__name__
                     for node in job.graph.node_dict.values()}
    # The settings module turns params into what core runs on, so it is a dependency too; its own imports are
    # the settings classes of every stage, which the stage's modules already bring when it runs them.
    settings = {SETTINGS} & set().union(*(imported_modules(module) for module in asset_modules))
    return asset_modules | settings | core_closure(asset_modules)


def missing_deps(dvc_yaml: dict) -> dict[str, list[str]]:
    """Per stage that runs a job, the project modules it runs that its deps do not list."""
    missing = {}
    for name, stage in dvc_yaml["stages"].items():
        job = re.search(r"--job (\S+)", stage["cmd"])
        if job is None:
            continue
        deps = {Path(dep).as_posix() for dep in stage.get("deps", []) if isinstance(dep, str)}
        wanted = {module_path(module).relative_to(PROJECT_ROOT).as_posix() for module in stage_modules(job.group(1))}
        wanted.discard(f"{PACKAGE}/core/__init__.py")
        if wanted - deps:
            missing[name] = sorted(wanted - deps)
    return missing


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())


def test_every_stage_lists_every_module_it_runs(dvc_yaml):
    assert missing_deps(dvc_yaml) == {}


def test_a_dvc_yaml_missing_a_dependency_is_caught(dvc_yaml):
    training = dvc_yaml["stages"]["training"]
    training["deps"] = [dep for dep in training["deps"] if dep != "histo_assets/core/hypernetwork.py"]
    assert missing_deps(dvc_yaml) == {"training": ["histo_assets/core/hypernetwork.py"]}


def test_every_job_but_the_release_has_a_stage(dvc_yaml):
    """The release is no stage: the dataset_release asset records its folder with `dvc add` itself."""
    from histo_assets.definitions import pipeline_jobs, release_job

    staged = {re.search(r"--job (\S+)", stage["cmd"]).group(1) for stage in dvc_yaml["stages"].values() if "--job" in stage["cmd"]}
    assert staged == {job.name for job in pipeline_jobs if job is not release_job}


def test_dvc_yaml_names_no_params_file_but_the_resolved_one(dvc_yaml):
    """A lab points `dvc repro` at its params with HISTO_ASSETS_PARAMS; dvc.yaml itself is never edited."""
    resolved = RESOLVED_PARAMS_FILE.name
    first, *stages = dvc_yaml["stages"].values()
    assert "resolve-params" in first["cmd"] and first["always_changed"] is True
    assert first["outs"] == [{resolved: {"cache": False}}]
    for stage in stages:
        assert "params.yaml" not in stage["cmd"] and "params.demo.yaml" not in stage["cmd"]
        assert f"HISTO_ASSETS_PARAMS={resolved}" in stage["cmd"]
        files = {next(iter(entry)) for entry in stage.get("params", []) if isinstance(entry, dict)}
        assert files <= {resolved}


def test_dvc_repro_follows_the_params_file_chosen_by_the_environment(tmp_path):
    """A real `dvc repro` of the first stage, in a copy of the project's dvc.yaml, with a lab's own params file."""
    dvc = PROJECT_ROOT / ".venv-dvc" / "bin" / "dvc"
    (tmp_path / "dvc.yaml").write_text((PROJECT_ROOT / "dvc.yaml").read_text())
    (tmp_path / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    lab = tmp_path / "params.lab.yaml"
    lab.write_text(f"extends: {PROJECT_ROOT / 'params.yaml'}\nclasses: [lab_class_a, lab_class_b]\nseed: 11\n")
    environment = {**os.environ, "DVC_NO_ANALYTICS": "1", PARAMS_ENV: str(lab)}
    for command in (["git", "init", "-q"], [str(dvc), "init", "-q"],
                    [str(dvc), "repro", "--single-item", "resolve_params"]):
        subprocess.run(command, cwd=tmp_path, env=environment, check=True, capture_output=True, text=True)
    resolved = load_params(tmp_path / RESOLVED_PARAMS_FILE.name)
    assert resolved.values == load_params(lab).values
    assert resolved.classes == ["lab_class_a", "lab_class_b"] and resolved.seed == 11


# --- params: every key a stage's fingerprint reads is a param of its dvc.yaml stage --------------------


class RecordedSection(Mapping):
    """A params section that notes the path of every value read from it.

    A section read as a whole (hashed, printed or copied) notes its own path;
    one read key by key notes each key's.
    """

    def __init__(self, values: Mapping, path: str, reads: set[str]):
        self._values, self._path, self._reads = values, path, reads

    def __getitem__(self, key):
        value, path = self._values[key], f"{self._path}{key}"
        if isinstance(value, Mapping):
            return RecordedSection(value, f"{path}.", self._reads)
        self._reads.add(path)
        return value

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def _whole(self) -> dict:
        self._reads.add(self._path.rstrip("."))
        return copy.deepcopy(dict(self._values))

    def __str__(self) -> str:  # how stable_hash's json.dumps(default=str) meets a section it cannot encode
        return json.dumps(self._whole(), sort_keys=True, default=str)

    def __deepcopy__(self, memo) -> dict:
        return self._whole()


def fingerprint_reads(params_file: Path) -> dict[str, set[str]]:
    """Per declared stage, the params paths its fingerprint reads, for the last partition of its asset."""
    from histo_assets.core.stage import fingerprint
    from histo_assets.definitions import STAGES, build_definitions
    from histo_assets.resources import BaseModelResource
    from histo_assets.stage import Part

    p = load_params(params_file)
    partitions = {spec.key.to_user_string(): spec.partitions_def
                  for spec in build_definitions(p).resolve_all_asset_specs()}
    found = {}
    for asset, spec in STAGES.items():
        part = Part.of(None if partitions[asset] is None else partitions[asset].get_partition_keys()[-1])
        reads: set[str] = set()
        recorded = Params(RecordedSection(p.values, "", reads), p.source)
        fingerprint(**spec.fingerprinted(recorded, part, BaseModelResource()))
        found[asset] = reads
    return found


def uncovered_params(dvc_yaml: dict, reads: dict[str, set[str]], params_values: Mapping) -> dict[str, list[str]]:
    """Per dvc.yaml stage, the params paths its assets' fingerprints read that its params do not list.

    A path is covered by itself or a listed ancestor; a section read whole
    also by all of its keys listed one by one. Keys that decide speed, never
    output (core/stage.py's SPEED_ONLY_SETTINGS), need not be listed.
    """
    from histo_assets.core.stage import SPEED_ONLY_SETTINGS
    from histo_assets.definitions import defs

    uncovered = {}
    for name, stage in dvc_yaml["stages"].items():
        job = re.search(r"--job (\S+)", stage["cmd"])
        if job is None:
            continue
        listed = {key for entry in stage.get("params", []) if isinstance(entry, dict) for key in next(iter(entry.values()))}
        assets = {key.to_user_string() for key in defs.resolve_job_def(job.group(1)).asset_layer.selected_asset_keys}

        def covered(path: str) -> bool:
            parts = path.split(".")
            if parts[-1] in SPEED_ONLY_SETTINGS or any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1)):
                return True
            value = params_values
            for part in parts:
                value = value[part]
            return isinstance(value, Mapping) and all(covered(f"{path}.{child}") for child in value)

        missing = sorted({path for asset in assets & reads.keys() for path in reads[asset] if not covered(path)})
        if missing:
            uncovered[name] = missing
    return uncovered


@pytest.fixture(scope="module")
def stage_reads(pipeline) -> tuple[dict[str, set[str]], dict]:
    return fingerprint_reads(pipeline.params), load_params(pipeline.params).values


def test_every_stage_lists_every_param_its_fingerprints_read(dvc_yaml, stage_reads):
    reads, values = stage_reads
    assert {"split", "augmentation.total", "seed"} <= reads["augmented_crops"], "the recording sees what is read"
    assert uncovered_params(dvc_yaml, reads, values) == {}


def test_a_dvc_yaml_missing_a_param_is_caught(dvc_yaml, stage_reads):
    reads, values = stage_reads
    edited = copy.deepcopy(dvc_yaml)
    ingest = edited["stages"]["ingest"]
    ingest["params"] = [{file: [key for key in keys if key != "split"]} for entry in ingest["params"]
                        for file, keys in entry.items()]
    assert uncovered_params(edited, reads, values) == {"ingest": ["split", "split.groups_csv"]}
