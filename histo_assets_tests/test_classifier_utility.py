"""Classifier utility on data where the answer is known, plus its arithmetic, schema and determinism.

The known-answer data are small generated "tissues": stripes whose period
tells the class, at a random angle and phase, under a per-image colour shift
and pixel noise large enough that five training images per class leave a
classifier far from perfect. Against that real set:

* a perfect generator (fresh draws from each class's own distribution) must help;
* exact copies of the training crops carry no new information: synthetic-only
  must score what real-only scores, and real+copies must not hurt;
* class-shuffled synthetic images (a perfect generator's images under the
  wrong class) must hurt, and synthetic-only must fall below chance.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histo_assets.core.classifier_utility import (
    BALANCED_ACCURACY,
    CANDIDATES,
    CLASS_NOT_TRAINED,
    CNN,
    CONFUSION_COLUMNS,
    CONFUSION_FILE,
    GAINS,
    HELPS,
    HURTS,
    LOGISTIC,
    MACRO_F1,
    PLOT_FILE,
    REAL,
    REAL_PLUS_SYNTHETIC,
    RESULT_COLUMNS,
    RESULTS_FILE,
    SMALL_TEST,
    SUMMARY_FILE,
    SYNTHETIC,
    VARIANTS,
    UtilityError,
    UtilitySettings,
    classifier_utility,
    confusion_counts,
    extractor_featurizer,
    scores_from_confusion,
    stratified_resamples,
    write_candidates,
    write_utility,
)
from histo_assets.core.candidates import BEST_PER_CLASS, step_candidate
from histo_assets.core.evaluation import FeatureCache
from histo_assets.core.feature_networks import RandomConvFeatures
from histo_assets.core.features import WEIGHTS_ENV, build_extractor
from histo_assets.params import DEFAULT_PARAMS_FILE, PROJECT_ROOT, load_params
from histo_assets.settings import from_section, utility_settings
from histo_assets_tests.conftest import tree_hashes

CLASSES = ("short", "medium", "long")
PERIODS = (3.5, 6.0, 10.0)
COLOURS = np.array([[190, 100, 160], [175, 105, 170], [200, 115, 150]], dtype=np.float64)
SIDE = 32
N_TRAIN, N_TEST, N_SYNTHETIC = 5, 30, 40
REAL_GAIN = f"{REAL_PLUS_SYNTHETIC} - {REAL}"
SYNTHETIC_GAIN = f"{SYNTHETIC} - {REAL}"
CHANCE = 1 / len(CLASSES)


def striped_tissue(class_index: int, rng: np.random.Generator) -> Image.Image:
    """One image of a class: the stripe period (within ±15 %) is the only class signal that survives the nuisances."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    frequency = 2 * np.pi / (PERIODS[class_index] * rng.uniform(0.85, 1.15))
    stripes = np.sin(frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    colour = COLOURS[class_index] + rng.normal(0, 30, 3)
    pixels = colour + 40 * stripes[..., None] + rng.normal(0, 40, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_images(folder: Path, class_index: int, count: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{CLASSES[class_index]}_{index:03d}.png"
        striped_tissue(class_index, rng).save(path)
        paths.append(path)
    return paths


def known_answer_sets(root: Path) -> dict[str, dict[str, list[Path]]]:
    """train, test and the three synthetic sets (fresh, copies, shuffled), each mapping class to image paths."""
    sets: dict[str, dict[str, list[Path]]] = {name: {} for name in ("train", "test", "fresh", "copies", "shuffled")}
    for index, name in enumerate(CLASSES):
        sets["train"][name] = write_images(root / "train" / name, index, N_TRAIN, 100 + index)
        sets["test"][name] = write_images(root / "test" / name, index, N_TEST, 200 + index)
        sets["fresh"][name] = write_images(root / "fresh" / name, index, N_SYNTHETIC, 300 + index)
        wrong = (index + 1) % len(CLASSES)
        sets["shuffled"][name] = write_images(root / "shuffled" / name, wrong, N_SYNTHETIC, 400 + index)
        copies = root / "copies" / name
        copies.mkdir(parents=True)
        sets["copies"][name] = [Path(shutil.copy(path, copies / f"copy_{path.name}")) for path in sets["train"][name]]
    return sets


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, dict[str, list[Path]]]:
    return known_answer_sets(tmp_path_factory.mktemp("utility"))


@pytest.fixture(scope="module")
def settings() -> UtilitySettings:
    """params.yaml's utility section with a CNN budget cut to seconds; the data are 32 px."""
    params = load_params(DEFAULT_PARAMS_FILE)
    defaults = from_section(UtilitySettings, params["utility"], seed=11)
    return dataclasses.replace(defaults, seeds=1, image_size=SIDE, cnn_steps=60, bootstrap_resamples=400)


@pytest.fixture(scope="module")
def featurize():
    return extractor_featurizer(RandomConvFeatures(seed=3), batch_size=64)


def run(sets, synthetic: str, settings, featurize, classifier: str):
    return classifier_utility(
        sets["train"], sets[synthetic], sets["test"], settings, featurize, "random-conv", classifiers=[classifier]
    )


def row(result, variant: str, metric: str = BALANCED_ACCURACY):
    rows = result.table[result.table["variant"].eq(variant) & result.table["metric"].eq(metric)]
    assert len(rows) == 1
    return rows.iloc[0]


@pytest.mark.parametrize("classifier", [LOGISTIC, CNN])
def test_a_perfect_generator_helps(sets, settings, featurize, classifier):
    result = run(sets, "fresh", settings, featurize, classifier)
    assert result.verdicts()[classifier][REAL_GAIN] == HELPS
    assert row(result, REAL_GAIN)["ci_low"] > 0
    assert row(result, SYNTHETIC)["value"] > row(result, REAL)["value"]


@pytest.mark.parametrize("classifier", [LOGISTIC, CNN])
def test_copies_of_the_training_crops_score_as_real_and_do_not_hurt(sets, settings, featurize, classifier):
    result = run(sets, "copies", settings, featurize, classifier)
    real, synthetic = row(result, REAL), row(result, SYNTHETIC)
    assert synthetic["value"] == pytest.approx(real["value"], abs=1e-12)
    assert row(result, REAL_GAIN)["ci_high"] >= 0
    assert result.verdicts()[classifier][REAL_GAIN] != HURTS
    assert real["value"] > CHANCE, "the real-only classifier must have learnt something for the comparison to mean anything"


@pytest.mark.parametrize("classifier", [LOGISTIC, CNN])
def test_class_shuffled_synthetic_images_hurt(sets, settings, featurize, classifier):
    result = run(sets, "shuffled", settings, featurize, classifier)
    assert result.verdicts()[classifier] == {REAL_GAIN: HURTS, SYNTHETIC_GAIN: HURTS}
    assert row(result, SYNTHETIC)["ci_high"] < CHANCE
    for metric in (BALANCED_ACCURACY, MACRO_F1):
        assert row(result, REAL_GAIN, metric)["value"] < 0


def test_same_inputs_give_the_same_bytes_in_any_order(sets, settings, featurize, tmp_path):
    quick = dataclasses.replace(settings, cnn_steps=10)
    reordered = {name: list(reversed(paths)) for name, paths in sets["train"].items()}
    first = classifier_utility(sets["train"], sets["fresh"], sets["test"], quick, featurize, "random-conv",
                               classifiers=[LOGISTIC, CNN])
    second = classifier_utility(reordered, dict(reversed(list(sets["fresh"].items()))), sets["test"], quick,
                                featurize, "random-conv", classifiers=[LOGISTIC, CNN])
    write_utility(first, tmp_path / "first")
    write_utility(second, tmp_path / "second")
    hashes = tree_hashes(tmp_path / "first")
    assert sorted(hashes) == sorted([RESULTS_FILE, CONFUSION_FILE, SUMMARY_FILE, PLOT_FILE])
    assert hashes == tree_hashes(tmp_path / "second")


def test_the_metrics_feature_cache_serves_as_featurizer(sets, settings, featurize, tmp_path, monkeypatch):
    """The asset passes the metrics' cache, which sorts each set and caches it per class: the numbers must not move."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    extractor, info = build_extractor(None, seed=3)
    cache = FeatureCache(tmp_path / "features", extractor, info, batch_size=64)
    cached = classifier_utility(sets["train"], sets["fresh"], sets["test"], settings,
                                lambda paths: cache.features(paths).features, "random-conv", classifiers=[LOGISTIC])
    direct = classifier_utility(sets["train"], sets["fresh"], sets["test"], settings, featurize, "random-conv",
                                classifiers=[LOGISTIC])
    assert cached.table.equals(direct.table)
    assert len(list((tmp_path / "features").glob("*.npz"))) == 3 * len(CLASSES)


def test_tables_have_their_schema_intervals_and_flags(sets, settings, featurize):
    short = {name: paths[:5] for name, paths in sets["test"].items()}
    missing = {name: paths for name, paths in sets["fresh"].items() if name != CLASSES[0]}
    result = classifier_utility(sets["train"], missing, short, settings, featurize, "random-conv",
                                classifiers=[LOGISTIC])
    table, confusion = result.table, result.confusion
    assert list(table.columns) == RESULT_COLUMNS and list(confusion.columns) == CONFUSION_COLUMNS
    assert list(table["variant"].unique()) == [*VARIANTS, *GAINS]
    assert (table["ci_low"] <= table["value"] + 1e-12).all() and (table["value"] <= table["ci_high"] + 1e-12).all()
    assert set(table["n_test"]) == {15} and set(table["features"]) == {"random-conv"}
    assert row(result, REAL)["n_train"] == 3 * N_TRAIN and row(result, SYNTHETIC)["n_train"] == 2 * N_SYNTHETIC
    assert row(result, REAL)["flags"] == SMALL_TEST
    assert row(result, SYNTHETIC)["flags"] == f"{SMALL_TEST};{CLASS_NOT_TRAINED}"
    assert row(result, REAL_PLUS_SYNTHETIC)["flags"] == row(result, REAL_GAIN)["flags"] == SMALL_TEST
    assert row(result, SYNTHETIC_GAIN)["flags"] == f"{SMALL_TEST};{CLASS_NOT_TRAINED}"
    rates = confusion.groupby(["variant", "classifier", "true_class"])["rate"].sum()
    assert np.allclose(rates, 1.0)
    never = confusion[confusion["variant"].eq(SYNTHETIC) & confusion["predicted_class"].eq(CLASSES[0])]
    assert (never["rate"] == 0).all(), "a class without training images is never predicted"


def test_scores_match_a_hand_computed_confusion_matrix():
    # true x predicted: recalls 3/4, 1/2, 2/3; precisions 3/4, 1/3, 1; F1 3/4, 2/5, 4/5.
    counts = np.array([[3, 1, 0], [1, 1, 0], [0, 1, 2]])
    truth = np.repeat(np.arange(3), counts.sum(axis=1))
    predictions = np.concatenate([np.repeat(np.arange(3), r) for r in counts])[None, :]
    observed = confusion_counts(truth, predictions, np.arange(len(truth))[None, :], 3)[0, 0]
    assert (observed == counts).all()
    scores = scores_from_confusion(observed)
    assert scores[BALANCED_ACCURACY] == pytest.approx((3 / 4 + 1 / 2 + 2 / 3) / 3)
    assert scores[MACRO_F1] == pytest.approx((3 / 4 + 2 / 5 + 4 / 5) / 3)
    never_predicted = scores_from_confusion(np.array([[2, 0], [2, 0]]))
    assert never_predicted[MACRO_F1] == pytest.approx((2 * 2 / 6 + 0) / 2)


def test_resamples_keep_every_class_at_its_count():
    labels = np.array([0, 0, 0, 1, 2, 2])
    rows = stratified_resamples(labels, 50, seed=5)
    assert rows.shape == (50, 6)
    assert all((np.bincount(labels[r], minlength=3) == [3, 1, 2]).all() for r in rows)
    assert (rows == stratified_resamples(labels, 50, seed=5)).all()


def test_settings_come_from_params_and_bad_inputs_are_refused(sets, settings, featurize):
    for name in ("params.yaml", "params.demo.yaml"):
        assert utility_settings(load_params(PROJECT_ROOT / name)).classifier in (LOGISTIC, CNN)
    bad = dict(load_params(DEFAULT_PARAMS_FILE)["utility"], classifier="forest")
    with pytest.raises(UtilityError, match="forest"):
        from_section(UtilitySettings, bad, seed=1)
    with pytest.raises(UtilityError, match="featurize"):
        classifier_utility(sets["train"], sets["fresh"], sets["test"], settings, classifiers=[LOGISTIC])
    with pytest.raises(UtilityError, match=CLASSES[1]):
        classifier_utility(sets["train"], sets["fresh"], {**sets["test"], CLASSES[1]: []}, settings, featurize)


def test_every_candidate_is_written_and_the_utility_choice_is_a_trained_step(sets, settings, featurize, tmp_path):
    logistic = dataclasses.replace(settings, classifier=LOGISTIC)
    candidates = {step_candidate(0): sets["fresh"], step_candidate(3): sets["copies"],
                  step_candidate(6): sets["shuffled"], BEST_PER_CLASS: sets["copies"]}
    summary = write_candidates(tmp_path, sets["train"], sets["test"], candidates, logistic, [0, 3, 6],
                               featurize=featurize, features_label="random-conv")
    assert summary["best_step_by_utility"] == 3, "step 0 has the best images but no hypernetwork to release"
    assert summary["verdicts"][step_candidate(6)] == {REAL_GAIN: HURTS, SYNTHETIC_GAIN: HURTS}
    assert all(f"| {name} |" in summary["notes"] for name in candidates)
    for name in candidates:
        assert sorted(path.name for path in (tmp_path / CANDIDATES / name).iterdir()) == sorted(
            [RESULTS_FILE, CONFUSION_FILE, SUMMARY_FILE, PLOT_FILE])
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {
        "classifier": LOGISTIC, "features": "random-conv", "verdict_metric": BALANCED_ACCURACY,
        "verdicts": summary["verdicts"], "best_step_by_utility": 3,
    }
    table = pd.read_csv(tmp_path / RESULTS_FILE)
    assert list(table["candidate"].unique()) == list(candidates) and (tmp_path / PLOT_FILE).is_file()
