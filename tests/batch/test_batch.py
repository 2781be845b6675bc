"""idefics3-batch on a tiny checkpoint: each good row's answer equals generate() on that row alone, bad rows get
error records, a run resumes from its part file (torn last line included), a finished output is left alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch_workspace import BAD_ROWS, GOOD_ROWS, make_workspace, read_jsonl, write_jsonl
from mindone_idefics3.batch.cli import main

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 12


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("batch"))


def answer_alone(model, processor, row, folder):
    """The row through the public API, alone: chat template, processor, model.generate, batch_decode."""
    from mindone_idefics3.processing import load_image
    from mindone_idefics3.processing.chat_template import question_turns

    images = [load_image(folder / name) for name in row.get("images", [])]
    messages = row.get("messages") or question_turns(row["prompt"], len(images))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, return_tensors="np")
    ids = model.generate(**inputs, max_new_tokens=MAX_NEW, use_jit=False)  # PyNative: no graphs to compile
    new = ids[0, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new[None], skip_special_tokens=True)[0].strip(), inputs["input_ids"].shape[1]


@pytest.fixture(scope="module")
def first_run(workspace):
    """One uninterrupted run of the mixed input: (exit code, output path)."""
    out = workspace / "run1" / "out.jsonl"
    code = main(["--model", str(workspace / "model"), "--input", str(workspace / "in.jsonl"), "--output", str(out),
                 "--batch-size", "3", "--max-new-tokens", str(MAX_NEW), "--no-progress"])
    return code, out


def test_every_good_row_answers_as_when_it_runs_alone(workspace, first_run, ms_cpu):
    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    code, out = first_run
    assert code == 0
    records = read_jsonl(out)
    inputs = read_jsonl(workspace / "in.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in inputs]  # one record per row, in input order
    model = Idefics3ForConditionalGeneration.from_pretrained(workspace / "model", progress=False)
    processor = Idefics3Processor.from_pretrained(workspace / "model")
    by_id = {json.dumps(r["id"]): r for r in records}
    answers = set()
    for row in GOOD_ROWS:
        record = by_id[json.dumps(row["id"])]
        answer, prompt_tokens = answer_alone(model, processor, row, workspace)
        assert record["answer"] == answer, row["id"]
        assert record["prompt_tokens"] == prompt_tokens
        assert record["finish_reason"] in ("stop", "length")
        assert record["completion_tokens"] == MAX_NEW or record["finish_reason"] == "stop"
        answers.add(answer)
    assert len(answers) >= 3, "test setup: the tiny model gives (almost) the same answer to every row"
    assert len({r["prompt_tokens"] for r in records if "answer" in r}) == len(GOOD_ROWS)  # batches had padding
    for key, (_, message) in BAD_ROWS.items():
        assert set(by_id[json.dumps(key)]) == {"id", "error"} and message in by_id[json.dumps(key)]["error"]
    assert not out.with_name("out.jsonl.parts").exists()


def test_a_run_resumes_from_its_part_file_and_drops_a_torn_line(workspace, first_run, capsys):
    _, complete = first_run
    expected = complete.read_text()
    out = workspace / "run2" / "out.jsonl"
    part = out.with_name("out.jsonl.parts") / "rank-0.jsonl"
    part.parent.mkdir(parents=True)
    done = expected.splitlines(keepends=True)
    part.write_text(done[4] + done[1] + done[5][:17])  # two records, then a line cut by a kill
    assert main(["--model", str(workspace / "model"), "--input", str(workspace / "in.jsonl"), "--output", str(out),
                 "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--no-progress"]) == 0
    assert out.read_text() == expected  # the same records as the uninterrupted run, in input order
    err = capsys.readouterr().err
    assert f"done: {len(done)} rows, {len(BAD_ROWS)} errors" in err and f"this run: {len(done) - 2} rows" in err
    assert not part.parent.exists()


def test_a_finished_output_is_left_alone(workspace, first_run, capsys):
    _, out = first_run
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    # a model that does not exist: the rerun must not even load one
    assert main(["--model", str(workspace / "no-such-model"), "--input", str(workspace / "in.jsonl"),
                 "--output", str(out)]) == 0
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    assert "nothing to do: all 9 rows already have a record" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("bad_json", "in.jsonl:2: not valid JSON"),
    ("duplicate", "in.jsonl:3: duplicate id \"x\" (first on line 1)"),
    ("no_id", "in.jsonl:1: \"id\" must be a string or an integer, got null"),
    ("prompt_and_messages", "in.jsonl:1: a row needs exactly one of \"messages\""),
    ("images_not_a_list", "in.jsonl:1: \"images\" must be a list"),
    ("missing_input", "input file not found"),
    ("output_is_input", "--output must not be the --input file"),
    ("batch_size", "--batch-size must be at least 1"),
])
def test_input_mistakes_stop_before_the_model_loads(case, message, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    good = {"id": "x", "prompt": "hi"}
    rows = {"bad_json": None, "duplicate": [good, {"id": "y", "prompt": "a"}, good], "no_id": [{"prompt": "a"}],
            "prompt_and_messages": [{"id": 1, "prompt": "a", "messages": []}],
            "images_not_a_list": [{"id": 1, "prompt": "a", "images": "a.png"}]}.get(case, [good])
    if rows is None:
        source.write_text(json.dumps(good) + "\n{\"id\": 2, \"prompt\": \n")
    else:
        write_jsonl(source, rows)
    args = {"missing_input": ["--input", str(tmp_path / "nope.jsonl")],
            "output_is_input": ["--input", str(source), "--output", str(source)]}.get(case, ["--input", str(source)])
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.jsonl")]
    if case == "batch_size":
        args += ["--batch-size", "0"]
    assert main(["--model", str(tmp_path / "no-model"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_required_flags_and_help():
    env = {**os.environ, "GLOG_v": "3"}
    r = subprocess.run([sys.executable, "-m", "mindone_idefics3.batch", "--model", "m", "--output", "o.jsonl"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 2 and "the following arguments are required: --input" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "batch.py"), "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0
    for flag in ("--model", "--input", "--output", "--batch-size", "--max-new-tokens", "--temperature", "--top-p",
                 "--top-k", "--seed", "--longest-edge", "--no-image-splitting", "--dtype", "--device",
                 "--sort-window", "--no-progress", "msrun", "finish_reason", "error"):
        assert flag in r.stdout


def test_rows_sharing_a_photo_encode_it_once_and_answer_as_without_the_cache(workspace, tmp_path, capsys, ms_cpu):
    """2 photos × 3 questions: the images go through the vision tower twice, not six times (the summary line says
    so), and every answer is the one the run without the image cache gives."""
    questions = ("What is it?", "Describe the image.", "How many objects are there?")
    rows = [{"id": f"{name}-{q}", "prompt": question, "images": [str(workspace / name)]}
            for name in ("img.png", "wide.png") for q, question in enumerate(questions)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    runs = {}
    for mb in ("512", "0"):
        out = tmp_path / f"out-{mb}.jsonl"
        assert main(["--model", str(workspace / "model"), "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(out), "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--no-progress",
                     "--image-cache-mb", mb]) == 0
        runs[mb] = (read_jsonl(out), capsys.readouterr().err)
    assert "2 images encoded, 4 taken from the image cache" in runs["512"][1]
    assert "6 images encoded, 0 taken from the image cache" in runs["0"][1]
    assert runs["512"][0] == runs["0"][0]
