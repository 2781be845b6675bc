"""Where fine-tuning's memory goes: resident memory (VmRSS) after each phase of a training step and the peak
(VmHWM, reset before the phase) within it, next to the bytes the step must hold (weights, trainable weights,
their gradients, AdamW's state), on the checkpoint and batches of finetune_benchmark.py.

    python benchmarks/finetune_memory.py --mode full            # phases of 2 steps, our trainer's step
    python benchmarks/finetune_memory.py --mode lora --recompute

Phases: load (from_pretrained), optimizer (AdamW built), then per step: forward+backward (value_and_grad),
norm+clip (the gradients' norm and torch's clipping coefficient), update (AdamW, the gradients scaled by
1 / labelled tokens · the coefficient inside it), as the trainer does. Prints a table and writes JSON next to
finetune_benchmark's results (finetune-memory-<mode>[-recompute].json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import batch_benchmark  # noqa: E402
import finetune_benchmark  # noqa: E402
from bench.memory import reset_peak, rss_mb  # noqa: E402
from mindone_idefics3.process import peak_rss_bytes  # noqa: E402

MB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["lora", "full"], default="full")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    work = Path(args.work_dir)
    checkpoint = batch_benchmark.batch_checkpoint(work)
    data = finetune_benchmark.write_data(work / "finetune-photos", max(4, args.batch_size * (args.steps + 1)))
    job = dict(checkpoint=str(checkpoint), data=str(data), steps=args.steps, batch=args.batch_size)
    steps = finetune_benchmark.batches(job)

    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import select_device
    from mindone_idefics3.finetune.cli import trainable_full
    from mindone_idefics3.finetune.data import scored_tokens
    from mindone_idefics3.finetune.lora import attach_lora, select_targets
    from mindone_idefics3.finetune.optim import AdamW, clip_coefficient, grad_norm
    
    select_device("CPU")
    rows = []

    def phase(name, fn):
        reset_peak()
        t0 = time.perf_counter()
        out = fn()
        rows.append(dict(phase=name, rss_mb=round(rss_mb()), peak_mb=round(peak_rss_bytes() / MB),
                         seconds=round(time.perf_counter() - t0, 2)))
        print(rows[-1], flush=True)
        return out

    model = phase("load", lambda: Idefics3ForConditionalGeneration.from_pretrained(str(checkpoint), dtype="fp32",
                                                                                    progress=False))
    for p in model.get_parameters():
        p.requires_grad = False
    if args.mode == "lora":
        params = attach_lora(model, select_targets(model, finetune_benchmark.TARGETS), 8, 16.0, 0.0,
                             seed=0).parameters()
    else:
        params = trainable_full(model, False)
    for p in params:
        p.requires_grad = True
    model.model.text_model.recompute_layers = args.recompute
    model.set_train(True)
    nbytes = lambda ps: sum(p.size * p.itemsize for p in ps) / MB  # noqa: E731
    sizes = dict(weights_mb=round(nbytes(model.get_parameters())), trainable_mb=round(nbytes(params)))
    optimizer = phase("optimizer", lambda: AdamW(params, 1e-4, (0.9, 0.999), 1e-8, 0.0))
    sizes["optimizer_state_mb"] = round(sum(nbytes(s) for s in optimizer.state_tensors()))
    grad_fn = ms.value_and_grad(lambda b: model(b["input_ids"], b["attention_mask"], b.get("pixel_values"),
                                                b.get("pixel_attention_mask"), labels=b["labels"],
                                                num_items_in_batch=1.0).loss, None, params)
    for i, b in enumerate(steps[:args.steps]):
        loss, grads = phase(f"step {i + 1} forward+backward", lambda: grad_fn(b))
        n = scored_tokens(b["labels"])
        scale = phase(f"step {i + 1} norm+clip", lambda: clip_coefficient(grad_norm(grads) / n, 1.0) / n)
        phase(f"step {i + 1} update", lambda: optimizer.step(grads, 1e-4, grad_scale=scale))
        del grads
    result = dict(mode=args.mode, recompute=args.recompute, batch=args.batch_size,
                  load_average=os.getloadavg(), **sizes, phases=rows,
                  process_peak_mb=max(r["peak_mb"] for r in rows))
    out = Path(args.out_dir) / f"finetune-memory-{args.mode}{'-recompute' if args.recompute else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
