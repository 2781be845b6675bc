"""A continuous-batching decode step against the static batch's decode step, in one process, interleaved.

    python benchmarks/rows_step_benchmark.py --preset smolvlm-256m                 (rows 1,2,4,8; lengths 1024,2048)
    python benchmarks/rows_step_benchmark.py --preset tiny --rows 1,2 --lengths 256 --steps 3

For each row length L (the server's --max-model-len) and each number of running rows n, fp32:

  continuous   `ContinuousBatch` with 8 rows of L slots (the server's default geometry): n requests of a short text
               prompt join (their prefill is not timed), then --steps decode steps of the n running rows are timed
               (`ContinuousBatch.step`, the host's work included: inputs built, ids read back, rows given their
               tokens). Each row attends over its whole cache row (L slots, masked).
  static       generation's compiled decode step (`DecodeStep`, greedy) for a batch of n rows over a static cache
               of L slots, called --steps times with its inputs ready (the host's work of generate_steps not
               included): what `--scheduler static` runs for a batch of n whose longest request needs L slots.

Reported: the median ms per step, tokens per second (n / step), and the process's peak RSS over each side's timed
steps (VmHWM, reset before them). Both sides run their untimed first step (graphs compile there) first; the two
sides alternate per (L, n) so the machine's load weighs on both alike.
Prints a markdown table (the machine first) and writes benchmarks/results/rows-step-<preset or model>-cpu.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench import RESULTS
from bench.args import add_checkpoint_args, add_threads_arg, checked, positive_ints, use_threads
from bench.machine import describe, finish, headline
from bench.memory import reset_peak
from bench.presets import resolve_checkpoint
from bench.report import table, write_json
from mindone_idefics3.process import peak_rss_bytes

BATCH_ROWS = 8  # the server's default --max-batch-size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    add_threads_arg(p)
    p.add_argument("--rows", default="1,2,4,8", help="running rows, comma list (default 1,2,4,8; at most 8)")
    p.add_argument("--lengths", default="1024,2048", help="row lengths in slots, comma list (default 1024,2048)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per point (default 8)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/rows-step-<name>-cpu.json)")
    args = checked(p, p.parse_args(argv))
    args.rows = positive_ints(args.rows, "--rows")
    args.lengths = positive_ints(args.lengths, "--lengths")
    if max(args.rows) > BATCH_ROWS or args.steps < 1:
        p.error(f"--rows must be at most {BATCH_ROWS} and --steps at least 1")
    return args


class Row:
    """The row protocol of continuous.py: never done until told."""

    def __init__(self, inputs, params):
        self.inputs, self.params, self.done = inputs, params, False

    def add(self, token, finish_reason):
        self.done = self.done or finish_reason is not None

    def fail(self, error):
        raise error


def timed(fn, steps: int) -> tuple:
    """(median seconds per call, peak RSS MB over the calls)."""
    reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), peak_rss_bytes() / 2**20


def continuous_point(model, processor, length: int, n: int, steps: int) -> tuple:
    from mindone_idefics3.continuous import ContinuousBatch
    from mindone_idefics3.generation import SamplingParams, stop_token_ids

    batch = ContinuousBatch(model, BATCH_ROWS, length, stop_token_ids(model))
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": [{"type": "text", "text": f"Question {i}: tell me a story."}]}]
        rows.append(Row(processor.chat_inputs(messages, []), SamplingParams(max_new_tokens=length // 2)))
        batch.join(rows[-1])
        while batch.joins:
            batch.advance()
    batch.step()  # compiles
    result = timed(batch.step, steps)
    del batch
    return result


def static_point(model, length: int, n: int, steps: int) -> tuple:
    import mindspore as ms
    from mindspore import Tensor

    from mindone_idefics3.generation import DecodeStep
    from mindone_idefics3.runtime import jit_cell

    text = model.model.text_model
    text.use_caches(text.new_caches(n, length))
    step = jit_cell(DecodeStep(model, True, True))
    args = (Tensor(np.zeros((n, 1), np.int32)), Tensor(np.full((n, 1), 20, np.int32)), Tensor([20], ms.int32),
            Tensor(np.arange(length)[None].repeat(n, 0) <= 20))
    step(*args).asnumpy()  # compiles
    result = timed(lambda: step(*args).asnumpy(), steps)
    text.drop_caches()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = use_threads(args.threads)
    checkpoint, name = resolve_checkpoint(args, ["fp32"])
    machine = describe(threads, "CPU")

    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint, progress=False)
    processor = Idefics3Processor.from_pretrained(checkpoint)
    points = []
    for length in args.lengths:
        for n in args.rows:
            ours, ours_peak = continuous_point(model, processor, length, n, args.steps)
            theirs, their_peak = static_point(model, length, n, args.steps)
            points.append(dict(length=length, rows=n, continuous_ms=round(ours * 1e3, 1),
                               static_ms=round(theirs * 1e3, 1), continuous_tokens_per_s=round(n / ours, 2),
                               static_tokens_per_s=round(n / theirs, 2), continuous_over_static=round(ours / theirs, 2),
                               continuous_peak_rss_mb=round(ours_peak), static_peak_rss_mb=round(their_peak)))
            print(f"L={length} rows={n}: continuous {ours * 1e3:.0f} ms, static {theirs * 1e3:.0f} ms",
                  file=sys.stderr, flush=True)
    finish(machine)
    result = dict(machine=machine, checkpoint=name, batch_rows=BATCH_ROWS, steps=args.steps, points=points)
    out = Path(args.out) if args.out else RESULTS / f"rows-step-{name}-cpu.json"
    write_json(out, result)
    print(headline(machine))
    print(f"\nOne decode step, medians of {args.steps}; continuous: {BATCH_ROWS} rows of L slots, n running.\n")
    print("\n".join(table([("L", "r"), ("running rows", "r"), ("continuous ms", "r"), ("static ms", "r"),
                           ("continuous / static", "r"), ("continuous tok/s", "r"), ("static tok/s", "r"),
                           ("continuous peak RSS MB", "r"), ("static peak RSS MB", "r")],
                          [(p["length"], p["rows"], p["continuous_ms"], p["static_ms"], p["continuous_over_static"],
                            p["continuous_tokens_per_s"], p["static_tokens_per_s"], p["continuous_peak_rss_mb"],
                            p["static_peak_rss_mb"]) for p in points])))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
