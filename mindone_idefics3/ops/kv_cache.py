"""Static KV cache: preallocated per layer, written in place.

MindSpore 2.10 keeps a Parameter's data in sync between PyNative and compiled graphs only for some write ops: a
PyNative slice-setitem on axis 2 of a 4-D Parameter rebinds its data, after which a compiled graph that already ran
keeps reading (and writing) its own stale copy. So the cache is written two ways: inside a compiled graph by
slice-setitem (in place, one slot per decode step), and in PyNative by `ops.assign` of the whole updated tensor
(prefill, or the `--no-jit` decode loop), which both sides see. tests/test_generation.py checks the mix.
"""
from __future__ import annotations

from mindspore import Parameter, Tensor, nn, ops


class KVCache(nn.Cell):
    """Keys and values of one attention layer, (batch, kv_heads, max_length, head_dim) each."""

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype, name: str):
        super().__init__()
        shape = (batch, kv_heads, max_length, head_dim)
        self.k = Parameter(ops.zeros(shape, dtype), name=f"{name}.k", requires_grad=False)
        self.v = Parameter(ops.zeros(shape, dtype), name=f"{name}.v", requires_grad=False)

    def construct(self, slots: Tensor, k: Tensor, v: Tensor, compiled: bool = False):
        """Write k, v (B, Nkv, S, D) at cache slots `slots` (S,) int32; return the whole cache (k, v).

        compiled: True when this runs inside a `mindspore.jit` graph (a constant there).
        """
        if compiled:
            self.k[:, :, slots] = k
            self.v[:, :, slots] = v
        else:
            for cache, new in ((self.k, k), (self.v, v)):
                updated = cache * 1
                updated[:, :, slots] = new
                ops.assign(cache, updated)
        return self.k, self.v
