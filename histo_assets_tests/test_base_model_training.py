"""The trained base model: same bytes on a rerun, resumes to the bytes of an uninterrupted run, loads as diffusers."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histo_assets.core.base_model import attention_context_widths, load_base_model
from histo_assets.core.base_model_training import (
    HELD_OUT_CROPS,
    STATE_FILE,
    BaseModelTrainingError,
    BaseModelTrainingSettings,
    TextEncoderSettings,
    UnetSettings,
    VaeSettings,
    train_base_model,
    train_from_crops,
    training_summary,
)
from histo_assets.core.colour import lab_distance, mean_lab, srgb_to_lab
from histo_assets.core.layout import SUMMARY
from histo_assets.core.sampling import generate_images
from histo_assets.core.seeding import derive_seed
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import base_model_training_settings
from histo_assets_tests.conftest import thesis_generation, tree_hashes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESOLUTION = 32
SEED = 7
# Test-scale settings: every part exists and trains, in about a second.
SETTINGS = BaseModelTrainingSettings(
    prompt="an H&E histology tile",
    text_encoder=TextEncoderSettings(hidden_size=12, layers=1, heads=2, token_embedding_scale=0.01),
    vae=VaeSettings(block_out_channels=(8, 8, 8, 8), norm_num_groups=1, steps=4, batch_size=4, learning_rate=0.001,
                    kl_weight=0.001),
    unet=UnetSettings(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=4, norm_num_groups=4, steps=4,
                      batch_size=4, learning_rate=0.001, uncond_probability=0.25),
    checkpoint_every=2,
    preview_images=2,
)
PREVIEW = thesis_generation(prompt="unused", negative_prompt="blurry", steps=2, cfg_scale=3.0, width=RESOLUTION,
                             height=RESOLUTION, batch_size=2)


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list[Path]:
    """Pink and brown stained textures, like the H&E and IHC demo classes."""
    folder = tmp_path_factory.mktemp("crops")
    paths = []
    for index, colour in enumerate([(200, 110, 170)] * 4 + [(150, 110, 60)] * 4):
        noise = np.random.default_rng(index).normal(0, 30, (RESOLUTION, RESOLUTION, 3))
        path = folder / f"crop-{index}.png"
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _train(crops, out: Path, **kwargs):
    return train_base_model(crops, out, SETTINGS, model_folder="histo-sd", resolution=RESOLUTION, seed=SEED,
                            preview=PREVIEW, **kwargs)


@pytest.fixture(scope="module")
def trained(crops, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return out, _train(crops, out)


def test_rerun_writes_the_same_bytes(crops, trained, tmp_path):
    out, result = trained
    again = _train(crops, tmp_path / "again")
    assert tree_hashes(tmp_path / "again") == tree_hashes(out)
    assert again.sha256 == result.sha256
    assert {"histo-sd/model_index.json", "histo-sd/unet/diffusion_pytorch_model.safetensors",
            "base-model-loss.csv", "base-model-loss.png", "base-model-samples.png"} <= set(tree_hashes(out))
    assert not (out / STATE_FILE).exists()


@pytest.mark.parametrize("stop_after", [3, 5])
def test_resumed_run_ends_with_the_bytes_of_an_uninterrupted_one(crops, trained, tmp_path, stop_after):
    """3 stops inside the VAE phase (state saved at 2), 5 inside the U-Net phase (state saved at the VAE's end)."""
    out, _ = trained
    assert _train(crops, tmp_path, stop_after=stop_after) is None
    assert (tmp_path / STATE_FILE).is_file() and not (tmp_path / "histo-sd").exists()
    messages = []
    resumed = _train(crops, tmp_path, log=messages.append)
    assert resumed.resumed_from is not None
    assert any("resuming" in message for message in messages)
    assert tree_hashes(tmp_path) == tree_hashes(out)


def test_state_of_other_settings_is_not_resumed(crops, tmp_path):
    _train(crops, tmp_path, stop_after=3)
    messages = []
    other = BaseModelTrainingSettings(**{**SETTINGS.__dict__, "prompt": "another prompt"})
    result = train_base_model(crops, tmp_path, other, model_folder="histo-sd", resolution=RESOLUTION, seed=SEED,
                              preview=PREVIEW, log=messages.append)
    assert result.resumed_from is None
    assert any("other settings" in message for message in messages)


def test_output_loads_as_a_diffusers_model_and_generates(trained, tmp_path):
    out, result = trained
    base = load_base_model("diffusers", result.model_dir, expected_sha256=result.sha256, device="cpu")
    assert base.sha256 == result.sha256
    assert base.vae.config.scaling_factor == pytest.approx(result.scaling_factor)
    # The cross-attention width differs from every block width, so hypernetwork sizes address one kind each.
    assert attention_context_widths(base.unet) == [8, 12, 16]
    records = generate_images(base, None, tmp_path, tissue_class="c", step=0, count=1, settings=PREVIEW, master_seed=1)
    with Image.open(tmp_path / records[0].file) as image:
        assert image.size == (RESOLUTION, RESOLUTION)
    assert len(result.vae_losses) == SETTINGS.vae.steps and len(result.unet_losses) == SETTINGS.unet.steps
    assert (out / "base-model-loss.csv").read_text().count("\n") == 1 + SETTINGS.vae.steps + SETTINGS.unet.steps


def test_params_sections_build_valid_settings():
    for name in ("params.yaml", "params.demo.yaml"):
        base_model_training_settings(load_params(DEFAULT_PARAMS_FILE.parent / name))


def test_settings_hypernetworks_cannot_address_are_refused():
    clash = BaseModelTrainingSettings(**{**SETTINGS.__dict__, "text_encoder": TextEncoderSettings(
        hidden_size=16, layers=1, heads=2, token_embedding_scale=0.01)})
    with pytest.raises(BaseModelTrainingError, match="equals a U-Net block width"):
        clash.validate()


def test_mean_lab_matches_reference_colours():
    """sRGB white is L 100, a = b = 0; sRGB red is about (53.24, 80.09, 67.20) (CIE76 references)."""
    assert np.allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=1e-6)
    assert np.allclose(srgb_to_lab(np.array([255, 0, 0])), [53.24, 80.09, 67.20], atol=0.02)
    white, red = np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert lab_distance(mean_lab([white, red]), (srgb_to_lab(np.array([255, 255, 255])) + srgb_to_lab(np.array([255, 0, 0]))) / 2) < 1e-9


def test_training_from_crop_folders_drops_the_stale_summary_and_derives_its_seed(crops, tmp_path):
    """Images come from every folder given; the seed is the params seed derived for the base model."""
    out = tmp_path / "from-crops"
    out.mkdir()
    (out / SUMMARY).write_text("{}")
    messages = []
    result = train_from_crops(out, [crops[0].parent], SETTINGS, model_folder="histo-sd",
                              resolution=RESOLUTION, master_seed=SEED, preview=PREVIEW, log=messages.append)
    assert not (out / SUMMARY).exists()
    assert result.images == len(crops) and result.resumed_from is None
    direct = train_base_model(crops, tmp_path / "direct", SETTINGS, model_folder="histo-sd", resolution=RESOLUTION,
                              seed=derive_seed(SEED, "base_model"), preview=PREVIEW)
    assert tree_hashes(out) == tree_hashes(tmp_path / "direct")
    assert result.sha256 == direct.sha256
    assert any("training a base model on" in message for message in messages)


def test_training_summary_records_the_data_and_time(trained):
    _, result = trained
    summary = training_summary(result, ["a", "b"], SETTINGS.prompt, {"a": "v1", "b": "v2"})
    assert summary == {
        "training_set": {"classes": ["a", "b"], "images": result.images, "prompt": SETTINGS.prompt,
                         "augmented_crops_data_versions": {"a": "v1", "b": "v2"}, "held_out_crops": HELD_OUT_CROPS},
        "seconds": result.seconds,
    }
