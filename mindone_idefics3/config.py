"""Model configuration read from a Hugging Face Idefics3 `config.json`.

Only the fields the model needs are kept (`from_dict` ignores the rest); a missing or invalid field is one
`Idefics3Error` that names it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import Idefics3Error
from .files import read_json

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MAX_SIZE = 2**31 - 1  # no dimension or count of a real model comes near


def _from_dict(cls, data: dict, where: str, defaults_from_hf: dict):
    """Build dataclass `cls` from `data`, keeping only known fields; `defaults_from_hf` holds HF's defaults."""
    if not isinstance(data, dict):
        raise Idefics3Error(f"{where} must be a JSON object, got {type(data).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = data[f.name]
        elif f.name in defaults_from_hf:
            kwargs[f.name] = defaults_from_hf[f.name]
        else:
            raise Idefics3Error(f"{where} is missing the field '{f.name}'")
    return cls(**kwargs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_ints(obj, where: str, names):
    for name in names:
        value = getattr(obj, name)
        if not _is_int(value) or not 0 < value <= MAX_SIZE:
            raise Idefics3Error(f"{where}.{name} must be a positive integer (below 2^31), got {value!r:.80}")


def _check_positive_numbers(obj, where: str, names):
    """Finite numbers > 0 (JSON ints accepted), stored as floats."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise Idefics3Error(f"{where}.{name} must be a positive number, got {value!r:.80}")
        setattr(obj, name, float(value))


def _check_bools(obj, where: str, names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise Idefics3Error(f"{where}.{name} must be true or false, got {value!r:.80}")


def _check_token_ids(obj, where: str, names, lists: bool = False):
    """Token ids: an integer or null (or, with `lists`, a list of integers)."""
    for name in names:
        value = getattr(obj, name)
        if not (value is None or _is_int(value) or (lists and isinstance(value, list) and all(map(_is_int, value)))):
            kind = "an integer, a list of integers or null" if lists else "an integer or null"
            raise Idefics3Error(f"{where}.{name} must be a token id: {kind}, got {value!r:.80}")


@dataclass
class VisionConfig:
    """SigLIP vision tower (Idefics3VisionConfig)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    # transformers' Idefics3VisionConfig defaults, used when config.json omits a field.
    HF_DEFAULTS = dict(
        hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16, num_channels=3,
        image_size=224, patch_size=32, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    )

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        cfg = _from_dict(cls, data, "vision_config", cls.HF_DEFAULTS)
        _check_positive_ints(cfg, "vision_config", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_channels", "image_size",
                                                     "patch_size"))
        _check_positive_numbers(cfg, "vision_config", ("layer_norm_eps",))
        if cfg.num_channels != 3:
            raise Idefics3Error(f"vision_config.num_channels is {cfg.num_channels}; the image processor gives RGB "
                                "images: it must be 3")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise Idefics3Error(f"vision_config.hidden_size ({cfg.hidden_size}) is not divisible by "
                                f"num_attention_heads ({cfg.num_attention_heads})")
        if cfg.image_size % cfg.patch_size:
            raise Idefics3Error(f"vision_config.image_size ({cfg.image_size}) is not a multiple of "
                                f"patch_size ({cfg.patch_size})")
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise Idefics3Error(f"vision_config.hidden_act {cfg.hidden_act!r:.80} is not supported (SigLIP uses "
                                "'gelu_pytorch_tanh')")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class RopeScaling:
    """Rotary-embedding scaling (`rope_scaling` of a Llama config); `rope_type` 'default' means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "RopeScaling":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise Idefics3Error(f"text_config.rope_scaling must be an object or null, got {data!r:.80}")
        rope_type = data.get("rope_type", data.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise Idefics3Error(f"text_config.rope_scaling.rope_type {rope_type!r:.80} is not supported; supported: "
                                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        needed = {"linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for name in needed.get(rope_type, ()):
            if name not in data:
                raise Idefics3Error(f"text_config.rope_scaling of type {rope_type!r} is missing '{name}'")
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        scaling = cls(rope_type=rope_type, **{k: v for k, v in data.items() if k in known})
        _check_positive_numbers(scaling, "text_config.rope_scaling", ("factor", "low_freq_factor", "high_freq_factor"))
        _check_positive_ints(scaling, "text_config.rope_scaling", ("original_max_position_embeddings",))
        return scaling


@dataclass
class TextConfig:
    """Llama 3 decoder (LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    head_dim: Optional[int] = None
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, list, None] = None

    # transformers' LlamaConfig defaults (notably tie_word_embeddings=False: ties follow the *text* config).
    HF_DEFAULTS = dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu", head_dim=None,
        rope_scaling=None, pad_token_id=None, bos_token_id=1, eos_token_id=2,
    )

    @classmethod
    def from_dict(cls, data: dict) -> "TextConfig":
        if isinstance(data, dict) and data.get("model_type", "llama") != "llama":
            raise Idefics3Error(f"text_config.model_type is {data['model_type']!r:.80}; only 'llama' decoders are "
                                "supported")
        cfg = _from_dict(cls, data, "text_config", cls.HF_DEFAULTS)
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        _check_positive_ints(cfg, "text_config", ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "max_position_embeddings"))
        if cfg.head_dim is None:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        _check_positive_ints(cfg, "text_config", ("head_dim",))
        _check_positive_numbers(cfg, "text_config", ("rms_norm_eps", "rope_theta"))
        _check_bools(cfg, "text_config", ("tie_word_embeddings", "attention_bias", "mlp_bias"))
        _check_token_ids(cfg, "text_config", ("pad_token_id", "bos_token_id"))
        _check_token_ids(cfg, "text_config", ("eos_token_id",), lists=True)
        cfg.rope_scaling = RopeScaling.from_dict(data.get("rope_scaling"))
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise Idefics3Error(f"text_config.num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                                f"num_key_value_heads ({cfg.num_key_value_heads})")
        if cfg.hidden_act != "silu":
            raise Idefics3Error(f"text_config.hidden_act {cfg.hidden_act!r:.80} is not supported (Llama uses 'silu')")
        if cfg.head_dim % 2:
            raise Idefics3Error(f"text_config.head_dim ({cfg.head_dim}) must be even for rotary embeddings")
        return cfg


@dataclass
class Idefics3Config:
    """The whole model: vision tower, connector (`scale_factor`) and decoder."""

    vision_config: VisionConfig
    text_config: TextConfig
    scale_factor: int
    image_token_id: int
    pad_token_id: Optional[int] = None
    # "smolvlm" (SmolVLM2) has the same architecture, config fields and defaults as "idefics3" in transformers
    # 4.57.1 (SmolVLMConfig subclasses Idefics3Config unchanged); its processor adds videos.
    model_type: str = "idefics3"

    HF_DEFAULTS = dict(scale_factor=2, image_token_id=128257, pad_token_id=128002)
    MODEL_TYPES = ("idefics3", "smolvlm")

    @classmethod
    def from_dict(cls, data: dict) -> "Idefics3Config":
        if not isinstance(data, dict):
            raise Idefics3Error("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if not isinstance(model_type, str) or model_type not in cls.MODEL_TYPES:
            raise Idefics3Error(f"config.json has model_type {model_type!r:.80}, expected 'idefics3' (Idefics3, "
                                "SmolVLM) or 'smolvlm' (SmolVLM2); this is not an Idefics3-family checkpoint")
        if "text_config" not in data:
            raise Idefics3Error("config.json is missing 'text_config'")
        vision = VisionConfig.from_dict({} if data.get("vision_config") is None else data["vision_config"])
        text = TextConfig.from_dict(data["text_config"])
        top = {k: data.get(k, v) for k, v in cls.HF_DEFAULTS.items()}
        cfg = cls(vision_config=vision, text_config=text, model_type=model_type, **top)
        _check_positive_ints(cfg, "config", ("scale_factor",))
        _check_token_ids(cfg, "config", ("image_token_id", "pad_token_id"))
        if vision.patches_per_side % cfg.scale_factor:
            raise Idefics3Error(f"config.scale_factor ({cfg.scale_factor}) does not divide the patch grid side "
                                f"({vision.patches_per_side} = image_size / patch_size)")
        if cfg.image_token_id is None or not 0 <= cfg.image_token_id < text.vocab_size:
            raise Idefics3Error(f"config.image_token_id ({cfg.image_token_id!r}) is not a token id below "
                                f"text_config.vocab_size ({text.vocab_size})")
        return cfg

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "Idefics3Config":
        path = Path(path)
        if not path.is_file():
            raise Idefics3Error(f"{path} not found: a model directory needs its config.json")
        return cls.from_dict(read_json(path))

    @property
    def image_seq_len(self) -> int:
        """Text tokens per image tile after pixel shuffle: (N / scale_factor)^2."""
        return (self.vision_config.patches_per_side // self.scale_factor) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
