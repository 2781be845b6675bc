"""Videos for SmolVLM2: decode with PyAV, pick the frames, resize them, and write the prompt that holds them.

Equal to transformers 4.57.1's `SmolVLMVideoProcessor` and `SmolVLMProcessor.expand_text_with_video_tokens`:

- **metadata** as transformers' PyAV reader: `total_num_frames` = the stream's frame count, `fps` = its average
  rate, `duration` = frames / fps (a container that stores no frame count is counted by demuxing: transformers
  would then see 0 frames and take only the first);
- **frame selection** as `sample_frames`: round(fps × duration) frames, at most `max_frames` (at least one); when
  the clip is longer than `max_frames / fps` plus `skip_secs` at both ends, those ends are skipped; indices evenly
  spaced (`np.linspace(..., dtype=int)`, then unique);
- **resize** as `_preprocess`/`resize`: longest edge to `size` (the short side `int(long / aspect)`, made even),
  then squashed to `max_image_size`² (every frame is one unsplit tile). transformers resizes with torchvision's
  antialiased filters on uint8 frames, LANCZOS replaced by BICUBIC; torchvision follows Pillow's algorithm, and
  Pillow's antialiased resize with the same filter is what runs here (torchvision cannot be installed beside the
  CPU torch of these machines). Rescale and normalize as the image path;
- **prompt**: "You are provided the following series of {count in words} frames from a {H:MM:SS} [H:MM:SS]
  video.\\n", then per frame "\\nFrame from MM:SS:" + the unsplit image block, then "\\n\\n". As transformers,
  the count in words is the most frames of any video of the call (pixel_values' frame axis).

Settings come from the checkpoint: `video_sampling` in preprocessor_config.json (SmolVLM2's; its `size` wins over
`video_sampling.video_size`, as transformers' backward-compatible rule), or the fields of
video_preprocessor_config.json. Decoding needs PyAV and the count in words needs num2words: the `video` extra.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import Idefics3Error
from .image import MAX_IMAGE_SIZE, edge_dict, fit_longest_edge
from .prompt import ImageTokens, image_block

VIDEO_EXTRA = 'pip install "mindone_idefics3[video]"'
VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"
# SmolVLMProcessor.apply_chat_template renders conversations with a video with this template unless one is given
# (transformers PR 38105: the checkpoints' own templates predate video items).
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")
# transformers maps a PIL filter to torchvision's and replaces LANCZOS (which torchvision lacks for tensors) by
# BICUBIC; the others keep their kind.
_FILTERS = {0: Image.Resampling.NEAREST, 1: Image.Resampling.BICUBIC, 2: Image.Resampling.BILINEAR,
            3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclass
class VideoSettings:
    """How frames are chosen and sized (SmolVLM2-256M/500M: 1 fps, 64 frames, 512² frames)."""

    fps: float = 1.0
    max_frames: int = 64
    longest_edge: int = 4 * 364  # the first resize (`size`)
    frame_size: int = 364  # every frame is squashed to frame_size² (`max_image_size`)
    resample: int = int(Image.Resampling.LANCZOS)
    skip_secs: float = 1.0

    @classmethod
    def from_config(cls, data: dict) -> "VideoSettings":
        """From preprocessor_config.json (with `video_sampling`) or video_preprocessor_config.json."""
        sampling = data.get("video_sampling")
        settings = cls()
        if isinstance(sampling, dict):
            size = data.get("size", sampling.get("video_size"))
            fps, max_frames = sampling.get("fps", settings.fps), sampling.get("max_frames", settings.max_frames)
        else:
            size = data.get("size")
            fps, max_frames = data.get("fps"), data.get("num_frames")
        if size is not None:
            settings.longest_edge = edge_dict(size, "size")["longest_edge"]
        if data.get("max_image_size") is not None:
            settings.frame_size = edge_dict(data["max_image_size"], "max_image_size",
                                            most=MAX_IMAGE_SIZE)["longest_edge"]
        if data.get("resample") is not None:
            settings.resample = data["resample"]
        settings.fps = settings.fps if fps is None else fps
        settings.max_frames = settings.max_frames if max_frames is None else max_frames
        return settings.checked()

    def with_options(self, fps: Optional[float] = None, max_frames: Optional[int] = None) -> "VideoSettings":
        return VideoSettings(self.fps if fps is None else fps, self.max_frames if max_frames is None else max_frames,
                             self.longest_edge, self.frame_size, self.resample, self.skip_secs).checked()

    def checked(self) -> "VideoSettings":
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or \
                not 0 < self.fps < math.inf:
            raise Idefics3Error(f"video fps must be a positive number (frames sampled per second), got {self.fps!r:.80}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise Idefics3Error(f"video max_frames must be a positive integer, got {self.max_frames!r:.80}")
        if isinstance(self.resample, bool) or self.resample not in _FILTERS:
            raise Idefics3Error(f"resample={self.resample!r:.80} is not a PIL resampling filter (0-5)")
        return self


@dataclass
class Video:
    """A decoded video: the chosen frames, already resized, and where they were in the clip."""

    frames: np.ndarray  # (F, frame_size, frame_size, 3) uint8
    indices: np.ndarray  # (F,) frame numbers in the stream
    fps: float  # the stream's frame rate
    total_num_frames: int
    duration: float  # seconds: total_num_frames / fps

    @property
    def timestamps(self) -> List[float]:
        return [int(i) / self.fps for i in self.indices]


# ----------------------------------------------------------------------------------------------- selection
def sample_frame_indices(total_num_frames: int, video_fps: float, duration: float, fps: float, max_frames: int,
                         skip_secs: float = 1.0) -> np.ndarray:
    """transformers' `SmolVLMVideoProcessor.sample_frames` (the same arithmetic, the same corner cases)."""
    desired = max(min(int(round(fps * duration)), max_frames), 1)
    start, end = 0, total_num_frames - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * video_fps)
        end = int(total_num_frames - skip_secs * video_fps)
    start, end = max(0, start), min(end, total_num_frames - 1)
    if start >= end:
        start, end = 0, total_num_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def resized_size(height: int, width: int, longest_edge: int) -> tuple:
    """The first resize of `SmolVLMVideoProcessor.resize` (its `get_resize_output_image_size`): the image path's
    longest-edge fit, the edge capped at MAX_IMAGE_SIZE."""
    return fit_longest_edge(height, width, min(MAX_IMAGE_SIZE, longest_edge))


def resize_frame(rgb: np.ndarray, settings: VideoSettings) -> np.ndarray:
    """(H, W, 3) uint8 → (frame_size, frame_size, 3) uint8: longest edge first, then squashed to a square."""
    resample = _FILTERS[settings.resample]
    image = Image.fromarray(rgb)
    height, width = resized_size(image.height, image.width, settings.longest_edge)
    image = image.resize((width, height), resample=resample)
    image = image.resize((settings.frame_size, settings.frame_size), resample=resample)
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------- decoding
def _import_av():
    try:
        import av
    except ImportError:
        raise Idefics3Error(f"reading videos needs PyAV, which is not installed: {VIDEO_EXTRA}") from None
    return av


def load_video(source: VideoSource, settings: VideoSettings = VideoSettings(), *, download=None) -> Video:
    """Decode the frames `settings` choose from a file path, an http(s) URL, a data: URI or the file's bytes.

    download: `url -> bytes` for http(s) URLs (the caller's fetching rules); by default urllib with the image
    loader's timeout and size cap. Frames are resized as they are decoded, so memory holds only the chosen ones.
    """
    av = _import_av()
    where, opened = _open_argument(source, download)
    try:
        container = av.open(opened, mode="r")
    except av.error.FFmpegError as e:
        raise Idefics3Error(f"{where} is not a video file PyAV can read, or is truncated ({_reason(e)})") from None
    try:
        return _decode(av, container, where, settings)
    finally:
        container.close()


def _open_argument(source, download):
    from .image_io import URL_TIMEOUT_SECONDS, _data_uri_bytes, _download

    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise Idefics3Error("the video bytes passed are empty (0 bytes), not a video")
        return f"the {len(source)} bytes passed", io.BytesIO(bytes(source))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise Idefics3Error(f"cannot load a video from a {type(source).__name__}; pass a file path, an http(s) URL, "
                            "a data: URI or the file's bytes")
    if source.startswith(("http://", "https://")):
        data = download(source) if download else _download(source, URL_TIMEOUT_SECONDS, what="video")
        return source, io.BytesIO(data)
    if source.startswith("data:"):
        return "the data: URI video", io.BytesIO(_data_uri_bytes(source, what="video"))
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise Idefics3Error(f"video file not found: {path}")
    if os.path.isdir(path):
        raise Idefics3Error(f"{path} is a directory; pass the path of a video file")
    if os.path.getsize(path) == 0:
        raise Idefics3Error(f"{path} is empty (0 bytes), not a video")
    return path, path


def _reason(error) -> str:
    return getattr(error, "strerror", None) or str(error)


def _decode(av, container, where: str, settings: VideoSettings) -> Video:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise Idefics3Error(f"{where} has no video stream ({', '.join(kinds)} only); pass a video file")
    stream = container.streams.video[0]
    if not stream.average_rate:
        raise Idefics3Error(f"{where} does not state a frame rate; re-encode it (e.g. ffmpeg -i IN -r 30 OUT.mp4)")
    video_fps = float(stream.average_rate)
    total = int(stream.frames)
    if total <= 0:  # a container without a frame count (some WebM/MKV): count the packets of the stream
        total = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    if total <= 0:
        raise Idefics3Error(f"{where} has a video stream with no frames")
    duration = float(total / stream.average_rate)  # as transformers: exact Fraction division, then float
    indices = sample_frame_indices(total, video_fps, duration, settings.fps, settings.max_frames, settings.skip_secs)
    wanted, last = set(int(i) for i in indices), int(indices[-1])
    frames, decoded = [], 0
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i > last:
                break
            decoded = i + 1
            if i in wanted:
                frames.append(resize_frame(frame.to_ndarray(format="rgb24"), settings))
    except av.error.FFmpegError as e:
        got = "no decodable video frames" if not frames else f"decoding failed after {decoded} frames"
        raise Idefics3Error(f"{where} is corrupt or truncated: {got} ({_reason(e)}); re-encode or re-download "
                            "it") from None
    if not frames:
        raise Idefics3Error(f"{where} has no decodable video frames (its header announces {total}); the file is "
                            "corrupt or truncated")
    if len(frames) < len(indices):
        raise Idefics3Error(f"{where} ended after {decoded} decodable frames but its header announces {total}: the "
                            "file is truncated or corrupt; re-encode or re-download it")
    return Video(np.stack(frames), indices, video_fps, total, duration)


# ----------------------------------------------------------------------------------------------- the prompt
def _number_words(n: int) -> str:
    try:
        from num2words import num2words
    except ImportError:
        raise Idefics3Error(f"SmolVLM's video prompt spells the frame count with num2words, which is not "
                            f"installed: {VIDEO_EXTRA}") from None
    return num2words(n)


def video_block(video: Video, frame_count: int, image_seq_len: int, tokens: ImageTokens = ImageTokens()) -> str:
    """The text that replaces one `<video>`: the intro (frame_count in words, the duration), one timestamped
    unsplit image block per frame, the outro."""
    duration = timedelta(seconds=int(video.duration))
    text = VIDEO_INTRO.format(frame_count=_number_words(frame_count), video_duration=str(duration))
    frame = image_block(0, 0, image_seq_len, tokens)
    for second in video.timestamps:
        text += FRAME_TIMESTAMP.format(timestamp=f"{int(second // 60):02d}:{int(second % 60):02d}") + frame
    return text + MEDIA_OUTRO


def expand_video_prompt(text: str, videos: Sequence[Video], frame_count: int, image_seq_len: int,
                        tokens: ImageTokens = ImageTokens(), video_token: str = "<video>") -> str:
    """Replace the k-th `<video>` of `text` with the block of videos[k]."""
    parts = text.split(video_token)
    if len(parts) - 1 != len(videos):
        raise Idefics3Error(f"the prompt has {len(parts) - 1} {video_token} tags but {len(videos)} videos were "
                            "given for it")
    out = [parts[0]]
    for video, part in zip(videos, parts[1:]):
        out += [video_block(video, frame_count, image_seq_len, tokens), part]
    return "".join(out)
