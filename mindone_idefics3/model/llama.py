"""Llama 3 decoder: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP, optional static KV cache.

q/k/v and gate/up projections are fused into one matmul each (`qkv_proj`, `gate_up_proj`); the loader builds the
fused weights from the Hugging Face ones (weights.py), so each layer launches fewer kernels. Attention goes through
the seam (ops/attention.py); RMSNorm, RoPE and SwiGLU use Ascend's fused kernels where ops/kernels.py says so.

Kernel launches are what a decode step costs beyond reading the weights (one token: ~13 µs each on a 2-core CPU,
host launch time on Ascend), so the layers are written to launch few: the residual stream stays 2-D (tokens,
hidden) so the projections are bare matmuls, the rotary tables, the mask and the cache's scatter indices are made
once per forward and shared by every layer, and one token's heads are split by reshapes only (no transposes).
benchmarks/throughput.py counts the kernels of a compiled decode step (~41 per layer on the CPU, from ~58).
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import TextConfig
from ..ops import kernels
from ..ops.attention import make_attention
from ..ops.kv_cache import KVCache, scatter_index
from ..ops.norms import RMSNorm
from ..ops.rope import RotaryEmbedding, apply_rotary, rotate_qkv
from .layers import Embedding, Linear


class LlamaAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype, attention: nn.Cell):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias, dtype=dtype)
        self.attention = attention  # the model's attention backend (shared by its layers)
        self.fused_rope = kernels.fused_ops()
        self.kv_cache: Optional[KVCache] = None

    def construct(self, x: Tensor, rope, mask, slots: Tensor, index, cache: str, shape) -> Tensor:
        """x (B·S, H) → (B·S, H). rope: `RotaryEmbedding.row_tables` (eager) or its (cos, sin) (fused kernel);
        shape: (B, S); slots/index: see `LlamaModel.construct`."""
        b, s = shape
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        if self.fused_rope:  # q and k heads rotated in one call, in (B, S, N, D) layout (see ops/rope.py)
            qk, v = ops.split(qkv, ((nq + nkv) * d, nkv * d), axis=-1)
            qk = apply_rotary(qk.reshape(b, s, nq + nkv, d), rope[0], rope[1], True)
            q, k = ops.split(qk.swapaxes(1, 2), (nq, nkv), axis=1)  # (B, N, S, D)
        else:
            q, k, v = ops.split(rotate_qkv(qkv, rope), (nq * d, nkv * d, nkv * d), axis=-1)
            q, k = heads_first(q, b, s, nq, d), heads_first(k, b, s, nkv, d)
        v = heads_first(v, b, s, nkv, d)
        if cache == "decode":  # write the new slots, attend over the whole cache
            k, v = self.kv_cache(slots, index, k, v)
        elif cache == "fill":  # prefill: fill the cache, attend over the prompt's own k/v. A statement on purpose:
            self.kv_cache(slots, index, k, v)  # when its outputs were unpacked and unused, jit dropped the write
        return self.o_proj(self.attention(q, k, v, mask).reshape(b * s, nq * d))


def heads_first(x: Tensor, b: int, s: int, n: int, d: int) -> Tensor:
    """(B·S, N·D) → (B, N, S, D); a reshape alone when S = 1 (a decode step)."""
    if s == 1:
        return x.reshape(b, n, 1, d)
    return x.reshape(b, s, n, d).swapaxes(1, 2)


class LlamaMLP(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype)
        self.fused = kernels.fused_ops()

    def construct(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)  # gate ‖ up: swiglu's silu(first half) · second half
        if self.fused:
            return self.down_proj(kernels.swiglu(gate_up, -1))
        gate, up = ops.split(gate_up, self.intermediate, axis=-1)
        return self.down_proj(ops.silu(gate) * up)


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype, attention: nn.Cell):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def construct(self, x, rope, mask, slots, index, cache, shape):
        attn = self.self_attn(self.input_layernorm(x), rope, mask, slots, index, cache, shape)
        h, normed = self.post_attention_layernorm.add_and_norm(x, attn)  # h = x + attn, normed = norm(h)
        return h + self.mlp(normed)


class LlamaModel(nn.Cell):
    """Token embeddings, decoder layers, final norm. Parameter names follow `model.text_model.*` of transformers."""

    def __init__(self, cfg: TextConfig, dtype=ms.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.attention = make_attention(cfg.head_dim, dtype)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg, dtype, self.attention)
                                   for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(cfg, dtype)
        self.fused_rope = kernels.fused_ops()
        self.cache_shape: Optional[tuple] = None
        self.compiled_steps: dict = {}  # functions compiled against the current caches (generation.py)

    def setup_caches(self, batch: int, max_length: int) -> None:
        """Preallocate a static KV cache of `max_length` slots per layer (replacing any previous one)."""
        if self.cache_shape == (batch, max_length):
            return
        self.compiled_steps = {}  # graphs compiled against the old caches would keep using them
        for i, layer in enumerate(self.layers):
            layer.self_attn.kv_cache = KVCache(batch, self.cfg.num_key_value_heads, max_length, self.cfg.head_dim,
                                               self.dtype, name=f"kv_cache.{i}")
        self.cache_shape = (batch, max_length)

    def drop_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.cache_shape = None
        self.compiled_steps = {}

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
        rope = self.rotary_emb(position_ids) if self.fused_rope else self.rotary_emb.row_tables(position_ids)
        mask = self.attention.mask(key_keep, slots, compiled)
        index = None
        if compiled and cache != "none":
            index = scatter_index(b, self.cfg.num_key_value_heads, slots)
        h = inputs_embeds.reshape(b * s, hidden)
        for layer in self.layers:
            h = layer(h, rope, mask, slots, index, cache, (b, s))
        return self.norm(h).reshape(b, s, hidden)
