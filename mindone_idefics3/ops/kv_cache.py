"""Static KV cache: preallocated per layer, written in place (persists under `mindspore.jit`, capture_mode='ast')."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


class KVCache(nn.Cell):
    """Keys and values of one attention layer, (batch, kv_heads, max_length, head_dim) each."""

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype, name: str):
        super().__init__()
        shape = (batch, kv_heads, max_length, head_dim)
        self.k = Parameter(ops.zeros(shape, dtype), name=f"{name}.k", requires_grad=False)
        self.v = Parameter(ops.zeros(shape, dtype), name=f"{name}.v", requires_grad=False)

    def construct(self, slots: Tensor, k: Tensor, v: Tensor):
        """Write k, v (B, Nkv, S, D) at cache slots `slots` (S,) int32; return the whole cache (k, v)."""
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        return self.k, self.v
