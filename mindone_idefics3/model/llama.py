"""Llama 3 decoder: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP, optional static KV cache.

q/k/v and gate/up projections are fused into one matmul each (`qkv_proj`, `gate_up_proj`, laid out by weights.py,
whose loader builds them from the Hugging Face weights), so each layer launches fewer kernels. Attention goes
through the seam (ops/attention.py); RMSNorm, RoPE and SwiGLU use Ascend's fused kernels where ops/kernels.py says
so.

Kernel launches are what a decode step costs beyond reading the weights (host launch time, on the CPU and on
Ascend), so the layers are written to launch few: the residual stream stays 2-D (tokens,
hidden) so the projections are bare matmuls, the rotary tables, the mask and the cache's scatter indices are made
once per forward and shared by every layer, and one token's heads are split by reshapes only (no transposes).
benchmarks/throughput.py counts the kernels of a compiled decode step.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import TextConfig
from ..generation import PREFILL_BUCKET
from ..ops import attention as attention_ops, kernels
from ..ops.attention import EagerAttention, make_attention
from ..ops.kv_cache import KVCache, LayerCaches, row_scatter_index, scatter_index, write_cache
from ..ops.norms import RMSNorm, add_rms_norm, rms_norm
from ..ops.rope import RotaryEmbedding, apply_rotary, rotate_qkv
from ..runtime import as_graph_inputs, idle_pipeline, jit_cell
from ..weights import text_fused
from .layers import Embedding, FusedLinear, Linear, linear

KEPT_CACHE_SHAPES = 4  # cache shapes (with their compiled graphs) kept alive, the current one included


class DecoderLayerMath(nn.Cell):
    """One decoder layer as a function of its weights and KV cache (no parameters of its own).

    Inside the compiled decode step every layer runs it with its own Parameters; a prefill runs one compiled graph
    of it that all the layers share, their weights and caches passed as graph inputs (`LlamaModel.prefill`), so a
    compiled call holds one layer's activations and one graph serves all the layers.
    """

    def __init__(self, cfg: TextConfig, attention: nn.Cell):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.intermediate, self.eps = cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps
        self.attention = attention  # the model's attention backend (shared by its layers)
        self.fused = kernels.fused_ops()

    def construct(self, x: Tensor, rope, mask, slots: Tensor, index, cache: str, shape, cache_k, cache_v,
                  *weights) -> Tensor:
        """x (B·S, H) → (B·S, H). rope: `RotaryEmbedding.row_tables` (eager) or its (cos, sin) (fused kernels);
        shape: (B, S), or (B, S, keys) with cache "decode" when slots are keys - S .. keys - 1: attend over the
        cache's first `keys` slots only (a prefill's chunks: the slots filled so far); cache "rows": see
        `LlamaModel.decode_rows` (mask: its eager bias); cache "extend": "decode" in `LlamaModel.extend`;
        slots/index/cache: see `LlamaModel.construct`; cache_k/v: this layer's KV cache (None with cache "none");
        weights: the rest of `LlamaDecoderLayer.state()`, as separate arguments."""
        in_norm, qkv_w, qkv_b, o_w, o_b, post_norm, gate_up_w, gate_up_b, down_w, down_b = weights
        b, s = shape[0], shape[1]
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear(rms_norm(x, in_norm, self.eps, self.fused), qkv_w, qkv_b)
        if self.fused:  # q and k heads rotated in one call, in (B, S, N, D) layout (see ops/rope.py)
            qk, v = ops.split(qkv, ((nq + nkv) * d, nkv * d), axis=-1)
            qk = apply_rotary(qk.reshape(b, s, nq + nkv, d), rope[0], rope[1], True)
            q, k = ops.split(qk.swapaxes(1, 2), (nq, nkv), axis=1)  # (B, N, S, D)
        else:
            q, k, v = ops.split(rotate_qkv(qkv, rope), (nq * d, nkv * d, nkv * d), axis=-1)
            q, k = heads_first(q, b, s, nq, d), heads_first(k, b, s, nkv, d)
        v = heads_first(v, b, s, nkv, d)
        if cache == "decode" and len(shape) > 2:  # new slots [keys - S, keys): attend over the cache's first keys
            write_cache(cache_k, cache_v, slots, index, k, v)  # a statement: see "fill"
            before = shape[2] - s  # the earlier slots, read from the cache (not the written ones: reading a slice
            if before > 0:  # of the cache after the scatter gave stale values on a graph's first run)
                k, v = ops.cat((cache_k[:, :, :before], k), axis=2), ops.cat((cache_v[:, :, :before], v), axis=2)
        elif cache == "decode":  # write the new slots, attend over the whole cache
            k, v = write_cache(cache_k, cache_v, slots, index, k, v)
        elif cache == "extend":  # the same, for caches passed as graph inputs (`LlamaModel.extend`): there a read
            # of the cache is not ordered after the in-place write (MindSpore 2.7 read stale slots), so the keys
            # are the cache as read with the new slots put in functionally — right whichever comes first
            full_k, full_v = ops.tensor_scatter_update(cache_k, index, k), ops.tensor_scatter_update(cache_v, index, v)
            write_cache(cache_k, cache_v, slots, index, k, v)  # a statement (see "fill")
            k, v = full_k, full_v
        elif cache == "rows":  # row j: its own one-row cache (cache_k/v[j]), written at its slot (index[j]);
            # attention over the cache as read + the new k/v as one more key, the row's own slot masked: a graph
            # does not order a read of the cache after the in-place write, and copying the cache to append the key
            # cost more than the layer (MindSpore's CPU copies)
            outs = []
            for j in range(b):
                write_cache(cache_k[j], cache_v[j], None, index[j], k[j:j + 1], v[j:j + 1])  # a statement ("fill")
                outs.append(attention_ops.attention_with_new_key(q[j:j + 1], cache_k[j], cache_v[j], mask[j:j + 1],
                                                                 k[j:j + 1], v[j:j + 1], self.attention.scale))
            attn = outs[0] if b == 1 else ops.cat(outs, axis=0)
            return self.rest(x, attn, b, s, o_w, o_b, post_norm, gate_up_w, gate_up_b, down_w, down_b)
        elif cache == "fill":  # prefill: fill the cache, attend over the prompt's own k/v. A statement on purpose:
            write_cache(cache_k, cache_v, slots, index, k, v)  # unpacked and unused outputs made jit drop the write
        return self.rest(x, self.attention(q, k, v, mask), b, s, o_w, o_b, post_norm, gate_up_w, gate_up_b, down_w,
                         down_b)

    def rest(self, x: Tensor, attn: Tensor, b: int, s: int, o_w, o_b, post_norm, gate_up_w, gate_up_b, down_w,
             down_b) -> Tensor:
        """The layer after attention: output projection, residual, norm, MLP, residual."""
        nq, d = self.num_heads, self.head_dim
        attn = linear(attn.reshape(b * s, nq * d), o_w, o_b)
        h, normed = add_rms_norm(x, attn, post_norm, self.eps, self.fused)  # h = x + attn, normed = norm(h)
        gate_up = linear(normed, gate_up_w, gate_up_b)  # gate ‖ up: swiglu's silu(first half) · second half
        if self.fused:
            return h + linear(kernels.swiglu(gate_up, -1), down_w, down_b)
        gate, up = ops.split(gate_up, self.intermediate, axis=-1)
        return h + linear(ops.silu(gate) * up, down_w, down_b)


def heads_first(x: Tensor, b: int, s: int, n: int, d: int) -> Tensor:
    """(B·S, N·D) → (B, N, S, D); a reshape alone when S = 1 (a decode step)."""
    if s == 1:
        return x.reshape(b, n, 1, d)
    return x.reshape(b, s, n, d).swapaxes(1, 2)


class LlamaAttention(nn.Cell):
    """The attention weights of a layer (q, k, v fused into `qkv_proj`) and its KV cache, when one is set up."""

    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        self.qkv_proj = FusedLinear(cfg.hidden_size, text_fused(cfg)["qkv_proj"], bias=cfg.attention_bias,
                                    dtype=dtype)
        self.o_proj = Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias,
                             dtype=dtype)
        self.kv_cache: Optional[KVCache] = None


class LlamaMLP(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.hidden_size, text_fused(cfg)["gate_up_proj"], bias=cfg.mlp_bias,
                                        dtype=dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)


class LlamaDecoderLayer(nn.Cell):
    """A layer's weights (transformers' names, fused projections) and KV cache; `DecoderLayerMath` runs them."""

    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def state(self) -> tuple:
        """(cache k, cache v, *weights): the arguments of `DecoderLayerMath` after the activations."""
        attn, mlp, cache = self.self_attn, self.mlp, self.self_attn.kv_cache
        return (None if cache is None else cache.k, None if cache is None else cache.v,
                self.input_layernorm.weight, attn.qkv_proj.weight_arg(), attn.qkv_proj.bias,
                attn.o_proj.weight_arg(), attn.o_proj.bias, self.post_attention_layernorm.weight,
                mlp.gate_up_proj.weight_arg(), mlp.gate_up_proj.bias, mlp.down_proj.weight_arg(), mlp.down_proj.bias)


class LlamaModel(nn.Cell):
    """Token embeddings, decoder layers, final norm. Parameter names follow `model.text_model.*` of transformers."""

    def __init__(self, cfg: TextConfig, dtype=ms.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.attention = make_attention(cfg.head_dim, dtype)
        self.layer_math = DecoderLayerMath(cfg, self.attention)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(cfg, dtype)
        self.fused_rope = kernels.fused_ops()
        self.caches: Optional[LayerCaches] = None  # the current static KV cache of every layer
        self._layer_graph = None  # the compiled `layer_math` of `prefill`, made on first use
        self.recompute_layers = False  # gradient checkpointing per decoder layer (fine-tuning's --recompute)
        self._kept: "OrderedDict[tuple, LayerCaches]" = OrderedDict()  # earlier shapes' caches, oldest first

    @property
    def cache_shape(self) -> Optional[tuple]:
        return None if self.caches is None else self.caches.shape

    def setup_caches(self, batch: int, max_length: int) -> None:
        """Make a static KV cache of `max_length` slots per layer current.

        The caches of the last KEPT_CACHE_SHAPES shapes are kept: batches of varying shapes (batch inference) then
        find the caches — and whatever was compiled against them (generation.py keys its compiled steps by the
        `LayerCaches` object) — instead of building them again at every change of shape.
        """
        shape = (batch, max_length)
        if self.cache_shape == shape:
            return
        if self.caches is not None:
            self._kept[self.caches.shape] = self.caches
        caches = self._kept.pop(shape, None)
        if caches is None:
            caches = self.new_caches(batch, max_length)
        while len(self._kept) >= KEPT_CACHE_SHAPES:
            self._kept.popitem(last=False)
        self.use_caches(caches)

    def new_caches(self, batch: int, max_length: int) -> LayerCaches:
        """Static KV caches of every layer, (batch, max_length) slots, not made current."""
        return LayerCaches((batch, max_length), [
            KVCache(batch, self.cfg.num_key_value_heads, max_length, self.cfg.head_dim, self.dtype,
                    name=f"kv_cache.{i}") for i in range(len(self.layers))])

    def use_caches(self, caches: LayerCaches) -> None:
        """Make `caches` the current ones (what `prefill`, `extend` and the forward read and write). A caller that
        keeps caches of its own (continuous batching) switches between them with this; `setup_caches` keeps
        earlier shapes for callers that do not."""
        for layer, cache in zip(self.layers, caches.layers):
            layer.self_attn.kv_cache = cache
        self.caches = caches

    def drop_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.caches = None
        self._kept.clear()

    def construct(self, inputs_embeds: Tensor, position_ids: Tensor, key_keep: Optional[Tensor], slots: Tensor,
                  cache: str = "none", compiled: bool = False) -> Tensor:
        """Run the decoder over S new tokens.

        inputs_embeds (B, S, H); position_ids (B, S) int32 (rotary positions, per row); slots (S,) int32: the
        key index of each new token. cache: "none" (a plain forward: the tokens attend to each other, the cache is
        not touched), "fill" (a prefill from slot 0: the same, and k/v are written into the cache) or "decode"
        (k/v written at `slots`, attention over the whole cache). key_keep: (B, Sk) bool, False for padded keys,
        Sk = S, or the cache length with "decode"; None when no key is padded. compiled: True inside a
        `mindspore.jit` graph (how the cache is written, see kv_cache.py). Returns (B, S, H).
        """
        b, s, hidden = inputs_embeds.shape
        rope, mask, index = self.tables(position_ids, key_keep, slots, compiled, compiled and cache != "none")
        h = inputs_embeds.reshape(b * s, hidden)
        for layer in self.layers:
            if self.recompute_layers:  # training: keep only each layer's input, recompute the rest in backward
                h = self.recompute_layer(h, rope, mask, slots, index, cache, (b, s), *layer.state())
            else:
                h = self.layer_math(h, rope, mask, slots, index, cache, (b, s), *layer.state())
        return self.norm(h).reshape(b, s, hidden)

    def decode_rows(self, inputs_embeds: Tensor, position_ids: Tensor, key_keep: Tensor, row_slots: Tensor,
                    caches: tuple) -> Tensor:
        """One token per row where each row has a one-row cache of its own at its own length (continuous
        batching): row b writes its keys and values at slot row_slots[b] of its cache and attends over the slots
        where key_keep (B, cache length) is True — its filled slots, not the new one (`DecoderLayerMath`, cache
        "rows": the new key is the step's own) — and its new key. caches: for each layer, for each row, its k and
        v (graph inputs, `runtime.as_graph_inputs`); a row may come twice (padding to a compiled batch size: both
        write the same values). inputs_embeds (B, 1, H); position_ids (B, 1). The eager attention math on every
        device (one query per row over its cache read in place). Inside a compiled graph only (the caches are
        written by scatter). Returns (B, 1, H), normed."""
        b, s, hidden = inputs_embeds.shape
        rope = self.rope(position_ids)
        bias = attention_ops.attention_bias(key_keep[:, None, None, :])
        index = tuple(row_scatter_index(1, self.cfg.num_key_value_heads, row_slots[j:j + 1]) for j in range(b))
        h = inputs_embeds.reshape(b * s, hidden)
        for i, layer in enumerate(self.layers):
            mine = caches[2 * b * i:2 * b * (i + 1)]
            h = self.layer_math(h, rope, bias, row_slots, index, "rows", (b, s), mine[0::2], mine[1::2],
                                *layer.state()[2:])
        return self.norm(h).reshape(b, s, hidden)

    def recompute_layer(self, *args):
        """`layer_math` under `mindspore.recompute` (PyNative; non-reentrant, so gradients reach the weights and
        LoRA adapters passed as arguments)."""
        return ms.recompute(self.layer_math, *args, use_reentrant=False)

    def prefill(self, inputs_embeds: Tensor, position_ids: Tensor, key_keep: Optional[Tensor],
                slots: Tensor) -> Tensor:
        """`construct` with cache "fill", driven from the host one layer at a time through one compiled graph of
        `layer_math` that every layer shares (their weights and caches are its inputs), so a compiled call holds
        one layer's activations whatever the number of layers. Returns (B, S, H).

        With eager attention a prompt whose scores would exceed SCORE_BLOCK_ELEMENTS goes in chunks (`extend`, the
        chunks the outer loop, the layers inner): each chunk writes its keys and values and attends over the slots
        filled so far — the earlier chunks, itself causally — so a call holds one chunk's scores (with a mask,
        MindSpore 2.10's CPU graphs keep the intermediates of every query block of a call alive, which made prefill
        memory grow with the prompt; docs/mindspore-notes.md). slots must be 0..S-1 (a prefill starts the cache).
        """
        if self._layer_graph is None:
            self._layer_graph = jit_cell(self.layer_math)
        b, s, hidden = inputs_embeds.shape
        if self.prefill_chunk(b, s, s) < s:
            cache_keep = np.ones((b, self.cache_shape[1]), np.bool_)  # the prompt's key mask, then every later slot
            if key_keep is not None:
                cache_keep[:, :s] = key_keep.asnumpy().astype(np.bool_)
            return self.extend(inputs_embeds, position_ids, Tensor(cache_keep), slots, filled_keys=True)
        h = inputs_embeds.reshape(b * s, hidden)
        rope, mask, index = self.tables(position_ids, key_keep, slots, False, True, grouped=True)
        rope = ms.mutable(rope)  # tensors in a tuple input are graph constants (a recompile per value) else
        with idle_pipeline():  # compiled calls only: see runtime.idle_pipeline
            for layer in self.layers:
                h = self._layer_graph(h, rope, mask, slots, index, "fill", (b, s), *as_graph_inputs(layer.state()))
        return self.norm(h).reshape(b, s, hidden)

    def extend(self, inputs_embeds: Tensor, position_ids: Tensor, cache_keep: Tensor, slots: Tensor,
               filled_keys: bool = False) -> Tensor:
        """New tokens into the cache at `slots`, attending causally by slot over the cache (cache_keep (B, cache
        length): False for padded keys): a conversation's next turn after the tokens it has cached already, and
        the chunks of a long prefill. `prefill_chunk` tokens per call through the shared compiled layer graph.

        filled_keys: slots are 0..S-1 (a prefill) and each chunk attends over the slots filled so far only, one
        graph per chunk (their key lengths differ). Otherwise every chunk attends over the whole cache, so one
        graph serves every turn of a conversation whatever its length (a compile per turn would cost more than
        the masked tail). Returns (B, S, H), normed."""
        if self._layer_graph is None:
            self._layer_graph = jit_cell(self.layer_math)
        b, s, hidden = inputs_embeds.shape
        cache_len = self.cache_shape[1]
        chunk = self.prefill_chunk(b, s, s if filled_keys else cache_len)
        h = inputs_embeds.reshape(b, s, hidden)
        outs = []
        for start in range(0, s, chunk):
            part = slice(start, min(start + chunk, s))
            n = part.stop - start
            keys = part.stop if filled_keys else cache_len
            shape = (b, n, keys) if filled_keys else (b, n)
            rope, mask, index = self.tables(position_ids[:, part], cache_keep[:, :keys], slots[part], False, True,
                                            grouped=True)
            rope = ms.mutable(rope)
            x = h[:, part].reshape(b * n, hidden)
            chunk_slots = slots[part]
            mode = "decode" if filled_keys else "extend"
            with idle_pipeline():
                for layer in self.layers:
                    x = self._layer_graph(x, rope, mask, chunk_slots, index, mode, shape,
                                          *as_graph_inputs(layer.state()))
            outs.append(x.reshape(b, n, hidden))
        return self.norm(outs[0] if len(outs) == 1 else ops.cat(outs, axis=1))

    def prefill_chunk(self, batch: int, length: int, keys: Optional[int] = None) -> int:
        """Tokens per prefill call when `length` new tokens attend over at most `keys` slots (default: the whole
        cache): the whole prompt with fused attention kernels (no scores in memory); with eager attention, when a
        call's scores (batch · heads · chunk · keys) would exceed SCORE_BLOCK_ELEMENTS, the prompt in the fewest
        chunks that keep within it, as equal as multiples of PREFILL_BUCKET allow (at least one bucket; the last
        chunk may be shorter)."""
        if not isinstance(self.attention, EagerAttention) or length % PREFILL_BUCKET:
            return length
        keys = self.cache_shape[1] if keys is None else keys
        budget = attention_ops.SCORE_BLOCK_ELEMENTS // (batch * self.cfg.num_attention_heads * keys)
        largest = max(PREFILL_BUCKET, budget // PREFILL_BUCKET * PREFILL_BUCKET)
        if largest >= length:
            return length
        chunks = -(-length // largest)
        return -(-length // (chunks * PREFILL_BUCKET)) * PREFILL_BUCKET

    def rope(self, position_ids: Tensor):
        """The rotary tables of the layers' rotation (see `DecoderLayerMath`)."""
        return self.rotary_emb(position_ids) if self.fused_rope else self.rotary_emb.row_tables(position_ids)

    def tables(self, position_ids: Tensor, key_keep: Optional[Tensor], slots: Tensor, in_graph: bool,
               graph_writes: bool, grouped: bool = False):
        """What every layer shares, made once per forward: rotary tables, attention mask, and the cache's scatter
        indices when the cache is written inside a compiled graph (graph_writes; else None). grouped: an eager
        per-query mask laid out for the KV groups (`attention.grouped_bias`: one plain add per layer instead of a
        broadcast over the groups; the prefill's calls, whose scores it matches in size)."""
        rope = self.rope(position_ids)
        mask = self.attention.mask(key_keep, slots, in_graph)
        if grouped and isinstance(self.attention, EagerAttention):
            mask = attention_ops.grouped_bias(mask, self.cfg.num_attention_heads, self.cfg.num_key_value_heads)
        index = scatter_index(position_ids.shape[0], self.cfg.num_key_value_heads, slots) if graph_writes else None
        return rope, mask, index
