"""A tiny random-weight Idefics3 checkpoint in the Hugging Face layout, built without torch or transformers.

`generate.py --demo` runs the whole path on it (processor, vision, connector, decoder, generation) in seconds.
Its weights are random: the text it produces is meaningless by construction.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

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
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                  model_type="idefics3_vision")
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                mlp_bias=False, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=256))
    return write_random_model(path, vision, text, 2, longest_edge=2 * vision["image_size"], seed=seed)


def make_smolvlm2(path: Union[str, Path], fps: float = 1, max_frames: int = 64) -> Path:
    """Turn a checkpoint written here into a SmolVLM2 one: model_type "smolvlm" (the same weights and config
    fields) and SmolVLM2's processor files (`video_sampling` in preprocessor_config.json, SmolVLMProcessor), with
    video frames the size of its tiles."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    _write_json(path / "config.json", dict(config, model_type="smolvlm",
                                           architectures=["SmolVLMForConditionalGeneration"]))
    pre = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
    _write_json(path / "preprocessor_config.json", dict(
        pre, image_processor_type="SmolVLMImageProcessor", processor_class="SmolVLMProcessor",
        video_sampling=dict(fps=fps, max_frames=max_frames, video_size=pre["max_image_size"])))
    processor = json.loads((path / "processor_config.json").read_text(encoding="utf-8"))
    _write_json(path / "processor_config.json", dict(processor, processor_class="SmolVLMProcessor"))
    return path


def special_token_ids(tok) -> Dict[str, int]:
    """Ids of SPECIAL_TOKENS in a tokenizer made by `build_tokenizer`."""
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_random_model(path: Union[str, Path], vision: dict, text: dict, scale: int, *, longest_edge: int,
                       dtype=np.float32, seed: int = 0) -> Path:
    """A random-weight checkpoint that both processors (ours and transformers') and both generates can run on (the
    demo's, the benchmarks' presets): config and weights whose special token ids are `build_tokenizer`'s (bos, eos,
    pad, `<image>`; generation stops on eos and `<end_of_utterance>`), then the processor files of `write_processor_files` with
    left padding and input_ids/attention_mask only (transformers' tokenizer pads right and returns token_type_ids
    by default, which Idefics3's generate refuses). `text` without vocab_size gets the tokenizer's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = special_token_ids(tok)
    text = dict(text, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"],
                pad_token_id=ids["<|finetune_right_pad_id|>"])
    text.setdefault("vocab_size", tok.get_vocab_size())
    if text["vocab_size"] < tok.get_vocab_size():
        raise ValueError(f"vocab_size {text['vocab_size']} is smaller than the tokenizer's {tok.get_vocab_size()}")
    write_random_checkpoint(path, vision, text, scale, ids["<image>"], seed=seed, dtype=dtype,
                            eos_token_ids=[text["eos_token_id"], ids["<end_of_utterance>"]])
    write_processor_files(path, tok, tile=vision["image_size"], longest_edge=longest_edge,
                          image_seq_len=(vision["image_size"] // vision["patch_size"] // scale) ** 2,
                          max_length=text["max_position_embeddings"], padding_side="left",
                          model_input_names=["input_ids", "attention_mask"])
    return path


def write_processor_files(path: Union[str, Path], tok, *, tile: int, longest_edge: int, image_seq_len: int,
                          max_length: int, padding_side: Optional[str] = None,
                          model_input_names: Optional[List[str]] = None) -> None:
    """The processor side of a checkpoint for a `build_tokenizer` tokenizer: tokenizer.json and its configs,
    preprocessor_config.json (tiles of `tile` px, images resized to `longest_edge` first), processor_config.json
    and chat_template.json (Idefics3's template). `padding_side` and `model_input_names`, when given, go into
    tokenizer_config.json (unset, transformers' tokenizer pads right and also returns token_type_ids)."""
    path = Path(path)
    extra = {k: v for k, v in dict(padding_side=padding_side, model_input_names=model_input_names).items()
             if v is not None}
    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "preprocessor_config.json", dict(
        image_processor_type="Idefics3ImageProcessor", processor_class="Idefics3Processor", do_convert_rgb=True,
        do_resize=True, size={"longest_edge": longest_edge}, resample=1, do_image_splitting=True,
        max_image_size={"longest_edge": tile}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True))
    _write_json(path / "processor_config.json", dict(image_seq_len=image_seq_len, processor_class="Idefics3Processor"))
    _write_json(path / "chat_template.json", dict(chat_template=IDEFICS3_CHAT_TEMPLATE))
    _write_json(path / "tokenizer_config.json", dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=max_length, **extra,
        added_tokens_decoder={str(tok.token_to_id(t)): dict(content=t, special=True, lstrip=False, rstrip=False,
                                                            normalized=False, single_word=False)
                              for t in SPECIAL_TOKENS + ROW_COL_TOKENS}))
    _write_json(path / "special_tokens_map.json", dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                                       pad_token="<|finetune_right_pad_id|>",
                                                       additional_special_tokens=["<fake_token_around_image>",
                                                                                  "<image>", "<end_of_utterance>"]))


def write_random_checkpoint(path: Union[str, Path], vision: dict, text: dict, scale: int, image_token_id: int, *,
                            seed: int = 0, eos_token_ids=None, dtype=np.float32,
                            shard_bytes: int = 2 * 2**30) -> Path:
    """config.json, generation_config.json and random weights (transformers' names) for the given shapes.

    dtype: numpy dtype the weights are stored in (float32 or float16). Up to `shard_bytes` of weights go to one
    model.safetensors; more are written shard by shard (model-0000i-of-0000n.safetensors + the index), so
    memory stays about one shard whatever the model's size.
    """
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
    shapes = weight_shapes(vision, text, scale)
    itemsize = np.dtype(dtype).itemsize
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({n: _random_tensor(n, shapes[n], rng, dtype) for n in names}, str(path / file),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
        _write_json(path / "model.safetensors.index.json", dict(
            metadata={"total_size": total}, weight_map={n: f for f, names in zip(files, shards) for n in names}))
    return path


def weight_shapes(vision: dict, text: dict, scale: int) -> Dict[str, Tuple[int, ...]]:
    """transformers' parameter names and shapes of an Idefics3 with these vision/text configs (untied lm_head)."""
    dv, dt, p = vision["hidden_size"], text["hidden_size"], vision["patch_size"]
    ffv, fft = vision["intermediate_size"], text["intermediate_size"]
    head = text.get("head_dim") or dt // text["num_attention_heads"]
    q, kv = text["num_attention_heads"] * head, text["num_key_value_heads"] * head
    out = {
        "model.vision_model.embeddings.patch_embedding.weight": (dv, vision.get("num_channels", 3), p, p),
        "model.vision_model.embeddings.patch_embedding.bias": (dv,),
        "model.vision_model.embeddings.position_embedding.weight": ((vision["image_size"] // p) ** 2, dv),
        "model.vision_model.post_layernorm.weight": (dv,),
        "model.vision_model.post_layernorm.bias": (dv,),
        "model.connector.modality_projection.proj.weight": (dt, dv * scale**2),
        "model.text_model.embed_tokens.weight": (text["vocab_size"], dt),
        "model.text_model.norm.weight": (dt,),
        "lm_head.weight": (text["vocab_size"], dt),
    }
    for i in range(vision["num_hidden_layers"]):
        pre = f"model.vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[pre + f"self_attn.{name}.weight"], out[pre + f"self_attn.{name}.bias"] = (dv, dv), (dv,)
        for name in ("layer_norm1", "layer_norm2"):
            out[pre + f"{name}.weight"], out[pre + f"{name}.bias"] = (dv,), (dv,)
        out[pre + "mlp.fc1.weight"], out[pre + "mlp.fc1.bias"] = (ffv, dv), (ffv,)
        out[pre + "mlp.fc2.weight"], out[pre + "mlp.fc2.bias"] = (dv, ffv), (dv,)
    for i in range(text["num_hidden_layers"]):
        pre = f"model.text_model.layers.{i}."
        out[pre + "self_attn.q_proj.weight"] = (q, dt)
        out[pre + "self_attn.k_proj.weight"] = (kv, dt)
        out[pre + "self_attn.v_proj.weight"] = (kv, dt)
        out[pre + "self_attn.o_proj.weight"] = (dt, q)
        out[pre + "mlp.gate_proj.weight"] = (fft, dt)
        out[pre + "mlp.up_proj.weight"] = (fft, dt)
        out[pre + "mlp.down_proj.weight"] = (dt, fft)
        out[pre + "input_layernorm.weight"] = (dt,)
        out[pre + "post_attention_layernorm.weight"] = (dt,)
    return out


def _random_tensor(name: str, shape: Tuple[int, ...], rng: np.random.Generator, dtype) -> np.ndarray:
    """N(0, 0.05) weights and biases; norm scales 1 + N(0, 0.05); embeddings N(0, 1), lm_head N(0, 0.5) (so the
    logits of a random model are not all alike)."""
    std = 1.0 if "embed_tokens" in name else 0.5 if name.startswith("lm_head") else 0.05
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
        x += 1
    return x.astype(dtype, copy=False)


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
