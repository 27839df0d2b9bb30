"""core/feature_networks.py: the random-conv fallback and the FID Inception network in plain torch."""

import pytest
import torch

from histo_assets.core.feature_networks import InceptionV3FID, RandomConvFeatures
from histo_assets.core.io import atomic_path
from histo_assets_tests.test_metrics import _textures


def test_random_conv_features_are_deterministic_per_seed():
    images = torch.from_numpy(_textures(60, n=4, cell=4, tint=(180, 110, 160))).permute(0, 3, 1, 2)
    first, second, other = RandomConvFeatures(seed=7), RandomConvFeatures(seed=7), RandomConvFeatures(seed=8)
    features = first(images)
    assert features.shape == (4, 256) and features.dtype == torch.float32
    assert torch.equal(features, second(images))
    assert not torch.allclose(features, other(images))
    assert first.features_and_logits(images)[1] is None


def test_inception_state_dict_matches_the_pt_inception_layout():
    state = InceptionV3FID().state_dict()
    # 94 conv+bn units x (conv.weight + 5 batch-norm entries) + fc weight and bias
    assert len(state) == 566
    assert sum(key.endswith("conv.weight") for key in state) == 94
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(value.numel() for key, value in state.items() if not key.endswith(buffers)) == 23_850_960
    assert not any(key.startswith("AuxLogits") for key in state)
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.bias": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {key: tuple(state[key].shape) for key in expected_shapes} == expected_shapes


def test_a_foreign_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    with atomic_path(path) as tmp:
        torch.save(RandomConvFeatures(seed=0).state_dict(), tmp)
    with pytest.raises(ValueError, match="not an FID Inception state dict"):
        InceptionV3FID.from_weights(path)
