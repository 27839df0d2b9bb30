"""core/method_evidence.py: the stain and KID evidence table of a pipeline's outputs, and the checks read off it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histo_assets.core.io import atomic_write_json
from histo_assets.core.layout import IMAGES, SUMMARY, Layout
from histo_assets.core.method_evidence import EvidenceCheck, evidence_checks, evidence_table
from histo_assets.core.schemas import SchemaError
from histo_assets.core.steps import BASELINE_STEP

FINAL = 5000
HE, IHC = "fibrocystic", "ihc_her2"


def grey_lightness(level: int) -> float:
    """CIE L* of an sRGB grey, written out from the standards: for a neutral, Y is the linearised value."""
    unit = level / 255
    y = unit / 12.92 if unit <= 0.04045 else ((unit + 0.055) / 1.055) ** 2.4
    return 116 * y ** (1 / 3) - 16 if y > (6 / 29) ** 3 else 116 * (y * (29 / 6) ** 2 / 3 + 4 / 29) - 16


def write_pngs(folder: Path, colours: list[tuple[int, int, int]], size: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, colour in enumerate(colours):
        Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(folder / f"{index:03d}.png")


def write_kid(layout: Layout, tissue_class: str, step: int, kid: float) -> None:
    atomic_write_json(layout.checkpoint_metrics(tissue_class, step) / SUMMARY,
                      {"fingerprint": "f", "row": {"tissue_class": tissue_class, "step": step, "kid_mean": kid}})


def grey(level: int) -> tuple[int, int, int]:
    return (level, level, level)


@pytest.fixture
def two_class_layout(tmp_path) -> Layout:
    """White H&E crops and black IHC crops; each class's final images move from the other's colour towards its own."""
    layout = Layout(tmp_path / "data")
    write_pngs(layout.square_crops(HE) / IMAGES, [grey(255)] * 2)
    write_pngs(layout.square_crops(IHC) / IMAGES, [grey(0)] * 3)
    write_pngs(layout.synthetic_images(HE, BASELINE_STEP) / IMAGES, [grey(0)])
    write_pngs(layout.synthetic_images(HE, FINAL) / IMAGES, [grey(200), grey(200)])
    write_pngs(layout.synthetic_images(IHC, BASELINE_STEP) / IMAGES, [grey(255)])
    write_pngs(layout.synthetic_images(IHC, FINAL) / IMAGES, [grey(60)])
    for tissue_class, before, after in ((HE, 0.08, 0.02), (IHC, 0.12, 0.03)):
        write_kid(layout, tissue_class, BASELINE_STEP, before)
        write_kid(layout, tissue_class, FINAL, after)
    return layout


def table_of(values: dict[tuple[str, int], tuple[float, float, float]]) -> pd.DataFrame:
    """An evidence table from (ΔE to H&E crops, ΔE to IHC crops, KID) per class and step."""
    return pd.DataFrame([
        {"tissue_class": c, "step": step, f"delta_e_to_{HE}": he, f"delta_e_to_{IHC}": ihc, "kid_mean": kid}
        for (c, step), (he, ihc, kid) in values.items()
    ])


GOOD = {
    (HE, BASELINE_STEP): (40.0, 30.0, 0.08), (HE, FINAL): (5.0, 50.0, 0.02),
    (IHC, BASELINE_STEP): (20.0, 45.0, 0.12), (IHC, FINAL): (48.0, 4.0, 0.03),
}


# --- the table ---------------------------------------------------------------------------------------


def test_table_gives_each_class_and_step_its_lab_colour_delta_e_to_every_class_and_kid(two_class_layout):
    table = evidence_table(two_class_layout, [HE, IHC], FINAL)
    assert list(table.columns) == ["tissue_class", "step", "L", "a", "b", f"delta_e_to_{HE}", f"delta_e_to_{IHC}",
                                   "kid_mean"]
    assert list(zip(table.tissue_class, table.step)) == [(HE, 0), (HE, FINAL), (IHC, 0), (IHC, FINAL)]
    rows = table.set_index(["tissue_class", "step"])
    # Greys have a = b = 0, so ΔE to white (L 100) and black (L 0) crops is the difference in L alone.
    for (c, step), level in {(HE, 0): 0, (HE, FINAL): 200, (IHC, 0): 255, (IHC, FINAL): 60}.items():
        row = rows.loc[(c, step)]
        lightness = grey_lightness(level)
        assert row["L"] == pytest.approx(lightness, abs=1e-6), (c, step)
        assert row["a"] == pytest.approx(0, abs=1e-6) and row["b"] == pytest.approx(0, abs=1e-6)
        assert row[f"delta_e_to_{HE}"] == pytest.approx(100 - lightness, abs=1e-6)
        assert row[f"delta_e_to_{IHC}"] == pytest.approx(lightness, abs=1e-6)
    assert rows["kid_mean"].to_dict() == {(HE, 0): 0.08, (HE, FINAL): 0.02, (IHC, 0): 0.12, (IHC, FINAL): 0.03}


def test_colours_are_averaged_over_every_png_of_a_folder_and_nothing_else(two_class_layout):
    images = two_class_layout.synthetic_images(HE, FINAL) / IMAGES
    write_pngs(images / "nested", [grey(0)])
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "stray.jpg")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "002.png")
    rows = evidence_table(two_class_layout, [HE, IHC], FINAL).set_index(["tissue_class", "step"])
    assert rows.loc[(HE, FINAL), "L"] == pytest.approx(2 / 3 * grey_lightness(200), abs=1e-6), \
        "two grey PNGs and one black one; the JPEG and the nested folder are not read"


def test_a_step_without_metrics_has_kid_nan(two_class_layout):
    (two_class_layout.checkpoint_metrics(IHC, FINAL) / SUMMARY).unlink()
    rows = evidence_table(two_class_layout, [HE, IHC], FINAL).set_index(["tissue_class", "step"])
    assert math.isnan(rows.loc[(IHC, FINAL), "kid_mean"])
    assert rows.loc[(IHC, BASELINE_STEP), "kid_mean"] == 0.12


def test_a_metrics_summary_with_the_wrong_fields_is_an_error_naming_the_file(two_class_layout):
    path = two_class_layout.checkpoint_metrics(HE, FINAL) / SUMMARY
    atomic_write_json(path, {"row": {"kid_mean": 0.01}})
    with pytest.raises(SchemaError, match="missing fingerprint") as error:
        evidence_table(two_class_layout, [HE, IHC], FINAL)
    assert str(path) in str(error.value)


def test_a_step_without_images_is_an_error_not_a_silent_pass(two_class_layout):
    for png in (two_class_layout.synthetic_images(IHC, FINAL) / IMAGES).glob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match="no images"):
        evidence_table(two_class_layout, [HE, IHC], FINAL)


# --- the checks --------------------------------------------------------------------------------------


def test_files_where_training_worked_pass_every_check(two_class_layout):
    table = evidence_table(two_class_layout, [HE, IHC], FINAL)
    checks = evidence_checks(table, [HE, IHC], FINAL, IHC)
    assert [check.name for check in checks] == [
        f"{HE}: stain nearer its real crops than the base model's",
        f"{HE}: KID against held-out crops below the base model's",
        f"{IHC}: stain nearer its real crops than the base model's",
        f"{IHC}: KID against held-out crops below the base model's",
        f"{IHC}: its images nearer its crops' colour than {HE}'s images",
    ]
    assert all(check.passed for check in checks), [check for check in checks if not check.passed]
    assert all(isinstance(check.passed, bool) for check in checks)


def test_checks_report_the_numbers_they_compare():
    checks = {check.name: check for check in evidence_checks(table_of(GOOD), [HE, IHC], FINAL, IHC)}
    assert checks[f"{HE}: stain nearer its real crops than the base model's"] == EvidenceCheck(
        f"{HE}: stain nearer its real crops than the base model's", True, "ΔE 40.00 at step 0 -> 5.00 at step 5000")
    assert checks[f"{IHC}: KID against held-out crops below the base model's"].detail == \
        "KID 0.1200 at step 0 -> 0.0300 at step 5000"
    assert checks[f"{IHC}: its images nearer its crops' colour than {HE}'s images"].detail == "ΔE 4.00 against 50.00"


def test_without_an_ihc_class_only_the_per_class_checks_are_made():
    checks = evidence_checks(table_of(GOOD), [HE, IHC], FINAL, None)
    assert len(checks) == 4
    assert not [check for check in checks if "its images nearer" in check.name]
    assert all(check.passed for check in checks)


def test_a_stain_moving_away_from_its_crops_fails_its_check_naming_the_class():
    bad = {**GOOD, (HE, FINAL): (45.0, 50.0, 0.02)}
    failed = [check for check in evidence_checks(table_of(bad), [HE, IHC], FINAL, IHC) if not check.passed]
    assert [(check.name, check.detail) for check in failed] == [
        (f"{HE}: stain nearer its real crops than the base model's", "ΔE 40.00 at step 0 -> 45.00 at step 5000"),
    ]


def test_kid_rising_fails_its_check_naming_the_class():
    bad = {**GOOD, (IHC, FINAL): (48.0, 4.0, 0.2)}
    failed = [check for check in evidence_checks(table_of(bad), [HE, IHC], FINAL, IHC) if not check.passed]
    assert [(check.name, check.detail) for check in failed] == [
        (f"{IHC}: KID against held-out crops below the base model's", "KID 0.1200 at step 0 -> 0.2000 at step 5000"),
    ]


def test_no_change_from_the_base_model_is_no_evidence():
    unchanged = {**GOOD, (HE, FINAL): GOOD[(HE, BASELINE_STEP)]}
    failed = {check.name for check in evidence_checks(table_of(unchanged), [HE, IHC], FINAL, None)
              if not check.passed}
    assert failed == {f"{HE}: stain nearer its real crops than the base model's",
                      f"{HE}: KID against held-out crops below the base model's"}


def test_missing_kid_fails_the_kid_check_rather_than_passing():
    missing = {**GOOD, (HE, FINAL): (5.0, 50.0, float("nan"))}
    checks = {check.name: check for check in evidence_checks(table_of(missing), [HE, IHC], FINAL, None)}
    kid = checks[f"{HE}: KID against held-out crops below the base model's"]
    assert not kid.passed and kid.detail == "KID 0.0800 at step 0 -> nan at step 5000"


def test_an_ihc_class_no_nearer_its_colour_than_an_he_class_fails_naming_both():
    # The H&E class's final images end up nearer the IHC crops' colour than the IHC class's own.
    bad = {**GOOD, (HE, FINAL): (38.0, 3.0, 0.02)}
    failed = [check for check in evidence_checks(table_of(bad), [HE, IHC], FINAL, IHC) if not check.passed]
    assert [(check.name, check.detail) for check in failed] == [
        (f"{IHC}: its images nearer its crops' colour than {HE}'s images", "ΔE 4.00 against 3.00"),
    ]


def test_the_ihc_class_is_compared_with_every_other_class():
    other = "fibroadenoma"
    values = {**GOOD, (other, BASELINE_STEP): (40.0, 30.0, 0.09), (other, FINAL): (6.0, 2.0, 0.04)}
    table = table_of(values)
    table[f"delta_e_to_{other}"] = [50.0, 45.0, 60.0, 55.0, 35.0, 10.0]
    checks = evidence_checks(table, [HE, other, IHC], FINAL, IHC)
    assert len(checks) == 2 * 3 + 2
    ihc_checks = [(check.name, check.passed) for check in checks if "its images nearer" in check.name]
    assert ihc_checks == [
        (f"{IHC}: its images nearer its crops' colour than {HE}'s images", True),
        (f"{IHC}: its images nearer its crops' colour than {other}'s images", False),
    ]
    assert all(check.passed for check in checks if check.name.startswith(f"{other}:"))
