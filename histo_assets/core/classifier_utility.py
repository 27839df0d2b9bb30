"""Does adding synthetic images to a training set make a classifier better on real, held-out crops?

FID and KID say how close synthetic images are to real ones; a classifier team
needs to know whether the images help their model. This module trains the same
small classifier, with fixed seeds and a fixed budget, on three training sets:
the real training crops, real plus synthetic, and synthetic only (train on
synthetic, test on real). Each is scored on the held-out real crops.

Numbers are balanced accuracy (the per-class mean recall, so a class with few
crops counts as much as a large one), macro-F1 and the per-class confusion
matrix. Each carries a bootstrap interval over the test items. The gains
(real+synthetic minus real, synthetic minus real) use the same resamples on
both sides (a paired bootstrap). Two variants scored on one test set share
its luck, and the paired interval cancels that luck, where two separate
intervals would overlap and say nothing.

Two classifiers are offered. ``logistic`` is a multinomial logistic
regression on the features of the metrics' extractor (or any other
featuriser). Its fit is convex, so it has no seed noise, and it reuses
features the metrics already computed. ``cnn`` is a small convolutional
network trained from scratch on the pixels, with its own seed noise.
``utility.classifier`` chooses the default. The measurement behind the choice
is in benchmarks/README.md.

Everything random draws from generators seeded through ``derive_seed``,
never from global state, and training runs on one torch thread, so the same
inputs give the same bytes on any CPU machine.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import minimize
from torch import nn

from histo_assets.core.candidates import ClassPaths, step_candidate
from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.feature_networks import ImageFeatureExtractor
from histo_assets.core.features import extract_features
from histo_assets.core.io import Log, atomic_directory, atomic_write_json
from histo_assets.core.plots import interval_bars
from histo_assets.core.seeding import derive_seed
from histo_assets.core.steps import BASELINE_STEP

LOGISTIC = "logistic"
CNN = "cnn"
CLASSIFIERS = (LOGISTIC, CNN)

REAL = "real"
REAL_PLUS_SYNTHETIC = "real+synthetic"
SYNTHETIC = "synthetic"
VARIANTS = (REAL, REAL_PLUS_SYNTHETIC, SYNTHETIC)
# Paired differences against the real-only classifier: what "the synthetic data helps" means.
GAINS = {f"{REAL_PLUS_SYNTHETIC} - {REAL}": REAL_PLUS_SYNTHETIC, f"{SYNTHETIC} - {REAL}": SYNTHETIC}

BALANCED_ACCURACY = "balanced_accuracy"
MACRO_F1 = "macro_f1"
METRICS = (BALANCED_ACCURACY, MACRO_F1)

HELPS = "helps"
HURTS = "hurts"
NO_DETECTABLE_EFFECT = "no_detectable_effect"

SMALL_TEST = "small_test"
CLASS_NOT_TRAINED = "class_not_trained"
FLAG_MEANINGS = {
    SMALL_TEST: "a class has fewer held-out real crops than utility.min_test_per_class, so its recall moves in "
    "coarse steps and the interval is wide",
    CLASS_NOT_TRAINED: "a class has no training images in this variant, so the classifier cannot predict it",
}
FLAG_SEPARATOR = ";"

# The schema of utility.csv (one row per variant or gain, classifier and metric) and confusion.csv.
RESULT_COLUMNS = [
    "variant", "classifier", "metric", "value", "ci_low", "ci_high",
    "n_train", "n_test", "flags",
    "n_seeds", "confidence_level", "bootstrap_resamples", "features",
]
CONFUSION_COLUMNS = [
    "variant", "classifier", "true_class", "predicted_class", "rate", "ci_low", "ci_high", "n_test",
]
RESULTS_FILE = "utility.csv"
CONFUSION_FILE = "confusion.csv"
SUMMARY_FILE = "utility.json"
PLOT_FILE = "utility.png"
# Per-candidate tables, confusion matrices and plots, below the overview files.
CANDIDATES = "candidates"

# Paths in, an N x D float array out, row i for paths[i]. It is called once per class and image set, with the
# paths sorted, so the metrics' FeatureCache (which sorts and caches per set) serves the held-out and generated sets.
Featurizer = Callable[[Sequence[Path]], np.ndarray]


class UtilityError(HistoAssetsError, ValueError):
    """Inputs from which no utility can be measured."""


@dataclass(frozen=True)
class UtilitySettings:
    """The ``utility`` section of params; ``seed`` is already derived for this step."""

    classifier: str
    seeds: int
    image_size: int
    logistic_l2: float
    logistic_max_iter: int
    cnn_width: int
    cnn_steps: int
    cnn_batch_size: int
    cnn_learning_rate: float
    bootstrap_resamples: int
    confidence_level: float
    min_test_per_class: int
    seed: int

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise UtilityError(f"utility.classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.seeds < 1 or self.bootstrap_resamples < 1 or self.cnn_steps < 1:
            raise UtilityError("utility.seeds, utility.bootstrap_resamples and utility.cnn_steps must be at least 1")
        if not 0 < self.confidence_level < 1:
            raise UtilityError(f"utility.confidence_level must be between 0 and 1, got {self.confidence_level}")


def gain_verdict(ci_low: float, ci_high: float) -> str:
    """A paired gain helps or hurts only when its interval excludes zero."""
    return HELPS if ci_low > 0 else HURTS if ci_high < 0 else NO_DETECTABLE_EFFECT


@dataclass(frozen=True)
class UtilityResult:
    table: pd.DataFrame
    confusion: pd.DataFrame
    classes: tuple[str, ...]
    settings: UtilitySettings
    features: str

    def verdicts(self, metric: str = BALANCED_ACCURACY) -> dict[str, dict[str, str]]:
        """Per classifier and gain: helps or hurts when the paired interval excludes zero, else no detectable effect."""
        out: dict[str, dict[str, str]] = {}
        rows = self.table[self.table["metric"].eq(metric) & self.table["variant"].isin(list(GAINS))]
        for row in rows.itertuples():
            out.setdefault(row.classifier, {})[row.variant] = gain_verdict(row.ci_low, row.ci_high)
        return out


def extractor_featurizer(module: ImageFeatureExtractor, batch_size: int) -> Featurizer:
    """A featuriser over image files from any extractor of core/features.py."""

    def featurize(paths: Sequence[Path]) -> np.ndarray:
        images = (Image.open(path).convert("RGB") for path in paths)
        return extract_features(module, images, batch_size)[0]

    return featurize


@dataclass(frozen=True)
class _Split:
    """One image set: sorted paths per class, and flat paths and class indices in that order."""

    per_class: tuple[tuple[Path, ...], ...]

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(path for members in self.per_class for path in members)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.full(len(members), index, dtype=np.int64) for index, members in enumerate(self.per_class)])

    def features(self, featurize: Featurizer) -> np.ndarray:
        return np.concatenate(
            [np.asarray(featurize(members), dtype=np.float64) for members in self.per_class if members]
        )


def _split(sets: ClassPaths, classes: Sequence[str]) -> _Split:
    """Paths sorted within each class, so the numbers do not depend on the order the caller listed them in."""
    return _Split(tuple(tuple(sorted(Path(p) for p in sets.get(name, ()))) for name in classes))


def _class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """Weights that give every trained class the same total, so the loss targets balanced accuracy."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def _fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, l2: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-weighted multinomial logistic regression with an L2 penalty, by L-BFGS from zero.

    From a fixed start on a strictly convex loss, the fit is a function of
    the data alone: there is no seed to vary.
    """
    n, dim = x.shape
    sample = _class_weights(y, classes)[y]
    sample /= sample.sum()
    rows = np.arange(n)

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = theta[: dim * classes].reshape(dim, classes), theta[dim * classes :]
        logits = x @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -(sample * log_prob[rows, y]).sum() + 0.5 * l2 * (weights**2).sum()
        residual = np.exp(log_prob)
        residual[rows, y] -= 1.0
        residual *= sample[:, None]
        gradient = np.concatenate([(x.T @ residual + l2 * weights).ravel(), residual.sum(axis=0)])
        return float(loss), gradient

    start = np.zeros(dim * classes + classes)
    fitted = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}).x
    return fitted[: dim * classes].reshape(dim, classes), fitted[dim * classes :]


def _logistic_predictions(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: int, settings: UtilitySettings
) -> np.ndarray:
    """Test predictions (1 x N_test): features standardised with the training set's own statistics."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std[std < 1e-12] = 1.0
    weights, bias = _fit_logistic(
        (train_x - mean) / std, train_y, classes, settings.logistic_l2, settings.logistic_max_iter
    )
    return (((test_x - mean) / std) @ weights + bias).argmax(axis=1)[None, :]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks, global average pooling and a linear head.

    Small enough to train in seconds on a CPU at 32-64 px; from scratch, so
    what it learns comes from the training set under test and not from a
    pretrained network's prior.
    """

    def __init__(self, classes: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        channels = (3, width, 2 * width, 4 * width, 4 * width)
        blocks: list[nn.Module] = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            blocks += [conv, nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks[:-1])
        self.head = nn.Linear(channels[-1], classes)
        nn.init.normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _load_pixels(paths: Sequence[Path], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size]; PIL's bilinear resize averages over the source pixels when it shrinks."""
    arrays = [
        np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for p in paths
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _as_input(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32) / 127.5 - 1.0


def _dihedral(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip and quarter turn per image: tissue has no up, down, left or right."""
    flips = torch.rand(len(batch), generator=generator) < 0.5
    batch = torch.where(flips[:, None, None, None], batch.flip(3), batch)
    turns = torch.randint(0, 4, (len(batch),), generator=generator)
    return torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(batch, turns)])


def _train_cnn(
    pixels: torch.Tensor, labels: np.ndarray, classes: int, settings: UtilitySettings, seed: int
) -> SmallCNN:
    """A fixed number of optimiser steps whatever the training set's size, so every variant gets the same budget."""
    generator = torch.Generator().manual_seed(seed)
    model = SmallCNN(classes, settings.cnn_width, generator)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.cnn_learning_rate, weight_decay=1e-4)
    weights = torch.from_numpy(_class_weights(labels, classes)).to(torch.float32)
    targets = torch.from_numpy(labels)
    inputs = _as_input(pixels)
    model.train()
    for _ in range(settings.cnn_steps):
        rows = torch.randint(0, len(inputs), (min(settings.cnn_batch_size, len(inputs)),), generator=generator)
        loss = F.cross_entropy(model(_dihedral(inputs[rows], generator)), targets[rows], weight=weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


def _cnn_predictions(
    train_pixels: torch.Tensor, train_y: np.ndarray, test_pixels: torch.Tensor, classes: int,
    settings: UtilitySettings, seeds: Sequence[int],
) -> np.ndarray:
    predictions = []
    for seed in seeds:
        model = _train_cnn(train_pixels, train_y, classes, settings, seed)
        with torch.inference_mode():
            predictions.append(model(_as_input(test_pixels)).argmax(dim=1).numpy())
    return np.stack(predictions)


def stratified_resamples(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Test-item indices of each bootstrap resample (resamples x N), drawn with replacement within each class.

    Within each class, so every resample holds every class at its real count:
    with a handful of held-out crops per class a plain resample would often
    drop a class and leave balanced accuracy undefined.
    """
    rng = np.random.default_rng(seed)
    columns = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        columns.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    return np.concatenate(columns, axis=1)


def confusion_counts(truth: np.ndarray, predictions: np.ndarray, rows: np.ndarray, classes: int) -> np.ndarray:
    """Counts (seeds x resamples x true x predicted) of each seed's predictions on each resample of test items."""
    seeds, resamples = len(predictions), len(rows)
    codes = truth[rows][None, :, :] * classes + predictions[:, rows]
    offsets = np.arange(seeds * resamples).reshape(seeds, resamples, 1) * classes * classes
    counts = np.bincount((codes + offsets).ravel(), minlength=seeds * resamples * classes * classes)
    return counts.reshape(seeds, resamples, classes, classes)


def scores_from_confusion(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Balanced accuracy and macro-F1 over the last two axes; a class never predicted has precision and F1 of 0."""
    counts = counts.astype(np.float64)
    hits = np.diagonal(counts, axis1=-2, axis2=-1)
    actual, predicted = counts.sum(axis=-1), counts.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = hits / actual
        f1 = np.where(actual + predicted > 0, 2 * hits / (actual + predicted), 0.0)
    return {BALANCED_ACCURACY: recall.mean(axis=-1), MACRO_F1: f1.mean(axis=-1)}


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval: accuracy-type scores have no small-sample bias that would call for centring."""
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class _Scored:
    """One variant's scores: point values over the full test set and bootstrap replicates, both seed means."""

    point: dict[str, float]
    replicates: dict[str, np.ndarray]
    rates: np.ndarray
    rate_replicates: np.ndarray
    n_train: int
    n_seeds: int
    flags: tuple[str, ...]


def _score(
    truth: np.ndarray, predictions: np.ndarray, resamples: np.ndarray, classes: int, n_train: int, flags: list[str]
) -> _Scored:
    identity = np.arange(len(truth))[None, :]
    point_counts = confusion_counts(truth, predictions, identity, classes)[:, 0]
    counts = confusion_counts(truth, predictions, resamples, classes)
    point = {name: float(values.mean()) for name, values in scores_from_confusion(point_counts).items()}
    replicates = {name: values.mean(axis=0) for name, values in scores_from_confusion(counts).items()}
    rows = counts.sum(axis=-1, keepdims=True)
    return _Scored(
        point=point,
        replicates=replicates,
        rates=(point_counts / point_counts.sum(axis=-1, keepdims=True)).mean(axis=0),
        rate_replicates=(counts / rows).mean(axis=0),
        n_train=n_train,
        n_seeds=len(predictions),
        flags=tuple(flags),
    )


def _training_set(variant: str, real: _Split, synthetic: _Split) -> np.ndarray:
    """Indices into the concatenation real + synthetic that make up a variant's training set."""
    real_rows, synthetic_rows = np.arange(len(real.paths)), len(real.paths) + np.arange(len(synthetic.paths))
    return {REAL: real_rows, REAL_PLUS_SYNTHETIC: np.concatenate([real_rows, synthetic_rows]), SYNTHETIC: synthetic_rows}[variant]


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Fit on one thread: other thread counts split the float sums of training differently and change its last bits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def classifier_utility(
    train: ClassPaths,
    synthetic: ClassPaths,
    test: ClassPaths,
    settings: UtilitySettings,
    featurize: Featurizer | None = None,
    features_label: str = "",
    classifiers: Sequence[str] | None = None,
    log: Log | None = None,
) -> UtilityResult:
    """Scores of the real, real+synthetic and synthetic-only classifiers on the held-out real crops.

    ``test`` names the classes, in order; ``train`` and ``synthetic`` map the
    same names to image paths (a missing class counts as empty and is
    flagged). ``featurize`` is needed for the logistic classifier; pass the
    metrics' feature cache to reuse its features. ``features_label`` names
    the features in the table, e.g. the extractor's name. ``classifiers``
    defaults to ``settings.classifier``.
    """
    classes = tuple(test)
    k = len(classes)
    if k < 2:
        raise UtilityError(f"a classifier needs at least 2 classes, got {list(classes)}")
    empty = [name for name in classes if not test[name]]
    if empty:
        raise UtilityError(f"no held-out real crops for class(es) {', '.join(empty)}: nothing to test on")
    real_split, synthetic_split, test_split = (_split(s, classes) for s in (train, synthetic, test))
    if not len(real_split.paths) or not len(synthetic_split.paths):
        raise UtilityError("both the real training set and the synthetic set need images")
    chosen = tuple(classifiers or (settings.classifier,))
    unknown = sorted(set(chosen) - set(CLASSIFIERS))
    if unknown:
        raise UtilityError(f"unknown classifier(s) {unknown}; choose from {', '.join(CLASSIFIERS)}")
    if LOGISTIC in chosen and featurize is None:
        raise UtilityError("the logistic classifier needs a featurize function (e.g. extractor_featurizer)")

    truth = test_split.labels
    resamples = stratified_resamples(truth, settings.bootstrap_resamples, derive_seed(settings.seed, "bootstrap"))
    pooled_labels = np.concatenate([real_split.labels, synthetic_split.labels])
    small_test = np.bincount(truth, minlength=k).min() < settings.min_test_per_class
    scored: dict[tuple[str, str], _Scored] = {}
    for classifier in chosen:
        if classifier == LOGISTIC:
            pooled = np.concatenate([real_split.features(featurize), synthetic_split.features(featurize)])
            test_inputs = test_split.features(featurize)
        else:
            pooled = torch.cat([_load_pixels(s.paths, settings.image_size) for s in (real_split, synthetic_split)])
            test_inputs = _load_pixels(test_split.paths, settings.image_size)
        for variant in VARIANTS:
            rows = _training_set(variant, real_split, synthetic_split)
            labels = pooled_labels[rows]
            flags = [SMALL_TEST] if small_test else []
            if len(np.unique(labels)) < k:
                flags.append(CLASS_NOT_TRAINED)
            with _one_torch_thread():
                if classifier == LOGISTIC:
                    predictions = _logistic_predictions(pooled[rows], labels, test_inputs, k, settings)
                else:
                    seeds = [derive_seed(settings.seed, CNN, index) for index in range(settings.seeds)]
                    predictions = _cnn_predictions(
                        pooled[torch.from_numpy(rows)], labels, test_inputs, k, settings, seeds
                    )
            scored[classifier, variant] = _score(truth, predictions, resamples, k, len(rows), flags)
            if log is not None:
                point = scored[classifier, variant].point
                log(f"{classifier} on {variant} ({len(rows)} images): balanced accuracy "
                    f"{point[BALANCED_ACCURACY]:.3f}, macro-F1 {point[MACRO_F1]:.3f}")
    label = features_label if LOGISTIC in chosen else ""
    return UtilityResult(
        table=_table(scored, chosen, len(truth), settings, label),
        confusion=_confusion_table(scored, chosen, classes, np.bincount(truth, minlength=k), settings),
        classes=classes,
        settings=settings,
        features=label,
    )


def _features_label(classifier: str, settings: UtilitySettings, features: str) -> str:
    return features if classifier == LOGISTIC else f"pixels {settings.image_size}x{settings.image_size}"


def _table(
    scored: Mapping[tuple[str, str], _Scored], classifiers: Sequence[str], n_test: int,
    settings: UtilitySettings, features: str,
) -> pd.DataFrame:
    level = settings.confidence_level
    records = []
    for classifier in classifiers:
        common = {"classifier": classifier, "n_test": n_test, "confidence_level": level,
                  "bootstrap_resamples": settings.bootstrap_resamples,
                  "features": _features_label(classifier, settings, features)}
        base = scored[classifier, REAL]
        for variant in VARIANTS:
            result = scored[classifier, variant]
            for metric in METRICS:
                low, high = percentile_interval(result.replicates[metric], level)
                records.append(common | {
                    "variant": variant, "metric": metric, "value": result.point[metric], "ci_low": low,
                    "ci_high": high, "n_train": result.n_train, "flags": FLAG_SEPARATOR.join(result.flags),
                    "n_seeds": result.n_seeds,
                })
        for gain, variant in GAINS.items():
            result = scored[classifier, variant]
            flags = sorted(set(result.flags) | set(base.flags), key=list(FLAG_MEANINGS).index)
            for metric in METRICS:
                low, high = percentile_interval(result.replicates[metric] - base.replicates[metric], level)
                records.append(common | {
                    "variant": gain, "metric": metric, "value": result.point[metric] - base.point[metric],
                    "ci_low": low, "ci_high": high, "n_train": result.n_train,
                    "flags": FLAG_SEPARATOR.join(flags), "n_seeds": result.n_seeds,
                })
    return pd.DataFrame.from_records(records, columns=RESULT_COLUMNS)


def _confusion_table(
    scored: Mapping[tuple[str, str], _Scored], classifiers: Sequence[str], classes: Sequence[str],
    per_class: np.ndarray, settings: UtilitySettings,
) -> pd.DataFrame:
    """Row-normalised confusion: the share of each true class's held-out crops given each label, with intervals."""
    records = []
    for classifier in classifiers:
        for variant in VARIANTS:
            result = scored[classifier, variant]
            for t, true_class in enumerate(classes):
                for p, predicted_class in enumerate(classes):
                    low, high = percentile_interval(result.rate_replicates[:, t, p], settings.confidence_level)
                    records.append({
                        "variant": variant, "classifier": classifier, "true_class": true_class,
                        "predicted_class": predicted_class, "rate": float(result.rates[t, p]),
                        "ci_low": low, "ci_high": high, "n_test": int(per_class[t]),
                    })
    return pd.DataFrame.from_records(records, columns=CONFUSION_COLUMNS)


def utility_plot(result: UtilityResult, path: Path | None, title: str = "Classifier utility on held-out real crops") -> Image.Image:
    """Bars per variant with their intervals, one panel per classifier, chance level as a line."""
    panels = {}
    for classifier, rows in result.table[result.table["variant"].isin(VARIANTS)].groupby("classifier", sort=False):
        panels[classifier] = {
            metric: [(row.variant, row.value, row.ci_low, row.ci_high) for row in group.itertuples()]
            for metric, group in rows.groupby("metric", sort=False)
        }
    return interval_bars(panels, path, title=title, reference=1.0 / len(result.classes), reference_label="chance")


def csv_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n", float_format="%.6g")
    return buffer.getvalue().encode()


def summary(result: UtilityResult) -> dict[str, Any]:
    """What the numbers mean and under which settings: the JSON next to the tables."""
    return {
        "classes": list(result.classes),
        "verdicts": result.verdicts(),
        "verdict_metric": BALANCED_ACCURACY,
        "chance_level": 1.0 / len(result.classes),
        "features": result.features,
        "settings": asdict(result.settings),
        "flags": FLAG_MEANINGS,
    }


def write_utility(result: UtilityResult, folder: Path) -> Path:
    """The tables, the summary and the plot, swapped into ``folder`` together or not at all."""
    with atomic_directory(folder) as staging:
        (staging / RESULTS_FILE).write_bytes(csv_bytes(result.table))
        (staging / CONFUSION_FILE).write_bytes(csv_bytes(result.confusion))
        (staging / SUMMARY_FILE).write_text(json.dumps(summary(result), indent=2, sort_keys=True) + "\n")
        utility_plot(result, staging / PLOT_FILE)
    return Path(folder)


def candidates_table(results: Mapping[str, UtilityResult]) -> pd.DataFrame:
    """Every candidate's rows in one table, with the verdict of each gain row."""
    frames = []
    for candidate, result in results.items():
        table = result.table.copy()
        table.insert(0, "candidate", candidate)
        table["verdict"] = [gain_verdict(row.ci_low, row.ci_high) if row.variant in GAINS else "" for row in table.itertuples()]
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def best_candidate(results: Mapping[str, UtilityResult], classifier: str, eligible: Sequence[str]) -> str:
    """The eligible candidate whose real+synthetic classifier scores the highest balanced accuracy; ties: the first."""
    def score(candidate: str) -> float:
        table = results[candidate].table
        row = table[table["classifier"].eq(classifier) & table["variant"].eq(REAL_PLUS_SYNTHETIC)
                    & table["metric"].eq(BALANCED_ACCURACY)]
        return float(row["value"].iloc[0])

    if not eligible:
        raise UtilityError("no release candidate to choose from")
    return max(eligible, key=lambda candidate: (score(candidate), -list(eligible).index(candidate)))


def candidates_plot(results: Mapping[str, UtilityResult], classifier: str, path: Path | None) -> Image.Image:
    """Balanced accuracy of the three variants for every candidate, with intervals and chance level."""
    first = next(iter(results.values()))
    panels = {classifier: {
        candidate: [(row.variant, row.value, row.ci_low, row.ci_high) for row in result.table.itertuples()
                    if row.classifier == classifier and row.metric == BALANCED_ACCURACY and row.variant in VARIANTS]
        for candidate, result in results.items()
    }}
    return interval_bars(panels, path, title="Balanced accuracy on held-out real crops, per release candidate",
                         reference=1.0 / len(first.classes), reference_label="chance")


def candidates_notes(results: Mapping[str, UtilityResult], classifier: str) -> str:
    """For the dataset card: per candidate, what adding its images (or using them alone) does to the classifier."""
    first = next(iter(results.values()))
    n_test = first.table["n_test"].iloc[0]
    lines = [f"Classifier utility ({classifier}, {first.features}; {n_test} held-out real crops, "
             f"{first.settings.confidence_level:.0%} bootstrap intervals over them), balanced accuracy:",
             "", "| candidate | real | real+synthetic | synthetic only | adding synthetic |", "|---|---|---|---|---|"]
    for candidate, result in results.items():
        rows = result.table[result.table["classifier"].eq(classifier) & result.table["metric"].eq(BALANCED_ACCURACY)]
        cell = {row.variant: f"{row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]" for row in rows.itertuples()}
        verdict = result.verdicts().get(classifier, {}).get(f"{REAL_PLUS_SYNTHETIC} - {REAL}", "")
        lines.append(f"| {candidate} | {cell.get(REAL, '')} | {cell.get(REAL_PLUS_SYNTHETIC, '')} | "
                     f"{cell.get(SYNTHETIC, '')} | {verdict.replace('_', ' ')} |")
    return "\n".join(lines)


def write_candidates(
    out: Path, train: ClassPaths, test: ClassPaths, candidates: Mapping[str, ClassPaths], settings: UtilitySettings,
    steps: Sequence[int], *, featurize: Featurizer, features_label: str, log: Log | None = None,
) -> dict[str, Any]:
    """Every candidate's utility in its own folder, the table, plot and DVC metrics across them in ``out``.

    Returns the summary's fields. The step chosen by utility is among the
    trained checkpoints only: step 0 has no hypernetwork to release.
    """
    results = {name: classifier_utility(train, synthetic, test, settings, featurize=featurize,
                                        features_label=features_label, log=log)
               for name, synthetic in candidates.items()}
    trained = {step_candidate(step): step for step in steps if step != BASELINE_STEP}
    chosen_step = trained[best_candidate(results, settings.classifier, list(trained))]
    for name, result in results.items():
        write_utility(result, out / CANDIDATES / name)
    (out / RESULTS_FILE).write_bytes(csv_bytes(candidates_table(results)))
    candidates_plot(results, settings.classifier, out / PLOT_FILE)
    verdicts = {name: result.verdicts()[settings.classifier] for name, result in results.items()}
    atomic_write_json(out / SUMMARY_FILE, {
        "classifier": settings.classifier, "features": features_label, "verdict_metric": BALANCED_ACCURACY,
        "verdicts": verdicts, "best_step_by_utility": chosen_step,
    })
    return {"best_step_by_utility": chosen_step, "verdicts": verdicts,
            "notes": candidates_notes(results, settings.classifier)}
