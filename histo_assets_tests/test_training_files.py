"""core/training_files.py: a training run's file names, finding its numbered checkpoints, and no torch on import."""

import subprocess
import sys
from pathlib import Path

import pytest

from histo_assets.core.training_files import (
    checkpoint_path,
    existing_checkpoints,
    final_path,
    loss_csv_path,
    settings_path,
)

NAME = "colon"


@pytest.mark.parametrize("out_dir", ["runs/colon", Path("runs/colon")])
def test_a_runs_files_are_named_after_it_in_its_output_folder(out_dir):
    folder = Path("runs/colon")
    assert checkpoint_path(out_dir, NAME, 500) == folder / "colon-500.pt"
    assert final_path(out_dir, NAME) == folder / "colon.pt"
    assert loss_csv_path(out_dir, NAME) == folder / "colon-loss.csv"
    assert settings_path(out_dir, NAME) == folder / "colon-settings.json"


def test_existing_checkpoints_finds_only_the_runs_numbered_checkpoints_in_step_order(tmp_path):
    checkpoints = [checkpoint_path(tmp_path, NAME, steps) for steps in (100, 20, 1000, 5)]
    others = [
        final_path(tmp_path, NAME), loss_csv_path(tmp_path, NAME), settings_path(tmp_path, NAME),
        tmp_path / "colon-100.pt.optim",  # the optimizer sidecar of a checkpoint
        tmp_path / ".colon-300.pt.x1y2.tmp",  # an atomic write in progress
        tmp_path / "lung-100.pt", tmp_path / "colon-x-100.pt", tmp_path / "colon-100.pt.bak", tmp_path / "colon-.pt",
        tmp_path / "colon-1e3.pt", tmp_path / "my-colon-100.pt",
    ]
    for path in checkpoints + others:
        path.write_bytes(b"")
    (tmp_path / "colon-700.pt").mkdir()
    found = existing_checkpoints(tmp_path, NAME)
    assert list(found) == [5, 20, 100, 1000]
    assert found == {steps: checkpoint_path(tmp_path, NAME, steps) for steps in (5, 20, 100, 1000)}
    assert existing_checkpoints(str(tmp_path), NAME) == found


def test_a_name_is_matched_literally_not_as_a_pattern(tmp_path):
    name = "colon.v1+"
    checkpoint_path(tmp_path, name, 10).write_bytes(b"")
    (tmp_path / "colonXv11-20.pt").write_bytes(b"")
    assert existing_checkpoints(tmp_path, name) == {10: tmp_path / "colon.v1+-10.pt"}


def test_a_missing_folder_or_a_file_in_its_place_has_no_checkpoints(tmp_path):
    assert existing_checkpoints(tmp_path / "missing", NAME) == {}
    (tmp_path / "file").write_text("not a folder")
    assert existing_checkpoints(tmp_path / "file", NAME) == {}
    assert existing_checkpoints(tmp_path, NAME) == {}


def test_importing_it_loads_neither_torch_nor_diffusers():
    """``histo-assets lineage`` reads a run's settings path from here without paying torch's import time."""
    code = ("import sys, histo_assets.core.training_files; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
