"""load_image: every source kind opens (with EXIF orientation, like transformers' load_image), and every broken
input is one Idefics3Error naming the source. URLs are served from a thread on 127.0.0.1 only."""
import base64
import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import load_image
from processor_fixtures import make_image


def png_bytes(image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    """A loopback HTTP server: /ok.png, /missing (404), /slow (answers after 3 s)."""
    body = png_bytes(make_image(64, 48))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                time.sleep(3)
            try:
                if self.path in ("/ok.png", "/slow"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404, "Not Found")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout test)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_sources_path_bytes_pil_data_uri_and_url_give_the_same_pixels(tmp_path, server):
    image = make_image(64, 48)
    path = tmp_path / "a.png"
    image.save(path)
    data = png_bytes(image)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, str(path), data, bytearray(data), image, uri, server + "/ok.png"):
        loaded = load_image(source)
        assert loaded.size == (64, 48)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_alpha_is_kept_for_the_image_processor(tmp_path):
    image = make_image(40, 30, "RGBA")
    assert load_image(png_bytes(image)).mode == "RGBA"


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image as reference_load

    image = make_image(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    ours, ref = load_image(path), reference_load(str(path))
    assert ours.size == ref.size == (40, 80)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(Idefics3Error, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(Idefics3Error, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt|truncated|not an image"),
])
def test_unreadable_bytes(data, message):
    with pytest.raises(Idefics3Error, match=message):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    data = png_bytes(make_image(300, 200), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Idefics3Error, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_zero_size_pil_image():
    with pytest.raises(Idefics3Error, match="zero size"):
        load_image(Image.new("RGB", (7, 0)))


def test_decompression_bomb_is_refused(monkeypatch):
    data = png_bytes(Image.new("L", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow refuses above twice this limit
    with pytest.raises(Idefics3Error, match="decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(data)


def test_bad_data_uri_and_wrong_type():
    with pytest.raises(Idefics3Error, match="base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(Idefics3Error, match="data:image/png;base64"):
        load_image("data:image/png,rawdata")
    with pytest.raises(Idefics3Error, match="int"):
        load_image(42)


def test_url_errors_say_to_pass_a_local_path(server):
    with pytest.raises(Idefics3Error, match="HTTP 404.*local path"):
        load_image(server + "/missing")
    start = time.perf_counter()
    with pytest.raises(Idefics3Error, match="timeout 0.5 s.*local path"):
        load_image(server + "/slow", timeout=0.5)
    assert time.perf_counter() - start < 2.5
