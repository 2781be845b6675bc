"""What users send — photos, several images, a long text — through the processor and greedy generate(), ours and
transformers' on the same checkpoint files, in the same process, interleaved.

    python benchmarks/real_inputs.py --preset smolvlm-256m --repeats 2
    python benchmarks/real_inputs.py --preset tiny --cases photo,tiles-1 --repeats 1

Cases (each measured in a fresh process of its own, so that its peak memory is its own):
  photo             one 640×480 photo: 13 tiles with SmolVLM's processor (4×3 tiles of 512 px + the global view)
  tiles-1           the same photo with do_image_splitting=False: 1 tile (memory should not grow from 1 to 13)
  two-images        a 1024×768 and a 300×900 picture in one prompt
  two-images-batch  a batch of two such prompts with different questions: their lengths differ (left padding)
  long-text         a text prompt of about --long-text-tokens tokens, no image

Prints a markdown table (the machine first) and writes benchmarks/results/real-inputs-<preset>-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench import RESULTS, Refused
from bench.args import add_checkpoint_args, add_threads_arg, checked, choices, use_threads
from bench.images import write_test_images
from bench.kernels import attention_backend
from bench.machine import describe, finish, headline
from bench.presets import resolve_checkpoint
from bench.processes import run_child, save_results, script_main
from bench.report import fmt, table, write_json
from bench.runs import Run, leading_equal, load_models, measure, ours_generate, reference_generate, summary

DEFINITIONS = """\
Each call is one request: read the image files, apply the chat template, run the processor (ours:
mindone_idefics3's Idefics3Processor; theirs: transformers' AutoProcessor), then greedy generate() of exactly
--new-tokens tokens (no stop ids on either side). Per side, a case makes one cold call, then --repeats warm calls,
interleaved: ours, theirs, ours, theirs, ...
  TTFT cold      the first call in the process: our graphs for these shapes compile in it (vision, prefill, decode
                 step); transformers has nothing to compile.
  TTFT warm      median over the warm calls. TTFT = request start (image files) -> first new token on the host:
                 image decoding and processing, vision, prefill, first token.
  processor s    reading the image files, chat template and processor: the part of TTFT before the model.
  decode tok/s   per sequence, median over the warm calls: (new tokens - 2) / time from the 2nd to the last token.
  peak RSS       the process's peak resident memory (VmHWM, reset before each call) during the side's calls, cold
                 included; both models are resident (each side's load RSS is in the details). above baseline = that
                 peak minus the RSS just before the call: what the call itself added. Our cold call is the first
                 of the process, before transformers ran: its peak (cold peak) is ours alone; later peaks also hold
                 what the other side's allocator kept. --reference none measures ours alone throughout.
  ids equal      leading new tokens equal to transformers' in every row (of --new-tokens).
  inputs equal   both processors gave the same input_ids, attention_mask, pixel_values and pixel_attention_mask.
transformers runs on CPU torch with --reference-attn attention (sdpa by default, what its users get), the same
threads, its vision position ids corrected as in tests/reference.py (transformers 4.57 shifts full
tiles) so the ids can be compared."""

IMAGE_QUESTION = "Describe the image."
TWO_IMAGES_QUESTIONS = ("What differs between the two images?",
                        "Which of the two images is brighter, and what shapes and colours do you see in each one?")


@dataclass
class Case:
    images: List[List[str]]  # per prompt, names of bench.images.SIZES
    questions: List[str]  # per prompt; None: the long text
    options: Dict[str, object] = field(default_factory=dict)  # processor options, both sides


CASES = {
    "photo": Case([["photo"]], [IMAGE_QUESTION]),
    "tiles-1": Case([["photo"]], [IMAGE_QUESTION], dict(do_image_splitting=False)),
    "two-images": Case([["wide", "tall"]], [TWO_IMAGES_QUESTIONS[0]]),
    "two-images-batch": Case([["wide", "tall"], ["wide", "tall"]], list(TWO_IMAGES_QUESTIONS)),
    "long-text": Case([[]], [None]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=DEFINITIONS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {','.join(CASES)} (default: all)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="precision of both models (default: fp32; bf16 needs Ascend on our side)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call, at least 3 (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="warm calls per side after the cold one (default: 3)")
    p.add_argument("--long-text-tokens", type=int, default=2000,
                   help="tokens of the long-text case's question (default: 2000)")
    p.add_argument("--reference", choices=["hf", "none"], default="hf",
                   help="hf: transformers alongside (needs the test extra: torch, transformers); none: ours alone, "
                        "so the peak RSS is ours only (default: hf)")
    p.add_argument("--reference-attn", choices=["sdpa", "eager"], default="sdpa",
                   help="transformers' attention implementation (default: sdpa, its default)")
    add_threads_arg(p)
    p.add_argument("--device", choices=["Ascend", "CPU"], default=None, help="default: Ascend when usable, else CPU")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/real-inputs-<preset or model>-<device>.json)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="print the tables of results files written earlier (a run stopped early keeps the cases it "
                        "finished), then the memory growth over all their cases, and measure nothing")
    args = checked(p, p.parse_args(argv))
    try:
        args.case_list = choices(args.cases, list(CASES), "--cases")
    except ValueError as e:
        p.error(str(e))
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3 (the first comes from the prefill, the first decode step is not "
                "timed, tokens/s needs one more)")
    if args.long_text_tokens < 1:
        p.error("--long-text-tokens must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------- one request
def long_text(tokenizer, tokens: int) -> str:
    """The demo corpus repeated and cut to the most words that encode to at most `tokens` tokens."""
    from mindone_idefics3.demo import CORPUS

    words = CORPUS.split()
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words += CORPUS.split()
    lo, hi = 1, len(words)  # the longest prefix of words within `tokens`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=False)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def make_request(processor, load_image, case: Case, image_files: Dict[str, str], questions: List[str], **call):
    """Read the images, apply the chat template, run the processor: one prompt per entry of case.images."""
    images = [[load_image(image_files[name]) for name in names] for names in case.images]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(names) + [{"type": "text", "text": question}]}],
        add_generation_prompt=True) for names, question in zip(case.images, questions)]
    return processor(text=prompts, images=images if any(images) else None, padding=True, **call)


def tiles(inputs: dict) -> int:
    """Real (not padding) image tiles in the batch."""
    if inputs.get("pixel_attention_mask") is None:
        return 0
    mask = np.asarray(inputs["pixel_attention_mask"])
    return int(mask.reshape(-1, mask.shape[-2] * mask.shape[-1]).any(axis=1).sum())


def same_inputs(ours: dict, theirs: dict) -> bool:
    keys = set(ours) | set(theirs)
    return all(k in ours and k in theirs and np.array_equal(np.asarray(ours[k]), theirs[k].numpy()) for k in keys)


# ----------------------------------------------------------------------------------------------- one case
def measure_case(job: dict) -> dict:
    """Load both sides, then the case's calls (cold, then --repeats warm, interleaved); returns its row."""
    from mindone_idefics3.processing import Idefics3Processor
    from mindone_idefics3.processing import load_image as our_load_image

    args = argparse.Namespace(**job["args"])
    case, device, new_tokens = CASES[job["case"]], job["device"], args.new_tokens
    reference = args.reference == "hf"
    model, ref, facts = load_models(job["checkpoint"], args.dtype, device, job["threads"], reference,
                                    args.reference_attn)
    ours_processor = Idefics3Processor.from_pretrained(job["checkpoint"], **case.options)
    questions = [q or long_text(ours_processor.tokenizer, args.long_text_tokens) for q in case.questions]
    seen = {}  # each side's processor output of its last call

    def request(side: str, make, generate):
        """A timed call: the request through the processor (timed on its own too), then generate."""
        def call(clock):
            t = time.perf_counter()
            seen[side] = make()
            processed = time.perf_counter() - t
            new_ids, details = generate(seen[side], clock)
            return new_ids, dict(details, processor_s=processed)

        return lambda: measure(call, new_tokens, device if side == "ours" else "CPU")

    calls = [("ours", request(
        "ours", lambda: make_request(ours_processor, our_load_image, case, job["images"], questions),
        lambda inputs, clock: ours_generate(model, inputs, new_tokens, clock)))]
    if reference:
        from transformers import AutoProcessor
        from transformers.image_utils import load_image as their_load_image

        their_processor = AutoProcessor.from_pretrained(job["checkpoint"], **case.options)
        pad_id = model.config.text_config.pad_token_id
        calls.append(("theirs", request(
            "theirs", lambda: make_request(their_processor, their_load_image, case, job["images"], questions,
                                           return_tensors="pt"),
            lambda inputs, clock: reference_generate(ref, inputs, new_tokens, pad_id, clock))))
    runs: Dict[str, List[Run]] = {side: [] for side, _ in calls}
    for i in range(1 + args.repeats):  # cold, then warm: ours, theirs, ours, theirs, ...
        for side, call in calls:
            runs[side].append(call())
            print(f"{job['case']}: {side} {'cold' if i == 0 else 'warm'} call, TTFT {runs[side][-1].ttft:.3f} s",
                  file=sys.stderr, flush=True)
    ids = seen["ours"]["input_ids"]
    row = dict(case=job["case"], status="ok", model=job["name"], precision=args.dtype, device=device,
               attention=attention_backend(model), batch=int(ids.shape[0]), prompt_tokens=int(ids.shape[1]),
               prompt_tokens_per_row=[int(n) for n in seen["ours"]["attention_mask"].sum(axis=1)],
               tiles=tiles(seen["ours"]), new_tokens=new_tokens, **facts)
    for side, prefix in (("ours", ""), ("theirs", "ref_")):
        if side in runs:
            row.update(side_summary(runs[side], prefix))
    if reference:
        row.update(ttft_ratio=round(row["ttft_s"] / row["ref_ttft_s"], 3),
                   ttft_speedup=round(row["ref_ttft_s"] / row["ttft_s"], 3),
                   cold_ttft_ratio=round(row["cold_ttft_s"] / row["ref_cold_ttft_s"], 3),
                   decode_speedup=round(row["tokens_per_s"] / row["ref_tokens_per_s"], 3),
                   ids_equal=leading_equal(runs["ours"][-1].new_ids, runs["theirs"][-1].new_ids),
                   inputs_equal=same_inputs(seen["ours"], seen["theirs"]))
    return row


def side_summary(runs: List[Run], prefix: str) -> dict:
    """Cold call, medians of the warm calls, and the largest peaks over all calls (cold included)."""
    cold, warm = runs[0], runs[1:]
    out = summary(warm, prefix)
    out.update({f"{prefix}cold_ttft_s": round(cold.ttft, 4),
                f"{prefix}cold_peak_rss_mb": round(cold.peak_rss_mb),
                f"{prefix}peak_rss_mb": round(max(r.peak_rss_mb for r in runs)),
                f"{prefix}peak_above_baseline_mb": round(max(r.peak_above_baseline_mb for r in runs))})
    return out


def child_main(job: dict) -> int:
    """`real_inputs.py --child JOB.json`: measure one case, save its row."""
    save_results(job, dict(rows=[measure_case(job)]))
    return 0


# ----------------------------------------------------------------------------------------------- the run
def run_cases(args) -> int:
    """Check, prepare the weights and pictures, describe the machine; then each case in a fresh process."""
    if args.table:
        results = [json.loads(Path(path).read_text()) for path in args.table]
        print("\n\n".join(markdown(result, growth=False) for result in results))
        print("\n".join(flatness([row for result in results for row in result["rows"]])))
        return 0
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings off (read when it is imported)
    threads = use_threads(args.threads)
    ckpt, name = resolve_checkpoint(args, [args.dtype])
    from mindone_idefics3.config import Idefics3Config

    cfg = Idefics3Config.from_json_file(ckpt / "config.json")
    if "long-text" in args.case_list and args.long_text_tokens + 64 + args.new_tokens > \
            cfg.text_config.max_position_embeddings:
        raise Refused(f"--long-text-tokens {args.long_text_tokens} + the chat template + {args.new_tokens} new tokens "
                      f"do not fit the model's {cfg.text_config.max_position_embeddings} positions: lower it")
    from mindone_idefics3.device import resolve_dtype, select_device

    device = select_device(args.device)
    resolve_dtype(args.dtype, device)  # an Idefics3Error (exit 2) when the device cannot run it
    machine = describe(threads, device, reference=args.reference == "hf")
    if args.reference == "hf" and (machine["torch"] is None or machine["transformers"] is None):
        raise Refused("--reference hf needs torch and transformers (pip install -e .[test])")
    images = {k: str(v) for k, v in write_test_images(Path(args.work_dir) / "images").items()}
    out = Path(args.out or RESULTS / f"real-inputs-{name}-{device.lower()}.json")
    result = dict(machine=machine, checkpoint=str(ckpt), weights="random (preset)" if args.preset else "checkpoint",
                  reference=f"transformers (CPU torch, {args.reference_attn} attention)"
                  if args.reference == "hf" else None, images=images,
                  args={k: v for k, v in vars(args).items() if k != "case_list"}, definitions=DEFINITIONS, rows=[])
    for case in args.case_list:
        part, failure = run_child(Path(__file__).resolve(), dict(
            args=vars(args), checkpoint=str(ckpt), name=name, case=case, device=device, threads=threads,
            images=images))
        result["rows"] += part.get("rows", [])
        if failure:
            result["rows"].append(dict(case=case, status="failed", reason=failure))
        write_json(out, result)  # after every case: a long run keeps what it measured
    finish(machine)
    write_json(out, result)
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0


# ----------------------------------------------------------------------------------------------- output
def pair(row: dict, key: str, digits: int = 2) -> str:
    """'ours / theirs' of a field (theirs under ref_<key>)."""
    return f"{fmt(row.get(key), digits)} / {fmt(row.get('ref_' + key), digits)}"


MAIN_COLUMNS = [("case", "c"), ("batch", "r"), ("prompt tokens", "r"), ("tiles", "r"),
                ("TTFT cold s (ours / ref)", "r"), ("TTFT warm s (ours / ref)", "r"), ("TTFT ours ÷ ref", "r"),
                ("TTFT x ref", "r"), ("decode tok/s (ours / ref)", "r"), ("decode x ref", "r"),
                ("peak RSS MB (ours / ref)", "r"), ("above baseline MB (ours / ref)", "r"), ("ids equal", "r")]
DETAIL_COLUMNS = [("case", "c"), ("tokens/s min–max (ours)", "r"), ("processor s (ours / ref)", "r"),
                  ("first decode step s (ours)", "r"), ("cold peak RSS MB (ours / ref)", "r"),
                  ("load s (ours / ref)", "r"), ("load RSS MB (ours / ref)", "r"), ("attention (ours / ref)", "c"),
                  ("inputs equal", "c")]


def markdown(result: dict, growth: bool = True) -> str:
    head = [headline(result["machine"]),
            f"Threads: {result['machine']['threads']} for both sides. Weights: {result['weights']}. Reference: "
            f"{result['reference'] or 'none'}. x ref = speed-up over transformers (> 1 = ours faster).", ""]
    main, details = [], []
    for r in result["rows"]:
        if r["status"] != "ok":
            main.append([r["case"], "—", "—", "—", f"failed: {r['reason']}", *["—"] * 8])
            continue
        ids = f"{r['ids_equal']}/{r['new_tokens']}" if "ids_equal" in r else None
        main.append([r["case"], r["batch"], r["prompt_tokens"], r["tiles"], pair(r, "cold_ttft_s", 3),
                     pair(r, "ttft_s", 3), r.get("ttft_ratio"), r.get("ttft_speedup"), pair(r, "tokens_per_s"),
                     r.get("decode_speedup"), pair(r, "peak_rss_mb", 0), pair(r, "peak_above_baseline_mb", 0), ids])
        details.append([r["case"], f"{fmt(r['tokens_per_s_min'])}–{fmt(r['tokens_per_s_max'])}",
                        pair(r, "processor_s", 3), fmt(r["first_decode_step_s"], 3), pair(r, "cold_peak_rss_mb", 0),
                        pair(r, "load_s"), pair(r, "load_rss_mb", 0),
                        f"{r['attention']} / {r.get('ref_attention', '—')}", r.get("inputs_equal")])
    return "\n".join(head + table(MAIN_COLUMNS, main) + ["", "Details:", ""] + table(DETAIL_COLUMNS, details)
                     + (flatness(result["rows"]) if growth else []))


FLATNESS = (("photo", "tiles-1", "13 tiles vs 1 tile"), ("two-images", "photo", "2 images vs 1"),
            ("two-images-batch", "two-images", "batch of 2 vs 1 prompt"))
MEMORY = (("cold_peak_rss_mb", "cold peak"), ("peak_rss_mb", "peak"), ("peak_above_baseline_mb", "above baseline"))


def flatness(rows: List[dict]) -> List[str]:
    """How memory grows with tiles, images and batch: ratios between cases, when both rows are there. Our cold call
    is the first of its process, before transformers ran: its peak is ours alone (with both models loaded); later
    peaks also hold what the other side's allocator kept."""
    ok = {r["case"]: r for r in rows if r["status"] == "ok"}
    lines = []
    for a, b, what in FLATNESS:
        if a in ok and b in ok:
            for prefix, side in (("", "ours"), ("ref_", "ref")):
                if prefix + "peak_rss_mb" in ok[a]:
                    ratios = ", ".join(f"{name} x{ok[a][prefix + key] / ok[b][prefix + key]:.3f}"
                                       for key, name in MEMORY)
                    lines.append(f"- {what} ({a} ÷ {b}), {side}: {ratios}")
    return ["", "Memory growth (ratios of RSS between cases):", *lines] if lines else []


def main(argv=None) -> int:
    return script_main(argv, lambda a: run_cases(parse_args(a)), child_main)


if __name__ == "__main__":
    sys.exit(main())
