"""benchmarks/prepare_dataset.py on small local datasets in each benchmark's schema (built here with the datasets
library, no network), and the README's three commands (prepare, batch, eval) end to end on the tiny model."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets", reason="the eval extra (datasets) is not installed")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import prepare_dataset  # noqa: E402  (a script in benchmarks/, not a package module)


def picture(kind: str, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


ROWS = {
    "docvqa": dict(questionId=[11, 12], question=["What is the date?", "Who signed?"],
                   answers=[["May 5", "5 May"], ["J. Doe"]], question_types=[["form"], []]),
    "textvqa": dict(question_id=[1, 2], question=["What brand?", "What number?"],
                    answers=[["nokia"] * 10, ["7"] * 9 + ["seven"]]),
    "chartqa": dict(question=["Max value?", "Which is red?"], answer=["42", "Spain"],
                    type=["human_test", "augmented_test"]),
    "mmstar": dict(index=[5, 6], answer=["B", "A"], category=["math", "logic"],
                   question=["Which?\nOptions: A: a cat, B: a dog, C: 3, 5, D: none",
                             "Sum?\nOptions: A: 1, B: 2"]),
}


def local_dataset(tmp_path, name: str, as_dict: bool) -> Path:
    columns = dict(ROWS[name], image=[{"bytes": picture("JPEG", 0), "path": None},
                                      {"bytes": picture("PNG", 1), "path": None}])
    data = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    path = tmp_path / f"{name}-source"
    (datasets.DatasetDict({prepare_dataset.BENCHMARKS[name].split: data}) if as_dict else data).save_to_disk(path)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", list(ROWS))
def test_each_benchmark_becomes_input_references_and_images(name, tmp_path):
    source = local_dataset(tmp_path, name, as_dict=name in ("docvqa", "mmstar"))
    out = tmp_path / "out"
    assert prepare_dataset.main(["--dataset", name, "--source", str(source), "--out", str(out)]) == 0
    inputs, refs = read(out / "input.jsonl"), read(out / "references.jsonl")
    assert [r["id"] for r in inputs] == [r["id"] for r in refs] and len(inputs) == 2
    assert inputs[0]["images"] == ["images/000000.jpg"] and inputs[1]["images"] == ["images/000001.png"]
    assert (out / "images/000000.jpg").read_bytes() == picture("JPEG", 0)  # the original bytes, not re-encoded
    assert all("Answer" in r["prompt"] for r in inputs)
    expected = {
        "docvqa": [{"id": 11, "answers": ["May 5", "5 May"], "category": "form"}, {"id": 12, "answers": ["J. Doe"]}],
        "textvqa": [{"id": 1, "answers": ["nokia"] * 10}, {"id": 2, "answers": ["7"] * 9 + ["seven"]}],
        "chartqa": [{"id": 0, "answers": ["42"], "category": "human_test"},
                    {"id": 1, "answers": ["Spain"], "category": "augmented_test"}],
        "mmstar": [{"id": 5, "answers": ["B"], "category": "math",
                    "choices": {"A": "a cat", "B": "a dog", "C": "3, 5", "D": "none"}},
                   {"id": 6, "answers": ["A"], "category": "logic", "choices": {"A": "1", "B": "2"}}],
    }[name]
    assert refs == expected


def test_a_wrong_schema_names_the_missing_column(tmp_path, capsys):
    source = local_dataset(tmp_path, "chartqa", as_dict=False)
    with pytest.raises(SystemExit, match=r"row 0 has no column 'questionId'"):
        prepare_dataset.main(["--dataset", "docvqa", "--source", str(source), "--out", str(tmp_path / "o")])


def test_the_readme_commands_reproduce_a_score(tmp_path, capsys):
    """prepare → idefics3-batch → idefics3-eval, on the tiny random model (its score is meaningless, the chain is
    what is checked)."""
    from mindone_idefics3.batch.cli import main as batch
    from mindone_idefics3.demo import write_demo_checkpoint
    from mindone_idefics3.eval.cli import main as evaluate

    model = write_demo_checkpoint(tmp_path / "model")
    data = tmp_path / "docvqa"
    assert prepare_dataset.main(["--dataset", "docvqa", "--source", str(local_dataset(tmp_path, "docvqa", True)),
                                 "--out", str(data)]) == 0
    assert batch(["--model", str(model), "--input", str(data / "input.jsonl"), "--output", str(data / "out.jsonl"),
                  "--max-new-tokens", "4", "--no-progress"]) == 0
    assert evaluate(["--predictions", str(data / "out.jsonl"), "--references", str(data / "references.jsonl"),
                     "--metric", "anls", "--output-json", str(data / "score.json")]) == 0
    score = json.loads((data / "score.json").read_text())
    assert score["n"] == 2 and score["errors"] == 0 and score["missing"] == 0 and 0 <= score["score"] <= 100
