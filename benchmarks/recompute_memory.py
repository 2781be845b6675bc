"""What recompute saves: the peak memory of one forward + backward over a long text batch, ours (--recompute:
each decoder layer under mindspore.recompute) against transformers (gradient_checkpointing_enable()), full
fine-tuning of the text model, recompute off and on.

    python benchmarks/recompute_memory.py [--tokens 2048] [--layers 4]

SmolVLM-256M shapes (finetune_benchmark's random checkpoint), the decoder cut to its first --layers layers on both
sides so that a 2,048-token batch runs in minutes on a 2-core CPU (activation memory is per layer: the fraction
recompute saves does not depend on the depth much, the absolute numbers scale with it). One text-only batch of
--tokens tokens, the last 64 labelled, fp32, eager attention on both sides. Each configuration runs in its own
process, once: peak RSS (VmHWM) during forward + backward above the RSS before it.
Writes benchmarks/results/recompute-memory-smolvlm-256m-cpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import batch_benchmark  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.memory import reset_peak, rss_mb  # noqa: E402
from bench.processes import run_jobs, save_results, script_main  # noqa: E402
from bench.report import write_json  # noqa: E402
from mindone_idefics3.process import peak_rss_bytes  # noqa: E402

MB = 2**20
ANSWER = 64  # labelled tokens at the end of the batch


def batch(job):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(100, 40000, size=(1, job["tokens"]), dtype=np.int64)
    labels = np.full_like(ids, -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]  # an answer's worth: the (tokens, vocab) logits would dwarf the layers
    return ids, np.ones_like(ids), labels


def measure(run) -> dict:
    """One forward + backward in a fresh process: its peak above the RSS before it (a second run would reuse
    what the allocators kept from the first, MindSpore's memory pool in particular, and show ~0)."""
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    run()
    return dict(peak_above_baseline_mb=round(peak_rss_bytes() / MB - before),
                seconds=round(time.perf_counter() - t0, 1), load_average_1min=round(os.getloadavg()[0], 1))


def ours(job) -> dict:
    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import select_device

    select_device("CPU")
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], dtype="fp32", progress=False)
    text = model.model.text_model
    text.layers = ms.nn.CellList(list(text.layers)[:job["layers"]])
    for p in model.get_parameters():
        p.requires_grad = False
    params = [p for n, p in model.parameters_and_names() if n.startswith("model.text_model.")]
    for p in params:
        p.requires_grad = True
    text.recompute_layers = job["recompute"]
    model.set_train(True)
    ids, mask, labels = batch(job)
    grad = ms.value_and_grad(lambda: model(ids, mask, labels=labels).loss, None, params)

    def run():
        loss, grads = grad()
        float(loss.asnumpy())
        del grads

    return measure(run)


def reference(job) -> dict:
    import torch
    from transformers import Idefics3ForConditionalGeneration

    torch.set_num_threads(job["threads"])
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], attn_implementation="eager")
    text = model.model.text_model
    text.layers = torch.nn.ModuleList(list(text.layers)[:job["layers"]])
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("model.text_model.")
    if job["recompute"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask, labels = (torch.tensor(x) for x in batch(job))

    def run():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    return measure(run)


def child_main(job: dict) -> int:
    row = ours(job) if job["impl"] == "mindone_idefics3" else reference(job)
    save_results(job, dict(impl=job["impl"], recompute=job["recompute"], **row))
    return 0


def run_all(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recompute-memory-smolvlm-256m-cpu.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    from mindone_idefics3.device import cpu_threads

    threads, load_at_start = cpu_threads(), os.getloadavg()[0]
    checkpoint = batch_benchmark.batch_checkpoint(Path(args.work_dir))
    jobs = [dict(impl=impl, recompute=rc, checkpoint=str(checkpoint), tokens=args.tokens, layers=args.layers,
                 threads=threads) for impl in ("mindone_idefics3", "transformers") for rc in (False, True)]
    rows = run_jobs(Path(__file__).resolve(), jobs, lambda j: f"{j['impl']} recompute={j['recompute']}")
    saved = {}
    for impl in ("mindone_idefics3", "transformers"):
        off = next((r for r in rows if r["impl"] == impl and not r["recompute"]), None)
        on = next((r for r in rows if r["impl"] == impl and r["recompute"]), None)
        if off and on and off["peak_above_baseline_mb"] > 0:
            saved[impl] = round(1 - on["peak_above_baseline_mb"] / off["peak_above_baseline_mb"], 3)
    write_json(Path(args.out), dict(machine=dict(describe(threads, "CPU"), load_average_1min_at_start=load_at_start,
                                                 load_average_1min_at_end=os.getloadavg()[0]),
                                    tokens=args.tokens, layers=args.layers, definitions=__doc__, results=rows,
                                    fraction_saved_by_recompute=saved))
    print("| implementation | recompute | peak above baseline (MB) | seconds | load |")
    print("| :--- | :--- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['impl']} | {'on' if r['recompute'] else 'off'} | {r['peak_above_baseline_mb']} | {r['seconds']} "
              f"| {r['load_average_1min']} |")
    print(f"\nfraction of the peak saved by recompute: {saved}")
    return 0 if len(rows) == len(jobs) else 1


def main(argv=None) -> int:
    return script_main(argv, run_all, child_main)


if __name__ == "__main__":
    sys.exit(main())
