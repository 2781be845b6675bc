"""`Idefics3Processor`: prompts + images (or videos) → input_ids, attention_mask, pixel_values,
pixel_attention_mask.

Equal to transformers' `Idefics3Processor` (4.57.1) for the same checkpoint files (see image.py, tokenizer.py and
chat_template.py for the few documented differences), with numpy, Pillow, tokenizers and jinja2 only. For SmolVLM2
checkpoints (`SmolVLMProcessor`, whose image path is Idefics3's) it also takes videos as `SmolVLMProcessor` does
(video.py): each `<video>` tag becomes the frames' timestamped blocks, the frames one unsplit tile each on the
image axis. As in transformers, one call takes images or videos, not both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import Idefics3Error
from . import chat_template as templates
from ..hub import PROCESSOR_FILES, resolve_model_dir
from .image import Idefics3ImageProcessor, ImageProcessorConfig
from .image_io import load_image
from .prompt import ImageTokens, expand_prompt, group_images
from ..files import read_json
from .tokenizer import TextTokenizer
from .video import VIDEO_CHAT_TEMPLATE, Video, VideoSettings, expand_video_prompt, load_video

DEFAULT_IMAGE_SEQ_LEN = 169  # transformers' default: Idefics3-8B (364 / 14 patches, scale factor 2)
PROCESSOR_OPTIONS = ("image_seq_len", "chat_template")
TOKENIZER_OPTIONS = ("padding_side", "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token", "bos_token",
                     "eos_token", "pad_token", "unk_token")
IMAGE_OPTIONS = tuple(f for f in ImageProcessorConfig.__dataclass_fields__)


class ProcessorOutput(dict):
    """The processor's result: a dict whose keys are also attributes (`out.input_ids`).

    `image_tiles` (an attribute, not a key: `**inputs` passes only the model's inputs on) holds, per prompt, the
    number of tiles of each image, in the order of pixel_values' image axis (None for a prompt whose images are not
    told apart): what tells one image's tiles from the next (the image-feature cache keys its entries by image)."""

    image_tiles: Optional[List[Optional[List[int]]]] = None

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Idefics3Processor:
    """Prompt builder + image processor + tokenizer + chat template of one checkpoint."""

    image_token = "<image>"
    fake_image_token = "<fake_token_around_image>"
    global_image_token = "<global-img>"
    end_of_utterance_token = "<end_of_utterance>"
    video_token = "<video>"

    def __init__(self, image_processor: Idefics3ImageProcessor, tokenizer: TextTokenizer,
                 image_seq_len: int = DEFAULT_IMAGE_SEQ_LEN, chat_template: Union[str, Dict[str, str], None] = None,
                 video_settings: Optional[VideoSettings] = None):
        self.image_processor = image_processor
        self.video_settings = video_settings  # None: the checkpoint's processor takes no videos (Idefics3's)
        self.tokenizer = tokenizer
        self.image_seq_len = _image_seq_len(image_seq_len)
        self.chat_template = chat_template
        # as transformers: these three are always special tokens (added if the vocabulary lacks them)
        tokenizer.add_special_tokens([self.fake_image_token, self.image_token, self.end_of_utterance_token])
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.fake_image_token_id = tokenizer.convert_tokens_to_ids(self.fake_image_token)
        self.end_of_utterance_token_id = tokenizer.convert_tokens_to_ids(self.end_of_utterance_token)
        self._tokens = ImageTokens(self.image_token, self.fake_image_token, self.global_image_token)

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_repo: Union[str, os.PathLike], *, revision: Optional[str] = None,
                        cache_dir: Optional[str] = None, **overrides) -> "Idefics3Processor":
        """Load from a checkpoint directory or a hub repo id (processor and tokenizer files only).

        overrides: image processor options (`size={"longest_edge": N * 364}`, `do_image_splitting=False`,
        `max_image_size`, `resample`, ...), `image_seq_len`, `chat_template`, and tokenizer options
        (`padding_side`, `pad_token`, ...).
        """
        unknown = sorted(set(overrides) - set(IMAGE_OPTIONS + PROCESSOR_OPTIONS + TOKENIZER_OPTIONS))
        if unknown:
            raise Idefics3Error(f"unknown option(s) {unknown} for Idefics3Processor.from_pretrained; valid: image "
                                f"{sorted(IMAGE_OPTIONS)}, processor {list(PROCESSOR_OPTIONS)}, tokenizer "
                                f"{list(TOKENIZER_OPTIONS)}")
        directory = resolve_model_dir(path_or_repo, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=PROCESSOR_FILES)
        preprocessor_file = directory / "preprocessor_config.json"
        if not preprocessor_file.is_file():
            raise Idefics3Error(f"{directory} has no preprocessor_config.json; copy it from the original checkpoint")
        image_processor = Idefics3ImageProcessor.from_dict(
            read_json(preprocessor_file), **{k: v for k, v in overrides.items() if k in IMAGE_OPTIONS})
        tokenizer = TextTokenizer.from_pretrained(
            directory, **{k: v for k, v in overrides.items() if k in TOKENIZER_OPTIONS})
        processor_file = directory / "processor_config.json"
        processor_config = read_json(processor_file) if processor_file.is_file() else {}
        if "image_seq_len" in overrides:
            image_seq_len = overrides["image_seq_len"]
        else:
            image_seq_len = processor_config.get("image_seq_len") or _image_seq_len_from_model_config(directory) \
                or DEFAULT_IMAGE_SEQ_LEN
        if "chat_template" in overrides:
            chat_template = overrides["chat_template"]
        else:
            chat_template = _processor_chat_template(directory, processor_config) or tokenizer.chat_template
        return cls(image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=chat_template,
                   video_settings=_video_settings(directory, read_json(preprocessor_file), processor_config))

    # ------------------------------------------------------------------------------------------- processing
    def __call__(self, text: Union[str, Sequence[str], None] = None, images=None, *,
                 return_tensors: Optional[str] = "np", padding: Union[bool, str] = False,
                 padding_side: Optional[str] = None, add_special_tokens: bool = True,
                 max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 image_seq_len: Optional[int] = None, size=None, max_image_size=None,
                 do_image_splitting: Optional[bool] = None, videos=None, fps: Optional[float] = None,
                 max_frames: Optional[int] = None) -> ProcessorOutput:
        """Model inputs for a prompt (or a batch of prompts) and their images.

        text: a prompt or a list of prompts; each `<image>` tag is expanded for the image in its place.
        images: one image, a flat list (taken in prompt order), or one list per prompt. An image is a PIL image,
            a path, an http(s) URL, encoded bytes, or a uint8 array (H, W[, C]).
        return_tensors: "np", "ms" (mindspore.Tensor) or None (token ids as Python lists, pixels as numpy).
        padding: False (a batch must then have equal lengths), True/"longest" or "max_length" (with max_length);
            padding_side defaults to the tokenizer's ("left" unless its config says otherwise).
        size / max_image_size / do_image_splitting: per-call image options (e.g. size={"longest_edge": 2 * 364}).
        videos (SmolVLM2 checkpoints): one video, a flat list (in prompt order) or one list per prompt, each `<video>`
            tag's; a video is a file path, an http(s) URL, a data: URI, the file's bytes or a loaded `Video`.
            fps / max_frames: per-call frame sampling (the checkpoint's `video_sampling` otherwise).

        Returns input_ids and attention_mask (B, S) int64, pixel_values (B, I, 3, H, W) float32 and
        pixel_attention_mask (B, I, H, W) int64 (I = the most tiles of any prompt; the rest are zero images).
        Without text: pixel_values, pixel_attention_mask and the tile rows/cols of each image.
        """
        if text is None and images is None:
            raise Idefics3Error("pass text=..., images=..., or both")
        if isinstance(return_tensors, (list, dict, set)) or return_tensors not in ("np", "ms", None):
            raise Idefics3Error(f"return_tensors must be 'np', 'ms' or None, got {return_tensors!r:.80}")
        seq_len = self.image_seq_len if image_seq_len is None else _image_seq_len(image_seq_len)
        prompts = None
        if text is not None:
            prompts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise Idefics3Error(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
            self.tokenizer.check_padding(padding, padding_side, max_length, pad_to_multiple_of)
        image_options = self.image_processor.call_options(size, max_image_size, do_image_splitting)
        if videos is not None:
            return self._video_call(prompts, images, videos, seq_len, fps, max_frames, return_tensors,
                                    dict(padding=padding, padding_side=padding_side, max_length=max_length,
                                         pad_to_multiple_of=pad_to_multiple_of), add_special_tokens)
        batch = self._image_batch(prompts, images, *image_options)

        out = ProcessorOutput()
        if batch is not None:
            out["pixel_values"], out["pixel_attention_mask"] = batch.pixel_values, batch.pixel_attention_mask
            out.image_tiles = [[r * c + 1 for r, c in zip(rows, cols)] for rows, cols in zip(batch.rows, batch.cols)]
        if prompts is None:
            out["rows"], out["cols"] = batch.rows, batch.cols
            return _convert(out, return_tensors)
        if batch is not None:
            prompts = [expand_prompt(p, r, c, seq_len, self._tokens)
                       for p, r, c in zip(prompts, batch.rows, batch.cols)]
        self._tokenize(out, prompts, add_special_tokens, return_tensors, dict(
            padding=padding, padding_side=padding_side, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of))
        return _convert(out, return_tensors)

    def _tokenize(self, out: ProcessorOutput, prompts: List[str], add_special_tokens: bool,
                  return_tensors: Optional[str], pad: dict) -> None:
        ids = self.tokenizer.encode_batch(prompts, add_special_tokens=add_special_tokens)
        if return_tensors is None and pad["padding"] in (False, None, "do_not_pad"):
            out["input_ids"], out["attention_mask"] = ids, [[1] * len(row) for row in ids]
        else:
            out["input_ids"], out["attention_mask"] = self.tokenizer.pad(ids, **pad)

    def _video_call(self, prompts, images, videos, seq_len: int, fps, max_frames, return_tensors, pad: dict,
                    add_special_tokens: bool) -> ProcessorOutput:
        """SmolVLMProcessor's video path: the frames of each prompt's videos in tag order as one-tile images."""
        if self.video_settings is None:
            raise Idefics3Error("this checkpoint's processor takes no videos (it is an Idefics3Processor: no "
                                "video_sampling in preprocessor_config.json); use a SmolVLM2 checkpoint")
        if images is not None and (not isinstance(images, (list, tuple)) or any(
                (list(i) if isinstance(i, (list, tuple)) else [i]) for i in images)):
            raise Idefics3Error("pass images or videos in one call, not both (as transformers' SmolVLMProcessor); "
                                "process them as separate requests")
        if prompts is None:
            raise Idefics3Error("videos need text: pass text=... with one <video> tag per video")
        settings = self.video_settings.with_options(fps, max_frames)
        counts = [p.count(self.video_token) for p in prompts]
        flat = list(videos) if isinstance(videos, (list, tuple)) else [videos]
        grouped = group_images(flat, counts, tag=self.video_token, kind="video")
        loaded = [[v if isinstance(v, Video) else load_video(v, settings) for v in sample] for sample in grouped]
        all_videos = [v for sample in loaded for v in sample]
        if not all_videos:
            raise Idefics3Error("videos is empty; pass one video per <video> tag")
        frame_count = max(len(v.indices) for v in all_videos)  # transformers: pixel_values' frame axis
        out = ProcessorOutput()
        frames = [[frame for v in sample for frame in v.frames] for sample in loaded]
        if any(frames):
            out["pixel_values"], out["pixel_attention_mask"] = self.image_processor.pad_and_normalize(frames)
        out.image_tiles = [[1] * len(sample) for sample in frames]
        prompts = [expand_video_prompt(p, sample, frame_count, seq_len, self._tokens, self.video_token)
                   for p, sample in zip(prompts, loaded)]
        self._tokenize(out, prompts, add_special_tokens, return_tensors, pad)
        return _convert(out, return_tensors)

    def load_video(self, source, fps: Optional[float] = None, max_frames: Optional[int] = None, *,
                   download=None) -> Video:
        """Decode a video's chosen frames with this checkpoint's settings (for the `videos` of several calls).
        download: `url -> bytes` for http(s) URLs (the caller's fetching rules; urllib by default)."""
        if self.video_settings is None:
            raise Idefics3Error("this checkpoint's processor takes no videos (it is an Idefics3Processor: no "
                                "video_sampling in preprocessor_config.json); use a SmolVLM2 checkpoint")
        return load_video(source, self.video_settings.with_options(fps, max_frames), download=download)

    def _image_batch(self, prompts: Optional[List[str]], images, size, max_image_size, do_image_splitting):
        counts = None if prompts is None else [p.count(self.image_token) for p in prompts]
        if images is None:
            if counts and any(counts):
                raise Idefics3Error(f"the prompts have {sum(counts)} {self.image_token} tags ({counts} per prompt) "
                                    "but no images were given; pass images=... (one per tag)")
            return None
        if not isinstance(images, (list, tuple)):
            images = [images]
        if counts is not None:
            grouped = group_images(list(images), counts)
        elif images and all(isinstance(i, (list, tuple)) for i in images):
            grouped = [list(sample) for sample in images]
        else:
            grouped = [list(images)]
        if not any(grouped):
            if prompts is None:
                raise Idefics3Error("images is empty; pass at least one image or text")
            return None
        grouped = [[_as_pil(image) for image in sample] for sample in grouped]
        return self.image_processor(grouped, size=size, max_image_size=max_image_size,
                                    do_image_splitting=do_image_splitting)

    # ------------------------------------------------------------------------------------------- chat and text
    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, *,
                            chat_template: Optional[str] = None, continue_final_message: bool = False,
                            **template_kwargs: Any) -> Union[str, List[str]]:
        """The prompt text for a conversation (or a list of conversations → a list of texts).

        Messages look like {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]};
        each image item becomes an `<image>` tag, to be given with the images to `__call__`; a {"type": "video"}
        item a `<video>` tag (SmolVLM2). As transformers' SmolVLMProcessor, a conversation with a video is rendered
        with SmolVLM's video template unless `chat_template` is given.
        chat_template: a template text, or the name of one of the checkpoint's templates.
        """
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        if chat_template is None and self.video_settings is not None and _has_video(conversations):
            chat_template = VIDEO_CHAT_TEMPLATE
        template = templates.select_template(self.chat_template, chat_template)
        rendered = [templates.render(template, c, add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message,
                                     special_tokens=self.tokenizer.special_tokens_map, **template_kwargs)
                    for c in conversations]
        return rendered if batched else rendered[0]

    def chat_inputs(self, messages, images: Sequence = (), videos: Sequence = (), *, fps: Optional[float] = None,
                    max_frames: Optional[int] = None) -> ProcessorOutput:
        """Model inputs (numpy, a batch of one) for a conversation whose next turn the model writes: the chat
        template with the generation prompt, and the images (or videos) in the order of the conversation's image
        (video) items. The one way the command line, batch inference and the server turn a request into model
        inputs."""
        prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        if len(videos):
            return self(text=prompt, images=[list(images)] if len(images) else None, videos=[list(videos)],
                        fps=fps, max_frames=max_frames, return_tensors="np")
        return self(text=prompt, images=[list(images)] if len(images) else None, return_tensors="np")

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> List[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


# ----------------------------------------------------------------------------------------------- helpers
def _video_settings(directory: Path, preprocessor: dict, processor_config: dict) -> Optional[VideoSettings]:
    """SmolVLM2's video settings (video_preprocessor_config.json, else preprocessor_config.json's
    video_sampling), or None for a checkpoint whose processor takes no videos."""
    video_file = directory / "video_preprocessor_config.json"
    if video_file.is_file():
        return VideoSettings.from_config(read_json(video_file))
    smolvlm = "SmolVLM" in str(preprocessor.get("processor_class", processor_config.get("processor_class", "")))
    if "video_sampling" in preprocessor or smolvlm:
        return VideoSettings.from_config(preprocessor)
    return None


def _has_video(conversations) -> bool:
    return any(isinstance(item, dict) and item.get("type") == "video"
               for conversation in conversations if isinstance(conversation, (list, tuple))
               for message in conversation if isinstance(message, dict)
               and isinstance(message.get("content"), (list, tuple))
               for item in message["content"])


def _processor_chat_template(directory: Path, processor_config: dict):
    """transformers' order: chat_template.json, else chat_template.jinja, else processor_config.json's key."""
    legacy = directory / "chat_template.json"
    if legacy.is_file():
        return read_json(legacy).get("chat_template")
    raw = directory / "chat_template.jinja"
    if raw.is_file():
        return raw.read_text(encoding="utf-8")
    return processor_config.get("chat_template")


def _image_seq_len(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Idefics3Error(f"image_seq_len must be a positive integer (tokens per tile), got {value!r:.80}")
    return value


def _image_seq_len_from_model_config(directory: Path) -> Optional[int]:
    """(image_size / patch_size / scale_factor)² from config.json, when processor_config.json does not say."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    from ..config import Idefics3Config

    return Idefics3Config.from_json_file(path).image_seq_len


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))
        if image.dtype != np.uint8 or not shape_ok:
            raise Idefics3Error(f"an image array must be uint8 of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                                f"got {image.dtype} {image.shape}; convert it with PIL.Image.fromarray yourself")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if isinstance(image, (str, bytes, bytearray, memoryview, os.PathLike)):
        return load_image(image)
    raise Idefics3Error(f"an image must be a PIL image, a path, a URL, bytes or a uint8 array, got "
                        f"{type(image).__name__}")


def _convert(out: ProcessorOutput, return_tensors: Optional[str]) -> ProcessorOutput:
    if return_tensors == "ms":
        import mindspore as ms

        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = ms.Tensor(value)
    elif return_tensors is None:
        for key in ("input_ids", "attention_mask"):
            if isinstance(out.get(key), np.ndarray):
                out[key] = out[key].tolist()
    return out
