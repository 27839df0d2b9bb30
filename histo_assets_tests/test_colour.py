"""core/colour.py: sRGB to CIELAB matches reference values, mean_lab averages per pixel, lab_distance is CIE76 ΔE."""

import numpy as np
import pytest
from PIL import Image

from histo_assets.core.colour import lab_distance, mean_lab, srgb_to_lab
from histo_assets_tests.conftest import tissue_image

H_AND_E_PINK = (200, 110, 170)  # conftest's tissue_image base colour
DAB_BROWN = (150, 110, 60)
JUST_NOTICEABLE = 2.3


def solid(colour: tuple[int, int, int], width: int = 4, height: int = 4) -> np.ndarray:
    return np.tile(np.array(colour, dtype=np.uint8), (height, width, 1))


@pytest.mark.parametrize("rgb, lab", [
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
    ((128, 128, 128), (53.59, 0.0, 0.0)),
])
def test_primaries_black_white_and_grey_match_their_reference_lab(rgb, lab):
    """sRGB D65 references (Lindbloom's calculator), to the two decimals they are quoted with."""
    assert np.allclose(srgb_to_lab(np.array(rgb)), lab, atol=0.02)


def test_greys_are_neutral_and_lighten_steadily_from_black_to_white():
    """No jump where sRGB's linear segment or CIELAB's cube root takes over: every grey level is a small step up."""
    lab = srgb_to_lab(np.repeat(np.arange(256)[:, None], 3, axis=1))
    assert np.abs(lab[:, 1:]).max() < 1e-9
    steps = np.diff(lab[:, 0])
    assert steps.min() > 0 and steps.max() < 0.6


def test_any_leading_shape_is_kept():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 5, 7, 3))
    lab = srgb_to_lab(pixels)
    assert lab.shape == (2, 5, 7, 3) and lab.dtype == np.float64
    assert np.array_equal(lab[1, 3, 4], srgb_to_lab(pixels[1, 3, 4]))
    assert np.array_equal(srgb_to_lab(pixels.astype(np.uint8)), lab)


@pytest.mark.parametrize("shape", [(3, 4), (4,), (2, 2, 1)])
def test_values_without_three_channels_in_the_last_axis_are_refused(shape):
    with pytest.raises(ValueError, match="last axis"):
        srgb_to_lab(np.zeros(shape, dtype=np.uint8))


def test_lightness_stays_between_black_and_white():
    rng = np.random.default_rng(1)
    lightness = srgb_to_lab(rng.integers(0, 256, size=(10_000, 3)))[:, 0]
    assert lightness.min() >= 0 and lightness.max() <= 100 + 1e-9


def test_h_and_e_pink_and_dab_brown_are_far_apart_in_the_stain_directions():
    """Eosin pink is red and blue-ish (a > 0, b < 0); DAB brown is yellow (b > 0): the difference the test relies on."""
    pink, brown = srgb_to_lab(np.array(H_AND_E_PINK)), srgb_to_lab(np.array(DAB_BROWN))
    assert pink[1] > 20 and pink[2] < 0
    assert brown[2] > 20
    assert lab_distance(pink, brown) > 20 * JUST_NOTICEABLE


def test_lab_distance_is_the_euclidean_distance_in_lab():
    assert lab_distance((50, 0, 0), (50, 3, 4)) == 5.0
    assert lab_distance([10, 20, 30], [10, 20, 30]) == 0.0
    distance = lab_distance(np.array([1, 2, 3]), np.array([4, 6, 3]))
    assert distance == 5.0 and isinstance(distance, float)


def test_lab_distance_is_symmetric_and_obeys_the_triangle_inequality():
    rng = np.random.default_rng(2)
    for a, b, c in rng.uniform(-100, 100, size=(50, 3, 3)):
        assert lab_distance(a, b) == lab_distance(b, a)
        assert lab_distance(a, c) <= lab_distance(a, b) + lab_distance(b, c) + 1e-12


def test_mean_lab_of_one_solid_image_is_its_colour():
    assert np.allclose(mean_lab([solid(H_AND_E_PINK)]), srgb_to_lab(np.array(H_AND_E_PINK)))


def test_mean_lab_averages_lab_per_pixel_not_the_mean_rgb():
    """Black and white average to L 50; the Lab of their mean RGB (mid grey) is about L 53.4."""
    mean = mean_lab([solid((0, 0, 0)), solid((255, 255, 255))])
    assert np.allclose(mean, (50, 0, 0), atol=1e-9)
    assert lab_distance(mean, srgb_to_lab(np.array([127.5, 127.5, 127.5]))) > JUST_NOTICEABLE


def test_larger_images_weigh_more_in_the_mean():
    """One white pixel and three black ones: L is a quarter of white's, whatever images they come in."""
    mean = mean_lab([solid((255, 255, 255), 1, 1), solid((0, 0, 0), 3, 1)])
    assert np.allclose(mean, (25, 0, 0), atol=1e-9)
    split = mean_lab([solid((255, 255, 255), 1, 1), solid((0, 0, 0), 1, 1), solid((0, 0, 0), 2, 1)])
    assert np.allclose(split, mean, atol=1e-9)


def test_files_pil_images_and_arrays_of_one_image_give_the_same_mean(tmp_path):
    image = tissue_image((40, 24), seed=5)
    path = tmp_path / "tile.png"
    image.save(path)
    expected = srgb_to_lab(np.asarray(image).reshape(-1, 3)).mean(axis=0)
    for source in (path, str(path), image, np.asarray(image)):
        assert np.allclose(mean_lab([source]), expected, atol=1e-9), type(source)


def test_mean_lab_reads_images_from_a_generator_of_paths(tmp_path):
    paths = []
    for index, colour in enumerate([H_AND_E_PINK, DAB_BROWN]):
        paths.append(tmp_path / f"tile{index}.png")
        Image.fromarray(solid(colour)).save(paths[-1])
    expected = (srgb_to_lab(np.array(H_AND_E_PINK)) + srgb_to_lab(np.array(DAB_BROWN))) / 2
    assert np.allclose(mean_lab(path for path in paths), expected, atol=1e-9)


def test_greyscale_and_rgba_images_count_as_their_rgb_colour(tmp_path):
    grey = Image.fromarray(np.full((4, 4), 128, dtype=np.uint8))
    rgba = Image.fromarray(np.dstack([solid(DAB_BROWN), np.full((4, 4), 255, np.uint8)]))
    assert (grey.mode, rgba.mode) == ("L", "RGBA")
    grey.save(tmp_path / "grey.png")
    assert np.allclose(mean_lab([grey]), srgb_to_lab(np.array([128, 128, 128])))
    assert np.allclose(mean_lab([tmp_path / "grey.png"]), srgb_to_lab(np.array([128, 128, 128])))
    assert np.allclose(mean_lab([rgba]), srgb_to_lab(np.array(DAB_BROWN)))


def test_mean_lab_of_nothing_is_refused():
    with pytest.raises(ValueError, match="no images"):
        mean_lab([])
    with pytest.raises(ValueError, match="no images"):
        mean_lab([np.zeros((0, 0, 3), dtype=np.uint8)])


@pytest.mark.parametrize("array", [
    np.zeros((4, 4, 3), dtype=np.float64),
    np.zeros((4, 4), dtype=np.uint8),
    np.zeros((4, 4, 4), dtype=np.uint8),
])
def test_arrays_that_are_not_8_bit_rgb_are_refused(array):
    """A float or 16-bit array would be read on the wrong scale; greyscale and RGBA arrays are ambiguous."""
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        mean_lab([array])


def test_generated_tiles_of_the_right_stain_are_nearer_their_class_than_the_other_stain(tmp_path):
    """What the module is for: tiles of the right stain sit within a JND of its real crops, far from the other."""
    rng = np.random.default_rng(3)

    def tiles(colour, count, folder):
        folder.mkdir()
        for index in range(count):
            pixels = np.clip(np.array(colour) + rng.normal(0, 15, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
        return sorted(folder.glob("*.png"))

    real_pink, generated_pink = tiles(H_AND_E_PINK, 4, tmp_path / "real"), tiles(H_AND_E_PINK, 3, tmp_path / "gen")
    brown = tiles(DAB_BROWN, 3, tmp_path / "brown")
    reference = mean_lab(real_pink)
    assert lab_distance(mean_lab(generated_pink), reference) < JUST_NOTICEABLE
    assert lab_distance(mean_lab(brown), reference) > 10 * JUST_NOTICEABLE
