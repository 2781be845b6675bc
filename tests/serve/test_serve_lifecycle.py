"""idefics3-serve's process: --demo serves, SIGTERM stops accepting, finishes the running request, exits 0;
the command line's mistakes stop it before anything loads."""
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_helpers import ROOT, Server


def test_sigterm_finishes_the_running_request_then_exits_0():
    server = Server(["--demo", "--grace-period", "60"])
    try:
        body = {"model": "idefics3-demo", "messages": [{"role": "user", "content": "Talk"}], "max_tokens": 300,
                "stream": True, "stream_options": {"include_usage": True}}
        events, started = [], threading.Event()

        def stream():
            with httpx.stream("POST", server.base + "/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        if len(events) == 3:
                            started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120), server.log
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(server.root + "/health", timeout=5)
        reader.join(120)
        assert server.proc.wait(120) == 0, server.log
    finally:
        server.stop()
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 300  # the running request was finished, not cut
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert "Traceback" not in server.log


@pytest.mark.parametrize("args, message", [
    ([], "pass --model DIR_OR_REPO (or --demo)"),
    (["--demo", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["--model", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
    (["--demo", "--image-cache-mb", "-1"], "--image-cache-mb must be >= 0"),
    (["--demo", "--request-timeout", "0"], "--request-timeout must be more than 0 seconds"),
])
def test_command_line_mistakes_exit_2_with_one_message(args, message):
    r = subprocess.run([sys.executable, "-m", "mindone_idefics3.serve", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_help_lists_the_flags():
    r = subprocess.run([sys.executable, "-m", "mindone_idefics3.serve", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    for flag in ("--model", "--host", "--port", "--dtype", "--device", "--served-model-name", "--max-batch-size",
                 "--max-queue", "--max-images-per-request", "--max-prompt-tokens", "--max-tokens-limit",
                 "--max-image-pixels", "--api-key", "--no-remote-images", "--demo", "--grace-period",
                 "--image-cache-mb", "--request-timeout", "--allowed-media-domains", "--allow-private-media-urls",
                 "--log-format", "--no-access-log"):
        assert flag in r.stdout
