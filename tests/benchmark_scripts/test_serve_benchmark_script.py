"""benchmarks/serve_benchmark.py without its (minutes-long) run: --help says what it measures, percentiles and the
table are right."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serve_benchmark.py"


def load():
    spec = importlib.util.spec_from_file_location("serve_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_documents_the_measurements():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for words in ("--concurrency", "--requests", "--max-tokens", "aggregate", "p50/p95", "one at a time",
                  "--no-image-splitting", "peak RSS"):
        assert words in r.stdout


def test_percentiles_and_table():
    bench = load()
    assert bench.pct([1.0], 95) == 1.0
    assert bench.pct([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert abs(bench.pct(list(map(float, range(1, 101))), 95) - 95.05) < 1e-9
    level = dict(clients=1, requests=2, seconds=10.0, completion_tokens=20, tokens_per_s=2.0, ttft_p50=1.0,
                 ttft_p95=1.5, latency_p50=5.0, latency_p95=6.0, mean_requests_per_batch=1.0)
    result = dict(machine=dict(cpu="x", cores_usable=2, ram_gb=1, mindspore="2.10.0", date="d",
                               load_average_1min_at_start=1.0, load_average_1min_at_end=2.0),
                  checkpoint_shapes="s", photo_size="640x480", server_peak_rss_mb=100, requests_per_level=2,
                  max_tokens=10, warmup_seconds=3.0,
                  levels=[level, dict(level, clients=2, tokens_per_s=5.0, mean_requests_per_batch=2.0)])
    table = bench.markdown(result)
    assert "| 1 | 2 | 10.0 | 20 | 2.00 | 1.00 |" in table and "| 2 | 2 | 10.0 | 20 | 5.00 | 2.50 |" in table


def test_image_reuse_help_documents_the_requests():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_image_reuse.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for words in ("one pixel changed", "max_tokens 1", "hit counter", "serve-image-reuse-smolvlm-256m-cpu.json"):
        assert words in r.stdout


def test_poisson_mixes():
    """--mix photos: a new photo per request, as before; --mix mixed: new photos, text-only questions and further
    questions about photos already sent (never one not sent yet)."""
    import argparse

    import numpy as np

    bench = load()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scheduler_scenarios

    images = [f"data:image/jpeg;base64,{i}" for i in range(40)]

    def bodies(mix):
        args = argparse.Namespace(mix=mix, requests=40, max_tokens=8)
        return scheduler_scenarios.poisson_bodies(bench, args, images, np.random.default_rng(0))

    def url(body):
        part = body["messages"][0]["content"][0]
        return part["image_url"]["url"] if part["type"] == "image_url" else None

    assert [url(b) for b in bodies("photos")] == images
    mixed, seen, kinds = bodies("mixed"), [], {"photo": 0, "text": 0, "again": 0}
    for body in mixed:
        u = url(body)
        kind = "text" if u is None else "again" if u in seen else "photo"
        assert kind != "photo" or u == images[len(seen)]  # new photos in order, each once
        seen += [u] if kind == "photo" else []
        kinds[kind] += 1
    assert all(n >= 6 for n in kinds.values()), kinds
    out = bench.parse_args(["--scenario", "poisson", "--mix", "mixed"]).out
    assert out.endswith("serve-poisson-mixed-smolvlm-256m-cpu.json")
