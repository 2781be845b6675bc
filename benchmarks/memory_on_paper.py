"""Idefics3-8B on paper: peak activation memory of vision and prefill in bf16, for chunks of 1, 4 and 17 tiles.

    python benchmarks/memory_on_paper.py [--prompt-text-tokens 64] [--new-tokens 500]

Counts the tensors alive at the worst point of one layer (what one compiled call of the layer graph holds), from
the shapes of HuggingFaceM4/Idefics3-8B-Llama3: 4×4 + 1 tiles of 364 px (26² patches, 169 tokens each after the
pixel shuffle), SigLIP-so400m (27 layers, width 1152, MLP 4304, 16 heads of 72, padded to 80 for the kernels),
Llama 3 8B (32 layers, 4096, MLP 14336, 32 query / 8 KV heads of 128). Two attention cases: Ascend's flash
kernels (no score matrix) and the eager path (fp32 scores, in blocks of 2^22 for long prompts). "Whole graph"
is one compiled graph for all layers that keeps every layer's activations until it ends, as measured on the CPU
before the per-layer graphs (~1.8 GB per SmolVLM tile). Prints a markdown table; no MindSpore needed.
"""
from __future__ import annotations

import argparse

BF16, FP32 = 2, 4
GB = 1e9
V = dict(layers=27, d=1152, mlp=4304, heads=16, head=72, head_kernel=80, patches=26 * 26, tokens=169)
T = dict(layers=32, d=4096, mlp=14336, heads=32, kv_heads=8, head=128, vocab=128259)
WEIGHTS_BYTES = 8.46e9 * BF16  # Idefics3-8B-Llama3: 8.46 B parameters
TILES = 17
SCORE_BLOCK = 1 << 22  # ops/attention.py SCORE_BLOCK_ELEMENTS


def vision_layer_bytes(tiles: int, flash: bool) -> float:
    """Worst point of one SigLIP layer for `tiles` tiles: the MLP (fc1 out + fp32 GELU temporaries) or attention."""
    p, d = V["patches"] * tiles, V["d"]
    stream = 2 * p * d * BF16  # residual in + the sum being built
    attn_io = p * 3 * d * BF16 + 3 * p * V["heads"] * V["head_kernel"] * BF16  # qkv + padded q, k, v
    n = V["patches"]  # the eager vision attention computes a chunk's scores at once (no query blocks)
    scores = 0 if flash else 3 * tiles * V["heads"] * n * n * FP32  # scores, bias-added, softmax
    mlp = p * V["mlp"] * (BF16 + 2 * FP32)  # fc1 out, fp32 copy, sigmoid-form temporary
    return stream + max(attn_io + scores, mlp)


def prefill_layer_bytes(seq: int, flash: bool) -> float:
    """Worst point of one decoder layer over a `seq`-token prompt (batch 1)."""
    d = T["d"]
    stream = 2 * seq * d * BF16 + seq * d * FP32  # residual, the sum, fp32 RMSNorm temporary
    qkv = seq * (T["heads"] + 2 * T["kv_heads"]) * T["head"] * BF16
    if flash:
        scores = 0
    else:
        block = max(1, SCORE_BLOCK // (T["heads"] * seq))
        scores = 3 * T["heads"] * min(block, seq) * seq * FP32
    attention = 2 * qkv + scores
    mlp = seq * 2 * T["mlp"] * BF16 + 2 * seq * T["mlp"] * BF16  # gate‖up, silu(gate), silu·up
    return stream + max(attention, mlp)


def kv_cache_bytes(slots: int) -> float:
    return T["layers"] * 2 * T["kv_heads"] * slots * T["head"] * BF16


def rope_tables_bytes(seq: int) -> float:
    return 2 * seq * (T["heads"] + 2 * T["kv_heads"]) * T["head"] * BF16  # cos, signed sin of the fused row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-text-tokens", type=int, default=64, help="text tokens besides the image tokens")
    p.add_argument("--new-tokens", type=int, default=500, help="tokens to generate (KV cache slots)")
    args = p.parse_args(argv)
    seq = -(-(TILES * V["tokens"] + args.prompt_text_tokens) // 64) * 64  # the prefill bucket
    cache = kv_cache_bytes(-(-(seq + args.new_tokens) // 64) * 64)
    prefill = {f: prefill_layer_bytes(seq, f) + rope_tables_bytes(seq) + cache for f in (True, False)}
    print(f"Idefics3-8B, bf16, {TILES} tiles = {TILES * V['tokens']} image tokens, prompt bucket {seq} tokens, "
          f"KV cache {cache / GB:.2f} GB, weights {WEIGHTS_BYTES / GB:.1f} GB\n")
    print("| vision chunk (tiles) | attention | vision peak, per layer | vision peak, whole graph "
          "| prefill peak, per layer | prefill peak, whole graph | weights + peak, per layer / whole graph "
          "| 32 GB NPU | 64 GB NPU |")
    print("| ---: | :--- | ---: | ---: | ---: | ---: | ---: | :---: | :---: |")
    for chunk in (1, 4, 17):
        for flash in (True, False):
            vis = vision_layer_bytes(chunk, flash)
            vis_whole = vis * V["layers"]
            pre, pre_whole = prefill[flash], prefill_layer_bytes(seq, flash) * T["layers"] + cache
            totals = (WEIGHTS_BYTES + max(vis, pre), WEIGHTS_BYTES + max(vis_whole, pre_whole))

            def fits(device_gb):
                return " / ".join("yes" if t < device_gb * GB * 0.9 else "no" for t in totals)

            print(f"| {chunk} | {'flash' if flash else 'eager'} | {vis / GB:.2f} GB | {vis_whole / GB:.1f} GB "
                  f"| {pre / GB:.2f} GB | {pre_whole / GB:.1f} GB | {totals[0] / GB:.1f} / {totals[1] / GB:.1f} GB "
                  f"| {fits(32)} | {fits(64)} |")
    print("\n'yes' leaves 10% of the device for the framework; 'per layer / whole graph'. Whole-graph columns: "
          "what the same input would need if a compiled graph kept every layer's activations (the CPU "
          "behaviour that made the per-layer graphs necessary; Ascend's graph memory planner may reuse more).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
