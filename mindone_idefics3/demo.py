"""A tiny random-weight Idefics3 checkpoint in the Hugging Face layout, built without torch or transformers.

`generate.py --demo` runs the whole path on it (processor, vision, connector, decoder, generation) in seconds.
Its weights are random: the text it produces is meaningless by construction.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np

IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>",
                  "<image>", "<global-img>", "<end_of_utterance>"]
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

CORPUS = """A picture is worth a thousand words. The quick brown fox jumps over the lazy dog. User: What do we see in
this image? Assistant: In this image we can see a city, a statue, a bridge, water, trees and buildings. Describe the
image. The image shows a red square on a blue background with a green circle. How many objects are there?"""


def build_tokenizer(vocab_size: int = 420):
    """A byte-level BPE tokenizer (Llama 3 style) with Idefics3's added tokens; bos added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + ROW_COL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def write_demo_checkpoint(path: Union[str, Path], seed: int = 0) -> Path:
    """Write config, random safetensors weights (transformers' names), tokenizer, processor and chat template."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                  model_type="idefics3_vision")
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                mlp_bias=False, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"],
                pad_token_id=ids["<|finetune_right_pad_id|>"],
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=256))
    scale = 2
    write_random_checkpoint(path, vision, text, scale, ids["<image>"], seed=seed,
                            eos_token_ids=[text["eos_token_id"], ids["<end_of_utterance>"]])
    image_seq_len = (vision["image_size"] // vision["patch_size"] // scale) ** 2
    _write_json(path / "preprocessor_config.json", dict(
        image_processor_type="Idefics3ImageProcessor", processor_class="Idefics3Processor", do_convert_rgb=True,
        do_resize=True, size={"longest_edge": 2 * vision["image_size"]}, resample=1, do_image_splitting=True,
        max_image_size={"longest_edge": vision["image_size"]}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True))
    _write_json(path / "processor_config.json", dict(image_seq_len=image_seq_len, processor_class="Idefics3Processor"))
    _write_json(path / "chat_template.json", dict(chat_template=IDEFICS3_CHAT_TEMPLATE))
    _write_json(path / "tokenizer_config.json", dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=text["max_position_embeddings"],
        added_tokens_decoder={str(tok.token_to_id(t)): dict(content=t, special=True, lstrip=False, rstrip=False,
                                                            normalized=False, single_word=False)
                              for t in SPECIAL_TOKENS + ROW_COL_TOKENS}))
    _write_json(path / "special_tokens_map.json", dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                                       pad_token="<|finetune_right_pad_id|>",
                                                       additional_special_tokens=["<fake_token_around_image>",
                                                                                  "<image>", "<end_of_utterance>"]))
    return path


def write_random_checkpoint(path: Union[str, Path], vision: dict, text: dict, scale: int, image_token_id: int, *,
                            seed: int = 0, eos_token_ids=None) -> Path:
    """config.json, generation_config.json and random fp32 weights (transformers' names) for the given shapes."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="idefics3", architectures=["Idefics3ForConditionalGeneration"], scale_factor=scale,
                  image_token_id=image_token_id, pad_token_id=text.get("pad_token_id"), vision_config=vision,
                  text_config=text, tie_word_embeddings=False)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", dict(bos_token_id=text.get("bos_token_id"),
                                                      eos_token_id=eos_token_ids or text.get("eos_token_id"),
                                                      pad_token_id=text.get("pad_token_id")))
    save_file(_random_weights(vision, text, scale, np.random.default_rng(seed)), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _random_weights(vision: dict, text: dict, scale: int, rng: np.random.Generator) -> dict:
    def w(*shape, std=0.05):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    dv, dt, p = vision["hidden_size"], text["hidden_size"], vision["patch_size"]
    head = dt // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * head
    n_pos = (vision["image_size"] // p) ** 2
    out = {
        "model.vision_model.embeddings.patch_embedding.weight": w(dv, 3, p, p),
        "model.vision_model.embeddings.patch_embedding.bias": w(dv),
        "model.vision_model.embeddings.position_embedding.weight": w(n_pos, dv),
        "model.vision_model.post_layernorm.weight": 1 + w(dv),
        "model.vision_model.post_layernorm.bias": w(dv),
        "model.connector.modality_projection.proj.weight": w(dt, dv * scale**2),
        "model.text_model.embed_tokens.weight": w(text["vocab_size"], dt, std=1.0),
        "model.text_model.norm.weight": 1 + w(dt),
        "lm_head.weight": w(text["vocab_size"], dt, std=0.5),
    }
    for i in range(vision["num_hidden_layers"]):
        pre = f"model.vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[pre + f"self_attn.{name}.weight"], out[pre + f"self_attn.{name}.bias"] = w(dv, dv), w(dv)
        for name in ("layer_norm1", "layer_norm2"):
            out[pre + f"{name}.weight"], out[pre + f"{name}.bias"] = 1 + w(dv), w(dv)
        out[pre + "mlp.fc1.weight"], out[pre + "mlp.fc1.bias"] = w(vision["intermediate_size"], dv), w(
            vision["intermediate_size"])
        out[pre + "mlp.fc2.weight"], out[pre + "mlp.fc2.bias"] = w(dv, vision["intermediate_size"]), w(dv)
    for i in range(text["num_hidden_layers"]):
        pre = f"model.text_model.layers.{i}."
        out[pre + "self_attn.q_proj.weight"] = w(dt, dt)
        out[pre + "self_attn.k_proj.weight"] = w(kv, dt)
        out[pre + "self_attn.v_proj.weight"] = w(kv, dt)
        out[pre + "self_attn.o_proj.weight"] = w(dt, dt)
        out[pre + "mlp.gate_proj.weight"] = w(text["intermediate_size"], dt)
        out[pre + "mlp.up_proj.weight"] = w(text["intermediate_size"], dt)
        out[pre + "mlp.down_proj.weight"] = w(dt, text["intermediate_size"])
        out[pre + "input_layernorm.weight"] = 1 + w(dt)
        out[pre + "post_attention_layernorm.weight"] = 1 + w(dt)
    return out


def write_demo_image(path: Union[str, Path], size=(200, 140)) -> Path:
    """A small synthetic picture (gradient, a square and a disc) saved as PNG."""
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 120)], -1).astype(np.uint8)
    img[20:70, 30:80] = (220, 30, 30)
    img[((x - 140) ** 2 + (y - 80) ** 2) < 30**2] = (30, 200, 60)
    Image.fromarray(img).save(path)
    return Path(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
