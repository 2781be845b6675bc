"""benchmarks/chat_benchmark.py and batch_benchmark.py --shared-images on the tiny preset (subprocesses): --help
says what they measure; a tiny run prints the table (the machine first) and writes the JSON with the done-criteria
figures: the conversation's later turns reuse the cache and encode only new images, the shared photos are encoded
once each, and every answer equals transformers'."""
import importlib.util
import json
from pathlib import Path

import pytest

from script_runs import run_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_help_tells_what_is_measured():
    for name, args, words in (
            ("chat_benchmark.py", [], ("--turns", "--max-new-tokens", "--second-image", "TTFT", "reused",
                                       "tiles", "decode tok/s", "answer = ref", "peak RSS", "warm-up",
                                       "the whole conversation")),
            ("batch_benchmark.py", [], ("--shared-images", "2 photos x 3 questions", "--image-cache-mb 0",
                                        "images encoded", "summary line", "spawn to exit", "peak RSS",
                                        "batch-shared-images-<preset>-cpu.json"))):
        r = run_script(name, "--help", *args, timeout=60)
        assert r.returncode == 0, r.stderr
        for word in words:
            assert word in r.stdout, (name, word)


def test_shared_images_writes_its_own_results_file():
    spec = importlib.util.spec_from_file_location("batch_benchmark", ROOT / "benchmarks" / "batch_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_args(["--shared-images"]).out.endswith("benchmarks/results/"
                                                               "batch-shared-images-smolvlm-256m-cpu.json")
    assert module.parse_args([]).out.endswith("benchmarks/results/batch-smolvlm-256m-cpu.json")


def test_a_tiny_chat_run_reuses_the_cache_and_answers_as_transformers(work):
    out = work / "chat.json"
    r = run_script("chat_benchmark.py", "--preset", "tiny", "--turns", "3", "--max-new-tokens", "4", "--work-dir",
                   str(work / "w"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert r.stdout.startswith(f"Machine: {result['machine']['cpu']},") and "load average" in r.stdout
    assert "| turn | images | prompt tokens | reused tokens | tiles encoded (ours / ref) | TTFT s ours |" in r.stdout
    assert "Done-criteria:" in r.stdout and "| 3b | + second |" in r.stdout
    turns, [third] = result["turns"], result["branch"]
    assert len(turns) == 3 and turns[0]["reused_tokens"] == 0 and turns[0]["vision_tiles"] == 13
    for turn in turns[1:]:  # the conversation so far comes from the cache; no image is encoded again
        assert turn["vision_tiles"] == 0 and turn["reused_tokens"] > 0 and turn["ref"]["vision_tiles"] == 13
    assert third["vision_tiles"] == result["ours"]["second_image_tiles"] == 13 and third["ref"]["vision_tiles"] == 26
    assert all(t["answer_equal"] and t["same_answer_as_warm_up"] for t in turns + [third])
    assert all(result["ours"]["branch_prefix_answers_equal"])
    c = result["criteria"]
    assert c["answers_equal"] == "4/4" and c["third_turn_encodes_only_the_new_image"]
    assert c["second_turn_ttft_ratio"] == pytest.approx(turns[1]["ttft_s"] / turns[0]["ttft_s"], rel=1e-2)
    for row in turns + [third]:
        assert row["ttft_s"] > 0 and row["cold_ttft_s"] > 0 and row["ref"]["ttft_s"] > 0
    assert result["ours"]["peak_rss_mb"] > 50 and result["transformers"]["peak_rss_mb"] > 50


def test_a_tiny_shared_images_run_encodes_each_photo_once(work):
    out = work / "shared.json"
    r = run_script("batch_benchmark.py", "--shared-images", "--preset", "tiny", "--new-tokens", "4", "--work-dir",
                   str(work / "w"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert r.stdout.startswith(f"Machine: {result['machine']['cpu']},")
    assert "2 images encoded, 4 taken from the image cache" in r.stdout
    assert "6 images encoded, 0 taken from the image cache" in r.stdout
    on, off, ref = result["results"]
    assert (on["image_cache_mb"], off["image_cache_mb"], ref["impl"]) == ("default", 0, "transformers")
    assert (on["images_encoded"], off["images_encoded"]) == (2, 6) and on["rows"] == off["rows"] == 6
    for run in (on, off, ref):
        assert run["wall_s"] > 0 and run["peak_rss_mb"] > 50 and run["errors"] == 0
    c = result["criteria"]
    assert c["encoded_twice_not_six_times"] and c["answers_identical_either_way"]
    assert c["answers_equal_to_transformers"] == "6/6" and off["answers_equal_to_reference"] == "6/6"
    assert c["wall_ratio"] == pytest.approx(on["wall_s"] / off["wall_s"], rel=1e-2)
    assert "OUT.jsonl" in on["summary_line"] and str(work) not in json.dumps(result["results"])
