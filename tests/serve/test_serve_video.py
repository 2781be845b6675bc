"""idefics3-serve's `video_url` content part (vLLM's) on a SmolVLM2 checkpoint, without a model: the request
becomes the processor's video inputs; URLs follow the image URLs' rules (data: URIs, http(s) unless
--no-remote-images, the size cap); a bad video is one 400. The http case is served on 127.0.0.1."""
import base64
import http.server
import threading

import pytest

from mindone_idefics3.serve.errors import APIError
from mindone_idefics3.serve.prepare import Limits, Preparer, to_template_messages
from mindone_idefics3.serve.protocol import ChatCompletionRequest

pytest.importorskip("av")
pytest.importorskip("num2words")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from mindone_idefics3.demo import make_smolvlm2, write_demo_checkpoint
    from mindone_idefics3.processing import Idefics3Processor
    from video_files import write_video

    d = tmp_path_factory.mktemp("serve_video")
    make_smolvlm2(write_demo_checkpoint(d / "model"), fps=1, max_frames=4)
    clip = write_video(d / "clip.mp4", frames=50, fps=10, width=64, height=48)
    return Idefics3Processor.from_pretrained(d / "model"), clip


def request(url):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}]})


def test_video_url_part_becomes_a_video_item(smol):
    messages, urls, video_urls = to_template_messages(request("data:video/mp4;base64,AAAA"))
    assert messages[0]["content"] == [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    assert (urls, video_urls) == ([], ["data:video/mp4;base64,AAAA"])


def test_data_uri_and_loopback_http_videos_give_the_processors_inputs(smol):
    processor, clip = smol
    data = clip.read_bytes()
    expected = processor.chat_inputs(to_template_messages(request("x"))[0], videos=[clip])
    preparer = Preparer(processor, Limits(context=4096), {})
    inline = preparer(request("data:video/mp4;base64," + base64.b64encode(data).decode()))
    assert (inline.inputs["input_ids"] == expected["input_ids"]).all()
    assert (inline.inputs["pixel_values"] == expected["pixel_values"]).all()
    assert inline.inputs["pixel_values"].shape[1] == 4

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
        # by default a video URL follows the image URLs' address rules: loopback is refused (serve/media.py)
        with pytest.raises(APIError, match="video 0 could not be fetched from 127.0.0.1; send a video URL"):
            preparer(request(url))
        private = Preparer(processor, Limits(context=4096, allow_private_media_urls=True), {})
        fetched = private(request(url))
        assert (fetched.inputs["input_ids"] == expected["input_ids"]).all()
        with pytest.raises(APIError, match="does not fetch remote videos"):
            Preparer(processor, Limits(context=4096, remote_images=False), {})(request(url))
        with pytest.raises(APIError, match="video 0 could not be fetched from 127.0.0.1"):  # over the size cap
            Preparer(processor, Limits(context=4096, max_image_bytes=1000, allow_private_media_urls=True),
                     {})(request(url))
    finally:
        server.shutdown()
        server.server_close()


def test_bad_videos_are_one_400(smol):
    processor, _ = smol
    preparer = Preparer(processor, Limits(context=4096), {})
    cases = {"data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode(): "video 0: .*not a video",
             "file:///etc/passwd": "must be a data:video/...;base64,... URI or an http\\(s\\) URL",
             "data:video/mp4;base64,@@@": "not valid base64"}
    for url, message in cases.items():
        with pytest.raises(APIError, match=message) as e:
            preparer(request(url))
        assert e.value.status == 400
    with pytest.raises(APIError, match="context"):
        Preparer(processor, Limits(context=64), {})(request(
            "data:video/mp4;base64," + base64.b64encode(smol[1].read_bytes()).decode()))
