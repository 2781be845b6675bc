"""Idefics3-8B fine-tuning on paper: memory per NPU for LoRA and full fine-tuning, recompute off and on, under
msrun data parallel (every worker holds the whole model, its gradients and optimizer state; per-worker batch 1).

    python benchmarks/finetune_memory_on_paper.py [--text-tokens 128] [--tiles 17] [--workers 8]

Counted from the shapes of HuggingFaceM4/Idefics3-8B-Llama3 (the same constants as memory_on_paper.py): Llama 3 8B
(32 layers, 4096, MLP 14336, 32 query / 8 KV heads of 128, vocabulary 128259, untied lm_head), SigLIP-so400m
(27 layers, 1152, MLP 4304), 169 tokens per 364-px tile. Activations are what the backward pass needs saved per
decoder layer with Ascend's flash attention (no score matrix), bf16: the layer's input and norm, q/k/v (and the
rotated q/k), the attention output, the residual and its norm, gate‖up, silu(gate) and the product — 89,088
values per token. Recompute keeps each layer's input only and rebuilds one layer at a time. The loss projects
only the labelled positions (--answer-tokens of them, fp32 logits and their softmax). A frozen vision tower runs
without a backward pass: one compiled layer of a 4-tile chunk (memory_on_paper.py's figure). --train-vision adds
the tower's saved activations (18,976 values per patch per layer) and its weights' training state.

Training state per trainable parameter: LoRA and "fp32" full fine-tuning (what finetune.py does today) keep fp32
weights, fp32 gradients and AdamW's two fp32 moments (16 B); "bf16 + fp32 master" is the mixed-precision recipe
(bf16 weights 2 B + fp32 gradients 4 B + fp32 master 4 B and moments 8 B = 18 B). ZeRO rows divide over the
workers the optimizer's 12 B (stage 1), then the gradients (2), then the bf16 weights (3) — a sharding
finetune.py does not do (yet; MindSpore's `parallel_optimizer` is its Ascend form). A ZeRO-3 worker briefly
gathers one layer's weights at a time (not counted). Prints a
markdown table; no MindSpore needed.
"""
from __future__ import annotations

import argparse

import memory_on_paper as paper

BF16, FP32 = 2, 4
GB = 1e9
T, V = paper.T, paper.V
TEXT_LAYER = (T["d"] * (T["heads"] + 2 * T["kv_heads"]) * T["head"] + T["heads"] * T["head"] * T["d"]
              + 3 * T["d"] * T["mlp"] + 2 * T["d"])
TEXT_PARAMS = T["layers"] * TEXT_LAYER + 2 * T["vocab"] * T["d"] + T["d"]  # layers, embeddings, lm_head, norm
CONNECTOR_PARAMS = V["d"] * 4 * T["d"]  # pixel shuffle (scale 2: 4 × 1152 wide) → 4096, no bias
VISION_PARAMS = paper.WEIGHTS_BYTES / BF16 - TEXT_PARAMS - CONNECTOR_PARAMS
LORA_TARGETS = [(T["d"], T["heads"] * T["head"]), (T["d"], T["kv_heads"] * T["head"]),
                (T["d"], T["kv_heads"] * T["head"]), (T["heads"] * T["head"], T["d"]),
                (T["d"], T["mlp"]), (T["d"], T["mlp"]), (T["mlp"], T["d"])]  # q k v o gate up down
TEXT_SAVED_PER_TOKEN = (T["d"] * 2 + (T["heads"] + 2 * T["kv_heads"]) * T["head"]
                        + (T["heads"] + T["kv_heads"]) * T["head"] + T["heads"] * T["head"] + 2 * T["d"]
                        + 2 * T["mlp"] + 2 * T["mlp"])  # 89,088
VISION_SAVED_PER_PATCH = 6 * V["d"] + 3 * V["d"] + 2 * V["mlp"]  # 18,976: x, norms, qkv, attn, h; fc1, gelu


def lora_params(rank: int) -> float:
    return T["layers"] * sum(rank * (i + o) for i, o in LORA_TARGETS)


def activations(seq: int, tiles: int, answer: int, recompute: bool, train_vision: bool) -> float:
    """Bytes the forward keeps for the backward (bf16), plus the transient of one recomputed layer."""
    layer = seq * TEXT_SAVED_PER_TOKEN * BF16
    text = (T["layers"] * seq * T["d"] * BF16 + layer) if recompute else T["layers"] * layer
    loss = 3 * answer * T["vocab"] * FP32  # logits, log-softmax, its gradient
    if not train_vision:
        return text + loss + paper.vision_layer_bytes(min(tiles, 4), True)
    patches = tiles * V["patches"]
    vlayer = patches * VISION_SAVED_PER_PATCH * BF16
    vision = (V["layers"] * patches * V["d"] * BF16 + vlayer) if recompute else V["layers"] * vlayer
    return text + loss + vision


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, default=17, help="image tiles per example (4×4 + 1 for one large image)")
    p.add_argument("--text-tokens", type=int, default=128, help="text tokens besides the image tokens")
    p.add_argument("--answer-tokens", type=int, default=64, help="labelled tokens (the loss's projected rows)")
    p.add_argument("--workers", type=int, default=8, help="data-parallel NPUs (the ZeRO rows divide by it)")
    p.add_argument("--lora-rank", type=int, default=8)
    args = p.parse_args(argv)
    seq = args.tiles * V["tokens"] + args.text_tokens
    all_params = TEXT_PARAMS + CONNECTOR_PARAMS + VISION_PARAMS
    full_trainable = TEXT_PARAMS + CONNECTOR_PARAMS
    w = args.workers
    rows = [  # name, frozen weight bytes, trainable params, bytes per trainable param: weights, grads, optimizer
        ("LoRA r%d, bf16 base" % args.lora_rank, all_params * BF16, lora_params(args.lora_rank), (4, 4, 8), False),
        ("full, fp32 (today)", (all_params - full_trainable) * FP32, full_trainable, (4, 4, 8), False),
        ("full, bf16 + fp32 master", (all_params - full_trainable) * BF16, full_trainable, (2, 4, 12), False),
        (f"full, bf16 + fp32 master, ZeRO-1 over {w}", (all_params - full_trainable) * BF16, full_trainable,
         (2, 4, 12 / w), False),
        (f"full, bf16 + fp32 master, ZeRO-2 over {w}", (all_params - full_trainable) * BF16, full_trainable,
         (2, 4 / w, 12 / w), False),
        (f"full, bf16 + fp32 master, ZeRO-3 over {w}", (all_params - full_trainable) * BF16, full_trainable,
         (2 / w, 4 / w, 12 / w), False),
        (f"full + vision, bf16 + fp32 master, ZeRO-3 over {w}", 0.0, all_params, (2 / w, 4 / w, 12 / w), True),
    ]
    print(f"Idefics3-8B fine-tuning, per NPU, batch 1 per worker: {args.tiles} tiles + {args.text_tokens} text "
          f"tokens = {seq} tokens, {args.answer_tokens} labelled; {TEXT_PARAMS / 1e9:.2f} B text + "
          f"{CONNECTOR_PARAMS / 1e6:.0f} M connector + {VISION_PARAMS / 1e9:.2f} B vision parameters\n")
    print("| mode | recompute | frozen weights | trainable: weights + grads + AdamW | activations | total "
          "| 32 GB NPU | 64 GB NPU |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | :---: | :---: |")
    for name, frozen, trainable, (wb, gb, ob), vision in rows:
        state = trainable * (wb + gb + ob)
        for recompute in (False, True):
            act = activations(seq, args.tiles, args.answer_tokens, recompute, vision)
            total = frozen + state + act
            fits = ["yes" if total < size * GB * 0.9 else "no" for size in (32, 64)]
            print(f"| {name} | {'on' if recompute else 'off'} | {frozen / GB:.1f} GB | {state / GB:.1f} GB "
                  f"| {act / GB:.1f} GB | {total / GB:.1f} GB | {fits[0]} | {fits[1]} |")
    print("\n'yes' leaves 10% of the device for the framework and its workspace.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
