"""A benchmark from the Hugging Face hub (or a local copy) → idefics3-batch's input, idefics3-eval's references and
the images on disk.

    python benchmarks/prepare_dataset.py --dataset docvqa --out data/docvqa
    idefics3-batch --model HuggingFaceM4/Idefics3-8B-Llama3 --input data/docvqa/input.jsonl --output data/docvqa/out.jsonl
    idefics3-eval --predictions data/docvqa/out.jsonl --references data/docvqa/references.jsonl --metric anls

Writes OUT/input.jsonl ({"id", "prompt", "images"}), OUT/references.jsonl ({"id", "answers", "category",
"choices"}) and OUT/images/ (each image's original bytes: no re-encoding, so the pixels are the dataset's). Needs
the `eval` extra (`pip install -e .[eval]`: the datasets library). --source takes a hub dataset id or a directory
written by `datasets`' save_to_disk (a Dataset or a DatasetDict holding --split).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Benchmark:
    hub_id: str
    config: Optional[str]
    split: str
    metric: str
    convert: Callable[[int, Dict[str, Any]], Dict[str, Any]]  # (row number, row) → id, question, answers, ...


def docvqa(n: int, row: dict) -> dict:
    types = row.get("question_types") or []
    return dict(id=row["questionId"], prompt=f"{row['question']}\n{SHORT_ANSWER}", answers=list(row["answers"]),
                category=types[0] if types else None)


def textvqa(n: int, row: dict) -> dict:
    return dict(id=row["question_id"], prompt=f"{row['question']}\n{SHORT_ANSWER}", answers=list(row["answers"]))


def chartqa(n: int, row: dict) -> dict:
    return dict(id=n, prompt=f"{row['question']}\n{SHORT_ANSWER}", answers=[str(row["answer"])],
                category=row.get("type"))


OPTIONS = re.compile(r"(?:^|,\s*|\n)([A-Z]):\s*")


def mmstar(n: int, row: dict) -> dict:
    """MMStar's question text ends with "Options: A: ..., B: ..., ..."; the options become the choices."""
    question = row["question"]
    at = question.rfind("Options:")
    if at < 0:
        raise ValueError(f"MMStar row {row['index']}: no 'Options:' in the question")
    parts = OPTIONS.split(question[at + len("Options:"):].strip())
    choices = {letter: text.strip() for letter, text in zip(parts[1::2], parts[2::2])}
    return dict(id=row["index"], prompt=f"{question}\n{LETTER_ANSWER}", answers=[row["answer"].strip()],
                choices=choices, category=row.get("category"))


BENCHMARKS = {
    "docvqa": Benchmark("lmms-lab/DocVQA", "DocVQA", "validation", "anls", docvqa),
    "textvqa": Benchmark("lmms-lab/textvqa", None, "validation", "vqa", textvqa),
    "chartqa": Benchmark("lmms-lab/ChartQA", None, "test", "relaxed", chartqa),
    "mmstar": Benchmark("Lin-Chen/MMStar", None, "val", "mc", mmstar),
}


def load_rows(source: str, bench: Benchmark, split: str):
    """The split as a `datasets.Dataset`, its images as undecoded bytes."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("error: this script needs the datasets library: pip install -e .[eval]") from None
    if Path(source).is_dir():
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise SystemExit(f"error: {source} has splits {list(data)}, not {split!r}: pass --split")
            data = data[split]
    else:
        data = datasets.load_dataset(source, bench.config, split=split)
    if "image" not in data.column_names:
        raise SystemExit(f"error: {source} has no 'image' column (columns: {data.column_names})")
    return data.cast_column("image", datasets.Image(decode=False))


def image_suffix(data: bytes) -> str:
    from PIL import Image

    kind = Image.open(io.BytesIO(data)).format or "bin"
    return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "GIF": ".gif"}.get(kind, "." + kind.lower())


def prepare(bench: Benchmark, data, out: Path, limit: Optional[int]) -> int:
    """Write the three outputs; returns the number of rows."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    inputs: List[str] = []
    references: List[str] = []
    seen = set()
    for n, row in enumerate(data):
        if limit is not None and n >= limit:
            break
        try:
            item = bench.convert(n, row)
        except KeyError as e:
            raise SystemExit(f"error: row {n} has no column {e} (columns: {sorted(row)}); is this the right "
                             "--dataset?") from None
        if item["id"] in seen:
            raise SystemExit(f"error: the dataset repeats id {item['id']!r} (row {n})")
        seen.add(item["id"])
        raw = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
        name = f"images/{n:06d}{image_suffix(raw)}"
        (out / name).write_bytes(raw)
        inputs.append(json.dumps({"id": item["id"], "prompt": item["prompt"], "images": [name]}, ensure_ascii=False))
        reference = {"id": item["id"], "answers": item["answers"]}
        reference.update({k: item[k] for k in ("choices", "category") if item.get(k) is not None})
        references.append(json.dumps(reference, ensure_ascii=False))
    (out / "input.jsonl").write_text("".join(line + "\n" for line in inputs), encoding="utf-8")
    (out / "references.jsonl").write_text("".join(line + "\n" for line in references), encoding="utf-8")
    return len(inputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=list(BENCHMARKS))
    p.add_argument("--out", required=True, help="folder for input.jsonl, references.jsonl and images/")
    p.add_argument("--source", default=None,
                   help="hub dataset id or a save_to_disk directory (default: " +
                        ", ".join(f"{k}: {b.hub_id}" for k, b in BENCHMARKS.items()) + ")")
    p.add_argument("--split", default=None,
                   help="default: " + ", ".join(f"{k}: {b.split}" for k, b in BENCHMARKS.items()))
    p.add_argument("--limit", type=int, default=None, help="only the first N rows (a quick check)")
    args = p.parse_args(argv)
    bench = BENCHMARKS[args.dataset]
    data = load_rows(args.source or bench.hub_id, bench, args.split or bench.split)
    out = Path(args.out)
    count = prepare(bench, data, out, args.limit)
    print(f"{count} rows: {out / 'input.jsonl'}, {out / 'references.jsonl'}, {out / 'images'}/\n"
          f"score with: idefics3-eval --predictions OUT.jsonl --references {out / 'references.jsonl'} "
          f"--metric {bench.metric}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
