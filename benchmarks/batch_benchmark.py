"""Batch inference throughput: idefics3-batch's loop at several batch sizes against a plain loop of transformers'
`generate`, on a SmolVLM-256M-shaped checkpoint (random weights) with photo-sized images.

    python benchmarks/batch_benchmark.py                              # batch sizes 1,4,8, 16 rows, 640x480 photos
    python benchmarks/batch_benchmark.py --batch-sizes 1,8 --rows 32 --image-splitting

Each configuration runs in a process of its own (MindSpore keeps every compiled graph; peak RSS is per process):
one untimed pass over all rows compiles the graphs of every shape, a second pass is timed. transformers runs the
same rows one by one (processor + generate, eager attention, its vision position ids corrected as in
tests/reference.py so that the answers can be compared), after one warm-up row. Both sides: greedy,
--new-tokens at most, stopping at the checkpoint's stop ids, the same threads.

Measured: rows/s and tokens/s (generated tokens, stop token included, / seconds of the timed pass, processing
and decoding included), the cold pass's seconds, peak RSS (VmHWM of the process), answers equal to transformers'.
Writes a markdown table and benchmarks/results/batch-smolvlm-256m-cpu.json (the machine described: CPU model,
cores, RAM, versions).

Shared images (--shared-images): 2 photos x 3 questions each (6 rows; the 640x480 test photo and a second one,
split into 13 tiles each at the processor's default settings) through the idefics3-batch command as users run
it (its default batch size), once with its image-feature cache (the default --image-cache-mb) and once with
--image-cache-mb 0, each a fresh process, then transformers row by row (as above: a warm-up row, then the timed
pass). Measured: images encoded (from the command's summary line), wall (spawn to exit: start-up, model load,
compiling and the rows), the rows' seconds (the summary line's), rows/s and tokens/s over those seconds, peak RSS
(ru_maxrss of the command), answers equal to transformers' and to the run without the cache. --rows,
--batch-sizes, --photo-size and --image-splitting do not apply. Writes
benchmarks/results/batch-shared-images-<preset>-cpu.json.

    python benchmarks/batch_benchmark.py --shared-images
    python benchmarks/batch_benchmark.py --shared-images --preset tiny --new-tokens 4
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench.images import write_photo, write_test_images  # noqa: E402
from bench.machine import describe, headline  # noqa: E402  (the benchmarks' shared package: benchmarks/bench)
from bench.processes import run_child, run_jobs, run_measured, save_results, script_main  # noqa: E402
from bench.report import fmt, table, write_json  # noqa: E402
from bench.presets import ensure_preset  # noqa: E402
from mindone_idefics3.process import peak_rss_bytes  # noqa: E402

PRESET = "smolvlm-256m"
TILE, LONGEST_EDGE, IMAGE_SEQ_LEN = 512, 2048, 64  # SmolVLM-256M's processor: 512-px tiles, 4 x 512, 64 tokens
QUESTIONS = ["Describe this photo.", "What is in the picture? Answer in one sentence.",
             "List the colours you can see in this image, from the most to the least visible.",
             "Is there any text in this photo? If so, transcribe it exactly; otherwise describe the scene in detail."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,4,8", help="comma list (default: 1,4,8)")
    p.add_argument("--rows", type=int, default=16, help="rows per pass (default: 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per row (default: 32)")
    p.add_argument("--photo-size", default="640x480", help="WIDTHxHEIGHT of the generated photos (default 640x480)")
    p.add_argument("--image-splitting", action="store_true",
                   help="split photos into 512-px tiles as SmolVLM's processor does by default (13 tiles for "
                        "640x480); default: one tile per photo (--no-image-splitting)")
    p.add_argument("--shared-images", action="store_true",
                   help="2 photos x 3 questions through idefics3-batch with its image cache and with "
                        "--image-cache-mb 0, and transformers row by row (see above)")
    p.add_argument("--preset", choices=[PRESET, "tiny"], default=PRESET,
                   help=f"random-weight checkpoint shapes (default {PRESET}; tiny: for a quick check)")
    p.add_argument("--reference", choices=["hf", "none"], default="hf", help="transformers loop (default: hf)")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"), help="preset weights and inputs")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/batch-<preset>-cpu.json; with --shared-images "
                        "benchmarks/results/batch-shared-images-<preset>-cpu.json)")
    args = p.parse_args(argv)
    if args.out is None:
        name = f"batch-shared-images-{args.preset}-cpu.json" if args.shared_images else f"batch-{args.preset}-cpu.json"
        args.out = str(ROOT / "benchmarks" / "results" / name)
    args.batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.width, args.height = (int(v) for v in args.photo_size.lower().split("x"))
    return args


# ----------------------------------------------------------------------------------------------- inputs
def batch_checkpoint(work_dir: Path, preset: str = PRESET) -> Path:
    """The preset's checkpoint: random weights with the demo tokenizer and SmolVLM-256M's processor settings
    (512-px tiles, longest edge 4 x 512, 64 tokens per tile); the special token ids in config.json are the
    tokenizer's (bench.presets writes it so)."""
    path = ensure_preset(preset, work_dir)
    if preset != PRESET:
        return path
    proc = json.loads((path / "preprocessor_config.json").read_text())
    seq = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
    if (proc["max_image_size"]["longest_edge"], proc["size"]["longest_edge"], seq) != (TILE, LONGEST_EDGE,
                                                                                       IMAGE_SEQ_LEN):
        raise RuntimeError(f"preset {PRESET} at {path} no longer has SmolVLM-256M's processor settings "
                           f"(tiles of {TILE} px, longest edge {LONGEST_EDGE}, {IMAGE_SEQ_LEN} tokens per tile)")
    return path


def write_photos(folder: Path, rows: int, width: int, height: int) -> Path:
    """`rows` photo-sized JPEGs (smooth colour fields, shapes, sensor-like noise) and an input file asking
    questions of different lengths about them."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(rows):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        base = np.stack([np.sin(a * x + c), np.cos(b * y), np.sin((a + b) * (x + y))], -1) * 100 + 128
        image = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"photo-{i:03d}.jpg", quality=90)
        lines.append(json.dumps({"id": i, "prompt": QUESTIONS[i % len(QUESTIONS)], "images": [f"photo-{i:03d}.jpg"]}))
    (folder / "input.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "input.jsonl"


# ----------------------------------------------------------------------------------------------- measuring
def ours(job: dict) -> dict:
    """idefics3-batch's loop (no files: records collected in memory) at one batch size: cold pass, timed pass."""
    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
    from mindone_idefics3.batch.cli import build_parser
    from mindone_idefics3.batch.runner import answer_rows
    from mindone_idefics3.batch.rows import read_rows
    from mindone_idefics3.cli_options import generation_options
    from mindone_idefics3.device import select_device

    select_device("CPU")
    args = build_parser().parse_args(["--model", job["checkpoint"], "--input", job["input"], "--output", "-",
                                      "--max-new-tokens", str(job["new_tokens"])])
    processor = Idefics3Processor.from_pretrained(job["checkpoint"], do_image_splitting=job["splitting"])
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], dtype="fp32", progress=False)
    rows = read_rows(Path(job["input"]))
    passes = []
    for _ in range(2):
        records: List[dict] = []
        t0 = time.perf_counter()
        answer_rows(rows, processor, model, generation_options(args), job["batch"], len(rows), records.extend)
        passes.append((time.perf_counter() - t0, records))
    return summary(passes, job)


def reference(job: dict) -> dict:
    """A plain loop over the rows with transformers: processor, generate, batch_decode."""
    import torch
    from PIL import Image
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    from tests.reference import corrected_position_ids

    torch.set_num_threads(job["threads"])
    processor = Idefics3Processor.from_pretrained(job["checkpoint"], do_image_splitting=job["splitting"])
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], attn_implementation="eager").eval()
    gen = json.loads((Path(job["checkpoint"]) / "generation_config.json").read_text())
    folder = Path(job["input"]).parent
    rows = [json.loads(line) for line in Path(job["input"]).read_text().splitlines()]

    def run(selected) -> List[dict]:
        records = []
        for row in selected:
            images = [Image.open(folder / name) for name in row["images"]]
            messages = [{"role": "user", "content": [{"type": "image"}] * len(images)
                         + [{"type": "text", "text": row["prompt"]}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=prompt, images=[images], return_tensors="pt")
            inputs.pop("token_type_ids", None)  # the tokenizer adds them; Idefics3's generate refuses them
            with torch.inference_mode(), corrected_position_ids():
                out = model.generate(**inputs, max_new_tokens=job["new_tokens"], do_sample=False,
                                     eos_token_id=gen["eos_token_id"], pad_token_id=gen["pad_token_id"])
            new = out[0, inputs["input_ids"].shape[1]:].tolist()
            stop = next((i for i, t in enumerate(new) if t in gen["eos_token_id"]), None)
            records.append({"id": row["id"], "completion_tokens": len(new) if stop is None else stop + 1,
                            "answer": processor.batch_decode([new[:stop]], skip_special_tokens=True)[0].strip()})
        return records

    t0 = time.perf_counter()
    warm = run(rows[:1])
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = run(rows)
    return summary([(cold, warm), (time.perf_counter() - t0, records)], job)


def summary(passes, job: dict) -> dict:
    (cold_s, _), (seconds, records) = passes
    tokens = sum(r.get("completion_tokens", 0) for r in records)
    return dict(impl=job["impl"], batch=job["batch"], rows=len(records), seconds=round(seconds, 2),
                cold_seconds=round(cold_s, 2), completion_tokens=tokens, rows_per_s=round(len(records) / seconds, 3),
                tokens_per_s=round(tokens / seconds, 2), errors=sum("error" in r for r in records),
                peak_rss_mb=round(peak_rss_bytes() / 2**20), answers={str(r["id"]): r.get("answer") for r in records})


def child_main(job: dict) -> int:
    save_results(job, ours(job) if job["impl"] == "mindone_idefics3" else reference(job))
    return 0


# ----------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    m = result["machine"]
    ref = next((r for r in result["results"] if r["impl"] == "transformers"), None)
    lines = [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gb']} GB RAM; MindSpore "
             f"{m['mindspore']}, torch {m.get('torch', '—')}, transformers {m.get('transformers', '—')}; {m['date']}; "
             f"load average {m['load_average_1min_at_start']:.1f} at start, {m['load_average_1min_at_end']:.1f} at end "
             "(the machine is shared).",
             f"Checkpoint: {result['checkpoint_shapes']}, random weights, fp32. Rows: {result['rows_per_pass']} photos of "
             f"{result['photo_size']}, {result['image_tiles']}; at most {result['new_tokens']} new tokens.", "",
             "| implementation | batch | rows/s | tokens/s | x transformers (rows/s) | timed pass (s) | cold pass (s) "
             "| peak RSS (MB) | answers = transformers |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["results"]:
        ratio = f"{r['rows_per_s'] / ref['rows_per_s']:.2f}" if ref else "—"
        same = r.get("answers_equal_to_reference", "—")
        lines.append(f"| {r['impl']} | {r['batch']} | {r['rows_per_s']:.3f} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{r['seconds']:.1f} | {r['cold_seconds']:.1f} | {r['peak_rss_mb']} | {same} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- shared images
SHARED_QUESTIONS = QUESTIONS[:3]
WALL_RATIO_LIMIT = 0.6  # the done-criterion: with the cache at most this fraction of the run without it
SUMMARY = re.compile(r"this run: (?P<rows>\d+) rows, (?P<errors>\d+) errors, (?P<tokens>\d+) tokens in "
                     r"(?P<seconds>[\d.]+) s .*?(?:, (?P<encoded>\d+) images encoded, (?P<hits>\d+) taken from the "
                     r"image cache)?\)")


def write_shared_rows(folder: Path) -> Path:
    """The 640x480 test photo and a second one, three questions about each: 6 rows, each image in 3 of them."""
    photos = [write_test_images(folder)["photo"], write_photo(folder, "second-photo", 640, 480, seed=7)]
    lines = [json.dumps({"id": f"{'ab'[p]}-{q + 1}", "prompt": question, "images": [photo.name]})
             for p, photo in enumerate(photos) for q, question in enumerate(SHARED_QUESTIONS)]
    (folder / "shared-input.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "shared-input.jsonl"


def batch_command(checkpoint: Path, source: Path, new_tokens: int, threads: int, cache_mb) -> dict:
    """One `python -m mindone_idefics3.batch` run (this checkout's package), measured from spawn to exit."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.jsonl"
        cmd = [sys.executable, "-m", "mindone_idefics3.batch", "--model", str(checkpoint), "--input", str(source),
               "--output", str(out), "--max-new-tokens", str(new_tokens), "--no-progress"]
        if cache_mb is not None:
            cmd += ["--image-cache-mb", str(cache_mb)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   GLOG_v="3", MINDONE_CPU_THREADS=str(threads))
        m = run_measured(cmd, env=env, cwd=ROOT)
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    summary_line = next((line.strip() for line in reversed(m.stderr.splitlines()) if "this run:" in line), None)
    if m.rc != 0 or summary_line is None:
        raise RuntimeError(f"idefics3-batch failed ({m.rc}): {m.stderr[-2000:]}")
    summary_line = re.sub(r"-> \S+;", "-> OUT.jsonl;", summary_line)  # the temporary output file's name left out
    found = SUMMARY.search(summary_line).groupdict()
    seconds, tokens, rows = float(found["seconds"]), int(found["tokens"]), int(found["rows"])
    return dict(impl="mindone_idefics3", image_cache_mb="default" if cache_mb is None else cache_mb,
                command=" ".join(["idefics3-batch", "--model", checkpoint.name, "--input", source.name, "--output",
                                  "OUT.jsonl"] + cmd[9:]), summary_line=summary_line,
                images_encoded=int(found["encoded"] or 0), images_from_cache=int(found["hits"] or 0),
                wall_s=round(m.wall_s, 2), rows_seconds=seconds, rows=rows, errors=int(found["errors"]),
                completion_tokens=tokens, rows_per_s=round(rows / seconds, 3), tokens_per_s=round(tokens / seconds, 2),
                peak_rss_mb=round(m.peak_rss_bytes / 2**20), answers={str(r["id"]): r.get("answer") for r in records})


def run_shared(args, checkpoint: Path, threads: int, load_at_start: float) -> int:
    import importlib.metadata as md

    source = write_shared_rows(Path(args.work_dir) / "shared-photos")
    rows: List[dict] = []
    for cache_mb in (None, 0):
        print(f"idefics3-batch, image cache {'default' if cache_mb is None else cache_mb} ...", file=sys.stderr,
              flush=True)
        rows.append(batch_command(checkpoint, source, args.new_tokens, threads, cache_mb))
    failed = None
    if args.reference == "hf":
        print("transformers row by row ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        ref, failed = run_child(Path(__file__).resolve(), dict(
            impl="transformers", batch=1, checkpoint=str(checkpoint), input=str(source), threads=threads,
            new_tokens=args.new_tokens, splitting=True))
        if not failed:
            ref.update(wall_s=round(time.perf_counter() - t0, 2), rows_seconds=ref["seconds"],
                       images_encoded=len(ref["answers"]))  # the timed pass: every row its image (the warm-up row apart)
            rows.append(ref)
    on, off = rows[0], rows[1]
    ref = rows[2] if len(rows) > 2 else None
    for r in rows:
        if ref is not None and r is not ref:
            r["answers_equal_to_reference"] = f"{sum(r['answers'].get(k) == v for k, v in ref['answers'].items())}/" \
                                              f"{len(ref['answers'])}"
        if r is not off:
            r["answers_equal_to_no_cache"] = f"{sum(r['answers'].get(k) == v for k, v in off['answers'].items())}/" \
                                             f"{len(off['answers'])}"
    same = all(on["answers"].get(k) == v for k, v in off["answers"].items()) and len(off["answers"]) == 6
    criteria = dict(images_encoded_with_cache=on["images_encoded"], images_encoded_without_cache=off["images_encoded"],
                    encoded_twice_not_six_times=on["images_encoded"] == 2 and off["images_encoded"] == 6,
                    wall_ratio=round(on["wall_s"] / off["wall_s"], 3),
                    wall_at_most_0_6x_without_cache=on["wall_s"] / off["wall_s"] <= WALL_RATIO_LIMIT,
                    rows_seconds_ratio=round(on["rows_seconds"] / off["rows_seconds"], 3),
                    answers_identical_either_way=same,
                    answers_equal_to_transformers=on.get("answers_equal_to_reference"))
    machine = dict(describe(threads, "CPU"), torch=md.version("torch"), transformers=md.version("transformers"),
                   load_average_1min_at_start=load_at_start, load_average_1min_at_end=os.getloadavg()[0])
    result = dict(machine=machine, threads=threads, checkpoint_shapes=f"{args.preset} (benchmarks/bench/presets.py)",
                  rows=[r["id"] for r in map(json.loads, source.read_text().splitlines())],
                  photos="the 640x480 test photo and a second 640x480 photo, 3 questions each, split into tiles at "
                         "the processor's default settings", new_tokens=args.new_tokens, precision="fp32",
                  definitions=__doc__.split("Shared images (--shared-images):")[1], criteria=criteria,
                  results=[{k: v for k, v in r.items() if k != "answers"} for r in rows],
                  answers={r["impl"] + ("" if r["impl"] == "transformers" else f" (image cache {r['image_cache_mb']})"):
                           r["answers"] for r in rows})
    if failed:
        result["reference_failed"] = failed
    write_json(Path(args.out), result)
    print(shared_markdown(result))
    print(f"\nJSON: {args.out}")
    return 1 if failed else 0


SHARED_COLUMNS = [("run", "l"), ("images encoded", "r"), ("wall s (spawn → exit)", "r"), ("rows s", "r"),
                  ("rows/s", "r"), ("tokens/s", "r"), ("peak RSS MB", "r"), ("answers = transformers", "r"),
                  ("answers = no cache", "r")]


def shared_markdown(result: dict) -> str:
    c, runs = result["criteria"], result["results"]
    names = {"default": "idefics3-batch (image cache on, default size)", 0: "idefics3-batch --image-cache-mb 0"}
    lines = [headline(result["machine"]),
             f"Checkpoint: {result['checkpoint_shapes']}, random weights, fp32; threads {result['threads']} for both "
             f"sides. Rows: {len(result['rows'])} = {result['photos']}; at most {result['new_tokens']} new tokens, "
             "greedy. idefics3-batch at its default batch size; transformers row by row (eager attention), its "
             "wall includes loading and a warm-up row.", ""]
    rows = [[names.get(r.get("image_cache_mb"), "transformers, row by row"), r["images_encoded"], fmt(r["wall_s"], 1),
             fmt(r["rows_seconds"], 1), fmt(r["rows_per_s"], 3), fmt(r["tokens_per_s"], 1), r["peak_rss_mb"],
             r.get("answers_equal_to_reference", "—"), r.get("answers_equal_to_no_cache", "—")] for r in runs]
    met = {True: "met", False: "NOT met"}
    lines += table(SHARED_COLUMNS, rows)
    lines += ["", f"Summary line with the cache: `{runs[0]['summary_line']}`",
              f"Summary line without it: `{runs[1]['summary_line']}`", "", "Done-criteria:",
              f"- images encoded: {c['images_encoded_with_cache']} with the cache, {c['images_encoded_without_cache']} "
              f"without (2 and 6 wanted): {met[c['encoded_twice_not_six_times']]}",
              f"- wall with the cache / without = {runs[0]['wall_s']:.1f} / {runs[1]['wall_s']:.1f} s = "
              f"{c['wall_ratio']:.3f} <= {WALL_RATIO_LIMIT}: {met[c['wall_at_most_0_6x_without_cache']]} (the rows "
              f"alone: {c['rows_seconds_ratio']:.3f})",
              f"- answers identical with and without the cache: {met[c['answers_identical_either_way']]}; equal to "
              f"transformers': {c['answers_equal_to_transformers'] or '—'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    return script_main(argv, run_all, child_main)


def run_all(argv) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    os.environ.setdefault("GLOG_v", "3")
    from mindone_idefics3.device import cpu_threads

    threads = cpu_threads()
    work = Path(args.work_dir)
    checkpoint = batch_checkpoint(work, args.preset)
    if args.shared_images:
        return run_shared(args, checkpoint, threads, load_at_start)
    source = write_photos(work / "batch-photos", args.rows, args.width, args.height)
    runs = [("mindone_idefics3", b) for b in args.batches] + ([("transformers", 1)] if args.reference == "hf" else [])
    jobs = [dict(impl=impl, batch=batch, checkpoint=str(checkpoint), input=str(source), threads=threads,
                 new_tokens=args.new_tokens, splitting=args.image_splitting) for impl, batch in runs]
    rows = run_jobs(Path(__file__).resolve(), jobs, lambda job: f"{job['impl']} batch {job['batch']}")
    ref = next((r for r in rows if r["impl"] == "transformers"), None)
    for r in rows:
        if ref and r is not ref:
            r["answers_equal_to_reference"] = f"{sum(r['answers'][k] == v for k, v in ref['answers'].items())}/" \
                                              f"{len(ref['answers'])}"
            r["rows_per_s_vs_transformers"] = round(r["rows_per_s"] / ref["rows_per_s"], 3)
            r["tokens_per_s_vs_transformers"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
    import importlib.metadata as md

    machine = dict(describe(threads, "CPU"), torch=md.version("torch"),
                   transformers=md.version("transformers"), load_average_1min_at_start=load_at_start,
                   load_average_1min_at_end=os.getloadavg()[0])
    result = dict(machine=machine, threads=threads, checkpoint_shapes=f"{args.preset} (benchmarks/bench/presets.py)",
                  rows_per_pass=args.rows, photo_size=f"{args.width}x{args.height}", new_tokens=args.new_tokens,
                  image_tiles=("split into 512-px tiles + a global view (SmolVLM's default)" if args.image_splitting
                               else "one 512-px tile per photo (--no-image-splitting)"),
                  definitions=__doc__, results=[{k: v for k, v in r.items() if k != "answers"} for r in rows])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
