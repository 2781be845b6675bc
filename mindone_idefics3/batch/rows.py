"""The input JSONL of `idefics3-batch`: one request per line, checked whole before any model is loaded.

A row is `{"id": ..., "messages": [...], "images": [...]}` (a conversation in the chat-template format, one
`{"type": "image"}` item per image) or `{"id": ..., "prompt": "...", "images": [...]}` (one user turn: the images,
then the prompt). `images` is optional: paths (relative ones are read from the input file's folder), http(s) URLs
or `data:` URIs; so is `videos` (the same kinds of sources; SmolVLM2 checkpoints; one `{"type": "video"}` item
each, or after the images in a "prompt" row). Ids are strings or integers, unique in the file. A line that is not such a row stops the run with
its line number: a malformed file is a mistake to fix, not a row to skip. Whether the images open, the tags match
the images and the prompt fits the context is decided per row later (see prepare.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

from ..errors import Idefics3Error
from ..processing.chat_template import question_turns

RowId = Union[str, int]


@dataclass
class InputRow:
    index: int  # position among the rows (blank lines not counted): rank r of N runs the rows with index % N == r
    line: int  # 1-based line number in the input file
    id: RowId
    messages: List[Dict[str, Any]]
    images: List[str] = field(default_factory=list)  # as the image loader takes them (relative paths resolved)
    videos: List[str] = field(default_factory=list)  # as the video loader takes them (relative paths resolved)

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(row_id: RowId) -> str:
    """A row id as a dict key: 1 and "1" are different ids."""
    return json.dumps(row_id)


def read_rows(path: Path) -> List[InputRow]:
    """Every row of the input file, in order (Idefics3Error naming the line for the first malformed one)."""
    if not path.is_file():
        raise Idefics3Error(f"input file not found: {path}" if not path.exists() else f"{path} is not a file")
    rows: List[InputRow] = []
    first_line: Dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            row = _parse(text, number, path, len(rows))
            if row.key in first_line:
                raise Idefics3Error(f"{path}:{number}: duplicate id {row.key} (first on line {first_line[row.key]});"
                                    " ids must be unique, the output is keyed by them")
            first_line[row.key] = number
            rows.append(row)
    return rows


def _parse(text: str, number: int, path: Path, index: int) -> InputRow:
    where = f"{path}:{number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Idefics3Error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise Idefics3Error(f"{where}: a row must be a JSON object, got {type(data).__name__}")
    row_id = data.get("id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise Idefics3Error(f"{where}: \"id\" must be a string or an integer, got {json.dumps(row_id)}")
    images = data.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise Idefics3Error(f"{where}: \"images\" must be a list of paths, URLs or data: URIs (strings)")
    videos = data.get("videos", [])
    if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
        raise Idefics3Error(f"{where}: \"videos\" must be a list of paths, URLs or data: URIs (strings)")
    has_messages, has_prompt = "messages" in data, "prompt" in data
    if has_messages == has_prompt:
        raise Idefics3Error(f"{where}: a row needs exactly one of \"messages\" (a conversation) or \"prompt\" "
                            "(a question about its images)")
    if has_prompt:
        if not isinstance(data["prompt"], str):
            raise Idefics3Error(f"{where}: \"prompt\" must be a string")
        messages = question_turns(data["prompt"], len(images), num_videos=len(videos))
    else:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise Idefics3Error(f"{where}: \"messages\" must be a non-empty list of messages like "
                                "{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", "
                                "\"text\": \"...\"}]}")
    return InputRow(index, number, row_id, messages, [_resolve(src, path.parent) for src in images],
                    [_resolve(src, path.parent) for src in videos])


def _resolve(source: str, base: Path) -> str:
    if source.startswith(("http://", "https://", "data:")):
        return source
    candidate = Path(source).expanduser()
    return str(candidate if candidate.is_absolute() else base / candidate)


def row_error(row: InputRow, message: str) -> Dict[str, Any]:
    """The output record of a row that could not be run."""
    return {"id": row.id, "error": message}

