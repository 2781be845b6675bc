"""Facts of our compiled decode step, for the throughput table: the attention backend, the bytes one step reads
(for the memory-bandwidth bound) and the kernels it launches (from MindSpore's actor-set dump)."""
from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

SHAPE_ONLY_KERNELS = {"Reshape", "ExpandDims", "Squeeze", "Flatten"}


def attention_backend(model) -> str:
    name = type(model.model.text_model.attention).__name__
    return {"EagerAttention": "eager", "AscendAttention": "flash (FA / fused infer)"}.get(name, name)


def decode_bytes(model) -> Dict[str, int]:
    """Bytes one decode step must read: decoder layers, final norm, lm_head (the embedding when tied), and the whole
    static KV cache (eager attention reads every slot). Call while the caches of the run are set up. (Walks the
    cells, not parameter names: the names gain a prefix once a generation step cell wraps the model.)"""
    text = model.model.text_model
    weights = kv = 0
    for p in text.layers.get_parameters():
        if "kv_cache" in p.name:
            kv += p.nbytes
        else:
            weights += p.nbytes
    weights += sum(p.nbytes for p in text.norm.get_parameters())
    weights += (text.embed_tokens if model.tied else model.lm_head).weight.nbytes
    return dict(weights=weights, kv_cache=kv)


def count_decode_kernels(model, batch: int) -> dict:
    """Kernels one compiled (greedy) decode step launches: compile it once more with MindSpore's graph dump on and
    count the kernel actors of the final actor set (one actor per kernel launch)."""
    import mindspore as ms
    from mindspore import Tensor

    from mindone_idefics3.generation import CACHE_BUCKET, decode_step_fn

    text = model.model.text_model
    text.setup_caches(batch, CACHE_BUCKET)  # new caches: the step compiles again, now with the dump on
    with tempfile.TemporaryDirectory() as d:
        ms.set_context(save_graphs=1, save_graphs_path=d)
        try:
            step = decode_step_fn(model, greedy=True, use_jit=True)
            zeros = Tensor(np.zeros((batch, 1), np.int32))
            step(zeros, zeros, Tensor([0], ms.int32), Tensor(np.ones((batch, CACHE_BUCKET), bool))).asnumpy()
        finally:
            ms.set_context(save_graphs=0)
        graphs = [collections.Counter(re.findall(r"^%\d+ = kernel_graph\d+:([A-Za-z0-9]+)-op\d+\(", f.read_text(),
                                                 re.M))
                  for f in Path(d).rglob("final_actor_set_*.ir")]
    text.drop_caches()
    if not graphs:
        return dict(error="MindSpore wrote no actor set (graph dump unavailable)")
    ops = max(graphs, key=lambda c: sum(c.values()))  # the decode graph (the only one compiled with the dump on)
    total = sum(ops.values())
    return dict(kernels=total, shape_only=sum(n for k, n in ops.items() if k in SHAPE_ONLY_KERNELS),
                per_layer=round(total / model.config.text_config.num_hidden_layers, 1), batch=batch,
                by_op=dict(ops.most_common()))
