"""partitions.py: tissue-class and class x checkpoint-step partitions built from params, step 0 included."""

import dagster as dg
import pytest
import yaml

from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.partitions import Partitions, by_tissue_class


def lab_params(tmp_path, classes: list[str], steps: list[int], overrides: list[str] | None = None):
    path = tmp_path / "params.lab.yaml"
    path.write_text(yaml.safe_dump({"extends": str(DEFAULT_PARAMS_FILE), "classes": classes,
                                    "training": {"checkpoint_steps": steps}}))
    return load_params(path, overrides or [])


def by_dimension(key: dg.MultiPartitionKey) -> tuple[str, str]:
    return key.keys_by_dimension["tissue_class"], key.keys_by_dimension["step"]


def test_tissue_class_partitions_are_the_params_classes_in_their_order(tmp_path):
    partitions = Partitions.from_params(lab_params(tmp_path, ["gamma", "alpha", "beta-2"], [100]))
    assert partitions.tissue_class.get_partition_keys() == ["gamma", "alpha", "beta-2"]


def test_class_and_step_partitions_cross_every_class_with_step_0_and_each_distinct_checkpoint_step(tmp_path):
    partitions = Partitions.from_params(lab_params(tmp_path, ["alpha", "beta"], [1000, 250, 1000]))
    dimensions = {d.name: d.partitions_def.get_partition_keys() for d in partitions.class_and_step.partitions_defs}
    assert dimensions == {"tissue_class": ["alpha", "beta"], "step": ["0", "250", "1000"]}, "numeric order, no repeats"
    keys = partitions.class_and_step.get_partition_keys()
    assert len(keys) == 6
    assert {by_dimension(key) for key in keys} == {(c, s) for c in ("alpha", "beta") for s in ("0", "250", "1000")}


def test_the_thesis_params_give_step_0_before_the_thesis_checkpoints():
    p = load_params(DEFAULT_PARAMS_FILE)
    partitions = Partitions.from_params(p)
    steps = [d.partitions_def for d in partitions.class_and_step.partitions_defs if d.name == "step"][0]
    assert steps.get_partition_keys() == ["0", *(str(s) for s in sorted(p["training"]["checkpoint_steps"]))]
    assert partitions.tissue_class.get_partition_keys() == p.classes


def test_overridden_checkpoint_steps_give_their_own_step_partitions(tmp_path):
    p = lab_params(tmp_path, ["alpha"], [100, 200], ["training.checkpoint_steps=[10, 30]"])
    keys = Partitions.from_params(p).class_and_step.get_partition_keys()
    assert sorted(by_dimension(key) for key in keys) == [("alpha", "0"), ("alpha", "10"), ("alpha", "30")]


@pytest.mark.parametrize("steps", [[0, 100], [-5, 100]])
def test_a_checkpoint_step_of_zero_or_below_is_refused_as_step_0_is_the_base_model(tmp_path, steps):
    with pytest.raises(ValueError, match="checkpoint steps must be positive: step 0 is the base model itself"):
        Partitions.from_params(lab_params(tmp_path, ["alpha"], steps))


def test_partitions_built_twice_from_the_same_params_are_equal(tmp_path):
    """Assets built separately from one Params share partitions, so Dagster can relate them."""
    p = lab_params(tmp_path, ["alpha", "beta"], [100])
    assert Partitions.from_params(p) == Partitions.from_params(p)
    assert Partitions.from_params(p) != Partitions.from_params(lab_params(tmp_path, ["alpha", "beta"], [200]))


def test_by_tissue_class_maps_a_class_to_all_its_steps_and_a_step_back_to_its_class(tmp_path):
    partitions = Partitions.from_params(lab_params(tmp_path, ["alpha", "beta"], [100, 200]))
    per_class, per_step = partitions.tissue_class, partitions.class_and_step

    downstream = by_tissue_class.get_downstream_partitions_for_partitions(
        per_class.subset_with_partition_keys(["beta"]), per_class, per_step)
    assert sorted(by_dimension(key) for key in downstream.get_partition_keys()) == \
        [("beta", "0"), ("beta", "100"), ("beta", "200")]

    one_step = per_step.subset_with_partition_keys([dg.MultiPartitionKey({"tissue_class": "alpha", "step": "100"})])
    upstream = by_tissue_class.get_upstream_mapped_partitions_result_for_partitions(one_step, per_step, per_class)
    assert list(upstream.partitions_subset.get_partition_keys()) == ["alpha"]
