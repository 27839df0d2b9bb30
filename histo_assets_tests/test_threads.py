"""The thread policy: the cores a process may use, shared among the steps that run at once, applied to torch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from histo_assets.core.threads import (
    THREAD_ENV_VARS,
    apply_threads,
    available_cores,
    cgroup_cpu_limit,
    thread_count,
    threads_per_step,
)
from histo_assets.params import load_params
from histo_assets.resources import BaseModelResource
from histo_assets_tests.conftest import write_params


@pytest.fixture
def torch_threads():
    """Tests change the process's intra-op pool; the rest of the session gets it back as it was."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def cpu_max(tmp_path, text: str):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 1), ("50000 100000\n", 1), ("800000 200000\n", 4)],
)
def test_the_cgroup_quota_counts_whole_cpus_and_at_least_one(tmp_path, text, cpus):
    assert cgroup_cpu_limit(cpu_max(tmp_path, text)) == cpus


@pytest.mark.parametrize("text", ["", "max", "lots 100000", "1 2 3"])
def test_an_unreadable_quota_is_no_quota(tmp_path, text):
    assert cgroup_cpu_limit(cpu_max(tmp_path, text)) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_the_quota_caps_the_affinity_mask(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path / "absent") == affinity
    assert available_cores(cpu_max(tmp_path, "100000 100000")) == 1
    assert available_cores(cpu_max(tmp_path, f"{(affinity + 3) * 100000} 100000")) == affinity


def test_a_narrower_affinity_mask_means_fewer_cores(tmp_path):
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        assert available_cores(tmp_path / "absent") == 1
    finally:
        os.sched_setaffinity(0, mask)


@pytest.mark.parametrize(
    ("cores", "concurrent_steps", "threads"),
    [(2, None, 1), (16, None, 1), (2, 1, 2), (8, 2, 4), (8, 3, 2), (2, 4, 1), (1, 1, 1)],
)
def test_each_concurrent_step_gets_an_equal_share_of_the_cores(cores, concurrent_steps, threads):
    assert threads_per_step(cores, concurrent_steps) == threads


def test_an_explicit_setting_wins_over_the_policy(tmp_path, no_thread_env):
    quota = cpu_max(tmp_path, "400000 100000")
    cores = available_cores(quota)
    assert thread_count(3, 1, quota) == 3
    assert thread_count(None, 1, quota) == cores
    assert thread_count(None, None, quota) == 1


def test_applying_after_torch_is_imported_sets_its_threads(torch_threads):
    wanted = torch_threads + 1
    apply_threads(wanted)
    assert torch.get_num_threads() == wanted
    apply_threads(1)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(("value", "threads"), [("3", 3), ("4,2", 4), (" 2 ", 2), ("0", None), ("many", None), ("", None)])
def test_an_operators_thread_variable_wins_over_the_policy_default(tmp_path, no_thread_env, value, threads):
    no_thread_env.setenv("MKL_NUM_THREADS", value)
    absent = tmp_path / "absent"
    assert thread_count(None, None, absent) == (threads or threads_per_step(available_cores(absent)))
    assert thread_count(5, None, absent) == 5


PROBE = """
import json, os, sys
from histo_assets.core.threads import THREAD_ENV_VARS, apply_threads, thread_count
apply_threads(thread_count(concurrent_steps=int(sys.argv[1])))
import torch
print(json.dumps({"torch": torch.get_num_threads(), "env": {name: os.environ[name] for name in THREAD_ENV_VARS}}))
"""


def probe(concurrent_steps: int, **env: str) -> dict:
    """The policy applied in a fresh interpreter, before torch is imported there."""
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_ENV_VARS}
    argv = [sys.executable, "-c", PROBE, str(concurrent_steps)]
    return json.loads(subprocess.run(argv, env=clean | env, capture_output=True, text=True, check=True).stdout)


def test_applying_before_torch_is_imported_sets_the_environment_torch_reads():
    """One step per core: 1 thread, where torch alone would take every core."""
    assert probe(available_cores()) == {"torch": 1, "env": dict.fromkeys(THREAD_ENV_VARS, "1")}


def test_an_operators_environment_is_kept_and_shared_before_torch_is_imported():
    """torch with MKL reads MKL_NUM_THREADS over OMP_NUM_THREADS, so an OMP_NUM_THREADS alone must reach it too."""
    assert probe(1, OMP_NUM_THREADS="1") == {"torch": 1, "env": dict.fromkeys(THREAD_ENV_VARS, "1")}


def test_the_device_resource_applies_its_setting_when_it_loads_the_model(tmp_path, tiny_model_cache, torch_threads):
    data = tmp_path / "data"
    shutil.copytree(tiny_model_cache, data / ".cache" / "tiny_sd")
    p = load_params(write_params(tmp_path, data))
    wanted = torch_threads + 1
    BaseModelResource(device="cpu", threads=wanted).load(p)
    assert torch.get_num_threads() == wanted
