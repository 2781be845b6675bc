"""Why 2 msrun workers × batch 1 and 1 worker × batch 2 end a few 1e-6 apart (the slow msrun test's run, in one
process): both settings' gradients step by step, and what AdamW makes of them.

    python benchmarks/data_parallel_rounding.py                       # the test's run (eps 1e-8)
    python benchmarks/data_parallel_rounding.py --adam-epsilon 1e-4   # the same with a larger epsilon

Runs the test's setup (demo checkpoint, tests/finetune_data.py's 8 examples, LoRA, --grad-accum 2, 3 steps at
lr 1e-2) as two trajectories: "one" (one worker, batches of 2) and "two" (ranks 0 and 1 of 2, batches of 1, their
gradients added as the two-worker AllReduce does: a + b in fp32, the same in either order). Per step it prints
- the gradients of both settings at the same weights, and the 1×2 gradients with the rows of each batch swapped
  (the same sum in another order: fp32 rounding's own size);
- the weight element that differs most between the settings after the fused-kernel update, against the test's
  tolerance (1e-4 of the weight's largest element), with its gradient in both settings, and the difference
  torch.optim.AdamW (fp32) and the exact float64 formula give from the same two gradient sets.
Writes benchmarks/results/data-parallel-rounding[-eps<epsilon>].json.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LR, BETAS, STEPS = 1e-2, (0.9, 0.999), 3


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW's epsilon (the test's: 1e-8)")
    EPS = p.parse_args(argv).adam_epsilon
    os.environ.setdefault("GLOG_v", "3")
    import torch
    from mindspore import Tensor

    from finetune_data import write_dataset
    from mindone_idefics3.cli_options import load_processor_and_model
    from mindone_idefics3.demo import write_demo_checkpoint
    from mindone_idefics3.distributed import World
    from mindone_idefics3.finetune.cli import build_parser
    from mindone_idefics3.finetune.data import TrainingData, collate_examples, scored_tokens
    from mindone_idefics3.finetune.lora import attach_lora, select_targets
    from mindone_idefics3.finetune.optim import AdamW, clip_coefficient, grad_norm, lr_factor
    from mindone_idefics3.finetune.trainer import TrainConfig, Trainer

    tmp = Path(tempfile.mkdtemp(prefix="dp-rounding-"))
    args = build_parser().parse_args([
        "--model", str(write_demo_checkpoint(tmp / "model")), "--data", str(write_dataset(tmp / "data", 8)),
        "--max-steps", str(STEPS), "--lora-dropout", "0", "--grad-accum", "2", "--no-image-splitting",
        "--no-progress", "--learning-rate", str(LR), "-o", str(tmp / "out")])
    data = TrainingData.open(args.data)
    processor, model, _, _ = load_processor_and_model(args, progress=False)
    for p in model.get_parameters():
        p.requires_grad = False
    params = attach_lora(model, select_targets(model, args.lora_targets), args.lora_rank, args.lora_alpha,
                         0.0, seed=args.seed).parameters()
    for p in params:
        p.requires_grad = True
    model.set_train(True)
    names = [p.name for p in params]

    def trainer(batch, world):
        cfg = TrainConfig(learning_rate=LR, grad_accum=2, batch_size=batch, max_steps=STEPS, seed=0)
        return Trainer(model, processor, data, params, cfg, tmp / "out", world, progress=False)

    one, ranks = trainer(2, World(0, 1)), [trainer(1, World(r, 2)) for r in (0, 1)]

    def local(tr, step, swap=False):
        """This rank's summed gradients (fp32 numpy), labelled tokens and loss sum: the trainer's micro loop."""
        grads, count, loss = None, 0, 0.0
        for indices in tr.micro_batches(step, tr.world.rank):
            batch = collate_examples(tr.samples(indices[::-1] if swap else indices, data), tr.pad_id)
            value, g = tr.grad_fn(batch)
            g = [x.asnumpy().astype(np.float32) for x in g]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            count += scored_tokens(batch["labels"])
            loss += float(value.asnumpy())
        return grads, count, loss

    def gradients(setting, step, swap=False):
        if setting == "one":
            return local(one, step, swap)
        (g0, c0, l0), (g1, c1, l1) = local(ranks[0], step), local(ranks[1], step)
        return [a + b for a, b in zip(g0, g1)], c0 + c1, l0 + l1

    def set_weights(ws):
        for p, w in zip(params, ws):
            p.set_data(Tensor(w.copy()))

    def largest_difference(xs, ys):
        return max(float(np.abs(x - y).max()) for x, y in zip(xs, ys)) / max(float(np.abs(x).max()) for x in xs)

    start = [p.asnumpy().copy() for p in params]
    weights = {k: [w.copy() for w in start] for k in ("one", "two")}
    ours = {k: AdamW(params, LR, BETAS, EPS, 0.0) for k in weights}
    torch_w = {k: [torch.nn.Parameter(torch.tensor(w.copy())) for w in start] for k in weights}
    torch_opt = {k: torch.optim.AdamW(torch_w[k], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0) for k in weights}
    exact = {k: ([w.astype(np.float64) for w in start], [0.0] * len(start), [0.0] * len(start)) for k in weights}
    report = {"lr": LR, "eps": EPS, "steps": []}
    for step in range(STEPS):
        lr = LR * lr_factor("linear", step, 0, STEPS)
        grads, scales, losses = {}, {}, {}
        for k in weights:
            set_weights(weights[k])
            g, count, loss = gradients(k, step)
            norm = grad_norm([Tensor(x) for x in g]) / count
            grads[k], scales[k], losses[k] = g, clip_coefficient(norm, 1.0) / count, loss / count
        set_weights(weights["one"])  # both settings and a reordered batch at the same weights
        same_two, swapped = gradients("two", step)[0], gradients("one", step, swap=True)[0]
        row = {"step": step + 1, "lr": lr, "loss_one": losses["one"], "loss_two": losses["two"],
               "grad_one_vs_two_same_weights": largest_difference(grads["one"], same_two),
               "grad_one_vs_rows_swapped": largest_difference(grads["one"], swapped)}
        for k in weights:
            set_weights(weights[k])
            ours[k].step([Tensor(x) for x in grads[k]], lr, grad_scale=scales[k])
            weights[k] = [p.asnumpy().copy() for p in params]
            for group in torch_opt[k].param_groups:
                group["lr"] = lr
            for p, x in zip(torch_w[k], grads[k]):
                p.grad = torch.tensor(x * np.float32(scales[k]))
            torch_opt[k].step()
            w64, m64, v64 = exact[k]
            t = step + 1
            for i, x in enumerate(grads[k]):
                g64 = x.astype(np.float64) * scales[k]
                m64[i] = BETAS[0] * m64[i] + (1 - BETAS[0]) * g64
                v64[i] = BETAS[1] * v64[i] + (1 - BETAS[1]) * g64 * g64
                w64[i] = w64[i] - lr / (1 - BETAS[0] ** t) * m64[i] / (np.sqrt(v64[i] / (1 - BETAS[1] ** t)) + EPS)
        ratio, i, at = max((float(np.abs(a - b).max()) / (1e-4 * max(float(np.abs(a).max()), 1e-3)), i,
                            np.unravel_index(int(np.argmax(np.abs(a - b))), a.shape))
                           for i, (a, b) in enumerate(zip(weights["one"], weights["two"])))
        g1, g2 = (float(grads[k][i][at]) * scales[k] for k in ("one", "two"))
        g_swapped = float(swapped[i][at]) * scales["one"]  # weights "one", as g1
        tw = {k: torch_w[k][i].detach().numpy()[at] for k in weights}
        row["worst"] = {
            "param": names[i], "element": [int(x) for x in at], "over_tolerance": ratio,
            "fused_diff": float(abs(weights["one"][i][at] - weights["two"][i][at])),
            "torch_fp32_diff": float(abs(tw["one"] - tw["two"])),
            "exact_f64_diff": float(abs(exact["one"][0][i][at] - exact["two"][0][i][at])),
            "fused_vs_torch_one": float(abs(weights["one"][i][at] - tw["one"])),
            "scaled_grad_one": g1, "scaled_grad_two": g2, "scaled_grad_one_rows_swapped": g_swapped,
            "grad_over_eps": g1 / EPS, "grad_relative_diff": abs(g1 - g2) / abs(g1),
        }
        if step == 0:  # Adam's first step is lr·g/(|g| + eps): its slope in g is lr·eps/(|g| + eps)²
            row["worst"]["first_step_slope_prediction"] = lr * EPS * abs(g1 - g2) / (abs(g1) + EPS) ** 2
            first = [lr * g / (abs(g) + EPS) for g in (g1, g_swapped)]  # torch's first step, in float64
            row["worst"]["first_step_diff_one_vs_rows_swapped"] = abs(first[0] - first[1])
        row["fused_vs_torch_max_one"] = max(float(np.abs(w - t.detach().numpy()).max())
                                            for w, t in zip(weights["one"], torch_w["one"]))
        report["steps"].append(row)
        print(json.dumps(row, indent=1))
    name = "data-parallel-rounding" + ("" if EPS == 1e-8 else f"-eps{EPS:g}")
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
