"""Plots people read instead of tables: loss curves and metric-versus-step charts."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from histo_assets.core.io import atomic_write_bytes  # noqa: E402

DPI = 100


def _save(figure, path: Path | None) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return Image.open(io.BytesIO(data))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def loss_curve(steps: Sequence[int], losses: Sequence[float], path: Path | None, *, title: str, marks: Sequence[int] = ()) -> Image.Image:
    """Per-step ε-MSE is very noisy (random timesteps), so a moving average is drawn over it."""
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(steps, losses, color="#c9a0dc", linewidth=0.6, label="loss per step")
    window = max(1, len(losses) // 20)
    axis.plot(steps, moving_average(list(losses), window), color="#5b2a86", linewidth=1.6, label=f"moving average ({window})")
    for mark in marks:
        axis.axvline(mark, color="#999999", linewidth=0.6, linestyle=":")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("ε-MSE loss")
    axis.set_title(title)
    axis.legend(loc="upper right", fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def metric_curves(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path | None, *, title: str) -> Image.Image:
    """One panel per metric, one line per class, metric against training step (the thesis's figures)."""
    metrics = list(series)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for label, points in series[metric].items():
            if points:
                xs, ys = zip(*sorted(points))
                axis.plot(xs, ys, marker="o", linewidth=1.4, label=label)
        axis.set_title(metric)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, y=1.04)
    return _save(figure, path)
