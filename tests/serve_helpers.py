"""Start the real `python -m mindone_idefics3.serve` on 127.0.0.1 (a free port) and stop it; reference answers
through the public API (chat template, processor, generate, batch_decode)."""
from __future__ import annotations

import base64
import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
READY = "idefics3-serve: ready at "


class Server:
    def __init__(self, args, timeout: float = 600.0):  # loading + warm-up on a loaded machine
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mindone_idefics3.serve", "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list = []
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"the server did not get ready in {timeout} s; stderr:\n{self.log}")
            if line.startswith(READY):
                self.base = line[len(READY):].split()[0]  # http://127.0.0.1:PORT/v1
                self.root = self.base[:-len("/v1")]
                return

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.put(line) if isinstance(sink, queue.Queue) else sink.append(line)

    @property
    def log(self) -> str:
        return "".join(self.stderr)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def random_image(seed: int, size=(90, 70)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def openai_messages(question: str, images=(), system=None):
    """OpenAI chat messages: the images (as data: URIs) then the question, in one user turn."""
    content = [{"type": "image_url", "image_url": {"url": png_data_uri(i)}} for i in images]
    content.append({"type": "text", "text": question})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def template_messages(question: str, n_images: int, system=None):
    """The same conversation as the processor's chat template takes it."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return messages + [{"role": "user", "content": content}]


class Reference:
    """Answers of the checkpoint through the public API, one request at a time (PyNative: nothing to compile)."""

    def __init__(self, model_dir):
        from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
        from mindone_idefics3.device import select_device
        from mindone_idefics3.generation import stop_token_ids

        select_device("CPU")
        self.model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, progress=False)
        self.processor = Idefics3Processor.from_pretrained(model_dir)
        self.stops = np.array(stop_token_ids(self.model), np.int64)

    def answer(self, question: str, images=(), max_tokens: int = 12, system=None, **options):
        """(text, finish_reason, prompt_tokens, completion_tokens) as generate() + batch_decode give them."""
        prompt = self.processor.apply_chat_template(template_messages(question, len(images), system),
                                                    add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=[list(images)] if images else None, return_tensors="np")
        ids = self.model.generate(**inputs, max_new_tokens=max_tokens, use_jit=False, **options)
        new = ids[0, inputs["input_ids"].shape[1]:]
        stopped = np.flatnonzero(np.isin(new, self.stops))
        count = int(stopped[0]) + 1 if stopped.size else len(new)
        text = self.processor.batch_decode(new[None, :count], skip_special_tokens=True)[0]
        return text, ("stop" if stopped.size else "length"), int(inputs["input_ids"].shape[1]), count


class LocalImageServer:
    """An HTTP server on 127.0.0.1 (a free port, its own thread) that the tests point image URLs at: /x.png (an
    image), /text.txt (not an image), /redirect?to=URL (302 to URL), /slow.png (a byte every 0.1 s), anything else
    404. `hits` lists every path requested, so a test can show that nothing reached it."""

    def __init__(self):
        import http.server
        import urllib.parse

        buf = io.BytesIO()
        random_image(5, (40, 30)).save(buf, format="PNG")
        png, hits = buf.getvalue(), []
        self.hits, self.png = hits, png

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/x.png":
                    self._send(200, "image/png", png)
                elif url.path == "/text.txt":
                    self._send(200, "text/plain", b"just some text, not an image\n")
                elif url.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.parse_qs(url.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/slow.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    try:
                        for i in range(50):  # a byte every 0.1 s for 5 s, then it gives up
                            self.wfile.write(png[i:i + 1])
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:  # the client gave up first
                        pass
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_loopback_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
