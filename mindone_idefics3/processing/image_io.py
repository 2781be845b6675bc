"""Opening images from what users have: a path, an http(s) URL, a `data:` URI, raw bytes or a PIL image.

Every failure is one `Idefics3Error` that names the source and says what to do; nothing reaches numpy half-decoded.
The image keeps its own mode (RGBA, P, CMYK, I;16, ...): conversion to RGB is the image processor's job, so
transparency is composited on white there, as transformers' image processor does. (transformers' `load_image`
converts to RGB itself, which drops alpha without compositing; that is the one place we differ.)
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import Idefics3Error

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

URL_TIMEOUT_SECONDS = 10.0
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024  # far above any real photo; stops a runaway download
# Decompression bombs below Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS): a file may declare more pixels than
# FREE_PIXELS only if it has a byte per MAX_PIXELS_PER_BYTE of them. Real pictures stay far below (a blank A4 page
# at 600 dpi: ~2,000 pixels per byte as a 1-bit PNG, ~11,600 as G4 TIFF; photos: 10-200); a 280-byte JPEG that
# declares 8947x8947 pixels would otherwise be decoded (grey fill) into 80 MB.
FREE_PIXELS = 2048 * 2048
MAX_PIXELS_PER_BYTE = 20_000


def load_image(source: ImageSource, timeout: float = URL_TIMEOUT_SECONDS,
               max_bytes: int = MAX_DOWNLOAD_BYTES) -> Image.Image:
    """Open and fully decode an image, applying its EXIF orientation.

    source: a file path, an `http://` / `https://` URL (fetched with urllib, `timeout` seconds, at most
    `max_bytes`), a `data:image/...;base64,` URI, the encoded bytes of an image file, or a PIL image.
    """
    if isinstance(source, Image.Image):
        return _oriented(ensure_decoded(source, "the PIL image"), "the PIL image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), f"the {len(source)} bytes passed")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise Idefics3Error(f"cannot load an image from a {type(source).__name__}; pass a file path, an http(s) URL, "
                            "bytes or a PIL.Image.Image")
    if source.startswith(("http://", "https://")):
        return _decode(_download(source, timeout, max_bytes), source)
    if source.startswith("data:"):
        return _decode(_data_uri_bytes(source), "the data: URI")
    return _decode_file(Path(source).expanduser())


def _download(url: str, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES, what: str = "image") -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mindone_idefics3"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise Idefics3Error(f"cannot download {what} {url}: HTTP {e.code} {e.reason}; check the URL, or download "
                            f"the {what} and pass its local path") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Idefics3Error(f"cannot download {what} {url}: {reason} (timeout {timeout:g} s); check the network, or "
                            f"download the {what} and pass its local path") from None
    if len(data) > max_bytes:
        raise Idefics3Error(f"{what} {url} is larger than {max_bytes / 2**20:g} MiB; download and shrink it first")
    return data


def _data_uri_bytes(uri: str, what: str = "image") -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64") or not payload:
        example = "image/png" if what == "image" else "video/mp4"
        raise Idefics3Error(f"a data: URI {what} must look like 'data:{example};base64,<base64 data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Idefics3Error(f"the data: URI {what} is not valid base64") from None


def _decode_file(path: Path) -> Image.Image:
    if not path.exists():
        raise Idefics3Error(f"image file not found: {path}")
    if path.is_dir():
        raise Idefics3Error(f"{path} is a directory; pass the path of an image file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Idefics3Error(f"cannot read image file {path}: {e.strerror or e}") from None
    return _decode(data, str(path))


def _decode(data: bytes, where: str) -> Image.Image:
    if not data:
        raise Idefics3Error(f"{where} is empty (0 bytes), not an image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Idefics3Error(f"{where} is refused as a decompression bomb ({e}); if the image is genuine, downscale "
                            "it first or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except UnidentifiedImageError:
        raise Idefics3Error(f"{where} is not an image file Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Idefics3Error(f"{where} is corrupt and cannot be decoded ({e}); re-export or re-download it") from None
    _refuse_bomb(image, len(data), where)
    return _oriented(ensure_decoded(image, where), where)


def _refuse_bomb(image: Image.Image, nbytes: int, where: str) -> None:
    """Refuse, before decoding, a file that declares far more pixels than its bytes can hold (see FREE_PIXELS)."""
    width, height = image.size
    if width * height > max(FREE_PIXELS, MAX_PIXELS_PER_BYTE * nbytes):
        raise Idefics3Error(f"{where} declares {width}x{height} pixels in only {nbytes} bytes (more than "
                            f"{MAX_PIXELS_PER_BYTE} pixels per byte): refused as a decompression bomb; if the image "
                            "is genuine, re-save it in a common format or raise "
                            "mindone_idefics3.processing.image_io.MAX_PIXELS_PER_BYTE")


def ensure_decoded(image: Image.Image, where: str) -> Image.Image:
    """Check that a PIL image has pixels and decodes (a lazily opened file may be truncated); no orientation change."""
    width, height = image.size
    if width == 0 or height == 0:
        raise Idefics3Error(f"{where} has zero size ({width}x{height} pixels)")
    try:
        image.load()  # decode now: truncation and corruption surface here, not deep in numpy
    except (OSError, SyntaxError, ValueError) as e:
        what = "truncated" if "truncated" in str(e) else "corrupt"
        raise Idefics3Error(f"{where} is {what} and cannot be decoded ({e}); re-export or re-download it") from None
    return image


def _oriented(image: Image.Image, where: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF blocks; the pixels are still fine
        try:
            return ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise Idefics3Error(f"{where} cannot be decoded ({e}); re-export or re-download it") from None
