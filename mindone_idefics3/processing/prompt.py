"""Prompt expansion: each `<image>` in a prompt becomes the token block of its tiles (docs/design.md §2).

Split image (rows × cols tiles): for each row r and column c, `<fake_token_around_image><row_r_col_c>` followed by
`<image>` × L, a newline after each row, then `\\n<fake_token_around_image><global-img>` + `<image>` × L +
`<fake_token_around_image>`. Unsplit image: `<fake_token_around_image><global-img>` + `<image>` × L +
`<fake_token_around_image>`. L = image_seq_len. The expansion is a string; tokenizing it afterwards keeps
tokenizer-specific merges (e.g. "\\n\\n" is one Llama 3 token; `<global-img>` is plain text in some checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import List, Sequence

from ..errors import Idefics3Error


@dataclass(frozen=True)
class ImageTokens:
    image: str = "<image>"
    fake_around: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"


def image_block(rows: int, cols: int, image_seq_len: int, tokens: ImageTokens = ImageTokens()) -> str:
    """The text that replaces one `<image>` for an image cut into rows × cols tiles (0 × 0: not split)."""
    run = tokens.image * image_seq_len
    global_view = f"{tokens.fake_around}{tokens.global_image}{run}{tokens.fake_around}"
    if rows == 0 and cols == 0:
        return global_view
    grid = "".join("".join(f"{tokens.fake_around}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{global_view}"


def expand_prompt(text: str, rows: Sequence[int], cols: Sequence[int], image_seq_len: int,
                  tokens: ImageTokens = ImageTokens()) -> str:
    """Replace the k-th `<image>` of `text` with the block of the k-th image (rows[k] × cols[k] tiles)."""
    parts = text.split(tokens.image)
    if len(parts) - 1 != len(rows):
        raise Idefics3Error(f"the prompt has {len(parts) - 1} {tokens.image} tags but {len(rows)} images were "
                            f"given for it")
    out = [parts[0]]
    for k, part in enumerate(parts[1:]):
        out += [image_block(rows[k], cols[k], image_seq_len, tokens), part]
    return "".join(out)


def image_token_count(rows: int, cols: int, image_seq_len: int) -> int:
    """Tokens of `image_block` when every tag is one token and "\n\n" is one token (Llama 3), as transformers."""
    return (image_seq_len + 3) + ((image_seq_len + 2) * cols + 1) * rows


def group_images(images: list, counts: Sequence[int], tag: str = "<image>", kind: str = "image") -> List[list]:
    """Images (or videos: `tag`, `kind`) for a batch of prompts with `counts[b]` tags each.

    Accepts what transformers accepts: one list per prompt (checked against the counts), or one flat list cut in
    prompt order. Every mismatch names both counts and says what to pass.
    """
    nested = [isinstance(item, (list, tuple)) for item in images]
    if all(nested) and images:
        given = [len(sample) for sample in images]
        if len(given) != len(counts):
            raise Idefics3Error(f"{kind}s has {len(given)} lists (one per prompt) but there are {len(counts)} "
                                "prompts")
        bad = [b for b, (n, k) in enumerate(zip(counts, given)) if n != k]
        if bad:
            b = bad[0]
            raise Idefics3Error(f"prompt {b} has {counts[b]} {tag} tags but {given[b]} {kind}s were given for it "
                                f"({tag} tags per prompt: {list(counts)}, {kind}s per prompt: {given}); put one "
                                f"{tag} in the text per {kind} (apply_chat_template writes one per "
                                f"{{'type': '{kind}'}} item)")
        return [list(sample) for sample in images]
    if any(nested):
        raise Idefics3Error(f"{kind}s must be a flat list of {kind}s or one list of {kind}s per prompt, not a mix")
    if sum(counts) != len(images):
        raise Idefics3Error(f"the prompts have {sum(counts)} {tag} tags in total ({list(counts)} per prompt) but "
                            f"{len(images)} {kind}s were given; pass one {kind} per {tag} tag")
    starts = [0, *accumulate(counts)]
    return [list(images[starts[b]:starts[b + 1]]) for b in range(len(counts))]
