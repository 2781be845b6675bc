"""`idefics3-batch` / `python -m mindone_idefics3.batch` / `batch.py` (for msrun): answer every row of a JSONL file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..cli_options import (add_image_cache_argument, add_model_arguments, add_sampling_arguments, check_max_new_tokens,
                           run_command)
from ..errors import Idefics3Error

DEFAULT_BATCH_SIZE = 8
WINDOW_BATCHES = 4  # default --sort-window: this many batches of rows are prepared and sorted together

EPILOG = """\
input rows (one JSON object per line):
  {"id": "q1", "prompt": "What is the title?", "images": ["scans/p1.png"]}
  {"id": 2, "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}],
   "images": ["https://example.com/a.jpg"]}
  Image paths are relative to the input file; http(s) URLs and data: URIs work too; ids are unique.
output rows (one per input row, in input order):
  {"id": "q1", "answer": "...", "prompt_tokens": 913, "completion_tokens": 7, "finish_reason": "stop"}
  {"id": 2, "error": "image file not found: ..."}      a row that cannot run; the run goes on
  finish_reason is "stop" (a stop token ended the answer; it is counted in completion_tokens) or "length"
  (--max-new-tokens reached). The answer has special tokens and surrounding whitespace removed.
resuming: records are appended to <output>.parts/rank-<r>.jsonl and fsync'ed after every batch; rerunning the
  same command runs only the rows without a record, then writes <output> (atomically) and removes the parts.
  A finished output rerun does nothing. To retry the rows that failed, delete their lines from <output> and rerun.
data parallel: msrun --worker_num N --local_worker_num N batch.py ... (rank r runs rows i with i % N == r; on
  the CPU each rank gets cores / N threads unless MINDONE_CPU_THREADS is set; rank 0 writes <output>).
greedy answers do not depend on the batch size or on which rows share a batch; sampled ones do.
exit codes: 0 every row has a record; 2 a mistake in the arguments or the input file (one line on stderr);
  1 (rank 0 under msrun) another rank died before writing its records; 130 interrupted. In every case the
  records written so far are kept and rerunning the same command finishes the rest."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idefics3-batch", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Answer every row of a JSONL file with an Idefics3 / SmolVLM checkpoint (MindSpore, Ascend or\n"
                    "CPU): batched by prompt length, resumable after a crash, data parallel under msrun. A progress\n"
                    "bar and a summary line (rows, errors, tokens/s) go to stderr.")
    add_model_arguments(p)
    p.add_argument("--input", required=True, metavar="IN.jsonl", help="the requests, one JSON object per line")
    p.add_argument("--output", required=True, metavar="OUT.jsonl",
                   help="the answers, one JSON object per input row in input order (written when all rows are done)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"rows generated together (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--sort-window", type=int, default=None, metavar="ROWS",
                   help=f"rows prepared ahead and sorted by prompt length before they are cut into batches "
                        f"(default {WINDOW_BATCHES} x --batch-size; each holds its image tensors in memory)")
    add_sampling_arguments(p, default_max_new_tokens=500)
    add_image_cache_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is still printed)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .shards import RankDied

    return run_command(run, args, errors={RankDied: 1},
                       interrupted="interrupted: the records written so far are kept; rerun the same command to finish")


def run(args: argparse.Namespace) -> int:
    from ..distributed import current_world, is_msrun_scheduler, share_cpu_threads
    from .progress import Progress
    from .rows import read_rows
    from .shards import OutputFiles, announce, finished, merge, missing, wait_for_all_rows

    if is_msrun_scheduler():
        return 0  # msrun's scheduler process: no rows for it (see shards.py)
    check_max_new_tokens(args)
    if args.batch_size < 1:
        raise Idefics3Error(f"--batch-size must be at least 1, got {args.batch_size}")
    args.sort_window = args.sort_window or WINDOW_BATCHES * args.batch_size
    if args.sort_window < args.batch_size:
        raise Idefics3Error(f"--sort-window ({args.sort_window}) must hold at least one batch ({args.batch_size})")
    source, files = Path(args.input), OutputFiles(Path(args.output))
    if files.final.is_dir():
        raise Idefics3Error(f"--output {files.final} is a directory; pass a file name like {files.final}/out.jsonl")
    if files.final.resolve() == source.resolve():
        raise Idefics3Error("--output must not be the --input file")
    world = current_world()
    share_cpu_threads(world)
    rows = read_rows(source)
    done = files.collect()
    mine = [row for row in missing(rows, done) if world.owns(row)]
    where = f" [rank {world.rank} of {world.size}]" if world.size > 1 else ""
    progress = Progress(len(mine), enabled=not args.no_progress, label=f"rank {world.rank}" if world.size > 1
                        else "rows")
    cache = None
    try:
        if mine:
            announce(files, world)
            cache = run_rows(mine, args, files.part(world.rank), progress)
    finally:
        progress.close()
    this_run = (f"this run: {progress.rows} rows, {progress.errors} errors, {progress.tokens} tokens in "
                f"{progress.seconds:.1f} s ({progress.rows / max(progress.seconds, 1e-9):.2f} rows/s, "
                f"{progress.tokens_per_second:.1f} tokens/s")
    if cache is not None and cache.hits + cache.misses:
        this_run += f", {cache.misses} images encoded, {cache.hits} taken from the image cache"
    this_run += ")"
    if world.rank != 0:
        print(f"done{where}: {this_run}; rank 0 writes {files.final}", file=sys.stderr)
        return 0
    if finished(files, rows):
        print(f"nothing to do: all {len(rows)} rows already have a record in {files.final}", file=sys.stderr)
        return 0
    records = wait_for_all_rows(files, rows, world)
    merge(files, rows, records)
    errors = sum("error" in records[row.key] for row in rows)
    print(f"done{where}: {len(rows)} rows, {errors} errors -> {files.final}; {this_run}", file=sys.stderr)
    return 0


def run_rows(rows: Sequence, args: argparse.Namespace, part: Path, progress):
    """Load the model, run `rows` (this rank's rows without a record), append their records to `part`; returns
    the image-feature cache the rows went through."""
    from ..cli_options import generation_options, image_cache, load_processor_and_model
    from .records import RecordWriter
    from .runner import answer_rows

    processor, model, device, _ = load_processor_and_model(args)
    cache = image_cache(args, device)
    writer = RecordWriter(part)

    def write(records) -> None:
        writer.write(records)
        progress.update(records)

    try:
        answer_rows(rows, processor, model, generation_options(args), args.batch_size, args.sort_window, write,
                    image_cache=cache)
    finally:
        writer.close()
    return cache
