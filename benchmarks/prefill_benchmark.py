"""The text prefill against its own matmuls and against transformers, in one process, interleaved.

    python benchmarks/prefill_benchmark.py --preset smolvlm-256m          (881 tokens: the photo's prompt)
    python benchmarks/prefill_benchmark.py --preset tiny --tokens 200 --repeats 2

A prompt of --tokens random text tokens (no image: the decoder's part of a prefill), fp32. Every side runs once
untimed (graphs compile there), then --repeats rounds of ours, matmuls, transformers in turn: on a shared machine
the load then weighs on every side alike. Medians of wall seconds and of CPU seconds (time.process_time: every
thread of the process) are reported; the ratio "ours ÷ matmuls" is the figure of merit. On a loaded machine the
CPU seconds are the steadier measure (best with --threads 1: no kernel thread waits for a descheduled partner).

  ours          mindone_idefics3.generation.prefill(..., use_jit=True) with no image, the whole call: the prompt
                left-padded to its 64-token bucket, embedded, through the compiled per-layer graph into a static
                cache of cache_length(tokens + --new-tokens) slots, the final norm and the lm_head of the last
                position (GenerationStats.prefill_seconds, the call without the embedding lookup, is in the JSON).
  matmuls       the same prefill's matmuls alone, as compiled MindSpore fp32 matmuls at the prompt's real length
                (--tokens, not the padded one), each layer's from the host as ours: per layer one compiled graph of
                the four projections (qkv, o, gate_up, down: MatMul(transpose_b=True) with that layer's weights),
                and one of the attention matmuls QKᵀ (BatchMatMul(transpose_b=True)) and PV (BatchMatMul), all
                heads over the whole prompt, grouped by KV head as ours; plus the lm_head of the last position.
                The attention matmuls are timed square (S×S) and counted at the causal share S(S+1)/(2·S²): what a
                causal prefill needs (the square figure is in the JSON too).
  transformers  its text model (Idefics3's LlamaModel) on the same ids into a DynamicCache, then its lm_head on
                the last position, under torch.inference_mode, its default attention (sdpa); --reference none
                leaves it out.
  logits        relative L2 of our last-position logits against transformers' (fp32: expect ~1e-6).
  peak RSS      per call: the process's peak resident memory during the call (VmHWM, reset before it) and that
                peak above the RSS before the call; the largest over the timed calls of each side.
  breakdown     where ours goes beyond the matmuls: one layer of each chunk shape the prefill runs (the chunks
                and their key lengths are printed), timed whole as the compiled layer graph and as pieces
                (projections; attention matmuls over the chunk's keys; mask + softmax; the rest = rope, norms,
                SwiGLU, cache write), then the host's share: the prefill minus its layer calls.

Prints markdown tables (the machine first) and writes benchmarks/results/prefill-<preset or model>-cpu.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import RESULTS
from bench.args import add_checkpoint_args, add_threads_arg, checked, use_threads
from bench.machine import describe, finish, headline
from bench.memory import reset_peak, rss_mb
from bench.presets import resolve_checkpoint
from bench.processes import script_main
from bench.report import table, write_json
from mindone_idefics3.process import peak_rss_bytes

PHOTO_PROMPT_TOKENS = 881  # the 640x480 test photo at SmolVLM's default processor settings (13 tiles)
RATIO_LIMIT = 1.3  # the done-criterion: the prefill within 1.3x its matmul time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    add_threads_arg(p)
    p.add_argument("--tokens", type=int, default=PHOTO_PROMPT_TOKENS,
                   help=f"prompt tokens (default {PHOTO_PROMPT_TOKENS}: the photo's prompt at SmolVLM's settings)")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="tokens the cache leaves room for after the prompt, as generate() sizes it (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--reference", choices=["hf", "none"], default="hf",
                   help="hf: transformers' prefill in the same rounds; none: ours and the matmuls only")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="time one layer of each chunk shape whole and in pieces (default: on)")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/prefill-<preset or model>-cpu.json)")
    args = checked(p, p.parse_args(argv))
    if args.tokens < 2 or args.new_tokens < 1:
        p.error("--tokens must be at least 2 and --new-tokens at least 1")
    return args


class Clock:
    """Wall and CPU seconds of this process between `start` and `stop` (CPU: every thread's, time.process_time)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


class PeakMeter:
    """Times calls (wall, CPU) and keeps the largest peak RSS (and peak above the RSS before) over them."""

    def __init__(self):
        self.peak_mb = self.above_mb = 0.0

    def __call__(self, fn):
        before = rss_mb()
        reset_peak()
        clock = Clock()
        result = fn()
        wall, cpu = clock.stop()
        peak = peak_rss_bytes() / 2**20
        self.peak_mb, self.above_mb = max(self.peak_mb, peak), max(self.above_mb, peak - before)
        return wall, cpu, result


def our_prefill(model, ids: np.ndarray, cache_len: int):
    """(GenerationStats.prefill_seconds, last-position logits (V,) fp32)."""
    from mindone_idefics3.generation import GenerationStats, prefill

    stats = GenerationStats()
    logits, _ = prefill(model, ids, np.ones_like(ids), None, None, cache_len, use_jit=True, stats=stats)
    return stats.prefill_seconds, logits.asnumpy()[0]


class Matmuls:
    """The prefill's matmuls at S tokens (see the module docstring), compiled, with each layer's weights."""

    def __init__(self, model, tokens: int, seed: int = 0):
        import mindspore as ms
        from mindspore import Tensor, ops

        from mindone_idefics3.runtime import as_graph_inputs

        cfg = model.config.text_config
        text = model.model.text_model
        rng = np.random.default_rng(seed)
        nkv, rep, d = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim

        def rand(*shape):
            return Tensor(rng.standard_normal(shape).astype(np.float32) * 0.05)

        s, hidden, inter = tokens, cfg.hidden_size, cfg.intermediate_size
        self.x, self.attn_out, self.act = rand(s, hidden), rand(s, cfg.num_attention_heads * d), rand(s, inter)
        self.q, self.k, self.v = rand(1, nkv, rep * s, d), rand(1, nkv, s, d), rand(1, nkv, s, d)
        self.probs = Tensor(np.full((1, nkv, rep * s, s), 1.0 / s, np.float32))
        self.last = rand(1, hidden)
        # (qkv, o, gate_up, down) weights of each layer; state() = (k, v, norm, qkv, b, o, b, norm, gate_up, b,
        # down, b)
        self.weights = [[as_graph_inputs(layer.state())[i] for i in (3, 5, 8, 10)] for layer in text.layers]
        self.lm_head = as_graph_inputs([text.embed_tokens.weight if model.tied else model.lm_head.weight])[0]
        mm, bmm_t, bmm = ops.MatMul(transpose_b=True), ops.BatchMatMul(transpose_b=True), ops.BatchMatMul()

        def projections(x, attn_out, act, qkv_w, o_w, gate_up_w, down_w):
            return mm(x, qkv_w), mm(attn_out, o_w), mm(x, gate_up_w), mm(act, down_w)

        def attention(q, k, probs, v):
            return bmm_t(q, k), bmm(probs, v)

        def head(x, w):
            return mm(x, w)

        self.projections, self.attention, self.head = ms.jit(projections), ms.jit(attention), ms.jit(head)
        self.causal_share = (s + 1) / (2 * s)
        self.flops = dict(
            projections=2 * s * len(self.weights) * (hidden * text.layers[0].self_attn.qkv_proj.weight.shape[0]
                                                     + cfg.num_attention_heads * d * hidden + 3 * hidden * inter),
            attention_square=len(self.weights) * 2 * 2 * cfg.num_attention_heads * s * s * d,
            lm_head=2 * hidden * self.lm_head.shape[0])

    def run(self) -> dict:
        """Seconds of each part (the attention's at the square and at the causal share) and the total counted."""
        from mindone_idefics3.runtime import idle_pipeline

        parts = {}
        with idle_pipeline():
            clock = Clock()
            for w in self.weights:
                out = self.projections(self.x, self.attn_out, self.act, *w)
            out[-1].asnumpy()
            parts["projections_s"], parts["projections_cpu_s"] = clock.stop()
            clock = Clock()
            for _ in self.weights:
                out = self.attention(self.q, self.k, self.probs, self.v)
            out[-1].asnumpy()
            parts["attention_square_s"], parts["attention_square_cpu_s"] = clock.stop()
            clock = Clock()
            self.head(self.last, self.lm_head).asnumpy()
            parts["lm_head_s"], parts["lm_head_cpu_s"] = clock.stop()
        for unit in ("s", "cpu_s"):
            parts[f"attention_causal_{unit}"] = parts[f"attention_square_{unit}"] * self.causal_share
            parts[f"total_{unit}"] = sum(parts[f"{k}_{unit}"] for k in ("projections", "attention_causal", "lm_head"))
        return parts


def reference_prefill(ref, ids: np.ndarray):
    """The last-position logits (V,) fp32 of transformers' text prefill into a DynamicCache."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        out = ref.model.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=True,
                                   past_key_values=DynamicCache())
        return ref.lm_head(out.last_hidden_state[:, -1]).float().numpy()[0]


def chunk_plan(text, tokens: int) -> list:
    """The (queries, keys) of each chunk our prefill runs for this prompt (LlamaModel.prefill / extend)."""
    from mindone_idefics3.generation import prompt_slots

    s = prompt_slots(tokens, True)
    chunk = text.prefill_chunk(1, s, s)
    if chunk >= s:
        return [(s, s)]
    return [(min(start + chunk, s) - start, min(start + chunk, s)) for start in range(0, s, chunk)]


def breakdown(model, plan: list, repeats: int, prefill_s: float) -> dict:
    """One layer of each chunk shape: the compiled layer graph whole, and its pieces compiled apart."""
    import mindspore as ms
    from mindspore import Tensor, ops

    from mindone_idefics3.ops import attention as attention_ops
    from mindone_idefics3.ops.kv_cache import scatter_index
    from mindone_idefics3.runtime import as_graph_inputs, idle_pipeline

    text = model.model.text_model
    cfg = model.config.text_config
    nq, nkv, d, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    rep, rng = nq // nkv, np.random.default_rng(1)
    state = as_graph_inputs(text.layers[0].state())
    mm, bmm_t = ops.MatMul(transpose_b=True), ops.BatchMatMul(transpose_b=True)

    def projections(x, attn_out, act, qkv_w, o_w, gate_up_w, down_w):
        return mm(x, qkv_w), mm(attn_out, o_w), mm(x, gate_up_w), mm(act, down_w)

    def attention_matmuls(q, k, probs, v):
        return bmm_t(q, k), ops.matmul(probs, v)

    def mask_softmax(scores, bias):
        return ops.softmax(attention_ops.add_bias(scores, bias, rep), axis=-1)

    graphs = [ms.jit(f) for f in (projections, attention_matmuls, mask_softmax)]

    def rand(*shape):
        return Tensor(rng.standard_normal(shape).astype(np.float32) * 0.05)

    def timed(fn, *args):
        fn(*args)
        times = []
        with idle_pipeline():
            for _ in range(repeats):
                t = time.perf_counter()
                out = fn(*args)
                (out[-1] if isinstance(out, tuple) else out).asnumpy()
                times.append(time.perf_counter() - t)
        return float(np.median(times))

    rows = []
    for queries, keys in plan:
        start = keys - queries
        slots = Tensor(np.arange(start, keys, dtype=np.int32))
        positions = Tensor(np.arange(start, keys, dtype=np.int32)[None])
        keep = Tensor(np.ones((1, keys), np.bool_))
        whole_prompt = start == 0 and len(plan) == 1
        rope, mask, _ = text.tables(positions, None if whole_prompt else keep, slots, False, True, grouped=True)
        index = scatter_index(1, nkv, slots)
        shape = (1, queries) if whole_prompt else (1, queries, keys)
        mode = "fill" if whole_prompt else "decode"
        x = rand(queries, hidden)
        layer = timed(text._layer_graph, x, ms.mutable(rope), mask, slots, index, mode, shape, *state)
        proj = timed(graphs[0], x, rand(queries, nq * d), rand(queries, cfg.intermediate_size), state[3], state[5],
                     state[8], state[10])
        attn = timed(graphs[1], rand(1, nkv, rep * queries, d), rand(1, nkv, keys, d),
                     rand(1, nkv, rep * queries, keys), rand(1, nkv, keys, d))
        soft = timed(graphs[2], rand(1, nkv, rep * queries, keys), mask)
        rows.append(dict(queries=queries, keys=keys, layer_ms=layer * 1e3, projections_ms=proj * 1e3,
                         attention_matmuls_ms=attn * 1e3, mask_softmax_ms=soft * 1e3,
                         rest_ms=(layer - proj - attn - soft) * 1e3))
    layers = len(text.layers)
    calls_s = sum(r["layer_ms"] for r in rows) * layers / 1e3
    return dict(chunks=rows, layer_calls_s=calls_s, host_and_outside_layers_s=prefill_s - calls_s,
                note="per chunk shape: one layer's compiled graph whole and its pieces compiled apart (medians); "
                     "layer_calls_s = sum over chunks x layers; host_and_outside_layers_s = the prefill's median "
                     "minus that (tables per chunk, embedding, final norm, lm_head, call overhead)")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = use_threads(args.threads)
    checkpoint, name = resolve_checkpoint(args, ["fp32"])
    reference = args.reference == "hf"
    machine = describe(threads, "CPU", reference=reference)

    from bench.runs import load_models
    from mindone_idefics3.generation import cache_length, prompt_slots

    model, ref, facts = load_models(checkpoint, "fp32", "CPU", threads, reference)
    text = model.model.text_model
    cfg = model.config.text_config
    rng = np.random.default_rng(0)
    special = {model.config.image_token_id, getattr(model.config, "pad_token_id", None)}
    ids = rng.integers(0, cfg.vocab_size, (1, args.tokens)).astype(np.int32)
    for token in special - {None}:  # an <image> id would ask for image features
        ids[ids == token] = (token + 1) % cfg.vocab_size
    cache_len = cache_length(args.tokens + args.new_tokens)
    matmuls = Matmuls(model, args.tokens)

    meters = dict(ours=PeakMeter(), matmuls=PeakMeter(), transformers=PeakMeter())
    wall, cpu = ({k: [] for k in meters} for _ in range(2))
    matmul_parts, stats_seconds = [], []
    warm = dict(ours=meters["ours"](lambda: our_prefill(model, ids, cache_len))[0],
                matmuls=matmuls.run()["total_s"])
    plan = chunk_plan(text, args.tokens)  # after a prefill: the cache is set up
    ours_logits = ref_logits = None
    if reference:
        warm["transformers"] = meters["transformers"](lambda: reference_prefill(ref, ids))[0]
    meters = dict(ours=PeakMeter(), matmuls=PeakMeter(), transformers=PeakMeter())  # the timed calls' peaks
    for _ in range(args.repeats):
        w, c, (seconds, ours_logits) = meters["ours"](lambda: our_prefill(model, ids, cache_len))
        wall["ours"].append(w), cpu["ours"].append(c), stats_seconds.append(seconds)
        _, _, parts = meters["matmuls"](matmuls.run)
        matmul_parts.append(parts)
        wall["matmuls"].append(parts["total_s"]), cpu["matmuls"].append(parts["total_cpu_s"])
        if reference:
            w, c, ref_logits = meters["transformers"](lambda: reference_prefill(ref, ids))
            wall["transformers"].append(w), cpu["transformers"].append(c)
    median = {k: float(np.median(v)) for k, v in wall.items() if v}
    median_cpu = {k: float(np.median(v)) for k, v in cpu.items() if v}
    parts = {k: float(np.median([p[k] for p in matmul_parts])) for k in matmul_parts[0]}
    logits_rel_l2 = None
    if reference:
        logits_rel_l2 = float(np.linalg.norm(ours_logits - ref_logits) / np.linalg.norm(ref_logits))
    detail = breakdown(model, plan, args.repeats, median["ours"]) if args.breakdown else None
    finish(machine)

    ratio = median["ours"] / median["matmuls"]
    result = dict(
        machine=machine, checkpoint=name, tokens=args.tokens, padded_tokens=prompt_slots(args.tokens, True),
        cache_slots=cache_len, repeats=args.repeats, load=facts,
        idle_pipeline=os.environ.get("MINDONE_IDLE_PIPELINE", "1"), chunks=[dict(queries=q, keys=k) for q, k in plan],
        wall_seconds={k: [round(x, 4) for x in v] for k, v in wall.items() if v},
        cpu_seconds={k: [round(x, 4) for x in v] for k, v in cpu.items() if v},
        ours_generation_stats_prefill_seconds=[round(x, 4) for x in stats_seconds],
        warm_up_seconds=warm, median_seconds=median, median_cpu_seconds=median_cpu,
        matmul_parts_median_seconds=parts, matmul_flops=matmuls.flops,
        matmul_gflops_per_s=dict(projections=matmuls.flops["projections"] / parts["projections_s"] / 1e9,
                                 attention=matmuls.flops["attention_square"] / parts["attention_square_s"] / 1e9),
        ours_over_matmuls=ratio, ours_over_matmuls_cpu=median_cpu["ours"] / median_cpu["matmuls"],
        ratio_limit=RATIO_LIMIT, met=ratio <= RATIO_LIMIT,
        transformers_over_ours=median["transformers"] / median["ours"] if reference else None,
        logits_rel_l2_vs_transformers=logits_rel_l2,
        peak_rss_mb={k: round(m.peak_mb) for k, m in meters.items() if wall[k]},
        peak_above_call_start_mb={k: round(m.above_mb) for k, m in meters.items() if wall[k]},
        breakdown=detail)
    out = Path(args.out) if args.out else RESULTS / f"prefill-{name}-cpu.json"
    write_json(out, result)
    print_tables(result)
    print(f"\nwrote {out}")
    return 0


def print_tables(r: dict) -> None:
    print(headline(r["machine"]))
    print(f"\n{r['tokens']} prompt tokens ({r['padded_tokens']} with the bucket's left padding), cache of "
          f"{r['cache_slots']} slots, chunks (queries x keys): "
          + ", ".join(f"{c['queries']}x{c['keys']}" for c in r["chunks"]) + f"; {r['repeats']} rounds, medians.\n")
    med, cpu, parts = r["median_seconds"], r["median_cpu_seconds"], r["matmul_parts_median_seconds"]
    names = dict(ours="ours: generation.prefill (compiled per-layer graph)",
                 matmuls="matmuls alone (causal share of attention)",
                 transformers="transformers: text model + lm_head (sdpa)")
    print("\n".join(table([("what", "l"), ("wall s", "r"), ("CPU s", "r"), ("peak RSS MB", "r"),
                           ("peak above call start MB", "r")],
                          [(names[k], round(med[k], 3), round(cpu[k], 3), r["peak_rss_mb"][k],
                            r["peak_above_call_start_mb"][k]) for k in med])))
    gf = r["matmul_gflops_per_s"]
    print(f"\nmatmuls: projections {parts['projections_s']:.3f} s ({gf['projections']:.0f} GFLOP/s), attention "
          f"{parts['attention_square_s']:.3f} s square ({gf['attention']:.0f} GFLOP/s) -> "
          f"{parts['attention_causal_s']:.3f} s causal, lm_head {parts['lm_head_s'] * 1e3:.1f} ms")
    verdict = "met" if r["met"] else "NOT met"
    print(f"ours / matmuls = {r['ours_over_matmuls']:.2f} wall, {r['ours_over_matmuls_cpu']:.2f} CPU time "
          f"(limit {r['ratio_limit']} on wall: {verdict})"
          + ("" if r["transformers_over_ours"] is None else
             f"; transformers / ours = {r['transformers_over_ours']:.2f}; logits rel L2 vs transformers "
             f"{r['logits_rel_l2_vs_transformers']:.1e}"))
    b = r.get("breakdown")
    if b:
        print("\nOne layer per chunk shape (ms, medians):\n")
        print("\n".join(table([("chunk (queries x keys)", "c"), ("layer graph", "r"), ("projections", "r"),
                               ("attention matmuls", "r"), ("mask + softmax", "r"), ("rest", "r")],
                              [(f"{c['queries']}x{c['keys']}", round(c["layer_ms"], 1), round(c["projections_ms"], 1),
                                round(c["attention_matmuls_ms"], 1), round(c["mask_softmax_ms"], 1),
                                round(c["rest_ms"], 1)) for c in b["chunks"]])))
        print(f"\nlayer calls {b['layer_calls_s']:.3f} s of the prefill's {med['ours']:.3f} s; outside them "
              f"(host, tables, embedding, lm_head) {b['host_and_outside_layers_s']:.3f} s")


if __name__ == "__main__":
    sys.exit(script_main(None, main))
