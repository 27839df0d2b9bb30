"""core/seeding.py: derived seeds are pinned, in range, and differ by master seed, purpose, class, step and index."""

import itertools
import random

import numpy as np
import torch

from histo_assets.core.seeding import derive_seed

CLASSES = ("tumour", "stroma", "lymphocytes")


def test_the_same_master_and_parts_give_the_same_seed():
    assert derive_seed(42, "generation", "tumour", 100, 3) == derive_seed(42, "generation", "tumour", 100, 3)


def test_seeds_are_pinned_so_earlier_runs_stay_reproducible():
    """Changing the derivation would silently change every generated image and split of a rerun."""
    assert derive_seed(0, "generation", "x", 1, 2) == 4615302846382355541
    assert derive_seed(42, "metrics") == 1459817090184760770


def test_a_seed_does_not_depend_on_which_other_seeds_were_derived_before_it():
    """Work split across processes or resumed in another order gets the same seed for each item."""
    items = [(cls, step) for cls in CLASSES for step in (100, 200)]
    forward = {item: derive_seed(7, "generation", *item) for item in items}
    backward = {item: derive_seed(7, "generation", *item) for item in reversed(items)}
    assert forward == backward


def test_deriving_a_seed_leaves_the_global_random_streams_alone():
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.random())
    random.seed(1)
    np.random.seed(1)
    derive_seed(5, "augmented_crops", "tumour")
    assert (random.random(), np.random.random()) == expected


def test_each_purpose_class_step_and_index_gets_its_own_seed():
    items = list(itertools.product(("generation", "metrics"), CLASSES, (100, 200), range(4)))
    seeds = [derive_seed(42, *item) for item in items]
    assert len(set(seeds)) == len(seeds)


def test_the_master_seed_changes_every_derived_seed():
    for parts in [("metrics",), ("utility",), ("augmented_crops", "tumour"), ("generation", "stroma", 100, 0)]:
        assert len({derive_seed(master, *parts) for master in (0, 1, 2, 12345)}) == 4


def test_the_order_of_the_parts_matters():
    assert derive_seed(1, "init", "vae") != derive_seed(1, "vae", "init")
    assert derive_seed(1, "generation", "tumour", 1, 2) != derive_seed(1, "generation", "tumour", 2, 1)


def test_no_parts_is_a_seed_of_its_own():
    assert derive_seed(3) != derive_seed(3, "")
    assert derive_seed(3) != derive_seed(3, "metrics")


def test_numpy_integers_give_the_same_seeds_as_python_integers():
    """Seeds and steps read from arrays or frames are numpy integers."""
    from_numpy = derive_seed(np.int64(42), "generation", "tumour", np.int64(100), np.int32(3))
    assert from_numpy == derive_seed(42, "generation", "tumour", 100, 3)


def test_seeds_are_non_negative_63_bit_integers_every_generator_accepts():
    seeds = [derive_seed(master, "part", index) for master in (0, 1, 2**62, -5) for index in range(200)]
    assert all(isinstance(seed, int) and 0 <= seed < 2**63 for seed in seeds)
    assert max(seeds) > 2**60, "the top bits are used, not only a few low ones"
    for seed in seeds[:5] + [max(seeds)]:
        torch.Generator().manual_seed(seed)
        np.random.default_rng(seed)
        assert int(np.int64(seed)) == seed
