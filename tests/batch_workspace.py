"""A folder for idefics3-batch tests: a tiny random checkpoint with its tokenizer, a few pictures, and an input file
of mixed rows (one image, two images, text only, a conversation, and rows that cannot run)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MODEL_SEED = 2  # with this seed the tiny model's answers differ from row to row (checked by the tests)

GOOD_ROWS = [
    {"id": "one-image", "prompt": "What is it?", "images": ["img.png"]},
    {"id": "two-images", "prompt": "Compare the two images.", "images": ["img.png", "wide.png"]},
    {"id": 3, "prompt": "The quick brown fox jumps over the lazy dog."},
    {"id": "conversation", "images": ["tall.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do we see in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A city, a statue and a bridge."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many objects are there?"}]}]},
    {"id": "long-question", "prompt": "Describe the image. " * 12, "images": ["wide.png"]},
    {"id": "text-2", "prompt": "A picture is worth a thousand words."},
]
BAD_ROWS = {
    "missing-image": ({"prompt": "What?", "images": ["nope.png"]}, "image file not found"),
    "tag-mismatch": ({"images": ["img.png"], "messages": [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]}, "2 <image> tags but 1 images"),
    "over-context": ({"prompt": "words " * 2100}, "beyond the model's context of 2048 tokens"),
}


def write_picture(path: Path, width: int, height: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def make_workspace(root: Path) -> Path:
    from mindone_idefics3.demo import write_demo_checkpoint

    write_demo_checkpoint(root / "model", seed=MODEL_SEED)
    write_picture(root / "img.png", 200, 140, 0)
    write_picture(root / "wide.png", 300, 100, 1)
    write_picture(root / "tall.png", 80, 160, 2)
    rows = list(GOOD_ROWS[:3]) + [{"id": key, **row} for key, (row, _) in BAD_ROWS.items()] + list(GOOD_ROWS[3:])
    write_jsonl(root / "in.jsonl", rows)
    write_jsonl(root / "good.jsonl", GOOD_ROWS)
    return root


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]
