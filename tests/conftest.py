"""Shared fixtures: tiny random-weight Idefics3 checkpoints written by the reference (transformers) itself.

Two shapes, both with llama3 RoPE scaling and grouped KV heads:
- `ckpt_a`: 6×6 patch grid (image 24, patch 4; not a power of two), scale 2 → 9 tokens per tile, untied lm_head.
- `ckpt_b`: 8×8 patch grid (image 32, patch 4), scale 4 → 4 tokens per tile, tied embeddings, one KV head.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

IMAGE_TOKEN = 290
VOCAB = 300

SHAPES = {
    "a": dict(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=24, patch_size=4),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=500000.0, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=32)),
        scale_factor=2,
    ),
    "b": dict(
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=4),
        text_config=dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2,
                         rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                           high_freq_factor=2.0, original_max_position_embeddings=16)),
        scale_factor=4,
    ),
}


def reference_classes(model_type: str = "idefics3"):
    """transformers' (config class, model class) of a model_type: Idefics3's, or SmolVLM's (SmolVLM2)."""
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[model_type]
    return getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForConditionalGeneration")


def write_reference_checkpoint(path, shape: str = "a", seed: int = 0, model_type: str = "idefics3", **save_kwargs):
    """Write a random-weight transformers checkpoint (safetensors) to `path` with Idefics3's classes, or with
    SmolVLM's (`model_type="smolvlm"`); returns the HF model."""
    import torch

    Config, HFModel = reference_classes(model_type)
    torch.manual_seed(seed)
    spec = SHAPES[shape]
    cfg = Config(image_token_id=IMAGE_TOKEN, pad_token_id=0, **{k: dict(v) if isinstance(v, dict) else v
                                                                        for k, v in spec.items()})
    model = HFModel(cfg).eval()
    # Non-trivial norms, so a mix-up of norm weights cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True, **save_kwargs)
    return model


class Checkpoint:
    def __init__(self, path, shape):
        self.path, self.shape = path, shape
        self._ref = None
        import json

        self.config = json.loads((path / "config.json").read_text())
        vc = self.config["vision_config"]
        self.image_size = vc["image_size"]
        self.patch_size = vc["patch_size"]
        n = vc["image_size"] // vc["patch_size"]
        self.image_seq_len = (n // self.config["scale_factor"]) ** 2

    @property
    def reference(self):
        """transformers' model on the same files (eager attention), loaded once."""
        if self._ref is None:
            _, HFModel = reference_classes(self.config["model_type"])
            self._ref = HFModel.from_pretrained(str(self.path), attn_implementation="eager").eval()
        return self._ref


@pytest.fixture(scope="session")
def ckpt_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_a")
    write_reference_checkpoint(path, "a", seed=0)
    return Checkpoint(path, "a")


@pytest.fixture(scope="session")
def ckpt_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_b")
    write_reference_checkpoint(path, "b", seed=1)
    return Checkpoint(path, "b")


@pytest.fixture(scope="session")
def ckpt_smolvlm(tmp_path_factory):
    """Shape "b" (scale 4, as SmolVLM2-256M/500M) written by transformers' SmolVLM classes (model_type smolvlm)."""
    path = tmp_path_factory.mktemp("ckpt_smolvlm")
    write_reference_checkpoint(path, "b", seed=2, model_type="smolvlm")
    return Checkpoint(path, "b")


@pytest.fixture(scope="session")
def ms_cpu():
    from mindone_idefics3.device import select_device

    return select_device("CPU")


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A huggingface_hub cache under tmp_path with HF_HUB_OFFLINE=1: `offline_hub(src_dir, "org/name")` puts a
    snapshot of src_dir there and returns (cache_dir, commit)."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"

    def add(src, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return cache, commit

    return add
