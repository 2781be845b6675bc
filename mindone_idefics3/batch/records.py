"""Output records on disk: appended and fsync'ed per batch, read back tolerating a torn last line, and the final
file written atomically.

A process killed mid-write leaves at most one incomplete line at the end of its file: reading drops it (the row
is simply run again) and `RecordWriter` cuts it off before appending, so the next record starts on a fresh line.
Any other line that is not a record is an error naming the file and line: that file was not written by us.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List

from ..errors import Idefics3Error
from ..files import atomic_path

Record = Dict[str, Any]


def read_records(path: Path) -> List[Record]:
    """The complete records of a JSONL file, in file order ([] when it does not exist)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # a torn last line (no newline yet) is dropped
    records = []
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise Idefics3Error(f"{path}:{number}: not a JSON record ({e.msg}); this file was not written by "
                                "idefics3-batch: move it away or pass another --output") from None
        if not isinstance(record, dict) or "id" not in record:
            raise Idefics3Error(f"{path}:{number}: a record must be a JSON object with an \"id\"; this file was "
                                "not written by idefics3-batch: move it away or pass another --output")
        records.append(record)
    return records


class RecordWriter:
    """Appends records to one file; `write` returns once they are on disk (flush + fsync)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab")
        _drop_torn_tail(self._file)

    def write(self, records: Iterable[Record]) -> None:
        lines = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        if lines:
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _drop_torn_tail(f) -> None:
    """Truncate an append-mode file after its last newline (a record torn by a kill)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(f.name, "rb") as reader:
        data = reader.read()
    keep = data.rfind(b"\n") + 1
    if keep < size:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, records: Iterable[Record]) -> None:
    """Write `path` so that it is either absent/old or complete (files.atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
