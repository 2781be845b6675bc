"""Fine-tuning throughput: our training step (finetune/trainer.py) against transformers + peft + torch.optim.AdamW on
the same SmolVLM-256M-shaped checkpoint (random weights), the same batches, on this CPU.

    python benchmarks/finetune_benchmark.py                     # LoRA and full, recompute off/on, both sides
    python benchmarks/finetune_benchmark.py --modes lora --steps 2

Configurations: LoRA (r 8, alpha 16, no dropout, the default text-model targets) and full fine-tuning (vision tower
frozen), each without and with recompute (ours: --recompute, each decoder layer under mindspore.recompute;
transformers: gradient_checkpointing_enable()). Each runs in a process of its own (peak RSS is per process): one
untimed step (MindSpore compiles the frozen vision tower's layer graph there), then --steps timed optimiser steps
of --batch-size examples (one 512-px tile per photo, a question and a ~20-token answer; the loss on the answers).
Both sides see the same collated batches (our data pipeline makes them; transformers gets them as tensors), fp32,
the same threads.

Measured: samples/s and tokens/s (real tokens of the batches / seconds of the timed steps), peak RSS (VmHWM), the
first timed step's loss on both sides (a sanity check that they train the same thing), the 1-minute load average
at the start and end of each configuration's timed steps. Writes a markdown table and
benchmarks/results/finetune-smolvlm-256m-cpu.json (CPU model, cores, load average at start and end).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import batch_benchmark  # noqa: E402  (the SmolVLM-shaped checkpoint with a tokenizer, and photos)
from bench.machine import describe  # noqa: E402  (the benchmarks' shared package: benchmarks/bench)
from bench.processes import run_jobs, save_results, script_main  # noqa: E402
from bench.report import write_json  # noqa: E402
from mindone_idefics3.process import peak_rss_bytes  # noqa: E402

ANSWER = "The photo shows a few coloured shapes on a smooth background, with some noise like a real camera makes."
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full (default both)")
    p.add_argument("--recompute", default="off,on", help="comma list of off, on (default both)")
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per configuration (default 3)")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (default 2)")
    p.add_argument("--reference", choices=["hf", "none"], default="hf")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune-smolvlm-256m-cpu.json"))
    return p.parse_args(argv)


def write_data(folder: Path, rows: int) -> Path:
    """Photos (batch_benchmark's) as a TRL-format training file: question → ANSWER."""
    source = batch_benchmark.write_photos(folder, rows, 640, 480)
    lines = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], "images": row["images"]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- measuring
def batches(job: dict):
    """The collated batches of every step (our pipeline), and the processor."""
    from mindone_idefics3 import Idefics3Processor
    from mindone_idefics3.finetune.data import Labeler, TrainingData, collate_examples

    processor = Idefics3Processor.from_pretrained(job["checkpoint"], do_image_splitting=False)
    data = TrainingData.open(job["data"])
    labeler = Labeler(processor)
    b = job["batch"]
    out = []
    for step in range(job["steps"] + 1):
        idx = [(step * b + i) % len(data) for i in range(b)]
        out.append(collate_examples([labeler(data[i]) for i in idx], processor.tokenizer.pad_token_id))
    return out


def ours(job: dict) -> dict:
    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import select_device
    from mindone_idefics3.finetune.cli import trainable_full
    from mindone_idefics3.finetune.data import scored_tokens
    from mindone_idefics3.finetune.lora import attach_lora, select_targets
    from mindone_idefics3.finetune.optim import AdamW, clip_coefficient, grad_norm

    select_device("CPU")
    steps = batches(job)
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], dtype="fp32", progress=False)
    for p in model.get_parameters():
        p.requires_grad = False
    if job["mode"] == "lora":
        params = attach_lora(model, select_targets(model, TARGETS), 8, 16.0, 0.0, seed=0).parameters()
    else:
        params = trainable_full(model, False)
    for p in params:
        p.requires_grad = True
    model.model.text_model.recompute_layers = job["recompute"]  # the vision tower is frozen: no backward through it
    model.set_train(True)
    optimizer = AdamW(params, 1e-4, (0.9, 0.999), 1e-8, 0.0)

    def loss_sum(b):
        return model(b["input_ids"], b["attention_mask"], b.get("pixel_values"), b.get("pixel_attention_mask"),
                     labels=b["labels"], num_items_in_batch=1.0).loss

    grad_fn = ms.value_and_grad(loss_sum, None, params)

    def step(b):  # the trainer's update: 1 / labelled tokens and the clipping folded into AdamW's grad_scale
        loss, grads = grad_fn(b)
        n = scored_tokens(b["labels"])
        optimizer.step(grads, 1e-4, grad_scale=clip_coefficient(grad_norm(grads) / n, 1.0) / n)
        return float(loss.asnumpy()) / n

    return timed(job, steps, step)


def reference(job: dict) -> dict:
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from tests.reference import corrected_position_ids

    torch.set_num_threads(job["threads"])
    steps = batches(job)
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], attn_implementation="eager")
    if job["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        regex = r"^model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=regex))
    else:
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith("model.vision_model.")
    if job["recompute"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if job["mode"] == "lora":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(b):
        position_ids = (b["attention_mask"].cumsum(-1) - 1).clip(min=0)
        with corrected_position_ids():
            out = model(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
                        position_ids=torch.tensor(position_ids), pixel_values=torch.tensor(b["pixel_values"]),
                        pixel_attention_mask=torch.tensor(b["pixel_attention_mask"]).bool(),
                        labels=torch.tensor(b["labels"]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return out.loss.item()

    return timed(job, steps, step)


def timed(job: dict, steps: List[dict], step) -> dict:
    step(steps[0])  # warm-up (compiles the frozen vision tower's layer graph)
    load_at_start = os.getloadavg()[0]
    losses, t0 = [], time.perf_counter()
    for b in steps[1:]:
        losses.append(step(b))
    seconds = time.perf_counter() - t0
    samples = sum(len(b["input_ids"]) for b in steps[1:])
    tokens = int(sum(b["attention_mask"].sum() for b in steps[1:]))
    return dict(impl=job["impl"], mode=job["mode"], recompute=job["recompute"], steps=len(steps) - 1,
                batch=job["batch"], seconds=round(seconds, 2), samples_per_s=round(samples / seconds, 4),
                tokens_per_s=round(tokens / seconds, 1), tokens=tokens, peak_rss_mb=round(peak_rss_bytes() / 2**20),
                first_loss=round(losses[0], 5), load_average_1min=[round(load_at_start, 1),
                                                                   round(os.getloadavg()[0], 1)])


def child_main(job: dict) -> int:
    save_results(job, ours(job) if job["impl"] == "mindone_idefics3" else reference(job))
    return 0


# ----------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gb']} GB RAM; MindSpore "
             f"{m['mindspore']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {m['date']}; "
             f"load average {m['load_average_1min_at_start']:.1f} at start, {m['load_average_1min_at_end']:.1f} at end "
             "(the machine is shared).",
             f"Checkpoint: SmolVLM-256M shapes, random weights, fp32; batches of {result['batch_size']} examples "
             "(one 512-px tile + question + answer each); loss on the answers.", "",
             "| implementation | mode | recompute | samples/s | tokens/s | x transformers+peft | peak RSS (MB) "
             "| first loss |", "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: |"]
    refs = {(r["mode"], r["recompute"]): r for r in result["results"] if r["impl"] == "transformers+peft"}
    for r in result["results"]:
        ref = refs.get((r["mode"], r["recompute"]))
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}" if ref and ref is not r else "—"
        lines.append(f"| {r['impl']} | {r['mode']} | {'on' if r['recompute'] else 'off'} | {r['samples_per_s']:.3f} "
                     f"| {r['tokens_per_s']:.1f} | {ratio} | {r['peak_rss_mb']} | {r['first_loss']:.4f} |")
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
    checkpoint = batch_benchmark.batch_checkpoint(work)
    data = write_data(work / "finetune-photos", max(4, args.batch_size * (args.steps + 1)))
    impls = ["mindone_idefics3"] + (["transformers+peft"] if args.reference == "hf" else [])
    jobs = [dict(impl=impl, mode=mode, recompute=rc == "on", checkpoint=str(checkpoint), data=str(data),
                 threads=threads, steps=args.steps, batch=args.batch_size)
            for mode in args.modes.split(",") for rc in args.recompute.split(",") for impl in impls]
    rows = run_jobs(Path(__file__).resolve(), jobs,
                    lambda job: f"{job['impl']} {job['mode']} recompute={job['recompute']}",
                    # kept as measured, should a later one fail or stop
                    after_each=lambda done: write_results(args, threads, load_at_start, done))
    result = write_results(args, threads, load_at_start, rows)
    table = markdown(result)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nJSON: {args.out}")
    return 0 if len(rows) == len(jobs) else 1


def write_results(args, threads: int, load_at_start: float, rows: List[Dict]) -> dict:
    for r in rows:
        ref = next((x for x in rows if x["impl"] == "transformers+peft" and x["mode"] == r["mode"]
                    and x["recompute"] == r["recompute"]), None)
        if ref is not None and ref is not r:
            r["samples_per_s_vs_reference"] = round(r["samples_per_s"] / ref["samples_per_s"], 3)
            r["peak_rss_vs_reference"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    import importlib.metadata as md

    machine = dict(describe(threads, "CPU"), torch=md.version("torch"),
                   transformers=md.version("transformers"), peft=md.version("peft"),
                   load_average_1min_at_start=load_at_start, load_average_1min_at_end=os.getloadavg()[0])
    result = dict(machine=machine, threads=threads, batch_size=args.batch_size, steps=args.steps,
                  definitions=__doc__, results=rows)
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    sys.exit(main())
