"""core/steps.py: the evaluated steps, and the checkpoint behind each class's step."""

import pytest

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import atomic_write_json
from histo_assets.core.layout import SUMMARY, Layout
from histo_assets.core.schemas import SchemaError
from histo_assets.core.steps import BASELINE_CHECKPOINT, BASELINE_STEP, MissingCheckpointError, checkpoint_at, evaluated_steps

CLASS = "tumour"


def write_checkpoints_summary(layout: Layout, steps: list[int], **changes) -> None:
    summary = {
        "fingerprint": "f" * 64, "name": f"histo-{CLASS}", "training_set": "t" * 64,
        "checkpoints": [{"step": step, "file": f"histo-{CLASS}-{step}.pt", "sha256": str(step) * 64} for step in steps],
        "final_loss": 0.1, "steps_per_second": 2.0, "device": "cpu", "base_model_sha256": "b" * 64,
        "base_model_short_hash": "bbbbbbbb", "resumed_from": None,
    } | changes
    atomic_write_json(layout.hypernetwork_checkpoints(CLASS) / SUMMARY, summary)


def test_step_0_leads_the_checkpoint_steps_which_must_be_positive():
    assert evaluated_steps([10, 5, 10]) == [BASELINE_STEP, 5, 10]
    with pytest.raises(ValueError, match="must be positive"):
        evaluated_steps([0, 5])


def test_step_0_is_the_base_model_without_a_checkpoint_even_before_training(tmp_path):
    assert checkpoint_at(Layout(tmp_path), CLASS, BASELINE_STEP) == BASELINE_CHECKPOINT


def test_a_trained_step_gives_its_file_and_hash_with_the_run_name_and_training_set(tmp_path):
    layout = Layout(tmp_path)
    write_checkpoints_summary(layout, [5, 10])
    assert checkpoint_at(layout, CLASS, 10) == {"step": 10, "file": f"histo-{CLASS}-10.pt", "sha256": "10" * 64,
                                                "name": f"histo-{CLASS}", "training_set": "t" * 64}


def test_an_untrained_class_or_step_is_refused_naming_it(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(MissingCheckpointError, match=f"class '{CLASS}': hypernetwork_checkpoints has not been materialised"):
        checkpoint_at(layout, CLASS, 5)
    write_checkpoints_summary(layout, [5])
    with pytest.raises(MissingCheckpointError, match="no checkpoint for step 15") as refused:
        checkpoint_at(layout, CLASS, 15)
    assert isinstance(refused.value, HistoAssetsError) and isinstance(refused.value, LookupError)


def test_a_checkpoint_summary_in_another_format_is_an_error_naming_the_file(tmp_path):
    layout = Layout(tmp_path)
    write_checkpoints_summary(layout, [5], extra_field=1)
    with pytest.raises(SchemaError, match="extra_field"):
        checkpoint_at(layout, CLASS, 5)
