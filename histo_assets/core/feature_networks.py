"""The feature extractors' networks, in plain torch: the FID Inception-v3 and the seeded random-conv fallback.

Apart from core/features.py, which names them and extracts features, so that
what identifies an extractor (its name, its weights' hash: what fingerprints
and cache names quote) can be known without importing torch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histo_assets.core.features import (
    FALLBACK_ANTIALIAS,
    FALLBACK_FEATURES,
    FALLBACK_INPUT_SIZE,
    INCEPTION_ANTIALIAS,
    INCEPTION_CLASSES,
    INCEPTION_FEATURES,
    INCEPTION_INPUT_SIZE,
    existing_weights,
)

_IMAGE_LAYOUT = "uint8 tensor of shape [N, 3, H, W]"


def _unit_range(images: Tensor) -> Tensor:
    """uint8 to float in [0, 1]; refusing floats avoids the silent x255 truncation torchmetrics applies."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a {_IMAGE_LAYOUT}, got {images.dtype} of shape {tuple(images.shape)}")
    return images.to(torch.float32) / 255.0


def _resize(images: Tensor, size: int, antialias: bool) -> Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


class ImageFeatureExtractor(nn.Module):
    """Frozen image encoder: uint8 images in, features (and logits, if it has a class head) out."""

    num_features: int
    has_logits: bool

    def train(self, mode: bool = True) -> ImageFeatureExtractor:
        """Stay in eval mode: batch-norm on batch statistics would make features depend on batch mates."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class _ConvBN(nn.Module):
    """Conv (no bias), batch norm with TensorFlow's eps, ReLU: the unit every Inception layer is made of."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool that ignores padding, as TensorFlow did when the FID weights were trained."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block (Mixed_5b-5d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _MixedC(nn.Module):
    """17x17 block (Mixed_6b-6e) with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        double = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(double)))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _MixedD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7x3_2(self.branch7x7x3_1(x))
        seven = self.branch7x7x3_4(self.branch7x7x3_3(seven))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)],
            dim=1,
        )


class _MixedE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 outputs.

    ``max_pool`` reproduces a quirk of the TensorFlow graph the FID weights
    come from: Mixed_7c pools its pooling branch with a 3x3 max pool where
    Inception-v3 otherwise averages. FID values are only comparable with it.
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class InceptionV3FID(ImageFeatureExtractor):
    """The FID Inception-v3 of pytorch-fid / torch-fidelity ("pt_inception-2015-12-05").

    Attribute names follow the published state dict (Conv2d_1a_3x3 ... Mixed_7c,
    fc), so ``pt_inception-2015-12-05-6726825d.pth`` loads without renaming.
    Preprocessing follows pytorch-fid: scale to [0, 1], resize to 299x299 with
    torch bilinear (align_corners=False, no antialias), then map to [-1, 1].
    Features are the 2048-d global average pool; logits are that pool times the
    1008-class fc weight without its bias, the "unbiased" logits the original
    IS code and torch-fidelity use.
    """

    num_features = INCEPTION_FEATURES
    has_logits = True

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(INCEPTION_FEATURES, INCEPTION_CLASSES)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(cls, path: str | os.PathLike) -> InceptionV3FID:
        """Load a local state dict; a missing file is an error, never a reason to download."""
        weights = existing_weights(path)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{weights} does not hold a state dict (got {type(state).__name__})")
        model = cls()
        result = model.load_state_dict(state, strict=False)
        # Files written before PyTorch 0.4.1 lack batch-norm counters, which inference never reads.
        missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{weights} is not an FID Inception state dict: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} "
                f"({len(result.unexpected_keys)} in all)"
            )
        return model

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = _resize(_unit_range(images), INCEPTION_INPUT_SIZE, INCEPTION_ANTIALIAS)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pooled = x.mean(dim=(2, 3))
        return pooled, pooled @ self.fc.weight.T


class RandomConvFeatures(ImageFeatureExtractor):
    """Fixed-seed random CNN: a weight-free stand-in for Inception that keeps the pipeline runnable.

    Random convolutional features still separate colour and texture
    statistics, so FID/KID on them rank checkpoints and catch broken
    generations, but their scale has nothing to do with Inception FID. There
    is no class head, hence no Inception Score. Weights are drawn once from
    ``torch.Generator().manual_seed(seed)``, so the same seed gives the same
    network on every machine.
    """

    num_features = FALLBACK_FEATURES
    has_logits = False
    _CHANNELS = (3, 32, 64, 128, FALLBACK_FEATURES)

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        layers = []
        for cin, cout in zip(self._CHANNELS[:-1], self._CHANNELS[1:]):
            conv = nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                # He-normal keeps activations from vanishing or exploding through the ReLUs.
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, None]:
        x = _resize(_unit_range(images), FALLBACK_INPUT_SIZE, FALLBACK_ANTIALIAS)
        return self.layers(2.0 * x - 1.0).mean(dim=(2, 3)), None
