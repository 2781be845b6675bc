"""Fuzzing image decoding (processing/image_io.py) and preprocessing (processing/image.py).

PNG, JPEG, GIF, WebP, TIFF and BMP files in every mode Pillow writes, 1×N to 48×48, then truncated, bit-flipped,
overwritten, or declaring another size (zero, 1×N, decompression-bomb sizes). Each must give an Idefics3Error
naming the input, or a correct result: an unchanged lossless file decodes to its pixels, and the tiles equal
those of the image's documented conversion (RGBA for modes with alpha, else RGB) with a valid mask.
"""
import warnings

import numpy as np
import pytest
from hypothesis import strategies as st
from PIL import Image

from fuzzing import BUDGETS, run_cases
from image_bytes import FORMAT_MODES, TIFF_COMPRESSIONS, declare_size, encode, picture
from processor_fixtures import documented_conversion
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import Idefics3ImageProcessor, load_image
from mindone_idefics3.processing.image_io import FREE_PIXELS, MAX_PIXELS_PER_BYTE

PROCESSOR = Idefics3ImageProcessor.from_dict({"size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32}})


@st.composite
def options(draw, fmt, mode):
    if fmt == "JPEG":
        return dict(quality=draw(st.integers(1, 95)), progressive=draw(st.booleans()))
    if fmt == "WEBP":
        # exact: keep the colour of fully transparent pixels (lossless WebP may change it otherwise)
        return dict(lossless=draw(st.booleans()), quality=draw(st.integers(0, 100)), exact=True)
    if fmt == "TIFF":
        extra = ("group4",) if mode == "1" else ("jpeg",) if mode in ("RGB", "L") else ()
        return dict(compression=draw(st.sampled_from(TIFF_COMPRESSIONS + extra)))
    if fmt == "PNG":
        return dict(optimize=draw(st.booleans()))
    return {}


@st.composite
def image_files(draw):
    """(encoded bytes, the image they must decode to, or None when the file was damaged or is lossy)."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    side = st.integers(1, 48) | st.just(1)
    image = picture(draw(side), draw(side), mode, draw(st.integers(0, 2**16)))
    saving = draw(options(fmt, mode))
    data = bytearray(encode(image, fmt, **saving))
    lossless = fmt in ("PNG", "GIF", "TIFF", "BMP") and saving.get("compression") != "jpeg" or saving.get("lossless")
    damage = draw(st.sampled_from(["none", "truncate", "flip", "overwrite", "size"]))
    where = draw(st.integers(0, len(data) - 1) | st.integers(0, min(64, len(data) - 1)))  # often in the header
    if damage == "truncate":
        del data[where:]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif damage == "overwrite":
        data[where:where + 4] = draw(st.binary(min_size=1, max_size=4))
    elif damage == "size":
        huge = st.integers(2**13, 2**20)  # sides of decompression bombs
        width, height = draw(st.sampled_from([(0, image.height), (image.width, 0), (1, draw(huge)),
                                              (draw(huge), draw(huge)), (draw(st.integers(1, 100)),
                                                                        draw(st.integers(1, 100)))]))
        data = bytearray(declare_size(bytes(data), fmt, width, height))
    return bytes(data), image if damage == "none" and lossless else None


def check_tiles(image: Image.Image) -> None:
    out = PROCESSOR([[image]])
    rows, cols = out.rows[0][0], out.cols[0][0]
    values, mask = out.pixel_values[0], out.pixel_attention_mask[0]
    assert values.shape[0] == (rows * cols + 1 if rows else 1) and values.shape[1:] == (3, 32, 32)
    assert np.isfinite(values).all() and np.abs(values).max() <= 1.0
    for frame in mask:  # a non-empty top-left rectangle
        h, w = int(frame[:, 0].sum()), int(frame[0].sum())
        assert h and w and frame.sum() == h * w and frame[:h, :w].all()
    converted = documented_conversion(image)
    if converted is not None:
        same = PROCESSOR([[converted]])
        assert np.array_equal(same.pixel_values, out.pixel_values) and (same.rows, same.cols) == (out.rows, out.cols)


def check(case) -> str:
    data, expected = case
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about damaged TIFF tags, EXIF and bomb-sized images
            image = load_image(data)
    except Idefics3Error as e:
        assert f"the {len(data)} bytes passed" in str(e) and "\n" not in str(e), str(e)
        return "refused"
    assert image.width * image.height <= max(FREE_PIXELS, MAX_PIXELS_PER_BYTE * len(data))  # the memory bound
    if expected is not None:
        assert image.size == expected.size
        if image.mode == expected.mode != "P":
            assert np.array_equal(np.asarray(image), np.asarray(expected))
        else:  # GIF reorders palettes and writes L as P
            assert np.array_equal(np.asarray(image.convert("RGBA")), np.asarray(expected.convert("RGBA")))
    check_tiles(image)
    return "processed"


@BUDGETS
def test_damaged_and_odd_image_files_give_a_clear_error_or_correct_tiles(budget):
    seen = {"refused": 0, "processed": 0}

    def count(case):
        seen[check(case)] += 1

    run_cases(image_files(), count, budget)
    assert seen["refused"] and seen["processed"], seen


@pytest.mark.parametrize("fmt", sorted(FORMAT_MODES))
@pytest.mark.parametrize("width, height", [(8947, 8947), (2**14, 2**14 + 1)], ids=["below-pillow", "above-pillow"])
def test_a_small_file_declaring_a_huge_size_is_refused_before_decoding(fmt, width, height):
    """Below Pillow's limit a 280-byte JPEG declaring 8947x8947 pixels decoded (grey) into 80 MB."""
    data = declare_size(encode(picture(8, 8, FORMAT_MODES[fmt][0], 0), fmt), fmt, width, height)
    with pytest.raises(Idefics3Error, match="refused as a decompression bomb"):
        load_image(data)


@pytest.mark.parametrize("mode, fmt, options", [("1", "PNG", {}), ("1", "TIFF", {"compression": "group4"}),
                                                ("L", "JPEG", {"progressive": True})])
def test_a_blank_600_dpi_a4_scan_is_not_a_bomb(mode, fmt, options):
    page = encode(Image.new(mode, (4961, 7016), 255), fmt, **options)
    assert load_image(page).size == (4961, 7016)
