"""core/candidates.py: the release candidates and the image sets each is judged on."""

import pandas as pd

from histo_assets.core.candidates import BEST_PER_CLASS, image_sets_hash, step_candidate, utility_inputs
from histo_assets.core.layout import HOLDOUT, IMAGES, INDEX, Layout
from histo_assets_tests.test_classifier_utility import CLASSES, write_images


def test_candidates_come_from_the_layout_and_train_on_original_crops_only(tmp_path):
    layout = Layout(tmp_path)
    classes, steps = CLASSES[:2], [0, 3, 6]
    best = dict(zip(classes, (6, 3)))
    for index, name in enumerate(classes):
        augmented = layout.augmented_crops(name)
        write_images(augmented / IMAGES, index, 3, 500 + index)
        pd.DataFrame({"file": [f"{name}_000.png", f"{name}_001.png", f"{name}_002.png"],
                      "kind": ["original", "augmented", "original"]}).to_parquet(augmented / INDEX)
        write_images(layout.square_crops(name) / IMAGES, index, 2, 600 + index)
        pd.DataFrame({"crop_file": [f"{name}_001.png"]}).to_parquet(augmented / HOLDOUT)
        for step in steps:
            write_images(layout.synthetic_images(name, step) / IMAGES, index, 2, 700 + step)
    train, test, candidates = utility_inputs(layout, classes, steps, best)
    first, second = classes
    assert train[first] == [layout.augmented_crops(first) / IMAGES / f"{first}_00{i}.png" for i in (0, 2)]
    assert test[second] == [layout.square_crops(second) / IMAGES / f"{second}_001.png"]
    assert list(candidates) == [step_candidate(step) for step in steps] + [BEST_PER_CLASS]
    assert candidates[BEST_PER_CLASS] == {c: candidates[step_candidate(best[c])][c] for c in classes}
    reordered = {name: {c: list(reversed(paths)) for c, paths in sets.items()} for name, sets in candidates.items()}
    assert image_sets_hash(train, test, reordered) == image_sets_hash(train, test, candidates)
    swapped = candidates | {BEST_PER_CLASS: candidates[step_candidate(0)]}
    assert image_sets_hash(train, test, swapped) != image_sets_hash(train, test, candidates)
