"""benchmarks/throughput.py: a reduced run on the tiny preset (subprocess) reports what its --help promises."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
ENV = {**os.environ, "GLOG_v": "3"}


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "tiny.json"
    r = run_script("--preset", "tiny", "--dtype", "fp32,bf16", "--jit", "on,off", "--batch-sizes", "1,2",
                   "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "1",
                   "--reference", "hf", "--work-dir", str(tmp / "weights"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads(out.read_text()), out


def test_table_has_the_gallery_columns_and_bf16_unsupported_on_cpu(tiny_run):
    r, _, _ = tiny_run
    assert ("| model | precision | device | attention | jit | batch | context | tokens/s | aggregate tokens/s "
            "| TTFT (s) | decode x ref | TTFT x ref |") in r.stdout
    assert "| tiny | bf16 | CPU | — | — | — | — | unsupported on CPU |" in r.stdout
    assert "| tiny | fp32 | CPU | eager | on | 1 |" in r.stdout and "| tiny | fp32 | CPU | eager | off | 2 |" in r.stdout
    assert "threads_num" in r.stdout and "torch.set_num_threads" in r.stdout  # says which threads it used


def test_json_describes_the_machine_and_every_row(tiny_run):
    _, result, _ = tiny_run
    assert {"cpu", "cores_usable", "ram_gb", "mindspore", "torch", "transformers", "threads", "date"} \
        <= set(result["machine"])
    assert result["memory_bandwidth_gbs"] > 0
    unsupported = [row for row in result["rows"] if row["status"] == "unsupported"]
    assert [row["precision"] for row in unsupported] == ["bf16"] and "CPU" in unsupported[0]["reason"]
    ok = [row for row in result["rows"] if row["status"] == "ok"]
    assert {(row["jit"], row["batch"]) for row in ok} == {("on", 1), ("on", 2), ("off", 1), ("off", 2)}
    for row in ok:
        assert row["precision"] == "fp32" and row["attention"] == "eager" and row["context"] == 8 + 16
        assert row["finite"] and row["ref_finite"] and row["logits_rel_l2"] < 1e-4
        for key in ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "aggregate_tokens_per_s", "ttft_s",
                    "vision_ms", "load_s", "peak_rss_mb", "ref_tokens_per_s", "ref_ttft_s", "ref_vision_ms",
                    "decode_speedup", "ttft_speedup", "decode_weight_bytes", "decode_kv_cache_bytes",
                    "bandwidth_bound_tokens_per_s", "fraction_of_bound"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, key
        assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["aggregate_tokens_per_s"] == pytest.approx(row["tokens_per_s"] * row["batch"], rel=1e-3)
        assert row["ids_equal"] == row["new_tokens"] == 4  # same weights and inputs: the same greedy ids
    kernels = result["kernels_per_decode_step"]["fp32"]
    assert kernels["kernels"] > kernels["shape_only"] > 0


def test_plot_is_written_when_matplotlib_is_installed(tiny_run):
    r, _, out = tiny_run
    png = out.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot: skipped" in r.stdout and not png.exists()
    else:
        assert f"plot: {png}" in r.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("preset, budget", [("smolvlm-256m", "0.5"), ("idefics3-8b", "20")])
def test_a_preset_too_big_for_the_memory_is_refused_before_writing(preset, budget, tmp_path):
    r = run_script("--preset", preset, "--dtype", "fp32", "--ram-budget-gb", budget, "--work-dir", str(tmp_path / "w"),
                   "--out", str(tmp_path / "x.json"), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: preset {preset} has" in r.stderr and "Nothing was written or loaded" in r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "x.json").exists()


def test_help_documents_the_measurements():
    r = run_script("--help", timeout=60)
    assert r.returncode == 0
    for text in ("--reference", "--threads", "--prompt-tokens", "TTFT", "kernels/step", "BW bound", "peak RSS"):
        assert text in r.stdout
