"""benchmarks/throughput.py runs end to end on the tiny preset (reduced) and reports what it claims."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_reports_rows_ratios_and_unsupported_bf16(tmp_path):
    out = tmp_path / "tiny.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny",
                        "--dtype", "fp32,bf16", "--jit", "on,off", "--new-tokens", "6", "--repeats", "1",
                        "--reference", "hf", "--work-dir", str(tmp_path / "w"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "GLOG_v": "3"})
    assert r.returncode == 0, r.stderr
    assert "| tiny | bf16 | CPU |" in r.stdout and "unsupported on CPU" in r.stdout
    result = json.loads(out.read_text())
    assert {"cpu", "cores", "mindspore", "torch", "threads"} <= set(result["machine"])
    ok = [row for row in result["rows"] if row["status"] == "ok"]
    assert {(row["precision"], row["jit"]) for row in ok} == {("fp32", "on"), ("fp32", "off")}
    for row in ok:
        assert row["finite"] and row["decode_tps"] > 0 and row["ttft_s"] > 0 and row["vision_ms"] > 0
        assert row["ref_decode_tps"] > 0 and row["decode_ratio"] > 0
        assert row["greedy_ids_equal"]  # same weights, same inputs: the reference generates the same ids
    unsupported = [row for row in result["rows"] if row["status"] == "unsupported"]
    assert [row["precision"] for row in unsupported] == ["bf16"]
