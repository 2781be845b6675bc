"""Idefics3: SigLIP tiles → pixel shuffle → written into the `<image>` token positions of a Llama 3 prompt."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import Idefics3Config
from ..device import current_device, dtype_argument, dtype_name, resolve_dtype, select_device
from ..errors import Idefics3Error
from ..files import read_json
from ..generation import GenerationMixin
from ..ops.attention import key_keep_or_none
from ..ops.kernels import attention_implementation, check_attn_implementation
from ..ops.rope import position_ids_from_mask
from ..runtime import jit_cell
from .connector import Connector, check_patch_grid
from .layers import Linear, linear
from .loss import causal_lm_loss
from .llama import LlamaModel
from .lora import load_adapter
from .vision import VisionTransformer, patch_layout

ArrayLike = Union[np.ndarray, Tensor, list]


def to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.asnumpy()
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is the caller's mistake
        raise Idefics3Error(f"{name} must be a numpy array or a MindSpore tensor ({e})") from None


@dataclass
class VisionInputs:
    """The real (non-padding) tiles of a batch, with their patch masks and position ids (host-side layout)."""

    pixel_values: np.ndarray  # (T, 3, H, W)
    patch_keep: np.ndarray  # (T, P) bool
    position_ids: np.ndarray  # (T, P) int32


def prepare_vision_inputs(pixel_values: ArrayLike, pixel_attention_mask: Optional[ArrayLike],
                          patch_size: int, patches_per_side: int) -> Optional[VisionInputs]:
    """Flatten (B, I, 3, H, W) to tiles, drop all-zero padding images, derive patch masks and position ids."""
    pv = to_numpy(pixel_values, "pixel_values")
    if pv.ndim != 5 or pv.shape[2] != 3:
        raise Idefics3Error(f"pixel_values must be (batch, images, 3, height, width), got shape {pv.shape}")
    b, i, c, h, w = pv.shape
    if h < patch_size or w < patch_size:
        raise Idefics3Error(f"pixel_values are {h}x{w} pixels, smaller than one {patch_size}x{patch_size} patch")
    tiles = pv.reshape(b * i, c, h, w)
    real = ~np.all(tiles == 0, axis=(1, 2, 3))  # padding images are all zeros (count over C·H·W)
    if pixel_attention_mask is None:
        keep = np.ones((b * i, h, w), bool)
    else:
        pam = to_numpy(pixel_attention_mask, "pixel_attention_mask")
        if pam.shape != (b, i, h, w):
            raise Idefics3Error(f"pixel_attention_mask must be (batch, images, height, width) = {(b, i, h, w)} to "
                                f"match pixel_values, got {pam.shape}")
        keep = pam.reshape(b * i, h, w).astype(bool)
    if not real.any():
        return None
    patch_keep, position_ids = patch_layout(keep[real], patch_size, patches_per_side)
    # No padding image (one image per row, or as many in every row): the tiles themselves, not a copy of them.
    return VisionInputs(np.ascontiguousarray(tiles if real.all() else tiles[real]), patch_keep, position_ids)


@dataclass
class Idefics3Output:
    logits: Optional[Tensor]  # (B, S, vocab), or (B, 1, vocab) with last_only; None with labels (see construct)
    image_hidden_states: Optional[Tensor] = None  # (T, image_seq_len, text hidden)
    loss: Optional[Tensor] = None  # fp32 scalar, with labels


# Tiles per vision call: peak activation memory grows with it, and on the CPU one tile per call was the fastest
# too (one tile is already a (1024 × 768) GEMM per projection; docs/performance.md). Ascend: 4, where per-layer
# activations stay far below the prefill's (benchmarks/memory_on_paper.py).
VISION_CHUNK_TILES = {"CPU": 1, "Ascend": 4}


class Idefics3Model(nn.Cell):
    def __init__(self, cfg: Idefics3Config, dtype=ms.float32):
        super().__init__()
        self.patch_size, self.scale_factor = cfg.vision_config.patch_size, cfg.scale_factor
        self.vision_model = VisionTransformer(cfg.vision_config, dtype)
        self.connector = Connector(cfg, dtype)
        self.text_model = LlamaModel(cfg.text_config, dtype)
        self.vision_chunk: Optional[int] = None  # tiles per vision call; None = VISION_CHUNK_TILES of the device
        self._vision_layer_graph = None  # the compiled vision layer every layer shares, made on first use

    def construct(self, pixel_values: Tensor, patch_keep: Optional[Tensor], position_ids: Tensor) -> Tensor:
        """Vision tower + connector: tiles (T, 3, H, W) → (T, image_seq_len, text hidden)."""
        return self.connector(self.vision_model(pixel_values, patch_keep, position_ids))

    def chunks(self, tiles: int) -> List[slice]:
        """The tiles of each vision call: `vision_chunk` at a time (None: VISION_CHUNK_TILES of the device)."""
        size = self.vision_chunk or VISION_CHUNK_TILES[current_device()]
        return [slice(start, start + size) for start in range(0, tiles, size)]

    def image_features(self, vision: VisionInputs, dtype, use_jit: bool = False) -> Tensor:
        """(T, image_seq_len, text hidden) features of the real tiles, `vision_chunk` tiles at a time.

        use_jit: each layer runs as one compiled graph that all the layers and chunks share (weights are its
        inputs), so peak memory is one layer's activations for one chunk, whatever the number of tiles.
        """
        h, w = vision.pixel_values.shape[-2:]
        check_patch_grid(h // self.patch_size, w // self.patch_size, self.scale_factor)
        # Training with a frozen tower: no gradient goes through it, so it runs compiled and unrecorded by autograd
        # (no activations kept for a backward pass that never comes); the connector after it may still train.
        frozen = self.training and not self.vision_model.trainable_params()
        run_layer = self.vision_model.layer_math
        if use_jit or frozen:
            if self._vision_layer_graph is None:
                self._vision_layer_graph = jit_cell(run_layer)
            run_layer = self._vision_layer_graph
        features = []
        for part in self.chunks(len(vision.pixel_values)):
            keep = vision.patch_keep[part]
            inputs = (Tensor(vision.pixel_values[part], dtype), None if keep.all() else Tensor(keep),
                      Tensor(vision.position_ids[part]), run_layer)
            if frozen:
                with ms._no_grad():  # pylint: disable=protected-access  (MindSpore 2.10's no-grad context)
                    x = self.vision_model.encode(*inputs)
            else:
                x = self.vision_model.encode(*inputs)
            features.append(self.connector(x))
        return features[0] if len(features) == 1 else ops.cat(features, axis=0)


class Idefics3ForConditionalGeneration(nn.Cell, GenerationMixin):
    """The full model. Parameter names are transformers' (`model.vision_model.*`, `model.text_model.*`, `lm_head`)
    except the fused `qkv_proj`/`gate_up_proj` (see weights.py)."""

    def __init__(self, config: Idefics3Config, dtype=ms.float32):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.model = Idefics3Model(config, dtype)
        self.tied = bool(config.text_config.tie_word_embeddings)
        if not self.tied:
            self.lm_head = Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False,
                                  dtype=dtype)
        self.generation_config: dict = {}
        self.model_dir: Optional[str] = None
        self.weights_id: Optional[str] = None  # what the weights were loaded from (from_pretrained), see weights_id

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, os.PathLike], dtype=None, *, device: Optional[str] = None,
                        cache_dir: Optional[str] = None, revision: Optional[str] = None,
                        progress: bool = True, adapter: Optional[Union[str, os.PathLike]] = None,
                        mindspore_dtype=None, attn_implementation: Optional[str] = None,
                        ) -> "Idefics3ForConditionalGeneration":
        """Load a Hugging Face Idefics3 checkpoint (directory or hub repo id) straight into `dtype`.

        dtype: ms.float32/float16/bfloat16 or 'fp32'/'fp16'/'bf16'; None = bf16 on Ascend, fp32 on the CPU.
        mindspore_dtype: mindone.transformers' name for dtype (give one of them).
        attn_implementation: 'eager' or 'flash_attention_2' (Ascend kernels, fp16/bf16; an error elsewhere), as in
        mindone.transformers; None = the device and dtype decide (ops/kernels.py).
        Weights are not randomly initialised first; a checkpoint that does not match the config is refused whole.
        adapter: a LoRA adapter directory (finetune.py's OUT, or one saved by PEFT) merged into the weights.
        """
        from ..hub import resolve_model_dir
        from ..weights import CheckpointReader, load_weights

        device = select_device(device)
        ms_dtype = resolve_dtype(dtype_argument(dtype, mindspore_dtype), device)
        check_attn_implementation(attn_implementation, ms_dtype)
        model_dir = resolve_model_dir(path_or_repo_id, cache_dir=cache_dir, revision=revision)
        config = Idefics3Config.from_json_file(model_dir / "config.json")
        reader = CheckpointReader(model_dir)
        with nn.utils.no_init_parameters(), attention_implementation(attn_implementation, ms_dtype):
            model = cls(config, ms_dtype)
        params = {p.name: p for p in model.get_parameters()}
        # A tied checkpoint may still carry lm_head.weight; the embedding is what the model uses.
        load_weights(params, reader, ms_dtype, ignore=lambda n: model.tied and n == "lm_head.weight",
                     progress=progress)
        model.generation_config = read_json(model_dir / "generation_config.json", missing_ok=True)
        model.model_dir = str(model_dir)
        if adapter is not None:
            load_adapter(model, adapter, merge_now=True)
        model.weights_id = weights_id(model_dir, ms_dtype, adapter)
        model.set_train(False)
        return model

    # ------------------------------------------------------------------------------------------ pieces
    def logits(self, hidden: Tensor) -> Tensor:
        """The output projection: hidden states (..., H) → (..., vocab) fp32 (tied: the token embeddings), with the
        LoRA delta of lm_head while one is attached (fine-tuning; for inference adapters are merged, so compiled
        generation sees plain weights)."""
        weight = self.model.text_model.embed_tokens.weight if self.tied else self.lm_head.weight_arg()
        return linear(hidden, weight).astype(ms.float32)

    def get_image_features(self, pixel_values, pixel_attention_mask=None, use_jit: bool = False) -> Optional[Tensor]:
        """Vision tower + connector over the real tiles of pixel_values (B, I, 3, H, W) (all-zero padding images
        dropped), in order: (T, image_seq_len, text hidden), or None without a real tile (transformers' name)."""
        cfg = self.config.vision_config
        vision = prepare_vision_inputs(pixel_values, pixel_attention_mask, cfg.patch_size, cfg.patches_per_side)
        return None if vision is None else self.model.image_features(vision, self.dtype, use_jit)

    def embed_prompt(self, input_ids: np.ndarray, pixel_values=None, pixel_attention_mask=None,
                     use_jit: bool = False, image_hidden_states: Optional[Tensor] = None):
        """Token embeddings (B, S, H) with the image features written into the `<image>` positions.

        Returns (embeddings, image features or None). The number of `<image>` tokens must equal
        (real tiles) × image_seq_len. use_jit: run the vision tower as a compiled graph. image_hidden_states:
        the features of the real tiles, computed already (`get_image_features`; an image-feature cache): the
        vision tower does not run (transformers' argument of the same name).
        """
        cfg = self.config
        embeds = self.model.text_model.embed_tokens(Tensor(input_ids))
        image_positions = np.flatnonzero(input_ids.reshape(-1) == cfg.image_token_id)
        vision = None
        if image_hidden_states is not None:
            n_tiles = image_hidden_states.shape[0]
        else:
            if pixel_values is not None:
                vision = prepare_vision_inputs(pixel_values, pixel_attention_mask, cfg.vision_config.patch_size,
                                               cfg.vision_config.patches_per_side)
            n_tiles = 0 if vision is None else len(vision.pixel_values)
        if image_positions.size != n_tiles * cfg.image_seq_len:
            raise Idefics3Error(
                f"the prompt holds {image_positions.size} <image> tokens but pixel_values hold {n_tiles} image "
                f"tile(s) × {cfg.image_seq_len} tokens = {n_tiles * cfg.image_seq_len}; build the prompt with the "
                "processor (it expands each <image> to the tokens of its tiles) and pass the images it returned")
        if n_tiles == 0:
            return embeds, None
        features = image_hidden_states if vision is None else self.model.image_features(vision, self.dtype, use_jit)
        b, s, h = embeds.shape
        # One gather merges both: row i of the result is token i's embedding, or the next image feature.
        index = np.arange(b * s, dtype=np.int32)
        index[image_positions] = b * s + np.arange(image_positions.size, dtype=np.int32)
        merged = ops.gather(ops.cat((embeds.reshape(b * s, h), features.reshape(-1, h)), axis=0),
                            Tensor(index), 0)
        return merged.reshape(b, s, h), features

    def vision_chunks(self, pixel_values, pixel_attention_mask) -> List[Tuple[int, bool]]:
        """(tiles, whether every patch is real) of each vision call `embed_prompt` makes for these images: what
        decides the vision graphs it compiles."""
        cfg = self.config.vision_config
        vision = prepare_vision_inputs(pixel_values, pixel_attention_mask, cfg.patch_size, cfg.patches_per_side)
        if vision is None:
            return []
        return [(len(vision.patch_keep[part]), bool(vision.patch_keep[part].all()))
                for part in self.model.chunks(len(vision.patch_keep))]

    # ------------------------------------------------------------------------------------------ forward
    def construct(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                  pixel_values: Optional[ArrayLike] = None, pixel_attention_mask: Optional[ArrayLike] = None,
                  last_only: bool = False, labels: Optional[ArrayLike] = None,
                  num_items_in_batch: Optional[float] = None, return_logits: bool = False) -> Idefics3Output:
        """A full forward pass, no cache (see generation.py for prefill + decode); differentiable (training).

        input_ids (B, S) int32/int64; attention_mask (B, S), 1 = real token (left padding); pixel_values
        (B, I, 3, H, W); pixel_attention_mask (B, I, H, W). Rotary positions follow the attention mask, as
        in transformers' generate (so a row's result does not depend on how much padding the batch gives it).
        Returns logits (B, S, vocab) fp32 (only the last position with last_only).

        labels (B, S): the target token of each position, -100 where not scored; `.loss` is then transformers'
        causal LM loss (model/loss.py), divided by num_items_in_batch when given (the labelled tokens of the
        whole global batch) instead of this batch's count. With labels the full logits are not formed unless
        return_logits.
        """
        ids = self.check_input_ids(input_ids)
        mask = self.check_attention_mask(attention_mask, ids.shape)
        embeds, features = self.embed_prompt(ids, pixel_values, pixel_attention_mask)
        s = ids.shape[1]
        hidden = self.model.text_model(embeds, Tensor(position_ids_from_mask(mask)), key_keep_or_none(mask),
                                       Tensor(np.arange(s, dtype=np.int32)))
        if labels is not None:
            loss = causal_lm_loss(hidden, self.check_labels(labels, ids.shape), self.logits, num_items_in_batch)
            return Idefics3Output(self.logits(hidden) if return_logits else None, features, loss)
        if last_only:
            hidden = hidden[:, -1:]
        return Idefics3Output(self.logits(hidden), features)

    def check_input_ids(self, input_ids: ArrayLike) -> np.ndarray:
        ids = to_numpy(input_ids, "input_ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise Idefics3Error(f"input_ids must be a non-empty (batch, seq) integer array, got {ids.dtype} "
                                f"{ids.shape}")
        vocab = self.config.text_config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise Idefics3Error(f"input_ids hold token ids outside the vocabulary [0, {vocab})")
        return ids.astype(np.int32)

    @staticmethod
    def check_labels(labels: ArrayLike, shape) -> np.ndarray:
        targets = to_numpy(labels, "labels")
        if targets.ndim == 1:
            targets = targets[None]
        if targets.shape != tuple(shape) or not np.issubdtype(targets.dtype, np.integer):
            raise Idefics3Error(f"labels must be an integer array shaped like input_ids {tuple(shape)}, got "
                                f"{targets.dtype} {targets.shape}")
        return targets

    @staticmethod
    def check_attention_mask(attention_mask: Optional[ArrayLike], shape) -> np.ndarray:
        if attention_mask is None:
            return np.ones(shape, np.int32)
        mask = to_numpy(attention_mask, "attention_mask")
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != tuple(shape):
            raise Idefics3Error(f"attention_mask has shape {mask.shape}, input_ids {tuple(shape)}; they must match")
        if not mask.any(axis=-1).all():
            raise Idefics3Error("attention_mask has a row without any real token")
        return mask.astype(np.int32)

    @property
    def device(self) -> str:
        return current_device()


def weights_id(model_dir, dtype, adapter=None) -> str:
    """An identity of loaded weights, for caches of what they compute (image features): the checkpoint's and the
    adapter's files (path, size, modification time) and the dtype."""
    parts = [dtype_name(dtype)]
    for directory in (model_dir, adapter):
        if directory is None:
            continue
        directory = Path(directory).resolve()
        parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(directory.iterdir()) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
