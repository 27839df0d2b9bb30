"""Logistic regression on extractor features against a small CNN: which should classifier_utility default to?

Both classifiers run under the `utility` section of the params file (seeds,
budget, bootstrap) on two kinds of data:

* **known answer**: the generated striped "tissues" of
  histo_assets_tests/test_classifier_utility.py (3 classes, 5 real training
  images per class, 30 held-out per class), with synthetic sets whose effect
  is known: fresh draws from the true classes (must help), copies of the
  training images (must not hurt) and class-shuffled fresh draws (must hurt);
* **demo**: the crops of a materialised demo (`histo-assets fetch-sample-data`, then
  `histo-assets materialize --job ingest_pipeline` and, for generated images,
  `training_pipeline` and `checkpoint_pipeline`, under the params file given). Its
  synthetic sets: each checkpoint's generated images, the augmented crops as a
  stand-in for a good generator, and the augmented crops under the wrong class.

Features come from the extractor the metrics use (`build_extractor`: the
random-conv fallback without Inception weights). Their extraction is timed on its own,
because the pipeline's metrics have already cached them. Run, on one thread:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_utility.py --params params.demo.yaml
with options --cases all|known|demo, --classifiers logistic,cnn and --set key=value (utility keys).
Prints Markdown tables.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from histo_assets.core.classifier_utility import (
    BALANCED_ACCURACY,
    CLASSIFIERS,
    GAINS,
    REAL,
    REAL_PLUS_SYNTHETIC,
    SYNTHETIC,
    UtilitySettings,
    classifier_utility,
    extractor_featurizer,
)
from histo_assets.core.features import build_extractor
from histo_assets.core.seeding import derive_seed
from histo_assets.core.layout import HOLDOUT, IMAGES, INDEX, Layout
from histo_assets.core.schemas import AUGMENTED_INDEX, HELD_OUT_CROPS
from histo_assets.params import load_params
from histo_assets.settings import from_section
from histo_assets_tests.test_classifier_utility import known_answer_sets

REAL_GAIN = f"{REAL_PLUS_SYNTHETIC} - {REAL}"


class TimedFeatures:
    """Features computed once per image set and remembered, with the seconds spent extracting them."""

    def __init__(self, featurize):
        self.featurize = featurize
        self.memo: dict[tuple[Path, ...], object] = {}
        self.seconds = 0.0

    def __call__(self, paths):
        key = tuple(paths)
        if key not in self.memo:
            started = time.perf_counter()
            self.memo[key] = self.featurize(paths)
            self.seconds += time.perf_counter() - started
        return self.memo[key]


def demo_sets(layout: Layout, classes: list[str]) -> tuple[dict, dict, dict[str, dict]]:
    """Real training crops, held-out crops, and the demo's synthetic sets, per class."""
    train, test, augmented = {}, {}, {}
    for name in classes:
        index = AUGMENTED_INDEX.read(layout.augmented_crops(name) / INDEX)
        images = layout.augmented_crops(name) / IMAGES
        train[name] = [images / f for f in index.loc[index["kind"].eq("original"), "file"]]
        augmented[name] = [images / f for f in index.loc[~index["kind"].eq("original"), "file"]]
        held_out = HELD_OUT_CROPS.read(layout.augmented_crops(name) / HOLDOUT)["crop_file"]
        test[name] = [layout.square_crops(name) / IMAGES / f for f in held_out]
    synthetic = {"augmented crops (good-generator stand-in)": augmented,
                 "augmented crops, class-shuffled": {name: augmented[classes[(i + 1) % len(classes)]]
                                                     for i, name in enumerate(classes)}}
    steps = sorted({int(p.name) for name in classes for p in layout.synthetic_images(name, 0).parent.glob("[0-9]*")})
    for step in steps:
        generated = {name: sorted((layout.synthetic_images(name, step) / IMAGES).glob("*.png")) for name in classes}
        if all(generated.values()):
            synthetic[f"generated, step {step}"] = generated
    return train, test, synthetic


def run_case(label, train, test, synthetic, settings, featurize, classifiers, rows):
    for classifier in classifiers:
        started = time.perf_counter()
        result = classifier_utility(train, synthetic, test, settings, featurize, "random-conv", classifiers=[classifier])
        seconds = time.perf_counter() - started
        table = result.table[result.table["metric"].eq(BALANCED_ACCURACY)].set_index("variant")
        cells = {variant: f"{table.at[variant, 'value']:.3f} [{table.at[variant, 'ci_low']:.3f}, {table.at[variant, 'ci_high']:.3f}]"
                 for variant in (REAL, REAL_PLUS_SYNTHETIC, SYNTHETIC, *GAINS)}
        rows.append({"case": label, "classifier": classifier, **cells,
                     "verdict (real+synthetic)": result.verdicts()[classifier][REAL_GAIN],
                     "n_train real/synthetic/test": f"{table.at[REAL, 'n_train']}/{table.at[SYNTHETIC, 'n_train']}/{table.at[REAL, 'n_test']}",
                     "seconds": f"{seconds:.1f}", "flags": table.at[REAL, "flags"]})
        print("| " + " | ".join(map(str, rows[-1].values())) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.demo.yaml")
    parser.add_argument("--set", action="append", default=[], help="utility key=value")
    parser.add_argument("--cases", choices=("all", "known", "demo"), default="all")
    parser.add_argument("--classifiers", default=",".join(CLASSIFIERS))
    parser.add_argument("--only", default="", help="run only the synthetic sets whose label contains this text")
    args = parser.parse_args()
    params = load_params(args.params)
    section = dict(params["utility"])
    for assignment in args.set:
        key, _, value = assignment.partition("=")
        section[key] = yaml.safe_load(value)
    settings = from_section(UtilitySettings, section, seed=derive_seed(params.seed, "utility"))
    extractor, info = build_extractor(params["metrics"]["inception_weights"], derive_seed(params.seed, "feature_extractor"))
    print(f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, load {os.getloadavg()}, settings {settings}")
    classifiers = args.classifiers.split(",")
    rows: list[dict] = []
    known_features = demo_features = 0.0
    if args.cases in ("all", "known"):
        with tempfile.TemporaryDirectory() as scratch:
            sets = known_answer_sets(Path(scratch))
            features = TimedFeatures(extractor_featurizer(extractor, int(params["metrics"]["batch_size"])))
            for name in (n for n in ("fresh", "copies", "shuffled") if args.only in n):
                run_case(f"known answer: {name}", sets["train"], sets["test"], sets[name], settings, features,
                         classifiers, rows)
            known_features = features.seconds
    if args.cases in ("all", "demo"):
        train, test, synthetic = demo_sets(Layout(params.data_dir), params.classes)
        features = TimedFeatures(extractor_featurizer(extractor, int(params["metrics"]["batch_size"])))
        for label, images in ((k, v) for k, v in synthetic.items() if args.only in k):
            run_case(f"demo: {label}", train, test, images, settings, features, classifiers, rows)
        demo_features = features.seconds
    print(f"\nFeatures ({info.name}, extracted once per image set, inside the logistic rows' seconds): "
          f"known-answer sets {known_features:.1f} s, demo sets {demo_features:.1f} s; load {os.getloadavg()}\n")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
