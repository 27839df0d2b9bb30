"""assets/generation.py: synthetic images carry AUTOMATIC1111's parameters, and step 0 is the plain base model."""

from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from histo_assets.core.a1111_text import parse_a1111_parameters
from histo_assets.core.io import sha256_file
from histo_assets.core.sampling import image_seed
from histo_assets_tests.pipeline_reading import base_model_sha256
from histo_assets_tests.tiny_pipeline import CLASSES, IMAGES_PER_CHECKPOINT, SEED, STEPS


def test_synthetic_images_carry_a1111_parameters_naming_hypernetwork_and_seed(pipeline):
    short = base_model_sha256(pipeline.data)[:10]
    for tissue_class in CLASSES:
        for step in STEPS:
            checkpoint = pipeline.data / "hypernetwork_checkpoints" / tissue_class / f"{tissue_class}-{step}.pt"
            folder = pipeline.data / "synthetic_images" / tissue_class / str(step)
            index = pd.read_parquet(folder / "index.parquet")
            assert list(index["index"]) == list(range(IMAGES_PER_CHECKPOINT))
            files = sorted((folder / "images").glob("*.png"))
            assert [p.name for p in files] == sorted(index["file"])
            for row in index.itertuples():
                with Image.open(folder / "images" / row.file) as image:
                    assert (image.size, image.mode) == ((64, 64), "RGB")
                    parameters = parse_a1111_parameters(image.text["parameters"])
                seed = image_seed(SEED, tissue_class, step, row.index)
                assert row.seed == seed and row.file.endswith(f"-{seed}.png")
                assert row.sha256 == sha256_file(folder / "images" / row.file)
                assert parameters["Seed"] == str(seed)
                assert "Hypernet" not in parameters and parameters["RNG"] == "CPU"
                assert parameters["Prompt"].count("<hypernet:") == 1
                assert f"<hypernet:{checkpoint.stem}:1.0>" in parameters["Prompt"]
                assert parameters["Model hash"] == short
                assert (parameters["Steps"], parameters["Sampler"], parameters["Size"]) == ("2", "Euler", "64x64")
                assert parameters["Negative prompt"] == "grainy, blurry, low quality"


def test_step_0_is_the_base_model_with_the_same_prompt_scored_but_never_released(pipeline):
    for tissue_class in CLASSES:
        baseline = pd.read_parquet(pipeline.data / "synthetic_images" / tissue_class / "0" / "index.parquet")
        trained = pd.read_parquet(pipeline.data / "synthetic_images" / tissue_class / str(STEPS[-1]) / "index.parquet")
        assert len(baseline) == IMAGES_PER_CHECKPOINT and baseline["hypernetwork_sha256"].isna().all()
        with Image.open(pipeline.data / "synthetic_images" / tissue_class / "0" / "images" / baseline["file"].iloc[0]) as image:
            parameters = parse_a1111_parameters(image.text["parameters"])
        assert "<hypernet:" not in parameters["Prompt"] and parameters["Prompt"] == baseline["prompt"].iloc[0]
        assert baseline["prompt"].iloc[0] == trained["prompt"].iloc[0], "the same prompt as the checkpoints"
    summary = json.loads((pipeline.data / "metrics_summary" / "details" / "summary.json").read_text())
    assert set(summary["against_base_model"]) == set(CLASSES)
    assert all(v["verdict"] in {"better", "worse", "indistinguishable", "unknown"} for v in summary["against_base_model"].values())
    assert all(step != 0 for step in summary["best"].values())
    metrics = json.loads((pipeline.data / "metrics_summary" / "metrics.json").read_text())
    assert all("against_base_model" in metrics["classes"][c] for c in CLASSES)
    csv = pd.read_csv(pipeline.data / "metrics_summary" / "metrics.csv")
    assert {(c, 0) for c in CLASSES} <= set(zip(csv["tissue_class"], csv["step"]))
