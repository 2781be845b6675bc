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
from .protocol import ChatCompletionRequest, ImagePart

log = logging.getLogger("mindone_idefics3.serve")


@dataclass
class Limits:
    """What one request may ask for (the command-line limits)."""
    context: int  # the model's max_position_embeddings
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


def to_template_messages(request: ChatCompletionRequest) -> Tuple[List[Dict[str, Any]], List[str]]:
    """OpenAI messages → the processor's chat-template messages ({"type": "image"} items in place of the
    image_url parts) and the image URLs in order."""
    messages, urls = [], []
    for message in request.messages:
        if isinstance(message.content, str):
            content = [{"type": "text", "text": message.content}]
        else:
            content = []
            for part in message.content:
                if isinstance(part, ImagePart):
                    content.append({"type": "image"})
                    urls.append(part.image_url.url)
                else:
                    content.append({"type": "text", "text": part.text})
        messages.append({"role": message.role, "content": content})
    return messages, urls


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
        messages, urls = to_template_messages(request)
        if len(urls) > limits.max_images:
            raise APIError(400, f"the request has {len(urls)} images; this server takes at most {limits.max_images} "
                                "per request (--max-images-per-request)", param="messages")
        images = [self._image(url, i) for i, url in enumerate(urls)]
        try:
            with self._lock:
                inputs = self.processor.chat_inputs(messages, images)
        except Idefics3Error as e:
            raise APIError(400, str(e), param="messages") from None
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, over this server's limit of "
                                f"{limits.max_prompt_tokens} (--max-prompt-tokens); shorten the messages or send "
                                "fewer or smaller images", param="messages", code="context_length_exceeded")
        max_tokens = self._max_tokens(request, prompt_tokens)
        return PreparedRequest(inputs, prompt_tokens, max_tokens, self._sampling(request), request.stop_strings())

    def _image(self, url: str, index: int):
        param = "messages"
        if url.startswith(("http://", "https://")):
            if not self.limits.remote_images:
                raise APIError(400, f"image {index} is an http(s) URL and this server does not fetch remote images "
                                    "(--no-remote-images); send it inline as data:image/...;base64,...",
                               param=param)
            image = self._remote_image(url, index)
        elif not url.startswith("data:"):
            raise APIError(400, f"image {index} must be a data:image/...;base64,... URI or an http(s) URL, got "
                                f"{url[:40]!r}", param=param)
        else:
            try:
                image = load_image(url)
            except Idefics3Error as e:
                raise APIError(400, f"image {index}: {e}", param=param) from None
        width, height = image.size
        if width * height > self.limits.max_image_pixels:
            raise APIError(400, f"image {index} has {width}x{height} = {width * height} pixels, over this server's "
                                f"limit of {self.limits.max_image_pixels} (--max-image-pixels); downscale it first",
                           param=param)
        return image

    def _remote_image(self, url: str, index: int):
        """Fetch and decode; whatever went wrong — an address refused, a closed port, a 404, a body that is not an
        image — the client gets the same message (anything more would let it map the server's network), and the
        server's log gets the reason."""
        try:
            return load_image(self.fetch(url))
        except Idefics3Error as e:  # FetchError is one
            host = e.host if isinstance(e, FetchError) else url_host(url)
            log.warning("image %d from %s refused or failed: %s", index, host,
                        e.reason if isinstance(e, FetchError) else e)
            raise APIError(400, f"image {index} could not be fetched from {host}; send an image URL this server may "
                                "fetch or the image inline as data:image/...;base64,...", param="messages",
                           code="image_fetch_failed") from None

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        limits = self.limits
        room = limits.context - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, which fills the model's context of "
                                f"{limits.context} tokens; shorten the messages or send fewer or smaller images",
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
                                f"{prompt_tokens + asked}, beyond the model's context of {limits.context} tokens; "
                                f"ask for at most {room} tokens or shorten the prompt", param=name,
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
