"""Reading the two inputs of `idefics3-eval`: predictions (idefics3-batch's output) and references, by id."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..errors import Idefics3Error


def read_by_id(path: Path, what: str) -> Dict[str, Dict[str, Any]]:
    """{json.dumps(id): row} of a JSONL file; a malformed line or a repeated id is an error naming the line."""
    if not path.is_file():
        raise Idefics3Error(f"{what} file not found: {path}")
    rows: Dict[str, Dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise Idefics3Error(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise Idefics3Error(f"{path}:{number}: each {what} row must be a JSON object with an \"id\"")
            key = json.dumps(row["id"])
            if key in rows:
                raise Idefics3Error(f"{path}:{number}: duplicate id {key}")
            rows[key] = dict(row, _line=number)
    return rows
