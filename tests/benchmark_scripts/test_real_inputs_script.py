"""benchmarks/real_inputs.py and cli_benchmark.py on the tiny preset (subprocesses): the table and JSON they promise,
the same inputs and greedy ids on both sides; and the SmolVLM preset's processor settings on the test photo."""
import json
import math
import sys
from pathlib import Path

import pytest

from script_runs import run_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def real_run(work):
    out = work / "real.json"
    r = run_script("real_inputs.py", "--preset", "tiny", "--cases", "two-images-batch", "--repeats", "1",
                   "--new-tokens", "4", "--work-dir", str(work / "w"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads(out.read_text())


def test_real_inputs_table_starts_with_the_machine_and_has_a_row_per_case(real_run):
    r, result = real_run
    cpu = result["machine"]["cpu"]
    assert r.stdout.startswith(f"Machine: {cpu},") and "load average" in r.stdout.splitlines()[0]
    assert ("| case | batch | prompt tokens | tiles | TTFT cold s (ours / ref) | TTFT warm s (ours / ref) "
            "| TTFT ours ÷ ref | TTFT x ref |") in r.stdout
    assert "| two-images-batch | 2 |" in r.stdout


def test_real_inputs_json_compares_the_same_work(real_run):
    _, result = real_run
    [row] = result["rows"]
    assert row["case"] == "two-images-batch" and row["status"] == "ok" and row["batch"] == 2
    assert row["tiles"] == 2 * (13 + 9)  # 1024x768 and 300x900 at a longest edge of 4 tiles, plus global views
    assert len(set(row["prompt_tokens_per_row"])) == 2  # different questions: left padding
    assert row["inputs_equal"] and row["ids_equal"] == row["new_tokens"] == 4
    assert row["ref_attention"] == "sdpa" and row["attention"] == "eager"
    for key in ("cold_ttft_s", "ttft_s", "tokens_per_s", "peak_rss_mb", "processor_s", "ref_cold_ttft_s",
                "ref_ttft_s", "ref_tokens_per_s", "ref_peak_rss_mb", "ref_processor_s", "ttft_ratio", "ttft_speedup",
                "decode_speedup"):
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, key
    assert row["ttft_ratio"] == pytest.approx(row["ttft_s"] / row["ref_ttft_s"], rel=1e-2)


def test_cli_benchmark_runs_both_scripts_in_fresh_processes(work, real_run):
    out = work / "cli.json"
    r = run_script("cli_benchmark.py", "--preset", "tiny", "--runs", "1", "--max-new-tokens", "4", "--work-dir",
                   str(work / "w"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert r.stdout.startswith(f"Machine: {result['machine']['cpu']},")
    ours, theirs = result["runs"]
    assert (ours["side"], theirs["side"]) == ("ours", "transformers")
    assert ours["ids_equal"] and ours["prompt_tokens_equal"] and ours["new_ids"] == theirs["new_ids"]
    for row in (ours, theirs):
        assert row["exit_code"] == 0 and row["wall_s"] > 0 and row["peak_rss_mb"] > 50
        assert all(row[k] is not None for k in ("import_seconds", "load_seconds", "time_to_first_token"))
    assert set(result["ours_over_transformers"]) == {"run_1"}
    cache = (work / "w" / "compile-cache").resolve()  # generate.py's cache, kept inside the work dir
    assert result["compile_cache"] == str(cache) and any(p.is_file() for p in cache.rglob("*"))


def test_smolvlm_processor_settings_split_the_photo_into_13_tiles(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench.images import write_test_images
    from mindone_idefics3.demo import build_tokenizer, write_processor_files
    from mindone_idefics3.processing import Idefics3Processor

    # what demo.write_random_model writes for the smolvlm-256m preset
    write_processor_files(tmp_path, build_tokenizer(), tile=512, longest_edge=2048, image_seq_len=64,
                          max_length=8192, padding_side="left", model_input_names=["input_ids", "attention_mask"])
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"longest_edge": 2048} and config["max_image_size"] == {"longest_edge": 512}
    assert config["resample"] == 1 and config["do_image_splitting"] and config["image_mean"] == [0.5] * 3
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    assert tokenizer_config["padding_side"] == "left"
    photo = write_test_images(tmp_path / "images")["photo"]
    processor = Idefics3Processor.from_pretrained(tmp_path)
    out = processor(text="<image>Describe.", images=[photo])
    assert out["pixel_values"].shape == (1, 13, 3, 512, 512)
    assert (out["input_ids"] == processor.image_token_id).sum() == 13 * 64


def test_the_long_text_has_about_the_tokens_asked_for():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_inputs import long_text

    from mindone_idefics3.demo import build_tokenizer

    tokenizer = build_tokenizer()
    n = len(tokenizer.encode(long_text(tokenizer, 2000), add_special_tokens=False).ids)
    assert 1990 <= n <= 2000


def test_help_tells_what_is_measured():
    for name, words in (("real_inputs.py", ("--cases", "two-images-batch", "TTFT cold", "peak RSS", "ids equal",
                                            "--reference-attn")),
                        ("cli_benchmark.py", ("--runs", "--compile-cache", "wall time", "peak RSS"))):
        r = run_script(name, "--help", timeout=60)
        assert r.returncode == 0
        for word in words:
            assert word in r.stdout, (name, word)


def test_a_long_text_beyond_the_context_is_refused(tmp_path):
    r = run_script("real_inputs.py", "--preset", "tiny", "--cases", "long-text", "--long-text-tokens", "4000",
                   "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "x.json"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: --long-text-tokens 4000" in r.stderr and not (tmp_path / "x.json").exists()
