"""Image processor: the same tiles, pixels and masks as transformers' Idefics3ImageProcessor (4.57.1).

pixel_values are compared with a tolerance of 0: every step uses the reference's own Pillow operations and float
arithmetic (rescale + normalize through a lookup table built with the reference's float32 ops), so the arrays
are bit-identical; the 1e-5 budget of the issue is not needed by any path.

The reference infers the channel layout from the first image of the batch (a first image of height 1, 3 or 4
is read as channels-first, a first L/P image raises), so parity batches start with an RGB "anchor" sample that
`reference_tiles` removes again; the position-dependence itself is tested separately. Grey (L) and palette (P)
images are compared with the reference on their RGB conversion (`as_rgb`): that is what ours gives for them.
"""
import numpy as np
import pytest
from PIL import Image

from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing.image import (Idefics3ImageProcessor, cap_longest_edge, fit_longest_edge,
                                               tile_boxes, tile_multiple_size)
from processor_fixtures import IMAGE_SIZES, as_rgb, make_image

CONFIG = dict(resample=1, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_image_splitting=True,
              size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364})


def reference_ip(**overrides):
    from transformers import Idefics3ImageProcessor as Reference

    return Reference(**{**CONFIG, **overrides})


def ours_ip(**overrides):
    return Idefics3ImageProcessor.from_dict({**CONFIG, **overrides})


def reference_tiles(samples, **overrides):
    """The reference's (pixel_values, mask, rows, cols) for `samples`, computed behind an RGB anchor sample."""
    out = reference_ip(**overrides)([[make_image(40, 30, seed=99)]] + list(samples), return_tensors="np",
                                    return_row_col_info=True)
    rows, cols = out["rows"][1:], out["cols"][1:]
    count = max(sum(r * c + 1 if r else 1 for r, c in zip(rs, cs)) for rs, cs in zip(rows, cols))
    return out["pixel_values"][1:, :count], out["pixel_attention_mask"][1:, :count], rows, cols


def assert_same(ours, ref):
    pixel_values, mask, rows, cols = ref
    assert (ours.rows, ours.cols) == (rows, cols)
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_attention_mask.dtype == np.int64
    assert ours.pixel_values.shape == pixel_values.shape
    np.testing.assert_array_equal(ours.pixel_attention_mask, mask)
    assert np.abs(ours.pixel_values - pixel_values).max() == 0.0


def batch_of_all_sizes(mode):
    """The six sizes of the issue in one batch of four samples holding 3, 0, 2 and 1 images."""
    images = [make_image(w, h, mode, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)]
    return [images[:3], [], images[3:5], images[5:]]


# ------------------------------------------------------------------------------------------ sizes
def test_output_sizes_match_the_reference_arithmetic():
    """Our size chain against the reference's own functions (its resize patched to report the size it is asked
    for; the image is a zero-strided view, so no pixels are touched)."""
    from transformers.models.idefics3 import image_processing_idefics3 as ref

    reference = reference_ip()
    asked = []
    reference.resize = lambda image, size, **kwargs: asked.append((size["height"], size["width"]))
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 4096), (4096, 1), (977, 13), (364, 365), (399, 3000), (5000, 7)]
    shapes += [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(120)]
    for h, w in shapes:
        for edge in (364, 2 * 364, 4 * 364, 5 * 364, 12 * 364):
            fitted = fit_longest_edge(h, w, edge)
            assert fitted == ref._resize_output_size_rescale_to_max_len(h, w, max_len=edge)
            capped = cap_longest_edge(*fitted)
            assert capped == ref._resize_output_size_scale_below_upper_bound(*fitted, max_len=4096)
            view = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (*capped, 3))
            reference.resize_for_vision_encoder(view, 364, input_data_format="channels_last")
            assert tile_multiple_size(*capped, 364) == asked[-1], (h, w, edge)


def test_tiles_cover_the_image_row_major():
    boxes, rows, cols = tile_boxes(728, 1092, 364)
    assert (rows, cols) == (2, 3)
    assert boxes[:4] == [(0, 0, 364, 364), (0, 364, 364, 728), (0, 728, 364, 1092), (364, 0, 728, 364)]
    assert tile_boxes(364, 364, 364) == ([], 0, 0)


# ------------------------------------------------------------------------------------------ pixel parity
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_pixels_match_reference_at_longest_edge_2x364(mode, split):
    samples = batch_of_all_sizes(mode)
    options = dict(size={"longest_edge": 2 * 364}, do_image_splitting=split)
    assert_same(ours_ip(**options)(samples), reference_tiles(as_rgb(samples), **options))


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_pixels_match_reference_at_longest_edge_5x364(split):
    samples = [[make_image(1456, 1456, "RGB"), make_image(13, 977, "RGBA", seed=1)],
               [make_image(3000, 400, "P", seed=2), make_image(365, 364, "L", seed=3), make_image(1, 1, seed=4)]]
    options = dict(size={"longest_edge": 5 * 364}, do_image_splitting=split)
    assert_same(ours_ip(**options)(samples), reference_tiles(as_rgb(samples), **options))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
@pytest.mark.parametrize("edge", [4 * 364, 5 * 364])
def test_pixels_match_reference_all_sizes_large_edges(mode, split, edge):
    samples = batch_of_all_sizes(mode)
    options = dict(size={"longest_edge": edge}, do_image_splitting=split)
    assert_same(ours_ip(**options)(samples), reference_tiles(as_rgb(samples), **options))


def test_call_options_override_the_config():
    samples = [[make_image(500, 300)]]
    ours = ours_ip()(samples, size={"longest_edge": 728}, do_image_splitting=False)
    assert_same(ours, reference_tiles(samples, size={"longest_edge": 728}, do_image_splitting=False))


@pytest.mark.parametrize("resample", [0, 2, 3])
def test_other_resampling_filters_match(resample):
    samples = [[make_image(500, 300), make_image(90, 700, "RGBA", seed=1)]]
    assert_same(ours_ip(resample=resample)(samples), reference_tiles(samples, resample=resample))


def test_batch_pads_image_axis_with_zero_images_and_zero_masks():
    samples = [[], [make_image(800, 300)], [make_image(30, 20, seed=1), make_image(30, 20, seed=2)]]
    out = ours_ip(size={"longest_edge": 364})(samples)  # nothing is split at this size: one tile per image
    assert out.rows == [[], [0], [0, 0]] and out.cols == [[], [0], [0, 0]]
    assert out.pixel_values.shape == (3, 2, 3, 364, 364)
    real = out.pixel_attention_mask.reshape(3, 2, -1).all(-1)
    np.testing.assert_array_equal(real, [[0, 0], [1, 0], [1, 1]])
    assert not out.pixel_attention_mask[real == 0].any()
    assert not out.pixel_values[0].any() and not out.pixel_values[1, 1].any()
    assert_same(out, reference_tiles(samples, size={"longest_edge": 364}))


def test_smaller_frames_are_padded_bottom_right_with_mask():
    ip = ours_ip()
    small = np.full((100, 200, 3), 255, np.uint8)
    big = np.zeros((364, 364, 3), np.uint8)
    values, mask = ip.pad_and_normalize([[small], [big]])
    assert values.shape == (2, 1, 3, 364, 364)
    assert mask[0, 0, :100, :200].all() and mask[0, 0].sum() == 100 * 200
    assert (values[0, 0, :, :100, :200] == 1.0).all() and not values[0, 0, :, 100:].any()


# ------------------------------------------------------------------------------------------ where we differ
def test_first_image_position_does_not_matter_unlike_the_reference():
    """The reference reads a first 1x1 RGB image as a channels-first 1x3 grey image; ours does not care."""
    tiny, other = make_image(1, 1, seed=5), make_image(200, 100, seed=6)
    ours_first = ours_ip()([[tiny, other]])
    ours_second = ours_ip()([[other, tiny]])
    n_other = ours_second.rows[0][0] * ours_second.cols[0][0] + 1
    np.testing.assert_array_equal(ours_first.pixel_values[0, -n_other:], ours_second.pixel_values[0, :n_other])
    ref_second = reference_tiles([[other, tiny]])
    assert_same(ours_second, ref_second)
    try:  # the reference either fails on the misread array or returns other tiles
        first = reference_ip()([[tiny, other]], return_tensors="np")["pixel_values"]
        misread = first.shape != ours_first.pixel_values.shape or \
            np.abs(first - ours_first.pixel_values).max() > 0.1
    except (TypeError, ValueError):
        misread = True
    assert misread


@pytest.mark.parametrize("mode", ["L", "P"])
def test_first_one_channel_image_works_while_the_reference_raises(mode):
    image = make_image(300, 200, mode)
    with pytest.raises(ValueError):
        reference_ip()([[image]], return_tensors="np")
    assert_same(ours_ip()([[image]]), reference_tiles([[image.convert("RGB")]]))


@pytest.mark.parametrize("mode", ["L", "P"])
@pytest.mark.parametrize("resample, split", [(1, True), (1, False), (3, True)], ids=["lanczos-split",
                                                                                  "lanczos-nosplit", "bicubic-split"])
def test_grey_and_palette_images_give_what_their_rgb_conversion_gives(mode, resample, split):
    """Not the reference's NEAREST resize of one-channel images (aliased scans): its result on convert("RGB")."""
    samples = [[make_image(600, 800, mode, seed=7), make_image(13, 977, mode, seed=8)], [make_image(365, 364, mode)]]
    options = dict(resample=resample, do_image_splitting=split, size={"longest_edge": 2 * 364})
    ours = ours_ip(**options)(samples)
    rgb = [[image.convert("RGB") for image in sample] for sample in samples]
    assert_same(ours, reference_tiles(rgb, **options))
    nearest = reference_tiles(samples, **options)[0]  # what the reference does with the L/P images themselves
    assert nearest.shape == ours.pixel_values.shape and np.abs(nearest - ours.pixel_values).max() > 0.1


def test_cmyk_is_converted_to_rgb_first():
    """The reference reads the four CMYK channels as RGBA; we convert with Pillow, so we equal its RGB result."""
    image = make_image(500, 300, "CMYK")
    assert_same(ours_ip()([[image]]), reference_tiles([[image.convert("RGB")]]))
    wrong = reference_tiles([[image]])[0]
    assert np.abs(wrong - ours_ip()([[image]]).pixel_values).max() > 0.1


def test_sixteen_bit_is_scaled_to_eight_bits():
    """The reference refuses values above 255; we scale by 255/65535 (rounded) and then behave as for L."""
    image = make_image(500, 300, "I;16")
    with pytest.raises(ValueError, match="outside the range"):
        reference_tiles([[image]])
    wide = np.asarray(image).astype(np.int64)
    eight = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    assert_same(ours_ip()([[image]]), reference_tiles([[eight.convert("RGB")]]))
    assert_same(ours_ip()([[image.convert("I")]]), reference_tiles([[eight.convert("RGB")]]))


def test_la_is_treated_as_rgba():
    image = make_image(500, 300, "LA")
    with pytest.raises(ValueError, match="channel dimension"):
        reference_tiles([[image]])
    assert_same(ours_ip()([[image]]), reference_tiles([[image.convert("RGBA")]]))


def test_bilevel_is_treated_as_its_rgb_conversion():
    image = make_image(300, 200, "1")
    assert_same(ours_ip()([[image]]), reference_tiles([[image.convert("RGB")]]))


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_palette_transparency_is_treated_as_rgba_where_the_reference_shows_the_palette_colour(split):
    image = make_image(500, 300, "P+t")
    ours = ours_ip(do_image_splitting=split)([[image]])
    assert_same(ours, reference_tiles([[image.convert("RGBA")]], do_image_splitting=split))
    # the reference given the P image drops the transparency (as convert("RGB") does): the palette colour shows
    for dropped in (reference_tiles([[image]], do_image_splitting=split)[0],
                    reference_tiles([[image.convert("RGB")]], do_image_splitting=split)[0]):
        assert np.abs(dropped - ours.pixel_values).max() > 0.5


def test_palette_with_an_alpha_palette_is_treated_as_rgba():
    rgba = make_image(400, 300, "RGBA")
    image = rgba.quantize(64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    assert image.mode == "P" and image.palette.mode == "RGBA" and "transparency" not in image.info
    assert_same(ours_ip()([[image]]), reference_tiles([[image.convert("RGBA")]]))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("options, message", [
    (dict(size={"shortest_edge": 10}), "longest_edge"),
    (dict(size={"longest_edge": 0}), "positive integer"),
    (dict(max_image_size=-3), "positive integer"),
    (dict(resample=9), "resampling filter"),
    (dict(image_std=[0.5, 0, 0.5]), "must not contain 0"),
    (dict(image_mean=[0.5, 0.5]), "image_mean must be 3 finite numbers"),
])
def test_bad_config_values_raise_clear_errors(options, message):
    with pytest.raises(Idefics3Error, match=message):
        ours_ip(**options)


def test_unknown_override_is_named():
    with pytest.raises(Idefics3Error, match="longest_side"):
        Idefics3ImageProcessor.from_dict(CONFIG, longest_side=3)


def test_bare_int_size_means_longest_edge():
    samples = [[make_image(900, 500)]]
    assert_same(ours_ip(size=728)(samples), reference_tiles(samples, size={"longest_edge": 728}))


def test_zero_size_and_truncated_pil_images_raise(tmp_path):
    with pytest.raises(Idefics3Error, match="zero size"):
        ours_ip()([[Image.new("RGB", (0, 5))]])
    path = tmp_path / "cut.png"
    make_image(300, 200).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(Idefics3Error, match="truncated"):
        ours_ip()([[Image.open(path)]])


def test_no_images_at_all_is_an_error():
    with pytest.raises(Idefics3Error, match="no images"):
        ours_ip()([[], []])


def test_global_view_is_the_whole_image_squashed_to_one_tile():
    image = make_image(1000, 600)
    out = ours_ip(size={"longest_edge": 728})([[image]])
    assert (out.rows, out.cols) == ([[2]], [[2]]) and out.pixel_values.shape[1] == 5
    h, w = fit_longest_edge(600, 1000, 728)
    grid = image.resize((w, h), Image.Resampling.LANCZOS).resize((728, 728), Image.Resampling.LANCZOS)
    tile = np.asarray(grid)[364:, :364]  # row 2, column 1
    overview = np.asarray(grid.resize((364, 364), Image.Resampling.LANCZOS))
    for frame, expected in ((out.pixel_values[0, 2], tile), (out.pixel_values[0, 4], overview)):
        np.testing.assert_allclose(frame.transpose(1, 2, 0), (expected / 255 - 0.5) / 0.5, atol=1e-6)
