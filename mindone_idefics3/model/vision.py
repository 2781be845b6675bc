"""SigLIP vision tower with Idefics3's variable-resolution position embeddings."""
from __future__ import annotations

import functools
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..config import VisionConfig
from ..errors import Idefics3Error
from ..ops import kernels
from ..ops.activations import gelu_tanh
from ..ops.attention import make_attention, split_heads
from ..ops.norms import LayerNorm, layer_norm, layer_norm_op
from ..runtime import as_graph_inputs, idle_pipeline
from ..weights import vision_fused
from .layers import Embedding, FusedLinear, Linear, linear


@functools.lru_cache(maxsize=256)
def vision_position_ids(nb_h: int, nb_w: int, grid_h: int, grid_w: int, n: int) -> np.ndarray:
    """Position ids (grid_h·grid_w,) int32 of a tile whose valid patches are the top-left nb_h × nb_w block.

    Row k of the valid block maps to bucket min(k·n // nb_h, n−1) of the n × n trained grid (columns alike); the
    id is bucket_row·n + bucket_col; padded patches keep id 0. A full tile (nb = n) gets the identity 0..n²−1.
    Integer arithmetic on purpose: transformers 4.55–4.57 computes k/nb·(1−1e−6) in fp32, which shifts full
    tiles to 0,0,1,…,n−2.
    """
    rows = np.minimum(np.arange(nb_h) * n // nb_h, n - 1)
    cols = np.minimum(np.arange(nb_w) * n // nb_w, n - 1)
    ids = np.zeros((grid_h, grid_w), np.int32)
    ids[:nb_h, :nb_w] = rows[:, None] * n + cols[None, :]
    return ids.reshape(-1)


def patch_layout(pixel_keep: np.ndarray, patch_size: int, n: int):
    """Host-side patch bookkeeping for a stack of tiles.

    pixel_keep: (T, H, W) bool, True where a pixel is real. A patch is valid if any of its pixels is.
    Returns patch_keep (T, P) bool and position_ids (T, P) int32 with P = (H // patch) · (W // patch).
    The valid patches of each tile must form a top-left rectangle (what the processor makes).
    """
    t, h, w = pixel_keep.shape
    gh, gw = h // patch_size, w // patch_size
    cropped = pixel_keep[:, : gh * patch_size, : gw * patch_size]
    patch_keep = cropped.reshape(t, gh, patch_size, gw, patch_size).any(axis=(2, 4))
    position_ids = np.empty((t, gh * gw), np.int32)
    for i, tile in enumerate(patch_keep):
        nb_h, nb_w = int(tile[:, 0].sum()), int(tile[0].sum())
        if nb_h == 0 or nb_w == 0:
            raise Idefics3Error(f"pixel_attention_mask of image {i} has no valid patch (all pixels masked); "
                                "drop the image or fix its mask")
        expected = np.zeros_like(tile)
        expected[:nb_h, :nb_w] = True
        if not np.array_equal(tile, expected):
            raise Idefics3Error(f"pixel_attention_mask of image {i} is not a top-left rectangle of valid pixels "
                                "(the processor pads images at the bottom/right only); pass the mask the processor "
                                "returned")
        position_ids[i] = vision_position_ids(nb_h, nb_w, gh, gw, n)
    return patch_keep.reshape(t, -1), position_ids


class PatchEmbedding(nn.Cell):
    """The stride-`patch` convolution of SigLIP, computed as one matmul over flattened patches.

    Parameters keep the convolution's names and shapes: weight (D, C, p, p), bias (D,).
    """

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch = p
        self.weight = Parameter(initializer("zeros", (d, c, p, p), dtype))
        self.bias = Parameter(initializer("zeros", (d,), dtype))
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixel_values: Tensor) -> Tensor:
        """(T, C, H, W) → (T, (H//p)·(W//p), D); a remainder smaller than a patch is dropped, like 'valid' conv."""
        t, c, h, w = pixel_values.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = pixel_values[:, :, : gh * p, : gw * p].reshape(t, c, gh, p, gw, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(t * gh * gw, c * p * p)
        y = self.matmul(x, self.weight.reshape(self.weight.shape[0], -1)) + self.bias
        return y.reshape(t, gh * gw, -1)


class VisionEmbeddings(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.patch_embedding = PatchEmbedding(cfg, dtype)
        self.position_embedding = Embedding(cfg.patches_per_side**2, cfg.hidden_size, dtype)

    def construct(self, pixel_values: Tensor, position_ids: Tensor) -> Tensor:
        return self.patch_embedding(pixel_values) + self.position_embedding(position_ids)


class VisionLayerMath(nn.Cell):
    """One SigLIP encoder layer as a function of its weights (no parameters of its own).

    Every layer runs it with its own weights; passed as graph inputs, the weights let one compiled graph serve all
    the layers of the tower (`VisionTransformer.encode`), so a compiled call holds one layer's activations only.
    """

    def __init__(self, cfg: VisionConfig, attention: nn.Cell):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.attention = attention  # the tower's attention backend (shared by its layers)
        self.norm = layer_norm_op(cfg.layer_norm_eps)
        self.fused = kernels.fused_ops()

    def construct(self, x: Tensor, mask, *weights) -> Tensor:
        """x (T, P, D); mask: the attention backend's; weights: `VisionEncoderLayer.weights()`, as separate
        arguments (a compiled graph takes Parameters one by one, not in a tuple)."""
        ln1_w, ln1_b, qkv_w, qkv_b, out_w, out_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b = weights
        q, k, v = split_heads(linear(layer_norm(x, ln1_w, ln1_b, self.norm), qkv_w, qkv_b), self.num_heads,
                              self.num_heads, self.head_dim)
        h = x + linear(self.attention(q, k, v, mask), out_w, out_b)
        hidden = gelu_tanh(linear(layer_norm(h, ln2_w, ln2_b, self.norm), fc1_w, fc1_b), self.fused)
        return h + linear(hidden, fc2_w, fc2_b)


class VisionAttention(nn.Cell):
    """The attention weights of a layer, under transformers' names (q, k, v fused into `qkv_proj`)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.qkv_proj = FusedLinear(cfg.hidden_size, vision_fused(cfg)["qkv_proj"], bias=True, dtype=dtype)
        self.out_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype)


class VisionMLP(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype)


class VisionEncoderLayer(nn.Cell):
    """A layer's weights (transformers' names); `VisionLayerMath` runs them."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.self_attn = VisionAttention(cfg, dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = VisionMLP(cfg, dtype)

    def weights(self) -> tuple:
        attn, mlp = self.self_attn, self.mlp
        return (self.layer_norm1.weight, self.layer_norm1.bias, attn.qkv_proj.weight_arg(), attn.qkv_proj.bias,
                attn.out_proj.weight_arg(), attn.out_proj.bias, self.layer_norm2.weight, self.layer_norm2.bias,
                mlp.fc1.weight_arg(), mlp.fc1.bias, mlp.fc2.weight_arg(), mlp.fc2.bias)


class VisionEncoder(nn.Cell):
    """The layers' weights (`encoder.layers.N.*`); `VisionTransformer.encode` runs them."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.layers = nn.CellList([VisionEncoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])


class VisionTransformer(nn.Cell):
    """pixel_values (T, C, H, W), patch_keep (T, P) bool or None, position_ids (T, P) int32 → (T, P, D)."""

    def __init__(self, cfg: VisionConfig, dtype=ms.float32):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg, dtype)
        # One call holds one chunk of tiles (Idefics3Model.vision_chunk): its scores are bounded without query blocks.
        self.attention = make_attention(cfg.head_dim, dtype, query_blocks=False)
        self.layer_math = VisionLayerMath(cfg, self.attention)
        self.encoder = VisionEncoder(cfg, dtype)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.recompute_layers = False  # gradient checkpointing per layer (fine-tuning's --recompute, tower trained)

    def construct(self, pixel_values: Tensor, patch_keep: Optional[Tensor], position_ids: Tensor) -> Tensor:
        """patch_keep None: every patch is real (full tiles), no mask needed."""
        return self.encode(pixel_values, patch_keep, position_ids, self.layer_math)

    def encode(self, pixel_values: Tensor, patch_keep: Optional[Tensor], position_ids: Tensor, run_layer) -> Tensor:
        """The tower with each layer run as `run_layer(x, mask, *layer.weights())`: `layer_math` itself, or one
        compiled graph of it that every layer shares (so a compiled call holds one layer's activations)."""
        x = self.embeddings(pixel_values, position_ids)
        mask = self.attention.mask(patch_keep)
        if run_layer is self.layer_math:  # PyNative: the Parameters themselves (gradients reach them)
            for layer in self.encoder.layers:
                if self.recompute_layers:  # training: keep each layer's input only, recompute the rest in backward
                    x = ms.recompute(run_layer, x, mask, *layer.weights(), use_reentrant=False)
                else:
                    x = run_layer(x, mask, *layer.weights())
        else:
            with idle_pipeline():  # compiled calls only: see runtime.idle_pipeline
                for layer in self.encoder.layers:
                    x = run_layer(x, mask, *as_graph_inputs(layer.weights()))
        return self.post_layernorm(x)
