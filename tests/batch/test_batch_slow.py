"""idefics3-batch as users run it (subprocesses, ~1-2 min each): killed with SIGKILL after its first batch and
rerun, and data parallel under msrun with two CPU workers."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_workspace import make_workspace

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "GLOG_v": "3"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("batch_slow"))


def batch_command(workspace, output, *extra):
    return [str(ROOT / "batch.py"), "--model", str(workspace / "model"), "--input", str(workspace / "in.jsonl"),
            "--output", str(output), "--max-new-tokens", "12", "--no-progress", *extra]


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    """The output of one plain run (one process, batches of 3)."""
    out = workspace / "plain" / "out.jsonl"
    r = subprocess.run([sys.executable, *batch_command(workspace, out, "--batch-size", "3")], capture_output=True,
                       text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out.read_text()


def test_killed_after_its_first_batch_a_rerun_completes_the_file(workspace, uninterrupted):
    out = workspace / "killed" / "out.jsonl"
    part = out.with_name("out.jsonl.parts") / "rank-0.jsonl"
    cmd = [sys.executable, *batch_command(workspace, out, "--batch-size", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.read_text().count('"answer"') >= 1:  # a generated batch is on disk
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = part.read_text().count("\n")
    assert 1 <= written < uninterrupted.count("\n") and not out.exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == uninterrupted  # one record per id, in input order, the same answers
    assert f"this run: {uninterrupted.count(chr(10)) - written} rows" in r.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0 and "nothing to do" in again.stderr and out.read_text() == uninterrupted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_msrun_with_two_cpu_workers_writes_the_same_output(workspace, uninterrupted, tmp_path):
    out = tmp_path / "parallel" / "out.jsonl"
    cmd = ["msrun", "--worker_num", "2", "--local_worker_num", "2", "--join", "True", "--master_port",
           str(free_port()), "--log_dir", str(tmp_path / "msrun_logs"),
           *batch_command(workspace, out, "--batch-size", "2")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=tmp_path)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "msrun_logs").glob("worker_*.log")))
    assert r.returncode == 0, logs
    assert out.read_text() == uninterrupted
    assert "[rank 1 of 2]" in logs and "rank 0 writes" in logs and "done [rank 0 of 2]: 9 rows, 3 errors" in logs
    assert "rows" not in (tmp_path / "msrun_logs" / "scheduler.log").read_text()  # it ran no rows of its own
    assert not out.with_name("out.jsonl.parts").exists()
