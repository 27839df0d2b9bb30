"""core/plots.py: loss, metric and interval charts are deterministic PNGs that decode; the moving average trails."""

from pathlib import Path

import pytest
from PIL import Image, ImageChops

from histo_assets.core.plots import DPI, interval_bars, loss_curve, metric_curves, moving_average, phase_loss_curves

STEPS = list(range(1, 121))
LOSSES = [0.2 + 0.1 * ((step * 7919) % 13) / 13 for step in STEPS]  # noisy, like per-step ε-MSE, but fixed
SERIES = {"fid": {"colon": [(100, 40.0, 35.0, 45.0), (200, 30.0, 26.0, 33.0)], "lung": [(100, 50.0), (200, 45.0)]},
          "kid": {"colon": [(100, 0.05), (200, 0.03)], "lung": [(100, 0.07), (200, 0.06)]}}
PANELS = {"real": {"balanced_accuracy": [("synthetic", 0.8, 0.7, 0.9), ("real", 0.85, 0.8, 0.9)],
                   "macro_f1": [("synthetic", 0.7, 0.6, 0.8), ("real", 0.75, 0.7, 0.8)]}}

# One call of each chart on fixed data, writing to the given path (or to none).
CHARTS = {
    "loss_curve": lambda path: loss_curve(STEPS, LOSSES, path, title="loss", marks=(40, 80)),
    "phase_loss_curves": lambda path: phase_loss_curves(
        {"VAE": ("L1", LOSSES), "U-Net": ("ε-MSE", LOSSES[::-1])}, path, title="phases"),
    "metric_curves": lambda path: metric_curves(SERIES, path, title="metrics"),
    "interval_bars": lambda path: interval_bars(PANELS, path, title="bars", reference=0.5, reference_label="chance"),
}


def decoded(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def test_a_loss_curve_is_written_into_a_new_folder_as_a_png_of_the_figure_size(tmp_path):
    path = tmp_path / "plots" / "loss.png"
    returned = loss_curve(STEPS, LOSSES, path, title="hypernetwork loss")
    written = decoded(path)
    assert written.mode == "RGBA" and same_pixels(written, returned)
    width, height = written.size
    assert 0.8 * 7 * DPI < width < 1.2 * 7 * DPI and 0.8 * 3.5 * DPI < height < 1.2 * 3.5 * DPI
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"], "no temporary file is left behind"


@pytest.mark.parametrize("chart", list(CHARTS))
def test_the_same_data_gives_byte_identical_pngs_and_without_a_path_the_same_image(tmp_path, chart):
    returned = CHARTS[chart](None)
    CHARTS[chart](tmp_path / "a.png")
    CHARTS[chart](tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    written = decoded(tmp_path / "a.png")
    assert same_pixels(returned, written) and "Software" not in written.info, "no matplotlib version stamp"


def test_a_step_mark_is_drawn_as_a_vertical_line_at_its_step():
    plain = loss_curve(STEPS, LOSSES, None, title="loss").convert("RGB")
    marked = loss_curve(STEPS, LOSSES, None, title="loss", marks=(60,)).convert("RGB")
    assert plain.size == marked.size
    left, top, right, bottom = ImageChops.difference(plain, marked).getbbox()
    width, height = plain.size
    assert right - left <= 4 and bottom - top > height / 2
    assert width / 3 < left < 2 * width / 3, "step 60 of 1..120 is near the middle of the axis"


def test_moving_average_is_a_trailing_mean_that_warms_up_over_the_first_values():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4, 8, 6], 10) == [4.0, 6.0, 6.0]
    assert moving_average([3, 1, 2], 1) == [3.0, 1.0, 2.0]
    assert moving_average([], 3) == []
    naive = [sum(LOSSES[max(0, i - 6):i + 1]) / len(LOSSES[max(0, i - 6):i + 1]) for i in range(len(LOSSES))]
    assert moving_average(LOSSES, 7) == pytest.approx(naive)


def test_each_training_phase_gets_its_own_panel():
    one = phase_loss_curves({"VAE": ("L1", LOSSES)}, None, title="phases")
    two = phase_loss_curves({"VAE": ("L1", LOSSES), "U-Net": ("ε-MSE", LOSSES)}, None, title="phases")
    assert two.height == one.height and two.width > 1.5 * one.width


def test_each_metric_gets_its_own_panel():
    one = metric_curves({"fid": SERIES["fid"]}, None, title="metrics")
    two = metric_curves(SERIES, None, title="metrics")
    assert two.height == one.height and two.width > 1.5 * one.width


def test_metric_points_are_drawn_in_step_order_whatever_order_they_come_in(tmp_path):
    shuffled = {metric: {label: points[::-1] for label, points in lines.items()} for metric, lines in SERIES.items()}
    metric_curves(SERIES, tmp_path / "ordered.png", title="metrics")
    metric_curves(shuffled, tmp_path / "shuffled.png", title="metrics")
    assert (tmp_path / "ordered.png").read_bytes() == (tmp_path / "shuffled.png").read_bytes()


def test_an_interval_is_drawn_as_a_band_and_non_finite_bounds_are_left_out(tmp_path):
    def chart(points, name):
        metric_curves({"fid": {"colon": points}}, tmp_path / name, title="fid")
        return (tmp_path / name).read_bytes()

    plain = chart([(100, 40.0), (200, 30.0)], "plain.png")
    banded = chart([(100, 40.0, 35.0, 45.0), (200, 30.0, 26.0, 33.0)], "banded.png")
    unknown = chart([(100, 40.0, float("nan"), 45.0), (200, 30.0, 26.0, float("inf"))], "unknown.png")
    assert banded != plain and unknown == plain


def test_a_label_without_points_draws_nothing(tmp_path):
    metric_curves({"fid": {"colon": [(1, 2.0), (2, 1.0)]}}, tmp_path / "one.png", title="fid")
    metric_curves({"fid": {"colon": [(1, 2.0), (2, 1.0)], "lung": []}}, tmp_path / "with_empty.png", title="fid")
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "with_empty.png").read_bytes()


def test_an_interval_that_misses_its_estimate_draws_no_whisker_on_that_side(tmp_path):
    """A bootstrap percentile interval need not contain the point estimate; matplotlib refuses negative error bars."""
    interval_bars({"real": {"accuracy": [("synthetic", 0.6, 0.65, 0.7)]}}, tmp_path / "missed.png", title="bars")
    interval_bars({"real": {"accuracy": [("synthetic", 0.6, 0.6, 0.7)]}}, tmp_path / "clipped.png", title="bars")
    assert (tmp_path / "missed.png").read_bytes() == (tmp_path / "clipped.png").read_bytes()


def test_interval_bars_draw_one_panel_per_entry_and_the_reference_line():
    plain = interval_bars(PANELS, None, title="bars")
    referenced = interval_bars(PANELS, None, title="bars", reference=0.5)
    assert not same_pixels(plain, referenced)
    two = interval_bars(PANELS | {"synthetic": PANELS["real"]}, None, title="bars")
    assert two.height == plain.height and two.width > 1.5 * plain.width
