"""idefics3-eval end to end: files in, the printed report and the JSON out, errors and missing rows counted."""
import json
import subprocess
import sys

import pytest

from mindone_idefics3.eval.cli import main
from mindone_idefics3.eval.report import bootstrap_ci95


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    predictions = write_jsonl(tmp_path / "out.jsonl", [
        {"id": 1, "answer": "Paris", "prompt_tokens": 9, "completion_tokens": 2, "finish_reason": "stop"},
        {"id": 2, "answer": "Lyon"},
        {"id": "3", "error": "image file not found: x.png"},
        {"id": 99, "answer": "extra"},
    ])
    references = write_jsonl(tmp_path / "refs.jsonl", [
        {"id": 1, "answers": ["paris"], "category": "cities"},
        {"id": 2, "answers": ["Lyons"], "category": "cities"},  # ANLS 1 - 1/5 = 0.8
        {"id": "3", "answers": ["x"], "category": "other"},
        {"id": 4, "answers": ["y"]},  # no prediction
    ])
    return predictions, references


def test_score_json_and_table(files, tmp_path, capsys):
    predictions, references = files
    out = tmp_path / "score.json"
    assert main(["--predictions", str(predictions), "--references", str(references), "--metric", "anls",
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "anls" and result["n"] == 4
    assert result["score"] == pytest.approx(100 * (1 + 0.8) / 4)
    assert result["by_category"] == {"cities": {"score": 90.0, "n": 2}, "other": {"score": 0.0, "n": 1}}
    assert result["errors"] == 1 and result["missing"] == 1 and result["ignored_predictions"] == 1
    low, high = result["ci95"]
    assert 0 <= low <= result["score"] <= high <= 100 and low < high
    printed = capsys.readouterr().out
    assert "anls: 45.00  (n = 4, 95% bootstrap CI" in printed
    assert "1 predictions are error records: counted as wrong" in printed
    assert "1 references have no prediction: counted as wrong" in printed
    assert "| cities   |      2 |  90.00 |" in printed


def test_bootstrap_interval_is_seeded_and_narrows_with_more_questions():
    few, many = [1.0, 0.0] * 10, [1.0, 0.0] * 1000
    assert bootstrap_ci95(few) == bootstrap_ci95(few)
    (lo_few, hi_few), (lo_many, hi_many) = bootstrap_ci95(few), bootstrap_ci95(many)
    assert lo_few < lo_many < 50 < hi_many < hi_few
    assert bootstrap_ci95([1.0] * 5) == (100.0, 100.0)


def test_mc_counts_answers_that_name_no_option(tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "answer": "The answer is (B)."},
                                                     {"id": "b", "answer": "I don't know"}])
    references = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "answers": ["B"], "choices": ["x", "y"]},
                                                    {"id": "b", "answers": ["A"], "choices": ["x", "y"]}])
    assert main(["--predictions", str(predictions), "--references", str(references), "--metric", "mc"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mc: 50.00") and "1 answers name no option: counted as wrong" in printed


@pytest.mark.parametrize("case, message", [
    ("bad_json", "refs.jsonl:2: not valid JSON"),
    ("duplicate", "refs.jsonl:2: duplicate id 1"),
    ("no_answers", "references line 1: \"answers\" must be a non-empty list of strings"),
    ("mc_without_choices", "the mc metric needs \"choices\""),
    ("missing_file", "predictions file not found"),
])
def test_mistakes_are_one_line_exit_2(case, message, files, tmp_path, capsys):
    predictions, references = files
    metric = "anls"
    if case == "bad_json":
        references.write_text('{"id": 1, "answers": ["a"]}\n{"id": 2, "answers": \n')
    elif case == "duplicate":
        write_jsonl(references, [{"id": 1, "answers": ["a"]}, {"id": 1, "answers": ["b"]}])
    elif case == "no_answers":
        write_jsonl(references, [{"id": 1, "answer": "a"}])
    elif case == "mc_without_choices":
        metric = "mc"
    elif case == "missing_file":
        predictions = tmp_path / "nope.jsonl"
    assert main(["--predictions", str(predictions), "--references", str(references), "--metric", metric]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_module_entry_point_and_help():
    r = subprocess.run([sys.executable, "-m", "mindone_idefics3.eval", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for text in ("--predictions", "--references", "--metric", "--output-json", "anls", "vqa", "relaxed", "mc",
                 "exact", "leave-one-out", "5% relative error"):
        assert text in r.stdout
