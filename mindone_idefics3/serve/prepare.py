"""A validated chat request → model inputs of its own (a batch of one), or the APIError that says why not.

Runs on the HTTP side (a thread of the server's pool) so that image decoding, the chat template and the image
processor never hold up the decode loop. It has its own processor: a `tokenizers.Tokenizer` shared between threads
raises `RuntimeError: Already borrowed`, so this processor is used under a lock and the engine's worker decodes with
another one.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import Idefics3Error
from ..generation import SamplingParams
from ..processing import load_image
from ..processing.processor import Idefics3Processor, ProcessorOutput
from .errors import APIError
from .media import Fetcher, FetchError, MediaPolicy, url_host
from .protocol import ChatCompletionRequest, ImagePart, VideoPart

log = logging.getLogger("mindone_idefics3.serve")


@dataclass
class Limits:
    """What one request may ask for (the command-line limits)."""
    context: int  # the tokens a request may hold: the model's max_position_embeddings or --max-model-len
    context_name: str = ""  # how errors name that limit (default: "the model's context of N tokens")
    max_images: int = 8
    max_prompt_tokens: Optional[int] = None
    max_tokens: int = 1024  # the largest max_tokens a request may ask for, and the default
    max_image_pixels: int = 4096 * 4096
    remote_images: bool = True
    image_timeout: float = 10.0
    max_image_bytes: int = 20 * 2**20
    allowed_media_domains: Optional[frozenset] = None  # None: any host (see media.py)
    allow_private_media_urls: bool = False

    def media_policy(self) -> MediaPolicy:
        return MediaPolicy(self.allowed_media_domains, self.allow_private_media_urls, self.image_timeout,
                           self.max_image_bytes)


@dataclass
class PreparedRequest:
    inputs: ProcessorOutput  # input_ids / attention_mask (1, S), pixel_values / pixel_attention_mask if images
    prompt_tokens: int
    max_tokens: int
    sampling: SamplingParams  # its max_new_tokens is max_tokens's (the engine sets it)
    stop: List[str] = field(default_factory=list)


def to_template_messages(request: ChatCompletionRequest) -> Tuple[List[Dict[str, Any]], List[str], List[str]]:
    """OpenAI messages → the processor's chat-template messages ({"type": "image"} / {"type": "video"} items in
    place of the image_url / video_url parts), the image URLs and the video URLs in order."""
    messages, urls, video_urls = [], [], []
    for message in request.messages:
        if isinstance(message.content, str):
            content = [{"type": "text", "text": message.content}]
        else:
            content = []
            for part in message.content:
                if isinstance(part, ImagePart):
                    content.append({"type": "image"})
                    urls.append(part.image_url.url)
                elif isinstance(part, VideoPart):
                    content.append({"type": "video"})
                    video_urls.append(part.video_url.url)
                else:
                    content.append({"type": "text", "text": part.text})
        messages.append({"role": message.role, "content": content})
    return messages, urls, video_urls


class Preparer:
    def __init__(self, processor: Idefics3Processor, limits: Limits, generation_defaults: Dict[str, Any],
                 fetch: Optional[Callable[[str], bytes]] = None):
        """fetch: url -> the bytes of a remote image (default: media.Fetcher under the limits' policy)."""
        self.processor, self.limits, self.defaults = processor, limits, generation_defaults
        self.fetch = fetch or Fetcher(limits.media_policy())
        self._lock = threading.Lock()

    def __call__(self, request: ChatCompletionRequest) -> PreparedRequest:
        limits = self.limits
        if request.n != 1:
            raise APIError(400, f"n={request.n} is not supported: this server returns one choice per request; "
                                "send n=1 (or several requests)", param="n")
        messages, urls, video_urls = to_template_messages(request)
        if len(urls) > limits.max_images:
            raise APIError(400, f"the request has {len(urls)} images; this server takes at most {limits.max_images} "
                                "per request (--max-images-per-request)", param="messages")
        if len(video_urls) > limits.max_images:
            raise APIError(400, f"the request has {len(video_urls)} videos; this server takes at most "
                                f"{limits.max_images} per request (--max-images-per-request)", param="messages")
        images = [self._image(url, i) for i, url in enumerate(urls)]
        videos = [self._video(url, i) for i, url in enumerate(video_urls)]
        try:
            with self._lock:
                inputs = self.processor.chat_inputs(messages, images, videos)
        except Idefics3Error as e:
            raise APIError(400, str(e), param="messages") from None
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, over this server's limit of "
                                f"{limits.max_prompt_tokens} (--max-prompt-tokens); shorten the messages or send "
                                "fewer or smaller images", param="messages", code="context_length_exceeded")
        max_tokens = self._max_tokens(request, prompt_tokens)
        return PreparedRequest(inputs, prompt_tokens, max_tokens, self._sampling(request), request.stop_strings())

    def _check_url(self, url: str, index: int, kind: str = "image") -> None:
        """The URL rules every part follows (images and videos alike): data: URIs, or http(s) URLs unless
        --no-remote-images (fetched under media.py's address rules, see `_fetch`)."""
        if url.startswith(("http://", "https://")):
            if not self.limits.remote_images:
                raise APIError(400, f"{kind} {index} is an http(s) URL and this server does not fetch remote "
                                    f"{kind}s (--no-remote-images); send it inline as data:{kind}/...;base64,...",
                               param="messages")
        elif not url.startswith("data:"):
            raise APIError(400, f"{kind} {index} must be a data:{kind}/...;base64,... URI or an http(s) URL, got "
                                f"{url[:40]!r}", param="messages")

    def _fetch(self, url: str, index: int, kind: str) -> bytes:
        """A remote part's bytes. Whatever went wrong — an address refused, a closed port, a 404 — the client gets
        the same message (anything more would let it map the server's network), and the server's log the reason."""
        try:
            return self.fetch(url)
        except Idefics3Error as e:  # FetchError is one
            self._fetch_failed(url, index, kind, e)

    def _fetch_failed(self, url: str, index: int, kind: str, error: Exception):
        """The one 400 of a part that could not be fetched (or decoded after fetching); the reason to the log."""
        host = error.host if isinstance(error, FetchError) else url_host(url)
        log.warning("%s %d from %s refused or failed: %s", kind, index, host,
                    error.reason if isinstance(error, FetchError) else error)
        article = "an" if kind == "image" else "a"
        raise APIError(400, f"{kind} {index} could not be fetched from {host}; send {article} {kind} URL this server "
                            f"may fetch or the {kind} inline as data:{kind}/...;base64,...", param="messages",
                       code=f"{kind}_fetch_failed") from None

    def _video(self, url: str, index: int):
        """A video_url part, under the image URLs' rules."""
        self._check_url(url, index, "video")
        try:
            return self.processor.load_video(url, download=lambda u: self._fetch(u, index, "video"))
        except Idefics3Error as e:
            raise APIError(400, f"video {index}: {e}", param="messages") from None

    def _image(self, url: str, index: int):
        param = "messages"
        self._check_url(url, index)
        if url.startswith("data:"):
            try:
                image = load_image(url)
            except Idefics3Error as e:
                raise APIError(400, f"image {index}: {e}", param=param) from None
        else:
            image = self._remote_image(url, index)
        width, height = image.size
        if width * height > self.limits.max_image_pixels:
            raise APIError(400, f"image {index} has {width}x{height} = {width * height} pixels, over this server's "
                                f"limit of {self.limits.max_image_pixels} (--max-image-pixels); downscale it first",
                           param=param)
        return image

    def _remote_image(self, url: str, index: int):
        """Fetch and decode; a body that is not an image gets the same message as a refused fetch (`_fetch`)."""
        data = self._fetch(url, index, "image")
        try:
            return load_image(data)
        except Idefics3Error as e:
            self._fetch_failed(url, index, "image", e)

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        limits = self.limits
        where = limits.context_name or f"the model's context of {limits.context} tokens"
        room = limits.context - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, which fills {where}; shorten the "
                                "messages or send fewer or smaller images",
                           param="messages", code="context_length_exceeded")
        asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if asked is None:
            return min(limits.max_tokens, room)
        if asked > limits.max_tokens:
            raise APIError(400, f"{name}={asked} is over this server's limit of {limits.max_tokens} "
                                "(--max-tokens-limit); ask for fewer tokens", param=name)
        if prompt_tokens + asked > limits.context:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; with {name}={asked} that is "
                                f"{prompt_tokens + asked}, beyond {where}; ask for at most {room} tokens or "
                                "shorten the prompt", param=name,
                           code="context_length_exceeded")
        return asked

    def _sampling(self, request: ChatCompletionRequest) -> SamplingParams:
        """temperature 0 is greedy. Without temperature: 1 when top_p is given, else the checkpoint's
        generation_config.json default (greedy unless it says do_sample)."""
        defaults = self.defaults
        if request.temperature is not None:
            temperature = request.temperature
        elif request.top_p is not None:
            temperature = 1.0
        else:
            temperature = defaults.get("temperature", 1.0) if defaults.get("do_sample") else 0.0
        top_p = request.top_p if request.top_p is not None else defaults.get("top_p", 1.0)
        if temperature == 0:
            return SamplingParams(do_sample=False, seed=request.seed)
        return SamplingParams(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                              seed=request.seed)
