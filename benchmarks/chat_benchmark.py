"""A conversation about one photo: our ChatSession, which keeps the conversation's KV cache and image features
between turns, against transformers re-running the whole conversation each turn.

    python benchmarks/chat_benchmark.py --preset smolvlm-256m
    python benchmarks/chat_benchmark.py --preset tiny --max-new-tokens 4

The conversation: turn 1 asks about the 640x480 test photo (13 tiles with SmolVLM's processor at its default
settings), turns 2..--turns ask text questions about it. With --second-image (default) a branch of the same
conversation is run too: turns 1 and 2 again (sharing the image-feature cache with the main conversation), then a
third turn that adds a second 640x480 photo; its row ("3b") is reported apart from the main turns.

Each side runs in a process of its own (MindSpore keeps every graph it compiled; a peak RSS is per process):
  ours          loads the model, runs the whole conversation (and its branch) once as a warm-up — its graphs for
                every shape compile there: its TTFTs are the "cold" column — then again in a new ChatSession
                with a new image-feature cache: the timed turns. Greedy, at most --max-new-tokens tokens, stopping
                at the checkpoint's stop ids.
  transformers  for each turn, the conversation so far as our side had it (our answers as the assistant turns,
                the turn's question) through its processor and generate(): greedy, the same stop ids and token
                limit, eager attention, its vision position ids corrected as in tests/reference.py. One untimed
                warm-up run of turn 1 first.

Measured per turn:
  TTFT          the turn's start (image files, chat template, processor) -> its first new token on the host.
                Ours: the processor's seconds + GenerationStats.time_to_first_token; transformers: a streamer's
                clock from before the processor.
  reused        prompt tokens whose keys and values the KV cache held already (GenerationStats.reused_tokens);
                transformers reuses nothing.
  tiles         image tiles run through the vision tower this turn (ours: GenerationStats.vision_tiles; theirs:
                every tile of the conversation, each turn).
  decode tok/s  ours: GenerationStats.decode_tokens_per_second (the first, compiling step left out); theirs:
                (new tokens - 2) / (2nd -> last token).
  answer = ref  our answer equals transformers' greedy answer to the whole conversation so far (decoded text).
  peak RSS      the process's peak resident memory (VmHWM), model load and warm-up included.
Prints a markdown table (the machine first) and writes benchmarks/results/chat-<preset or model>-cpu.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional


from bench import RESULTS, Refused
from bench.args import add_checkpoint_args, add_threads_arg, checked, use_threads
from bench.images import write_photo, write_test_images
from bench.machine import describe, finish, headline
from bench.presets import resolve_checkpoint
from bench.processes import run_child, save_results, script_main
from bench.report import fmt, table, write_json

QUESTIONS = ["Describe this photo.", "What colours can you see in it?", "Is there a sun in the sky?",
             "How many shapes are on the ground, and what are they?", "Summarise the scene in one sentence."]
SECOND_IMAGE_QUESTION = "Here is another photo. How does it differ from the first one?"
TTFT_LIMIT_S, TTFT_RATIO_LIMIT = 2.0, 0.1  # the done-criteria of the second turn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    add_threads_arg(p)
    p.add_argument("--turns", type=int, default=len(QUESTIONS),
                   help=f"turns of the main conversation, 2..{len(QUESTIONS)} (default {len(QUESTIONS)})")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many new tokens a turn (default 32)")
    p.add_argument("--second-image", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the branch whose third turn adds a second photo (default: on)")
    p.add_argument("--reference", choices=["hf", "none"], default="hf",
                   help="hf: transformers re-running the conversation each turn; none: ours alone (default: hf)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/chat-<preset or model>-cpu.json)")
    args = checked(p, p.parse_args(argv))
    if not 2 <= args.turns <= len(QUESTIONS):
        p.error(f"--turns must be between 2 and {len(QUESTIONS)}")
    if args.max_new_tokens < 3:
        p.error("--max-new-tokens must be at least 3 (decode tokens/s needs the first decode step and one more)")
    return args


def plan(turns: int, second_image: bool) -> dict:
    """The turns: (question, image names) of the main conversation and of the branch."""
    main = [(q, ["photo"] if i == 0 else []) for i, q in enumerate(QUESTIONS[:turns])]
    branch = main[:2] + [(SECOND_IMAGE_QUESTION, ["second"])] if second_image else []
    return dict(main=main, branch=branch)


# ----------------------------------------------------------------------------------------------- our side
def ours(job: dict) -> dict:
    from mindone_idefics3 import ChatSession, Idefics3ForConditionalGeneration, Idefics3Processor
    from mindone_idefics3.device import select_device
    from mindone_idefics3.image_cache import DEFAULT_MB, ImageFeatureCache
    from mindone_idefics3.process import peak_rss_bytes

    select_device("CPU")
    t = time.perf_counter()
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], dtype="fp32", progress=False)
    processor = Idefics3Processor.from_pretrained(job["checkpoint"])
    load_s = time.perf_counter() - t
    processed = []  # the processor's seconds of each chat_inputs call

    def timed_chat_inputs(*a, _inner=processor.chat_inputs, **k):
        t0 = time.perf_counter()
        out = _inner(*a, **k)
        processed.append(time.perf_counter() - t0)
        return out

    processor.chat_inputs = timed_chat_inputs
    images = job["images"]
    options = dict(max_new_tokens=job["max_new_tokens"], do_sample=False, repetition_penalty=1.0)

    def turn(chat, question, names) -> dict:
        processed.clear()
        answer = chat.ask(question, [images[n] for n in names] or None)
        s = chat.last_stats
        return dict(question=question, images=names, prompt_tokens=s.prompt_tokens, reused_tokens=s.reused_tokens,
                    vision_tiles=s.vision_tiles, processor_s=round(processed[0], 4),
                    ttft_s=round(processed[0] + s.time_to_first_token, 4),
                    model_ttft_s=round(s.time_to_first_token, 4), new_tokens=s.new_tokens,
                    decode_tokens_per_s=round(s.decode_tokens_per_second, 3), answer=answer,
                    conversation=chat.messages[:-1])

    def conversation(label: str) -> dict:
        cache = ImageFeatureCache(DEFAULT_MB["CPU"] * 2**20)  # a new one: nothing seen before
        chat = ChatSession(model, processor, image_cache=cache, **options)
        rows, names = [], []
        for question, ns in job["plan"]["main"]:
            names += ns
            rows.append(dict(turn(chat, question, ns), conversation_images=list(names)))
            print(f"ours {label}: turn {len(rows)}, TTFT {rows[-1]['ttft_s']:.3f} s, "
                  f"{rows[-1]['reused_tokens']} tokens reused, {rows[-1]['vision_tiles']} tiles", file=sys.stderr,
                  flush=True)
        branch = []
        if job["plan"]["branch"]:
            chat = ChatSession(model, processor, image_cache=cache, **options)  # the same photo: features cached
            names = []
            for question, ns in job["plan"]["branch"]:
                names += ns
                branch.append(dict(turn(chat, question, ns), conversation_images=list(names)))
            print(f"ours {label}: branch turn 3, TTFT {branch[-1]['ttft_s']:.3f} s, {branch[-1]['vision_tiles']} "
                  "tiles", file=sys.stderr, flush=True)
        return dict(turns=rows, branch=branch)

    cold = conversation("warm-up")
    warm = conversation("timed")
    for key in ("turns", "branch"):
        for c, w in zip(cold[key], warm[key]):
            w["cold_ttft_s"] = c["ttft_s"]
            w["same_answer_as_warm_up"] = c["answer"] == w["answer"]
    second_alone = None
    if job["plan"]["branch"]:  # the tiles of the second photo alone: what the branch's third turn should encode
        second_alone = int(processor.chat_inputs([{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": "x"}]}], [images["second"]]).image_tiles[0][0])
    return dict(load_s=round(load_s, 2), turns=warm["turns"], branch=warm["branch"][2:],
                branch_prefix_answers_equal=[b["answer"] == m["answer"] for b, m in
                                             zip(warm["branch"][:2], warm["turns"][:2])],
                second_image_tiles=second_alone, stop_ids=[int(t) for t in ChatSession(
                    model, processor, **options).stop], peak_rss_mb=round(peak_rss_bytes() / 2**20))


# ----------------------------------------------------------------------------------------------- transformers
def reference(job: dict) -> dict:
    import torch
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.image_utils import load_image

    from bench.runs import TokenClock
    from mindone_idefics3.process import peak_rss_bytes
    from tests.reference import corrected_position_ids

    torch.set_num_threads(job["threads"])
    t = time.perf_counter()
    processor = Idefics3Processor.from_pretrained(job["checkpoint"])
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], attn_implementation="eager").eval()
    load_s = time.perf_counter() - t
    stops, pad = job["stop_ids"], job["pad_token_id"]

    def run(row: dict) -> dict:
        clock = TokenClock()
        t0 = time.perf_counter()
        images = [load_image(job["images"][n]) for n in row["conversation_images"]]
        prompt = processor.apply_chat_template(row["conversation"], add_generation_prompt=True)
        inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt")
        inputs.pop("token_type_ids", None)  # the tokenizer adds them; Idefics3's generate refuses them
        with torch.inference_mode(), corrected_position_ids():
            out = model.generate(**inputs, max_new_tokens=job["max_new_tokens"], do_sample=False, num_beams=1,
                                 repetition_penalty=1.0, eos_token_id=stops, pad_token_id=pad, streamer=clock)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        cut = next((i for i, tok in enumerate(new) if tok in stops), len(new))
        times = clock.times
        mask = inputs.get("pixel_attention_mask")
        tiles = 0 if mask is None else int(mask.reshape(-1, mask.shape[-2] * mask.shape[-1]).any(1).sum())
        return dict(prompt_tokens=int(inputs["input_ids"].shape[1]), vision_tiles=tiles, ttft_s=round(
            times[0] - t0, 4), new_tokens=len(new), decode_tokens_per_s=round((len(times) - 2) / (
                times[-1] - times[1]), 3) if len(times) >= 3 and times[-1] > times[1] else None,
            answer=processor.decode(new[:cut], skip_special_tokens=True).strip())

    warm_up = run(job["turns"][0])
    print(f"transformers warm-up (turn 1): TTFT {warm_up['ttft_s']:.3f} s", file=sys.stderr, flush=True)
    results = dict(load_s=round(load_s, 2), warm_up_ttft_s=warm_up["ttft_s"], turns=[], branch=[])
    for key in ("turns", "branch"):
        for i, row in enumerate(job[key]):
            results[key].append(run(row))
            print(f"transformers {key} {i + 1}: TTFT {results[key][-1]['ttft_s']:.3f} s", file=sys.stderr, flush=True)
            results["peak_rss_mb"] = round(peak_rss_bytes() / 2**20)
            save_results(job, results)  # a crash keeps the turns measured
    return results


def child_main(job: dict) -> int:
    save_results(job, ours(job) if job["side"] == "ours" else reference(job))
    return 0


# ----------------------------------------------------------------------------------------------- the run
def run(args) -> int:
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings off (read when it is imported)
    threads = use_threads(args.threads)
    ckpt, name = resolve_checkpoint(args, ["fp32"])
    reference_on = args.reference == "hf"
    machine = describe(threads, "CPU", reference=reference_on)
    if reference_on and (machine["torch"] is None or machine["transformers"] is None):
        raise Refused("--reference hf needs torch and transformers (pip install -e .[test])")
    folder = Path(args.work_dir) / "images"
    images = {"photo": str(write_test_images(folder)["photo"]),
              "second": str(write_photo(folder, "second-photo", 640, 480, seed=7))}
    out = Path(args.out or RESULTS / f"chat-{name}-cpu.json")
    result = dict(machine=machine, checkpoint=shown(ckpt), weights="random (preset)" if args.preset else "checkpoint",
                  precision="fp32", images={k: shown(v) for k, v in images.items()},
                  args={k: shown(v) if k == "work_dir" else v for k, v in vars(args).items()}, definitions=__doc__.split("Measured per turn:")[1],
                  reference="transformers (CPU torch, eager attention), the whole conversation each turn"
                  if reference_on else None)
    script = Path(__file__).resolve()
    job = dict(side="ours", checkpoint=str(ckpt), images=images, max_new_tokens=args.max_new_tokens,
               threads=threads, plan=plan(args.turns, args.second_image))
    print("ours: warm-up conversation, then the timed one ...", file=sys.stderr, flush=True)
    mine, failed = run_child(script, job)
    if failed:
        raise Refused(f"our side: {failed}")
    result["ours"] = {k: v for k, v in mine.items() if k not in ("turns", "branch")}
    result["turns"] = [strip(r) for r in mine["turns"]]
    result["branch"] = [strip(r) for r in mine["branch"]]
    write_json(out, result)
    failed = None
    if reference_on:
        from mindone_idefics3.config import Idefics3Config

        pad = Idefics3Config.from_json_file(ckpt / "config.json").text_config.pad_token_id
        print("transformers: the whole conversation each turn ...", file=sys.stderr, flush=True)
        theirs, failed = run_child(script, dict(side="transformers", checkpoint=str(ckpt), images=images,
                                                max_new_tokens=args.max_new_tokens, threads=threads,
                                                stop_ids=mine["stop_ids"], pad_token_id=pad, turns=mine["turns"],
                                                branch=mine["branch"]))
        result["transformers"] = {k: v for k, v in theirs.items() if k not in ("turns", "branch")}
        for key in ("turns", "branch"):
            for row, ref in zip(result[key], theirs.get(key, [])):
                row["ref"] = {k: v for k, v in ref.items() if k != "answer"}
                row["ref_answer"] = ref["answer"]
                row["answer_equal"] = row["answer"] == ref["answer"]
        if failed:
            result["transformers"]["failed"] = failed
    result["criteria"] = criteria(result)
    finish(machine)
    write_json(out, result)
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 1 if failed else 0


def shown(path) -> str:
    """A path as the JSON records it: relative to the checkout when inside it, else its name alone."""
    path = Path(path).resolve()
    root = Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def strip(row: dict) -> dict:
    """A turn's row for the JSON: the conversation itself is left out (the questions and answers are there)."""
    return {k: v for k, v in row.items() if k not in ("conversation", "conversation_images")}


def criteria(result: dict) -> dict:
    """The done-criteria, each with its numbers and met / not met (None when not measured)."""
    turns, branch = result["turns"], result["branch"]
    first, second = turns[0], turns[1]
    ratio = second["ttft_s"] / first["ttft_s"]
    out = dict(second_turn_ttft_s=second["ttft_s"], first_turn_ttft_s=first["ttft_s"],
               second_turn_ttft_ratio=round(ratio, 4),
               second_turn_ttft_at_most_2s=second["ttft_s"] <= TTFT_LIMIT_S,
               second_turn_ttft_at_most_0_1x_first=ratio <= TTFT_RATIO_LIMIT)
    if branch:
        out.update(third_turn_new_image_tiles=branch[0]["vision_tiles"],
                   second_image_alone_tiles=result["ours"]["second_image_tiles"],
                   third_turn_encodes_only_the_new_image=branch[0]["vision_tiles"]
                   == result["ours"]["second_image_tiles"])
    rows = turns + branch
    if all("answer_equal" in r for r in rows):
        out.update(answers_equal=f"{sum(r['answer_equal'] for r in rows)}/{len(rows)}",
                   every_answer_equals_transformers=all(r["answer_equal"] for r in rows))
    else:
        out.update(answers_equal=None, every_answer_equals_transformers=None)
    return out


COLUMNS = [("turn", "c"), ("images", "c"), ("prompt tokens", "r"), ("reused tokens", "r"),
           ("tiles encoded (ours / ref)", "r"), ("TTFT s ours", "r"), ("TTFT s ours cold", "r"),
           ("TTFT s transformers", "r"), ("TTFT x ref", "r"), ("TTFT ÷ turn 1 (ours)", "r"),
           ("decode tok/s (ours / ref)", "r"), ("new tokens", "r"), ("answer = transformers", "c")]


def markdown(result: dict) -> str:
    m, turns, c = result["machine"], result["turns"], result["criteria"]
    ours_side, theirs = result["ours"], result.get("transformers", {})
    lines = [headline(m),
             f"Checkpoint: {Path(result['checkpoint']).name}, {result['weights']} weights, fp32; threads "
             f"{m['threads']} for both sides. Turn 1 asks about the 640x480 photo (default processor settings), "
             f"the next turns are text; 3b = a branch whose third turn adds a second 640x480 photo. At most "
             f"{result['args']['max_new_tokens']} new tokens a turn, greedy. Reference: {result['reference'] or 'none'}.",
             f"Peak RSS (MB): ours {ours_side['peak_rss_mb']}, transformers {theirs.get('peak_rss_mb', '—')}; load s: "
             f"ours {ours_side['load_s']}, transformers {theirs.get('load_s', '—')}; transformers' warm-up turn 1 "
             f"TTFT {fmt(theirs.get('warm_up_ttft_s'), 3)} s.", ""]
    rows = []
    for label, row in [(str(i + 1), r) for i, r in enumerate(turns)] + [("3b", r) for r in result["branch"]]:
        ref = row.get("ref", {})
        ref_ttft = ref.get("ttft_s")
        rows.append([label, "+ " + ", ".join(row["images"]) if row["images"] else "—", row["prompt_tokens"],
                     row["reused_tokens"], f"{row['vision_tiles']} / {fmt(ref.get('vision_tiles'))}",
                     fmt(row["ttft_s"], 3), fmt(row.get("cold_ttft_s"), 3), fmt(ref_ttft, 3),
                     fmt(ref_ttft / row["ttft_s"] if ref_ttft else None), fmt(row["ttft_s"] / turns[0]["ttft_s"], 3),
                     f"{fmt(row['decode_tokens_per_s'], 1)} / {fmt(ref.get('decode_tokens_per_s'), 1)}",
                     row["new_tokens"], row.get("answer_equal")])
    lines += table(COLUMNS, rows)
    met = {True: "met", False: "NOT met", None: "not measured"}
    lines += ["", "Done-criteria:",
              f"- turn 2 TTFT {c['second_turn_ttft_s']:.3f} s <= {TTFT_LIMIT_S:g} s: "
              f"{met[c['second_turn_ttft_at_most_2s']]}",
              f"- turn 2 TTFT / turn 1 TTFT = {c['second_turn_ttft_s']:.3f} / {c['first_turn_ttft_s']:.3f} = "
              f"{c['second_turn_ttft_ratio']:.3f} <= {TTFT_RATIO_LIMIT:g}: "
              f"{met[c['second_turn_ttft_at_most_0_1x_first']]}"]
    if "third_turn_new_image_tiles" in c:
        lines.append(f"- turn 3b (adds a second photo) encoded {c['third_turn_new_image_tiles']} tiles, the second "
                     f"photo alone has {c['second_image_alone_tiles']}: "
                     f"{met[c['third_turn_encodes_only_the_new_image']]}")
    lines.append(f"- every answer equals transformers' on the whole conversation: {c['answers_equal'] or '—'} "
                 f"({met[c['every_answer_equals_transformers']]})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    return script_main(argv, lambda a: run(parse_args(a)), child_main)


if __name__ == "__main__":
    sys.exit(main())
