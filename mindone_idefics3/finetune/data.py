"""Training data: TRL's conversational vision JSONL → model inputs with labels.

One example per line: `{"messages": [...], "images": ["a.jpg", "https://...", "data:image/png;base64,..."]}`.
`messages` is a conversation in the chat-template format (roles user/assistant/system; content a string or a list
of `{"type": "text", "text": ...}` / `{"type": "image"}` items); `images` hold one source per `{"type": "image"}`
item, in their order (relative paths are relative to the JSONL file). SmolVLM2 checkpoints also take `"videos"`,
one per `{"type": "video"}` item (as in the processor, an example has images or videos, not both); a video's tag is
expanded as the processor expands it, with the frames its settings choose. Blank lines are skipped.

`TrainingData.open` reads the file once, line by line, keeping only the byte offset of each example and checking
what can be checked without decoding images: the JSON, the message format, an assistant turn, as many images as
image items, local image files that exist. Any problem stops there, naming the line. Examples are then read back
by offset when a batch needs them (a large file is never held in memory), and images are decoded by the
processor's loader.

Labels (`Labeler`): by default only the assistant turns are scored — the tokens of each assistant message's content
and the `<end_of_utterance>` that closes it; `train_on="all"` scores every token but `<image>` and padding (the
Idefics3 notebook's convention: the fake/global/row-col markers around images are then scored too). Both come from
the chat template's own text: the assistant message i spans from the end of `render(messages[:i],
add_generation_prompt=True)` (after "Assistant:") to the end of the last `<end_of_utterance>` inside
`render(messages[:i + 1])`; tokens are mapped to those characters through the tokenizer's offsets, after the
`<image>` tags are expanded exactly as the processor expands them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import Idefics3Error
from ..model.loss import IGNORE_INDEX
from ..processing.chat_template import normalize_conversation
from ..processing.collate import collate
from ..processing.prompt import image_block
from ..processing.video import VIDEO_CHAT_TEMPLATE, video_block

REMOTE = ("http://", "https://", "data:")


@dataclass
class Example:
    line: int  # 1-based line number in the JSONL file
    messages: List[Dict[str, Any]]
    images: List[str]  # as the image loader takes them (relative paths resolved)
    videos: List[str] = ()  # as the video loader takes them (relative paths resolved)


class TrainingData:
    """The examples of one JSONL file, checked whole on open, read back lazily by index."""

    def __init__(self, path: Path, offsets: List[Tuple[int, int]]):
        self.path, self._offsets = path, offsets  # (byte offset, line number) of each example

    @classmethod
    def open(cls, path, what: str = "--data") -> "TrainingData":
        path = Path(path)
        if not path.is_file():
            raise Idefics3Error(f"{what} {path}: no such file; pass a JSONL file with one example per line")
        offsets = []
        with open(path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    parse_example(raw, number, path)  # the check; the example is read again when used
                    offsets.append((offset, number))
                offset += len(raw)
        if not offsets:
            raise Idefics3Error(f"{what} {path} holds no example (the file is empty or blank); write one JSON "
                                "object per line: {\"messages\": [...], \"images\": [...]}")
        return cls(path, offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Example:
        offset, number = self._offsets[index]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return parse_example(f.readline(), number, self.path)


def parse_example(raw: bytes, line: int, path: Path) -> Example:
    """One JSONL line → Example, or one Idefics3Error naming the line and what to fix."""
    where = f"{path} line {line}"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise Idefics3Error(f"{where} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "messages" not in data:
        raise Idefics3Error(f"{where} must be a JSON object with \"messages\" (and \"images\" when the messages "
                            "hold image items)")
    try:
        messages = normalize_conversation(data["messages"])
    except Idefics3Error as e:
        raise Idefics3Error(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise Idefics3Error(f"{where} has no assistant turn: there is nothing to learn from it; add the answer as "
                            "{\"role\": \"assistant\", \"content\": ...} or remove the line")
    sources = {}
    for kind in ("image", "video"):
        listed = data.get(kind + "s", [])
        if listed is None:
            listed = []
        if not isinstance(listed, list) or not all(isinstance(i, str) and i for i in listed):
            raise Idefics3Error(f"{where}: \"{kind}s\" must be a list of paths, URLs or data: URIs")
        tags = sum(item["type"] == kind for m in messages for item in m["content"])
        if tags != len(listed):
            raise Idefics3Error(f"{where} has {tags} {{\"type\": \"{kind}\"}} item(s) but {len(listed)} {kind}(s); "
                                f"give one {kind} per {kind} item, in their order")
        sources[kind] = [_resolve(source, kind, where, path) for source in listed]
    if sources["image"] and sources["video"]:
        raise Idefics3Error(f"{where} has images and videos; an example holds one or the other (as the processor)")
    return Example(line, messages, sources["image"], sources["video"])


def _resolve(source: str, kind: str, where: str, path: Path) -> str:
    if source.startswith(REMOTE):
        return source
    file = Path(source).expanduser()
    if not file.is_absolute():
        file = path.parent / file
    if not file.is_file():
        raise Idefics3Error(f"{where}: {kind} {source!r} not found (looked for {file}); relative paths are "
                            "relative to the JSONL file")
    return str(file)


# ----------------------------------------------------------------------------------------------- labels
class Labeler:
    """Example → processor inputs of one example with labels (see the module docstring)."""

    def __init__(self, processor, train_on: str = "assistant"):
        if train_on not in ("assistant", "all"):
            raise Idefics3Error(f"--train-on must be 'assistant' or 'all', got {train_on!r}")
        self.processor, self.train_on = processor, train_on
        self.eou = processor.end_of_utterance_token
        self.tokens = processor._tokens  # the image-token strings the processor expands with
        probe = [{"role": "user", "content": "?"}]
        self.generation_prompt = processor.apply_chat_template(probe, add_generation_prompt=True)[
            len(processor.apply_chat_template(probe)):]  # "Assistant:" for Idefics3's template

    def __call__(self, example: Example) -> Dict[str, np.ndarray]:
        """input_ids, attention_mask, labels (1, S) and pixel_values / pixel_attention_mask (1, I, ...) when the
        example has images — the processor's own output for the rendered conversation, plus labels."""
        proc = self.processor
        where = f"line {example.line}"
        # as the processor: a conversation with a video is rendered with SmolVLM's video template, every prefix too
        template = VIDEO_CHAT_TEMPLATE if example.videos else None
        try:
            text = proc.apply_chat_template(example.messages, chat_template=template)
            spans = self.assistant_spans(example.messages, text, template) if self.train_on == "assistant" else None
            sample: Dict[str, np.ndarray] = {}
            rows, cols = [], []
            video_blocks = None
            if example.videos:
                videos = [proc.load_video(src) for src in example.videos]
                frame_count = max(len(v.indices) for v in videos)  # the processor's rule
                video_blocks = [video_block(v, frame_count, proc.image_seq_len, self.tokens) for v in videos]
                sample["pixel_values"], sample["pixel_attention_mask"] = proc.image_processor.pad_and_normalize(
                    [[frame for v in videos for frame in v.frames]])
            elif example.images:
                from ..processing import load_image

                images = [load_image(src) for src in example.images]
                pix = proc(images=[images], return_tensors="np")
                sample["pixel_values"], sample["pixel_attention_mask"] = pix["pixel_values"], pix["pixel_attention_mask"]
                rows, cols = pix["rows"][0], pix["cols"][0]
        except Idefics3Error as e:
            raise Idefics3Error(f"{where}: {e}") from None
        if video_blocks is not None:
            expanded, shift, blocks = self.expand_blocks(text, proc.video_token, video_blocks)
        else:
            expanded, shift, blocks = self.expand(text, rows, cols)
        encoding = proc.tokenizer.backend.encode(expanded, add_special_tokens=True)
        ids = np.asarray(encoding.ids, np.int64)
        labels = ids.copy()
        if spans is not None:
            keep = np.zeros(len(ids), bool)
            for start, end in spans:
                start, end = shift(start), shift(end)
                keep |= np.array([s >= start and e <= end and e > s for s, e in encoding.offsets])
            labels[~keep] = IGNORE_INDEX
        for start, end in blocks if spans is not None else ():  # image blocks inside an assistant turn
            labels[np.array([s >= start and e <= end and e > s for s, e in encoding.offsets], bool)] = IGNORE_INDEX
        labels[ids == proc.image_token_id] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX  # nothing in the example predicts its first token (after left padding, a pad would)
        if spans is not None and not (labels != IGNORE_INDEX).any():
            raise Idefics3Error(f"{where}: the assistant turns hold no token to learn (empty answers?)")
        sample.update(input_ids=ids[None], attention_mask=np.ones((1, len(ids)), np.int64), labels=labels[None])
        return sample

    def assistant_spans(self, messages: Sequence[dict], text: str, template: Optional[str] = None
                        ) -> List[Tuple[int, int]]:
        """Character spans [start, end) of `text` (the rendered conversation) to score: each assistant message's
        content and its closing `<end_of_utterance>`."""
        proc, spans = self.processor, []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            through = proc.apply_chat_template(list(messages[: i + 1]), chat_template=template)
            if i:
                before = proc.apply_chat_template(list(messages[:i]), add_generation_prompt=True,
                                                  chat_template=template)
            else:  # the conversation opens with the assistant: its text up to the generation prompt
                at = through.find(self.generation_prompt)
                before = through[: at + len(self.generation_prompt)] if at >= 0 and self.generation_prompt else ""
            if not (text.startswith(through) and through.startswith(before.rstrip())) or not before:
                raise Idefics3Error("the chat template does not render the conversation turn by turn (each prefix "
                                    "of the conversation a prefix of its text); use --train-on all")
            start = len(before) if through.startswith(before) else len(before.rstrip())
            eou = through.rfind(self.eou, start)
            end = eou + len(self.eou) if eou >= 0 else len(through.rstrip())
            spans.append((start, end))
        return spans

    def expand(self, text: str, rows: Sequence[int], cols: Sequence[int]):
        """The processor's expansion of the `<image>` tags (prompt.expand_prompt), with a map from positions in
        `text` to positions in the expanded text and the expanded image blocks' spans."""
        tag = self.tokens.image
        if text.count(tag) != len(rows):
            raise Idefics3Error(f"the prompt has {text.count(tag)} {tag} tags but {len(rows)} images")
        return self.expand_blocks(text, tag, [image_block(r, c, self.processor.image_seq_len, self.tokens)
                                              for r, c in zip(rows, cols)])

    def expand_blocks(self, text: str, tag: str, block_texts: Sequence[str]):
        """`text` with its k-th `tag` replaced by block_texts[k], the position map and the blocks' spans."""
        parts = text.split(tag)
        if len(parts) - 1 != len(block_texts):
            raise Idefics3Error(f"the prompt has {len(parts) - 1} {tag} tags but {len(block_texts)} were given")
        out, starts, blocks, deltas, pos, new = [parts[0]], [], [], [], len(parts[0]), len(parts[0])
        for k, part in enumerate(parts[1:]):
            block = block_texts[k]
            starts.append(pos)
            blocks.append((new, new + len(block)))
            deltas.append(len(block) - len(tag))
            out += [block, part]
            pos += len(tag) + len(part)
            new += len(block) + len(part)
        cumulative = np.cumsum([0] + deltas)

        def shift(p: int) -> int:
            return p + int(cumulative[np.searchsorted(starts, p, side="left")])

        return "".join(out), shift, blocks


# ----------------------------------------------------------------------------------------------- batches
def collate_examples(samples: Sequence[Dict[str, np.ndarray]], pad_token_id: Optional[int]) -> Dict[str, Any]:
    """Left-padded batch (the processor's padding side) with labels padded by -100."""
    batch = collate(samples, pad_token_id)
    longest = batch["input_ids"].shape[1]
    labels = np.full((len(samples), longest), IGNORE_INDEX, np.int64)
    for b, sample in enumerate(samples):
        n = sample["labels"].shape[1]
        labels[b, longest - n:] = sample["labels"][0]
    batch["labels"] = labels
    return dict(batch)


def scored_tokens(labels: np.ndarray) -> int:
    """Tokens a batch's loss is taken over (the shifted labels that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
