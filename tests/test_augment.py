"""Reference augmentation keeps colour, destroys layout, draws crops independently, and is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from instantstyle.augment import (
    ReferenceAugment,
    augment_reference,
    draw_crop_box,
    horizontal_flip,
    patch_shuffle,
    random_resized_crop,
)

QUADRANT_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def quadrant_image(side: int = 64) -> np.ndarray:
    """Four flat quadrants in reading order: red, green / blue, yellow."""
    image = np.zeros((side, side, 3), dtype=np.uint8)
    half = side // 2
    for i, colour in enumerate(QUADRANT_COLOURS):
        row, col = divmod(i, 2)
        image[row * half:(row + 1) * half, col * half:(col + 1) * half] = colour
    return image


def colour_histogram(image: np.ndarray) -> dict[tuple[int, ...], int]:
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    return {tuple(int(v) for v in c): int(n) for c, n in zip(colours, counts)}


def quadrant_arrangement(image: np.ndarray) -> list[tuple[int, ...]]:
    half = image.shape[0] // 2
    return [tuple(int(v) for v in image[r * half + 1, c * half + 1]) for r in range(2) for c in range(2)]


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_patch_shuffle_keeps_the_colour_histogram_exactly(grid):
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    shuffled = patch_shuffle(image, grid, np.random.default_rng(1))
    assert shuffled.shape == image.shape and shuffled.dtype == np.uint8
    assert colour_histogram(shuffled) == colour_histogram(image)
    for channel in range(3):
        assert np.array_equal(np.bincount(shuffled[..., channel].ravel(), minlength=256),
                              np.bincount(image[..., channel].ravel(), minlength=256))
    assert not np.array_equal(shuffled, image)


def test_patch_shuffle_moves_whole_tiles_and_changes_the_layout():
    image = quadrant_image()
    arrangements = [tuple(quadrant_arrangement(patch_shuffle(image, 2, np.random.default_rng(seed))))
                    for seed in range(50)]
    # Never the identity (a plain permutation keeps a 2x2 layout once in 24 draws), and not one fixed swap.
    assert all(list(a) != QUADRANT_COLOURS for a in arrangements)
    assert len(set(arrangements)) > 5
    for arrangement in arrangements:  # each quadrant is one whole tile, so each colour appears once
        assert sorted(arrangement) == sorted(QUADRANT_COLOURS)


def test_patch_shuffle_leaves_an_indivisible_remainder_in_place():
    image = np.random.default_rng(0).integers(0, 256, (30, 31, 3), dtype=np.uint8)
    shuffled = patch_shuffle(image, 4, np.random.default_rng(0))  # tiles 7x7, strips of 2 rows and 3 columns
    assert np.array_equal(shuffled[28:], image[28:]) and np.array_equal(shuffled[:, 28:], image[:, 28:])
    assert colour_histogram(shuffled) == colour_histogram(image)


def test_crop_box_is_independent_of_another_crop_from_the_same_stream():
    rng = np.random.default_rng(0)
    target, reference = [], []
    for _ in range(4000):
        target.append(draw_crop_box(512, 768, (0.2, 1.0), rng))
        reference.append(draw_crop_box(512, 768, (0.2, 1.0), rng))
    target, reference = np.array(target, float), np.array(reference, float)
    for column in range(3):  # top, left, side: no correlation between the two draws
        assert abs(np.corrcoef(target[:, column], reference[:, column])[0, 1]) < 0.06
    assert np.mean(np.all(target == reference, axis=1)) < 0.01
    sides = reference[:, 2]
    assert sides.min() >= round(np.sqrt(0.2 * 512 * 768)) - 1 and sides.max() == 512  # capped at the short side


def test_random_resized_crop_takes_the_drawn_region():
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    top, left, side = draw_crop_box(48, 64, (0.3, 0.6), np.random.default_rng(5))
    crop = random_resized_crop(image, (0.3, 0.6), side, np.random.default_rng(5))  # same size: no resampling
    assert np.array_equal(crop, image[top:top + side, left:left + side])
    assert random_resized_crop(image, (0.3, 0.6), 32, np.random.default_rng(5)).shape == (32, 32, 3)


def test_flip_honours_its_probability():
    image = quadrant_image(8)
    assert np.array_equal(horizontal_flip(image, 1.0, np.random.default_rng(0)), image[:, ::-1])
    assert horizontal_flip(image, 0.0, np.random.default_rng(0)) is image
    rng = np.random.default_rng(0)
    flips = sum(not np.array_equal(horizontal_flip(image, 0.3, rng), image) for _ in range(4000))
    assert abs(flips / 4000 - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 4000)


def test_defaults_leave_the_reference_unchanged():
    image = quadrant_image()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert augment_reference(image, ReferenceAugment(), rng) is image
    assert rng.bit_generator.state == state  # nothing drawn: the data stream is as before


def test_chain_is_deterministic_for_a_seed():
    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    cfg = ReferenceAugment(crop_scale=(0.4, 0.9), crop_size=32, flip_prob=0.5, shuffle_grid=4)
    first = augment_reference(image, cfg, np.random.default_rng(7))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, augment_reference(image, cfg, np.random.default_rng(7)))
    others = [augment_reference(image, cfg, np.random.default_rng(s)) for s in range(8, 12)]
    assert any(not np.array_equal(first, other) for other in others)


@pytest.mark.parametrize("kwargs,needle", [
    ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
    ({"crop_scale": (0.8, 0.5)}, "crop_scale"),
    ({"flip_prob": 1.5}, "flip_prob"),
    ({"shuffle_grid": 0}, "shuffle_grid"),
])
def test_bad_settings_are_one_line_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as err:
        ReferenceAugment(**kwargs)
    assert "\n" not in str(err.value)


def test_rejects_non_uint8_images():
    with pytest.raises(ValueError, match="uint8"):
        patch_shuffle(np.zeros((8, 8, 3), np.float32), 2, np.random.default_rng(0))
