"""The text tokenizer: a `tokenizers.Tokenizer` read from `tokenizer.json` plus what transformers layers on top.

transformers (4.57.1) builds `PreTrainedTokenizerFast` / `LlamaTokenizerFast` from the same files; we reproduce the
parts that change ids or text:
- added tokens: every entry of `tokenizer_config.json`'s `added_tokens_decoder` whose flags differ from
  tokenizer.json is re-added with the config's flags, then special tokens (bos/eos/unk/pad/additional) that are
  not in the vocabulary are added as special tokens (new ids at the end); without `added_tokens_decoder`
  (legacy checkpoints) `special_tokens_map.json` supplies the special tokens;
- bos/eos: tokenizer.json's post-processor as is, except for the Llama tokenizer classes, whose post-processor is
  rebuilt from `add_bos_token` (default True) / `add_eos_token` (default False);
- decoding: the backend decoder, then `clean_up_tokenization_spaces` (from the config; default False);
- `add_prefix_space` and `split_special_tokens` from the config.
Padding is done here (numpy), on the side given by `padding_side` from the config (or tokenizer.json's padding
section); when neither says, we pad on the LEFT (what generation needs; transformers' generic class pads right).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import Idefics3Error
from ..files import read_json

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
LLAMA_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
# transformers' clean_up_tokenization: these replacements, in this order, each over the whole string.
CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
CLEANUP_CHARS = frozenset("".join(old for old, _ in CLEANUP_REPLACEMENTS))

TokenIds = Union[Sequence[int], np.ndarray]


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces English detokenization leaves before punctuation and contractions (as transformers)."""
    for old, new in CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def _content(token) -> Optional[str]:
    """A special-token entry of a config: a string, or an AddedToken dict with "content"."""
    if isinstance(token, dict):
        return token.get("content")
    return token


@functools.lru_cache(maxsize=16)
def added_token_id(directory: Optional[str], content: str) -> Optional[int]:
    """The id a checkpoint's tokenizer files give the added token `content` (tokenizer.json's added_tokens,
    added_tokens.json, or tokenizer_config.json's added_tokens_decoder), or None. Read once per directory, without
    building a tokenizer: generation asks it for `<end_of_utterance>`, which Idefics3-8B ends its turns with but does
    not list as eos."""
    if not directory:
        return None
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = Path(directory) / name
        if not path.is_file():
            continue
        data = read_json(path)
        if name == "tokenizer.json":
            for token in data.get("added_tokens", []):
                if token.get("content") == content:
                    return int(token["id"])
        elif name == "added_tokens.json" and content in data:
            return int(data[content])
        elif name == "tokenizer_config.json":
            for token_id, token in data.get("added_tokens_decoder", {}).items():
                if token.get("content") == content:
                    return int(token_id)
    return None


class TextTokenizer:
    """Encode/decode text like transformers' fast tokenizer for the same files (see the module docstring)."""

    def __init__(self, backend, *, special_tokens: Optional[Dict[str, str]] = None,
                 additional_special_tokens: Sequence[str] = (), padding_side: str = "left",
                 clean_up_tokenization_spaces: bool = False, chat_template=None):
        from tokenizers import AddedToken

        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.additional_special_tokens = list(additional_special_tokens)
        if padding_side not in ("left", "right"):
            raise Idefics3Error(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.chat_template = chat_template
        # as transformers: special tokens that are not added tokens yet become added special tokens (a new id if
        # the vocabulary lacks them, else their vocabulary id; either way they are now matched whole in any text)
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in self.all_special_tokens if t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], **overrides) -> "TextTokenizer":
        """Read tokenizer.json, tokenizer_config.json and (legacy) special_tokens_map.json from a directory.

        overrides: `padding_side`, `clean_up_tokenization_spaces`, `add_bos_token`, `add_eos_token` or any special
        token (`pad_token="..."`) — as if they were in tokenizer_config.json.
        """
        from tokenizers import AddedToken, Tokenizer

        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise Idefics3Error(f"{directory} has no tokenizer.json; Idefics3 checkpoints ship a fast tokenizer "
                                "file (sentencepiece-only tokenizers are not supported): copy tokenizer.json from "
                                "the original checkpoint")
        config_file = directory / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        config.update(overrides)
        spec = read_json(tokenizer_file)
        pre = spec.get("pre_tokenizer") or {}
        if "add_prefix_space" in config and "add_prefix_space" in pre:
            pre["add_prefix_space"] = bool(config["add_prefix_space"])
        try:
            backend = Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise Idefics3Error(f"{tokenizer_file} cannot be read by the tokenizers library ({e})") from None
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True

        llama = config.get("tokenizer_class") in LLAMA_CLASSES
        special = {k: _content(config.get(k, LLAMA_DEFAULTS.get(k) if llama else None)) for k in SPECIAL_TOKEN_KEYS}
        additional = [_content(t) for t in config.get("additional_special_tokens") or []]
        decoder = config.get("added_tokens_decoder")
        if decoder is None:
            special, additional = cls._legacy_special_tokens(directory, special, additional, overrides)
        padding = spec.get("padding") or {}
        if special["pad_token"] is None and padding.get("pad_token"):
            special["pad_token"] = padding["pad_token"]
        padding_side = config.get("padding_side") or {"Left": "left", "Right": "right"}.get(
            padding.get("direction"), "left")

        # added_tokens_decoder entries whose flags differ from tokenizer.json's are re-added (transformers does
        # the same; e.g. a token that is special in the config but not in tokenizer.json becomes special)
        current = {t.content: t for t in backend.get_added_tokens_decoder().values()}
        specials = {t for t in list(special.values()) + additional if t}
        changed = []
        for _, entry in sorted(((int(k), v) for k, v in (decoder or {}).items()), key=lambda kv: kv[0]):
            flags = dict(single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                         rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", True),
                         special=entry.get("special", False) or entry["content"] in specials)
            have = current.get(entry["content"])
            if have is None or any(getattr(have, k) != v for k, v in flags.items()):
                changed.append(AddedToken(entry["content"], **flags))
        if changed:
            backend.add_tokens(changed)

        tokenizer = cls(backend, special_tokens=special, additional_special_tokens=additional,
                        padding_side=padding_side,
                        clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                        chat_template=cls._read_chat_template(directory, config))
        if llama:
            tokenizer._set_bos_eos_template(config.get("add_bos_token", True), config.get("add_eos_token", False))
        return tokenizer

    @staticmethod
    def _legacy_special_tokens(directory: Path, special: dict, additional: list, overrides: dict):
        path = directory / "special_tokens_map.json"
        if not path.is_file():
            return special, additional
        for key, value in read_json(path).items():
            if key in overrides and overrides[key]:
                continue
            if key == "additional_special_tokens" and isinstance(value, list):
                additional = additional + [_content(t) for t in value if _content(t) not in additional]
            elif key in special:
                special[key] = _content(value)
        return special, additional

    @staticmethod
    def _read_chat_template(directory: Path, config: dict):
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        return template

    def _set_bos_eos_template(self, add_bos: bool, add_eos: bool) -> None:
        """The Llama classes' post-processor: [bos] $A [eos] as configured."""
        from tokenizers import processors

        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise Idefics3Error("tokenizer_config.json sets add_bos_token/add_eos_token but has no bos/eos token")
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = " ".join([single] + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        pairs = ([(bos, self.backend.token_to_id(bos))] if add_bos else []) + \
                ([(eos, self.backend.token_to_id(eos))] if add_eos else [])
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)

    # ------------------------------------------------------------------------------------------- vocabulary
    @property
    def all_special_tokens(self) -> List[str]:
        tokens = [t for t in self.special_tokens.values()] + self.additional_special_tokens
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> List[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def special_tokens_map(self) -> dict:
        """As transformers' `special_tokens_map` (what chat templates see as bos_token, eos_token, ...)."""
        out = dict(self.special_tokens)
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    def _special_id(self, key: str) -> Optional[int]:
        token = self.special_tokens.get(key)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> Dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        """Token string(s) → id(s); unknown tokens give unk_token_id (None without an unk token)."""
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            if index is None and tokens != self.unk_token and self.unk_token is not None:
                return self.unk_token_id
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, TokenIds]):
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        return [self.backend.id_to_token(int(i)) for i in ids]

    def add_special_tokens(self, tokens: Iterable[str]) -> int:
        """Make `tokens` special (added with new ids if unknown); returns how many were new to the vocabulary."""
        from tokenizers import AddedToken

        tokens = list(tokens)
        new = sum(self.backend.token_to_id(t) is None for t in tokens)
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self.additional_special_tokens += [t for t in tokens if t not in self.additional_special_tokens]
        return new

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        if not isinstance(add_special_tokens, bool):
            raise Idefics3Error(f"add_special_tokens must be True or False, got {add_special_tokens!r:.80}")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def __call__(self, text: Union[str, Sequence[str]], *, add_special_tokens: bool = True, padding=False,
                 padding_side: Optional[str] = None, max_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None) -> Dict[str, np.ndarray]:
        """input_ids and attention_mask (B, S) int64 for one text or a batch (see `pad`)."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.encode_batch(texts, add_special_tokens=add_special_tokens)
        input_ids, attention_mask = self.pad(ids, padding=padding, padding_side=padding_side,
                                             max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def pad(self, ids: Sequence[Sequence[int]], *, padding=True, padding_side: Optional[str] = None,
            max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None
            ) -> Tuple[np.ndarray, np.ndarray]:
        """Rows of ids → (B, S) int64 ids and mask. padding: False/"do_not_pad", True/"longest", "max_length"."""
        self.check_padding(padding, padding_side, max_length, pad_to_multiple_of)
        if padding in (True, "longest"):
            length = max(map(len, ids))
        elif padding == "max_length":
            length = max(max_length, max(map(len, ids)))
        else:
            lengths = sorted(set(map(len, ids)))
            if len(lengths) > 1:
                raise Idefics3Error(f"the prompts have different lengths ({lengths[0]} to {lengths[-1]} tokens) and "
                                    "cannot form one array; pass padding=True")
            length = lengths[0]
        if pad_to_multiple_of and padding not in (False, None, "do_not_pad"):
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        side = padding_side or self.padding_side
        pad_id = self.pad_token_id
        if pad_id is None and any(len(row) < length for row in ids):
            raise Idefics3Error("padding needs a pad token and the tokenizer has none; add \"pad_token\" to "
                                "tokenizer_config.json or pass pad_token=... when loading")
        input_ids = np.full((len(ids), length), pad_id if pad_id is not None else 0, np.int64)
        mask = np.zeros((len(ids), length), np.int64)
        for b, row in enumerate(ids):
            where = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[b, where] = row
            mask[b, where] = 1
        return input_ids, mask

    def check_padding(self, padding, padding_side: Optional[str], max_length: Optional[int],
                      pad_to_multiple_of: Optional[int]) -> None:
        """The options of `pad`, checked before any work: one Idefics3Error naming the option that is wrong."""
        if isinstance(padding, (list, dict, set)) or padding not in (True, False, None, "longest", "max_length",
                                                                     "do_not_pad"):
            raise Idefics3Error(f"padding must be True, False, 'longest' or 'max_length', got {padding!r:.80}")
        if padding == "max_length" and max_length is None:
            raise Idefics3Error("padding='max_length' needs max_length=N")
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise Idefics3Error(f"{name} must be a positive integer, got {value!r:.80}")
        if (padding_side or self.padding_side) not in ("left", "right"):
            raise Idefics3Error(f"padding_side must be 'left' or 'right', got {padding_side!r:.80}")

    # ------------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Union[int, TokenIds], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        ids = [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in np.asarray(ids).reshape(-1)]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None \
            else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> List[str]:
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in sequences]


class IncrementalDetokenizer:
    """Text of a growing token sequence, piece by piece, for streaming.

    `add(token_id)` returns the new text that is final (possibly ""); `flush()` returns the rest. Pieces never end
    inside a multi-byte UTF-8 character (an incomplete character decodes to U+FFFD and is held back) and their
    concatenation equals `tokenizer.decode(all_ids, skip_special_tokens)`. With clean_up_tokenization_spaces on,
    the trailing run of characters that a clean-up replacement could still change is held back too (only spaces
    are removed, and only inside runs of the characters of the replacement patterns, so any other character is a
    boundary later text cannot reach across). Each step decodes the whole sequence so far, which is what makes the
    guarantee hold for every decoder: O(n) per token, small next to a decode step of the model even for long answers
    (docs/performance.md).
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: List[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        end = len(text.rstrip("\ufffd"))
        if self.tokenizer.clean_up_tokenization_spaces:
            while end > self.emitted and text[end - 1] in CLEANUP_CHARS:
                end -= 1
        return self._take(text, end)

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece
