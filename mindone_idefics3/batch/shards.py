"""Data parallel runs under msrun, and the one output file they make.

msrun starts N workers, each with its rank (distributed.World); run alone, a process is rank 0 of 1. Rank r runs
the input rows with index % N == r and appends their records to its own part file, `<output>.parts/rank-<r>.jsonl`.
No communication op is used (MindSpore's `communication.init()` alone is slow on CPU workers, and a collective
would time out while ranks with more work are still running): rank 0, once its own rows are done, waits until
the part files hold a record for every input row — that completeness is the barrier — then writes `<output>` in
input order (atomically) and removes the parts. A row's record is final once written, so a rerun (with any N)
reads `<output>` and every part file and runs only the rows without one.

msrun's scheduler process (distributed.is_msrun_scheduler) serves `communication.init()`, which we do not call,
so it has nothing to do and exits at once; otherwise it would run rank 0's rows a second time.

msrun does not stop the other workers when one dies (checked with MindSpore 2.10), so rank 0 must not wait for a
dead rank forever: each rank with rows to run leaves `rank-<r>.pid` (pid, parent pid, host) in the parts folder,
and rank 0 gives up when a rank of the same launch (same host and parent, i.e. the same msrun) is gone while its
rows still lack records. A rank on another host cannot be watched this way: rank 0 then simply waits.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from ..distributed import World
from ..process import is_alive
from .records import Record, read_records, write_atomically
from .rows import InputRow, id_key

WAIT_REPORT_SECONDS = 60.0


@dataclass(frozen=True)
class OutputFiles:
    final: Path

    @property
    def parts_dir(self) -> Path:
        return self.final.with_name(self.final.name + ".parts")

    def part(self, rank: int) -> Path:
        return self.parts_dir / f"rank-{rank}.jsonl"

    def collect(self) -> Dict[str, Record]:
        """Every record written so far (the final file, then the part files), by id key."""
        records = {}
        parts = sorted(self.parts_dir.glob("rank-*.jsonl")) if self.parts_dir.is_dir() else []
        for path in [self.final, *parts]:
            for record in read_records(path):
                records[id_key(record["id"])] = record
        return records


class RankDied(Exception):
    """Another rank ended before writing its records: the run cannot finish, a rerun can."""


def announce(files: OutputFiles, world: World) -> None:
    """Leave this rank's pid where rank 0 can check that it is still running (see the module docstring)."""
    if world.size > 1:
        files.parts_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "ppid": os.getppid(), "host": socket.gethostname()}
        (files.parts_dir / f"rank-{world.rank}.pid").write_text(json.dumps(me))


def dead_ranks(files: OutputFiles, ranks) -> List[int]:
    """The ranks among `ranks` launched with this process (same host and parent) whose process is gone."""
    dead = []
    for rank in ranks:
        try:
            info = json.loads((files.parts_dir / f"rank-{rank}.pid").read_text())
        except (OSError, ValueError):
            continue  # not started yet (or not on this host's files)
        same_launch = info.get("host") == socket.gethostname() and info.get("ppid") == os.getppid()
        if same_launch and not is_alive(int(info["pid"])):
            dead.append(rank)
    return dead


def finished(files: OutputFiles, rows: Sequence[InputRow]) -> bool:
    """The final file holds exactly the input's rows, in order, and no part file waits to be merged."""
    if files.parts_dir.exists() or not files.final.exists():
        return False
    return [id_key(r["id"]) for r in read_records(files.final)] == [row.key for row in rows]


def missing(rows: Sequence[InputRow], records: Dict[str, Record]) -> List[InputRow]:
    return [row for row in rows if row.key not in records]


def wait_for_all_rows(files: OutputFiles, rows: Sequence[InputRow], world: World,
                      poll_seconds: float = 2.0) -> Dict[str, Record]:
    """Rank 0: the records of every row, once the other ranks have written them."""
    last_report = time.monotonic()
    while True:
        records = files.collect()
        left = missing(rows, records)
        if not left:
            return records
        waiting_for = sorted({row.index % world.size for row in left} - {world.rank})
        dead = dead_ranks(files, waiting_for)
        if dead:
            raise RankDied(f"rank(s) {dead} ended before writing their records (see their msrun worker logs); "
                           f"{len(left)} rows have no record yet: rerun the same command to finish them")
        if time.monotonic() - last_report >= WAIT_REPORT_SECONDS:
            print(f"waiting for the other ranks: {len(left)} rows left (ranks {waiting_for})", file=sys.stderr,
                  flush=True)
            last_report = time.monotonic()
        time.sleep(poll_seconds)


def merge(files: OutputFiles, rows: Sequence[InputRow], records: Dict[str, Record]) -> None:
    """Write the final file (one record per input row, in input order) atomically, then drop the part files."""
    write_atomically(files.final, (records[row.key] for row in rows))
    shutil.rmtree(files.parts_dir, ignore_errors=True)
