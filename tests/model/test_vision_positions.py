"""The vision position-id rule of docs/design.md §2: row k → min(k·N // nb, N−1), computed in integers."""
import numpy as np
import pytest

from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.model.vision import patch_layout, vision_position_ids


def test_full_tile_is_the_identity():
    for n in (6, 26, 32):
        np.testing.assert_array_equal(vision_position_ids(n, n, n, n, n), np.arange(n * n))


def test_half_tile_takes_every_other_bucket():
    ids = vision_position_ids(13, 13, 26, 26, 26).reshape(26, 26)
    np.testing.assert_array_equal(ids[0, :13], np.arange(0, 26, 2))
    np.testing.assert_array_equal(ids[:13, 0], np.arange(0, 26, 2) * 26)
    assert (ids[13:] == 0).all() and (ids[:, 13:] == 0).all()  # padded patches keep id 0


def test_full_32_grid_reaches_1023():
    ids = vision_position_ids(32, 32, 32, 32, 32)
    assert ids.max() == 1023 and len(np.unique(ids)) == 1024


def test_fp32_formula_of_transformers_457_would_differ():
    """The reference's (uncorrected) formula shifts a full tile; ours must not reproduce it."""
    n = 26
    boundaries = np.arange(1 / n, 1.0, 1 / n, dtype=np.float32)
    frac = (np.arange(n, dtype=np.float32) / np.float32(n) * np.float32(1 - 1e-6)).astype(np.float32)
    shifted = np.searchsorted(boundaries, frac, side="right")
    assert not np.array_equal(shifted, np.arange(n))
    assert np.array_equal(vision_position_ids(n, 1, n, 1, n) // n, np.arange(n))


def test_patch_layout_counts_a_patch_valid_if_any_pixel_is():
    keep = np.zeros((1, 24, 24), bool)
    keep[0, :13, :9] = True  # 13 rows → 4 patch rows (the 4th partly valid), 9 cols → 3 patch cols
    patch_keep, pos = patch_layout(keep, 4, 6)
    grid = patch_keep.reshape(6, 6)
    assert grid[:4, :3].all() and grid.sum() == 12
    np.testing.assert_array_equal(pos[0], vision_position_ids(4, 3, 6, 6, 6))


def test_non_rectangular_pixel_mask_is_refused():
    keep = np.ones((1, 24, 24), bool)
    keep[0, :4, :4] = False  # hole in the top-left corner
    with pytest.raises(Idefics3Error, match="top-left rectangle"):
        patch_layout(keep, 4, 6)
