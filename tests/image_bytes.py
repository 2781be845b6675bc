"""Encoded test images for the image fuzz tests: small pictures in every format and mode Pillow writes, and the
byte positions where each format declares its width and height (to declare other sizes, e.g. decompression
bombs or zero)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# format → the modes it is written in here
FORMAT_MODES = {
    "PNG": ("RGB", "RGBA", "L", "LA", "P", "P+t", "1", "I;16"),
    "JPEG": ("RGB", "L", "CMYK"),
    "GIF": ("P", "L"),
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"),
    "BMP": ("RGB", "L", "P", "1"),
}
TIFF_COMPRESSIONS = ("raw", "tiff_lzw", "tiff_deflate", "packbits")


def picture(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Noise over a gradient in `mode` ('P+t': a palette with a transparent index; 'I;16': full 16-bit range)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    rgb = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (height, width), dtype=np.uint8)]), "RGBA")
    if mode == "LA":
        return picture(width, height, "RGBA", seed).convert("LA")
    if mode in ("P", "P+t"):
        image = Image.fromarray(rgb).quantize(16)
        if mode == "P+t":
            image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    return Image.fromarray(rgb).convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def declare_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """`data` with the width and height its header declares replaced (clipped to what the field can hold); the
    pixel data is left as it is."""
    out = bytearray(data)
    if fmt == "PNG":  # IHDR is the first chunk; its CRC covers type + data
        struct.pack_into(">II", out, 16, min(width, 2**31 - 1), min(height, 2**31 - 1))
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    elif fmt == "GIF":  # logical screen, then the first image descriptor
        struct.pack_into("<HH", out, 6, min(width, 65535), min(height, 65535))
        at = _gif_descriptor(out)
        if at is not None:
            struct.pack_into("<HH", out, at + 5, min(width, 65535), min(height, 65535))
    elif fmt == "JPEG":  # the start-of-frame segment
        at = next((i for i in range(2, len(out) - 9) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if at is not None:
            struct.pack_into(">HH", out, at + 5, min(height, 65535), min(width, 65535))
    elif fmt == "BMP":
        struct.pack_into("<ii", out, 18, min(width, 2**31 - 1), min(height, 2**31 - 1))
    elif fmt == "TIFF":
        _tiff_size(out, width, height)
    elif fmt == "WEBP":
        _webp_size(out, width, height)
    return bytes(out)


def _gif_descriptor(data: bytearray):
    at = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while at < len(data):
        if data[at] == 0x2C:
            return at
        if data[at] != 0x21:  # not an extension block: give up
            return None
        at += 2
        while at < len(data) and data[at]:
            at += data[at] + 1
        at += 1
    return None


def _tiff_size(data: bytearray, width: int, height: int) -> None:
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    count = struct.unpack_from(order + "H", data, ifd)[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            value = width if tag == 256 else height
            if kind == 3:
                struct.pack_into(order + "H", data, entry + 8, min(value, 65535))
            else:
                struct.pack_into(order + "I", data, entry + 8, min(value, 2**32 - 1))


def _webp_size(data: bytearray, width: int, height: int) -> None:
    at = 12
    while at + 8 <= len(data):
        kind, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = at + 8
        if kind == b"VP8X":
            data[body + 4:body + 7] = (min(max(width, 1), 2**24) - 1).to_bytes(3, "little")
            data[body + 7:body + 10] = (min(max(height, 1), 2**24) - 1).to_bytes(3, "little")
        elif kind == b"VP8L":
            bits = struct.unpack_from("<I", data, body + 1)[0]
            w, h = min(max(width, 1), 2**14) - 1, min(max(height, 1), 2**14) - 1
            struct.pack_into("<I", data, body + 1, (bits & ~(2**28 - 1)) | w | (h << 14))
        elif kind == b"VP8 ":
            struct.pack_into("<HH", data, body + 6, min(width, 2**14 - 1), min(height, 2**14 - 1))
        at = body + size + (size & 1)
