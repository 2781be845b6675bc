"""Static KV cache: preallocated per layer, written in place.

MindSpore 2.10 keeps a Parameter's data in sync between PyNative and compiled graphs only for some write ops: a
PyNative slice-setitem on axis 2 of a 4-D Parameter rebinds its data, after which a compiled graph that already ran
keeps reading (and writing) its own stale copy. So the cache is written two ways: inside a compiled graph by
`scatter_nd_update` (in place, only the new slots; the indices are made once per forward by `scatter_index` and
shared by every layer), and in PyNative by `ops.assign` of the whole updated tensor (the `--no-jit` loop), which
both sides see. tests/generation/test_generation.py checks the mix. In a compiled decode step `scatter_nd_update` is also the
cheaper write (two writes per layer per step; docs/performance.md).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops


def scatter_index(batch: int, kv_heads: int, slots: Tensor) -> Tensor:
    """(batch, kv_heads, S, 3) int32 `scatter_nd_update` indices of the cache rows (b, head, slots[s])."""
    s = slots.shape[0]
    grid = np.stack(np.meshgrid(np.arange(batch), np.arange(kv_heads), indexing="ij"), -1)
    rows = Tensor(grid.reshape(batch, kv_heads, 1, 2).astype(np.int32))
    return ops.cat((ops.broadcast_to(rows, (batch, kv_heads, s, 2)),
                    ops.broadcast_to(slots.astype(ms.int32).reshape(1, 1, s, 1), (batch, kv_heads, s, 1))), -1)


def row_scatter_index(batch: int, kv_heads: int, row_slots: Tensor) -> Tensor:
    """(batch, kv_heads, 1, 3) int32 `scatter_nd_update` indices of one new slot per row: (b, head,
    row_slots[b]) — rows at lengths of their own (continuous batching)."""
    grid = np.stack(np.meshgrid(np.arange(batch), np.arange(kv_heads), indexing="ij"), -1)
    rows = Tensor(grid.reshape(batch, kv_heads, 1, 2).astype(np.int32))
    slots = ops.broadcast_to(row_slots.astype(ms.int32).reshape(batch, 1, 1, 1), (batch, kv_heads, 1, 1))
    return ops.cat((rows, slots), -1)


def write_cache(cache_k: Tensor, cache_v: Tensor, slots: Tensor, index, k: Tensor, v: Tensor):
    """Write k, v (B, Nkv, S, D) into the caches (B, Nkv, L, D) at slots `slots` (S,) int32; return the caches.

    index: `scatter_index(B, Nkv, slots)` inside a `mindspore.jit` graph (in place), None in PyNative (`ops.assign`
    of the updated tensor; the caches must then be the Parameters themselves).
    """
    if index is not None:
        ops.scatter_nd_update(cache_k, index, k)
        ops.scatter_nd_update(cache_v, index, v)
    else:
        for cache, new in ((cache_k, k), (cache_v, v)):
            updated = cache * 1
            updated[:, :, slots] = new
            ops.assign(cache, updated)
    return cache_k, cache_v


class KVCache(nn.Cell):
    """Keys and values of one attention layer, (batch, kv_heads, max_length, head_dim) each."""

    def __init__(self, batch: int, kv_heads: int, max_length: int, head_dim: int, dtype, name: str):
        super().__init__()
        shape = (batch, kv_heads, max_length, head_dim)
        self.k = Parameter(ops.zeros(shape, dtype), name=f"{name}.k", requires_grad=False)
        self.v = Parameter(ops.zeros(shape, dtype), name=f"{name}.v", requires_grad=False)


class LayerCaches:
    """The KV caches of every layer for one (batch, max_length) shape. A plain object on purpose: what is compiled
    against these caches can be kept with them, keyed by this object (weakly: it goes when the caches go).
    `owner`: who the cached keys and values belong to (a conversation, chat.py), None when nobody keeps them."""

    def __init__(self, shape: tuple, layers: list):
        self.shape, self.layers = shape, layers
        self.owner = None

    def copy_row(self, row: int, other: "LayerCaches", other_row: int, length: int) -> None:
        """Slots [0, length) of row `other_row` of `other` into row `row` of these caches (any shapes; PyNative
        `scatter_nd_update` in place, which compiled graphs see — tests/generation/test_continuous.py)."""
        kv_heads = self.layers[0].k.shape[1]
        grid = np.stack(np.meshgrid([row], np.arange(kv_heads), np.arange(length), indexing="ij"), -1)
        index = Tensor(grid.astype(np.int32))
        for mine, theirs in zip(self.layers, other.layers):
            for new, old in ((mine.k, theirs.k), (mine.v, theirs.v)):
                ops.scatter_nd_update(new, index, old[other_row:other_row + 1, :, :length])

    def copy_from(self, other: "LayerCaches", length: int) -> None:
        """The first `length` slots of every layer's keys and values from `other` (a smaller cache), the rest as
        they are (PyNative: `ops.assign` of whole tensors, which compiled graphs see)."""
        for mine, theirs in zip(self.layers, other.layers):
            for new, old in ((mine.k, theirs.k), (mine.v, theirs.v)):
                ops.assign(new, ops.cat((old[:, :, :length], new[:, :, length:]), axis=2))
