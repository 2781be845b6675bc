"""benchmarks/rows_step_benchmark.py on the tiny preset (a subprocess): --help says what it measures; a tiny run
prints the table (the machine first) and writes the JSON with both sides' step times and peak memory."""
import json

from script_runs import run_script


def test_help_tells_what_is_measured():
    r = run_script("rows_step_benchmark.py", "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    for word in ("--rows", "--lengths", "--steps", "continuous", "static", "peak RSS", "rows-step-<preset or model>"):
        assert word in r.stdout, word


def test_a_tiny_run_times_both_sides(tmp_path):
    out = tmp_path / "rows.json"
    r = run_script("rows_step_benchmark.py", "--preset", "tiny", "--rows", "1,2", "--lengths", "256", "--steps", "2",
                   "--work-dir", str(tmp_path / "w"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert r.stdout.startswith(f"Machine: {result['machine']['cpu']},")
    assert "| L | running rows | continuous ms | static ms |" in r.stdout
    assert [(p["length"], p["rows"]) for p in result["points"]] == [(256, 1), (256, 2)]
    for p in result["points"]:
        assert p["continuous_ms"] > 0 and p["static_ms"] > 0 and p["continuous_peak_rss_mb"] > 0
        assert abs(p["continuous_tokens_per_s"] * p["continuous_ms"] / 1e3 - p["rows"]) < 0.01 * p["rows"]
