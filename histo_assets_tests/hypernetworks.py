"""Hypernetwork files for tests that need one that visibly changes the tiny U-Net."""

from __future__ import annotations

from pathlib import Path

import torch

from histo_assets.core.base_model import TINY_HYPERNETWORK_SIZES
from histo_assets.core.hypernetwork import Hypernetwork, HypernetworkOptions, save_hypernetwork


def strong_hypernetwork(path: Path, name: str) -> Path:
    """Weights far from the near-zero default init, so the hypernetwork visibly changes the U-Net."""
    hn = Hypernetwork(name, HypernetworkOptions(sizes=TINY_HYPERNETWORK_SIZES), seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in hn.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return save_hypernetwork(hn, path)
