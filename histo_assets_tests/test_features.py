"""core/features.py: extractors built, labelled and run on images, without any published weights (the networks
themselves: test_feature_networks.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from histo_assets.core.features import (
    COMPARABLE_NONE,
    FALLBACK_NAME,
    INCEPTION_NAME,
    WEIGHTS_ENV,
    build_extractor,
    extract_features,
)
from histo_assets.core.feature_networks import InceptionV3FID, RandomConvFeatures
from histo_assets.core import features as features_module
from histo_assets.core.io import atomic_path, sha256_file
from histo_assets.core.metrics import (
    frechet_distance,
    kernel_distance,
)
from histo_assets_tests.test_metrics import _textures


def _seeded_inception(seed: int) -> InceptionV3FID:
    """Random weights with non-trivial batch-norm statistics, so features are far from zero."""
    model = InceptionV3FID()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("conv.weight"):
                tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
            elif name.endswith(("running_var", "bn.weight")):
                tensor.copy_(0.75 + 0.25 * noise.abs())
            else:
                tensor.copy_(0.05 * noise)
    return model


def test_random_conv_fid_separates_near_identical_from_different_sets():
    module = RandomConvFeatures(seed=0)
    base = _textures(61, n=64, cell=8, tint=(200, 120, 170))
    jitter = np.random.default_rng(62).integers(-2, 3, size=base.shape)
    near_copy = np.clip(base.astype(int) + jitter, 0, 255).astype(np.uint8)
    different = _textures(63, n=64, cell=2, tint=(150, 90, 200))
    base_features, logits = extract_features(module, list(base), batch_size=16)
    near_fid = frechet_distance(base_features, extract_features(module, list(near_copy), batch_size=16)[0])
    far_fid = frechet_distance(base_features, extract_features(module, list(different), batch_size=16)[0])
    assert logits is None
    assert 0 <= near_fid < far_fid / 100


def test_torchmetrics_fid_and_kid_accept_the_fallback_and_agree_with_ours():
    module = RandomConvFeatures(seed=1)
    real = _textures(70, n=24, cell=8, tint=(200, 120, 170))
    fake = _textures(71, n=24, cell=4, tint=(190, 110, 180))
    real_features, _ = extract_features(module, list(real), batch_size=8)
    fake_features, _ = extract_features(module, list(fake), batch_size=8)
    as_tensor = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2)  # noqa: E731
    fid = FrechetInceptionDistance(feature=module)
    fid.update(as_tensor(real), real=True)
    fid.update(as_tensor(fake), real=False)
    assert float(fid.compute()) == pytest.approx(frechet_distance(real_features, fake_features), rel=1e-4)
    # One subset of the whole set: torchmetrics' unseeded permutation cannot change the MMD.
    kid = KernelInceptionDistance(feature=module, subsets=1, subset_size=24)
    kid.update(as_tensor(real), real=True)
    kid.update(as_tensor(fake), real=False)
    ours, _ = kernel_distance(real_features, fake_features, subset_size=24, subsets=1, seed=0)
    assert float(kid.compute()[0]) == pytest.approx(ours, rel=1e-4)


def test_build_extractor_without_weights_is_the_labelled_fallback(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    module, info = build_extractor(None, seed=3)
    assert isinstance(module, RandomConvFeatures) and module.seed == 3
    assert info.name == FALLBACK_NAME
    assert info.feature_dim == 256
    assert info.weights_sha256 is None
    assert info.comparable_with == COMPARABLE_NONE == "none"
    assert info.inception_score_available is False
    assert "not comparable with published FID" in info.note
    assert "Inception Score is not available" in info.note


def test_extract_features_is_independent_of_batching_and_input_type():
    module = RandomConvFeatures(seed=2)
    large = _textures(80, n=5, cell=4, tint=(200, 120, 170))
    small = _textures(81, n=2, cell=4, tint=(60, 40, 90), size=32)
    images = list(large) + list(small)
    lines: list[str] = []
    one_by_one, _ = extract_features(module, images, batch_size=1)
    as_pil = (Image.fromarray(image) for image in images)
    batched, _ = extract_features(module, as_pil, batch_size=4, log=lines.append)
    assert batched.shape == (7, 256)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    assert lines and "7 images" in lines[-1]
    with pytest.raises(ValueError, match="uint8"):
        extract_features(module, [images[0].astype(np.float32)], batch_size=1)


@pytest.fixture(scope="module")
def inception_run():
    """One seeded model and its outputs on two images, shared because a CPU forward pass takes seconds."""
    model = _seeded_inception(0)
    images = list(_textures(90, n=2, cell=8, tint=(200, 120, 170)))
    with torch.inference_mode():
        features, logits = model.features_and_logits(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    return model, images, features, logits


def test_inception_outputs_2048_features_and_1008_logits_for_small_uint8_images(inception_run):
    model, images, features, logits = inception_run
    assert images[0].shape == (64, 64, 3)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and features.abs().max() > 0
    assert not torch.allclose(features[0], features[1])
    assert torch.allclose(logits, features @ model.fc.weight.T)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 64, 64))


def test_inception_weights_round_trip_through_a_file_reproduce_features(inception_run, tmp_path, monkeypatch):
    source, images, source_features, source_logits = inception_run
    path = tmp_path / "inception.pth"
    with atomic_path(path) as tmp:
        torch.save(source.state_dict(), tmp)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    module, info = build_extractor(None, seed=0)
    loaded_features, loaded_logits = extract_features(module, images, batch_size=2)
    assert np.array_equal(loaded_features, source_features.numpy())
    assert np.array_equal(loaded_logits, source_logits.numpy())
    assert info.name == INCEPTION_NAME and info.feature_dim == 2048
    assert (info.input_size, info.resize_mode, info.antialias) == (299, "bilinear", False)
    assert info.weights_sha256 == sha256_file(path)
    assert info.inception_score_available is True
    assert info.comparable_with == COMPARABLE_NONE and "not comparable" in info.note
    assert info.preprocessing == "uint8 RGB /255, bilinear resize to 299x299 (align_corners=False, no antialias), 2x-1"


def test_only_the_published_weights_are_labelled_comparable_with_pytorch_fid(inception_run, tmp_path, monkeypatch):
    path = tmp_path / "inception.pth"
    with atomic_path(path) as tmp:
        torch.save(inception_run[0].state_dict(), tmp)
    monkeypatch.setattr(features_module, "PUBLISHED_WEIGHTS_SHA256", sha256_file(path))
    _, info = build_extractor(str(path), seed=0)
    assert info.comparable_with == features_module.COMPARABLE_PYTORCH_FID == "pytorch-fid"
    assert "pytorch-fid only" in info.note and "torch-fidelity" in info.note


def test_missing_inception_weights_raise_and_never_download(tmp_path, monkeypatch):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        build_extractor(str(missing), seed=0)
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_extractor(None, seed=0)
    assert not missing.exists()
