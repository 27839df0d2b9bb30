"""Plots people read instead of tables: loss curves and metric-versus-step charts."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from histo_assets.core.io import atomic_write_bytes

DPI = 100


def _pyplot():
    """pyplot on the file-only Agg backend, imported at the first plot: importing it takes most of a second, which
    every CLI start would pay otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path | None) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(figure)
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
    figure, axis = _pyplot().subplots(figsize=(7, 3.5))
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


def phase_loss_curves(phases: Mapping[str, tuple[str, Sequence[float]]], path: Path | None, *, title: str) -> Image.Image:
    """One panel per training phase, ``{panel title: (loss name, per-step losses)}``.

    Phases train different networks on different losses (a VAE's L1, a U-Net's
    ε-MSE), whose scales share no axis.
    """
    figure, axes = _pyplot().subplots(1, len(phases), figsize=(4.6 * len(phases), 3.4), squeeze=False)
    for axis, (panel, (loss_name, losses)) in zip(axes[0], phases.items()):
        steps = list(range(1, len(losses) + 1))
        window = max(1, len(losses) // 20)
        axis.plot(steps, losses, color="#c9a0dc", linewidth=0.6, label="per step")
        axis.plot(steps, moving_average(list(losses), window), color="#5b2a86", linewidth=1.6,
                  label=f"moving average ({window})")
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(loss_name)
        axis.set_title(panel)
        axis.legend(loc="upper right", fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(title, y=1.04)
    return _save(figure, path)


def metric_curves(series: Mapping[str, Mapping[str, Sequence[tuple[float, ...]]]], path: Path | None, *, title: str) -> Image.Image:
    """One panel per metric, one line per class, metric against training step (the thesis's figures).

    Points are (step, value) or (step, value, low, high); an interval is drawn
    as a band, so a dip that stays inside its neighbours' bands reads as noise.
    """
    metrics = list(series)
    figure, axes = _pyplot().subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for label, points in series[metric].items():
            if not points:
                continue
            ordered = sorted(points)
            xs, ys = [p[0] for p in ordered], [p[1] for p in ordered]
            (line,) = axis.plot(xs, ys, marker="o", linewidth=1.4, label=label)
            bands = [(p[0], p[2], p[3]) for p in ordered if len(p) == 4 and math.isfinite(p[2]) and math.isfinite(p[3])]
            if bands:
                bx, low, high = zip(*bands)
                axis.fill_between(bx, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        axis.set_title(metric)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, y=1.04)
    return _save(figure, path)


def interval_bars(
    panels: Mapping[str, Mapping[str, Sequence[tuple[str, float, float, float]]]],
    path: Path | None,
    *,
    title: str,
    reference: float | None = None,
    reference_label: str = "",
) -> Image.Image:
    """One panel per entry, a group of bars per metric, one bar per (label, value, low, high) with its interval.

    Intervals are drawn as error bars so that two bars whose intervals overlap
    read as "not told apart"; ``reference`` draws a baseline such as chance level.
    """
    names = list(panels)
    figure, axes = _pyplot().subplots(1, len(names), figsize=(4.6 * len(names), 3.6), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], names):
        groups = list(panels[name])
        labels = list(dict.fromkeys(bar[0] for group in groups for bar in panels[name][group]))
        width = 0.8 / max(1, len(labels))
        for offset, label in enumerate(labels):
            bars = [(g, bar) for g, group in enumerate(groups) for bar in panels[name][group] if bar[0] == label]
            xs = [g + (offset - (len(labels) - 1) / 2) * width for g, _ in bars]
            values = [bar[1] for _, bar in bars]
            # A bootstrap percentile interval need not contain its point estimate; the bar then shows no whisker on that side.
            errors = [[max(0.0, bar[1] - bar[2]) for _, bar in bars], [max(0.0, bar[3] - bar[1]) for _, bar in bars]]
            axis.bar(xs, values, width=width, label=label, yerr=errors, capsize=3, error_kw={"linewidth": 1})
        if reference is not None:
            axis.axhline(reference, color="#666666", linewidth=1, linestyle="--", label=reference_label or None)
        axis.set_xticks(range(len(groups)), [group.replace("_", " ") for group in groups])
        axis.set_title(name)
        axis.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle(title, y=1.04)
    return _save(figure, path)
