"""Small fine-tuning datasets (JSONL + images) for the tests: written next to each other in a folder."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

ANSWERS = ["A red square.", "A blue circle.", "Two green lines.", "A yellow star.", "Nothing at all.",
           "A cat on a mat.", "The city at night.", "Three small dots."]


def png_bytes(rng, size=(40, 56)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(folder, n=8, seed=0, images=True, name="train.jsonl") -> Path:
    """n examples: image + question → answer; one with two images, one text only, one with a data: URL."""
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        answer = ANSWERS[i % len(ANSWERS)]
        if not images or i % 4 == 3:
            example = {"messages": [{"role": "user", "content": f"Say something {i}."},
                                    {"role": "assistant", "content": answer}]}
        else:
            count = 2 if i % 4 == 1 else 1
            sources = []
            for k in range(count):
                data = png_bytes(rng, (36 + 8 * k, 50))
                if i % 4 == 2:
                    sources.append("data:image/png;base64," + base64.b64encode(data).decode())
                else:
                    (folder / "img" / f"{i}_{k}.png").write_bytes(data)
                    sources.append(f"img/{i}_{k}.png")
            content = [{"type": "image"} for _ in sources] + [{"type": "text", "text": "What is this?"}]
            example = {"messages": [{"role": "user", "content": content},
                                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                       "images": sources}
        lines.append(json.dumps(example))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path
