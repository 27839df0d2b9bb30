"""Does the method work? A base model trained here, then one hypernetwork per class, judged against step 0.

End to end on the demo data with core functions only (no Dagster):

1. train the ``trained`` base model (core/base_model_training.py) on the training
   (augmented) crops of every class, with the one prompt of ``base_model.training``;
2. train one hypernetwork per class (core/training.py) with the ``training`` section;
3. generate ``generation.images_per_checkpoint`` images per class at step 0 (the
   base model, same prompt, no hypernetwork) and at the final checkpoint;
4. score both: ΔE (CIE76) between the mean Lab colour of the generated images and
   of the class's real crops (training crops and held-out crops), and KID against
   the held-out crops on the features the pipeline's metrics use.

It checks what issue 14 asks of the demo: for every class, ΔE and KID lower at the
final checkpoint than at step 0, and the IHC class's final images nearer its real
crops than either H&E class's final images are. Exit status 1 if any check fails.

Needs the ingested demo data (square and augmented crops), e.g. in a scratch copy:

    printf 'extends: /path/to/repo/params.demo.yaml\\ndata_dir: data\\n' > /tmp/proof/params.yaml
    cp -r data/raw /tmp/proof/data/   # after histo-assets fetch-sample-data
    HISTO_ASSETS_PARAMS=/tmp/proof/params.yaml .venv/bin/histo-assets materialize --job ingest_pipeline

Run:
    .venv/bin/python benchmarks/method_proof.py --params /tmp/proof/params.yaml [--work /tmp/proof/work]
        [--set base_model.training.unet.steps=2000 ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from histo_assets.core.layout import HOLDOUT
from histo_assets.core.schemas import HELD_OUT_CROPS
from histo_assets.core.threads import apply_threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params file whose data_dir holds the ingested demo crops")
    parser.add_argument("--work", default=None, help="scratch folder for models and images (default: <data_dir>/../proof)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="params override, section.key=value")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the thread policy's)")
    parser.add_argument("--keep-base", action="store_true", help="reuse a base model already trained in --work")
    args = parser.parse_args()

    from histo_assets.core.threads import thread_count

    threads = thread_count(args.threads, concurrent_steps=1)
    apply_threads(threads)

    from histo_assets.core.base_model import load_base_model
    from histo_assets.core.base_model_training import train_base_model
    from histo_assets.core.colour import lab_distance, mean_lab
    from histo_assets.core.features import build_extractor, extract_features
    from histo_assets.core.hypernetwork import sanitize_name
    from histo_assets.core.metrics import kernel_distance
    from histo_assets.core.sampling import generate_images
    from histo_assets.core.seeding import derive_seed
    from histo_assets.core.training import list_images, train_hypernetwork
    from histo_assets.params import load_params
    from histo_assets.settings import (
        base_model_training_settings,
        generation_settings,
        hypernetwork_options,
        metric_settings,
        training_settings,
    )

    apply_threads(threads)
    p = load_params(args.params, args.overrides)
    data = p.data_dir
    work = Path(args.work) if args.work else data.parent / "proof"
    classes = p.classes
    timings: dict[str, float] = {}
    log = print

    def timed(label: str, started: float) -> None:
        timings[label] = time.perf_counter() - started
        print(f"[{label}: {timings[label]:.1f} s]")

    train_dirs = {c: data / "augmented_crops" / c / "images" for c in classes}
    held_out = {}
    for c in classes:
        rows = HELD_OUT_CROPS.read(data / "augmented_crops" / c / HOLDOUT)
        held_out[c] = [data / "square_crops" / c / "images" / name for name in rows["crop_file"]]
    train_images = {c: list_images(train_dirs[c]) for c in classes}

    # 1. base model
    started = time.perf_counter()
    settings = base_model_training_settings(p)
    generation = generation_settings(p)
    base_dir = work / "base_model"
    model_dir = base_dir / "histo-sd"
    if not (args.keep_base and model_dir.is_dir()):
        shutil.rmtree(base_dir, ignore_errors=True)
        result = train_base_model(
            [path for c in classes for path in train_images[c]], base_dir, settings, model_folder="histo-sd",
            resolution=p.resolution, seed=derive_seed(p.seed, "base_model"), preview=generation, log=log,
        )
        print(f"base model sha256 {result.sha256[:12]}, scaling factor {result.scaling_factor:.4f}, "
              f"final VAE loss {np.mean(result.vae_losses[-50:]):.4f}, U-Net loss {np.mean(result.unet_losses[-100:]):.4f}")
    timed("base model training", started)
    base = load_base_model("diffusers", model_dir, device="cpu", dtype="float32")

    # 2. hypernetworks
    options = hypernetwork_options(p)
    training = training_settings(p)
    finals = {}
    started = time.perf_counter()
    for c in classes:
        out = work / "hypernetworks" / c
        shutil.rmtree(out, ignore_errors=True)
        trained = train_hypernetwork(base, train_dirs[c], out, training, name=sanitize_name(c), options=options,
                                     resolution=p.resolution, seed=derive_seed(p.seed, "hypernetwork", c))
        finals[c] = (max(trained.checkpoints), trained.checkpoints[max(trained.checkpoints)])
    timed("hypernetwork training (all classes)", started)

    # 3. generation at step 0 and at the final checkpoint
    count = int(p["generation"]["images_per_checkpoint"])
    generated: dict[tuple[str, int], list[Path]] = {}
    started = time.perf_counter()
    for c in classes:
        final_step, final_path = finals[c]
        for step, path in ((0, None), (final_step, final_path)):
            out = work / "images" / c / str(step)
            shutil.rmtree(out, ignore_errors=True)
            records = generate_images(base, path, out, tissue_class=c, step=step, count=count, settings=generation,
                                      master_seed=p.seed)
            generated[(c, step)] = [out / r.file for r in records]
    timed("generation (step 0 + final, all classes)", started)

    # 4. scores
    started = time.perf_counter()
    scoring = metric_settings(p)
    extractor, info = build_extractor(p["metrics"].get("inception_weights"), derive_seed(p.seed, "feature_extractor"))
    from PIL import Image

    def features(paths):
        return extract_features(extractor, (Image.open(path).convert("RGB") for path in paths), scoring.batch_size)[0]

    real_train_lab = {c: mean_lab(train_images[c]) for c in classes}
    real_held_lab = {c: mean_lab(held_out[c]) for c in classes}
    reference_features = {c: features(held_out[c]) for c in classes}
    rows = []
    for (c, step), paths in generated.items():
        lab = mean_lab(paths)
        gen_features = features(paths)
        size = min(scoring.kid_subset_size, len(paths), len(held_out[c]))
        kid, _ = kernel_distance(reference_features[c], gen_features, size, scoring.kid_subsets,
                                 scoring.seed)
        rows.append({"class": c, "step": step, "L": lab[0], "a": lab[1], "b": lab[2],
                     "dE_train": lab_distance(lab, real_train_lab[c]), "dE_heldout": lab_distance(lab, real_held_lab[c]),
                     "dE_to_ihc_train": lab_distance(lab, real_train_lab["skimage_ihc"]) if "skimage_ihc" in classes else None,
                     "kid_heldout": kid, "kid_subset": size})
    timed("scoring", started)
    table = pd.DataFrame(rows).sort_values(["class", "step"])
    pd.set_option("display.width", 200)
    print(f"\nfeatures: {info.name}; real mean Lab (train): "
          + "; ".join(f"{c} {np.round(real_train_lab[c], 1).tolist()}" for c in classes))
    print(table.round(4).to_string(index=False))

    checks = []
    for c in classes:
        first, last = table[(table["class"] == c) & (table.step == 0)].iloc[0], table[(table["class"] == c) & (table.step > 0)].iloc[0]
        checks.append((f"{c}: ΔE to training crops {first.dE_train:.1f} -> {last.dE_train:.1f}", last.dE_train < first.dE_train))
        checks.append((f"{c}: ΔE to held-out crops {first.dE_heldout:.1f} -> {last.dE_heldout:.1f}", last.dE_heldout < first.dE_heldout))
        checks.append((f"{c}: KID vs held-out {first.kid_heldout:.4f} -> {last.kid_heldout:.4f}", last.kid_heldout < first.kid_heldout))
    if "skimage_ihc" in classes:
        final = table[table.step > 0].set_index("class")
        own = final.loc["skimage_ihc", "dE_to_ihc_train"]
        for c in classes:
            if c != "skimage_ihc":
                other = final.loc[c, "dE_to_ihc_train"]
                checks.append((f"IHC final nearer IHC crops than {c} final: {own:.1f} < {other:.1f}", own < other))
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print("\ntimings (s, torch threads %d, load %s): " % (threads, ", ".join(f"{v:.2f}" for v in os.getloadavg()))
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
