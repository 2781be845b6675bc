"""benchmarks/prefill_benchmark.py on the tiny preset (a subprocess): --help says what it measures; a tiny run
prints the tables (the machine first) and writes the JSON: our prefill, its matmuls and transformers' timed in the
same rounds, the logits equal to transformers', the chunks the prefill ran and the per-chunk breakdown."""
import json

import pytest

from script_runs import run_script


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_help_tells_what_is_measured():
    r = run_script("prefill_benchmark.py", "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("--tokens", "--repeats", "881", "matmuls", "causal share", "transformers", "peak RSS", "CPU seconds",
                 "breakdown", "prefill-<preset or model>-cpu.json"):
        assert word in r.stdout, word


def test_a_tiny_run_times_every_side_and_matches_transformers(work):
    out = work / "prefill.json"
    # 300 tokens (320 padded) under a score budget of 2^22: one call; --tokens 1500 would chunk, too slow here
    r = run_script("prefill_benchmark.py", "--preset", "tiny", "--tokens", "300", "--repeats", "1", "--work-dir",
                   str(work / "w"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert r.stdout.startswith(f"Machine: {result['machine']['cpu']},") and "load average" in r.stdout
    assert "| what | wall s | CPU s | peak RSS MB | peak above call start MB |" in r.stdout
    assert "| chunk (queries x keys) | layer graph |" in r.stdout
    assert result["tokens"] == 300 and result["padded_tokens"] == 320
    assert result["chunks"] == [dict(queries=320, keys=320)]
    assert set(result["median_seconds"]) == {"ours", "matmuls", "transformers"}
    assert all(v > 0 for v in result["median_seconds"].values())
    assert result["logits_rel_l2_vs_transformers"] < 1e-5
    assert result["ours_over_matmuls"] == pytest.approx(result["median_seconds"]["ours"]
                                                        / result["median_seconds"]["matmuls"])
    parts = result["matmul_parts_median_seconds"]
    assert parts["attention_causal_s"] == pytest.approx(parts["attention_square_s"] * 301 / 600)
    assert [c["queries"] for c in result["breakdown"]["chunks"]] == [320]
