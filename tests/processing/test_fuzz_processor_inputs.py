"""Fuzzing what users pass to the processor: chat messages (`apply_chat_template`) and `__call__` arguments.

Each case is valid except for at most one argument (or one part of one message), set to a wrong type, shape or
value. A valid case must give a consistent result (for a call: one row per prompt, image tokens = tiles ×
image_seq_len in each row, a contiguous attention mask on the padding side, the requested lengths; for a chat: the
texts and image tags in order); an invalid one must be one Idefics3Error naming what is wrong.
"""
import io

import mindspore  # noqa: F401  (return_tensors="ms" would import it mid-test; it raises the recursion limit)
import numpy as np
import pytest
from hypothesis import strategies as st
from PIL import Image

from fuzzing import BUDGETS, run_cases
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import Idefics3Processor

IMAGES = [Image.new("RGB", (20, 30), "red"), Image.new("L", (7, 50), 90), Image.new("RGBA", (40, 9), (1, 2, 3, 4)),
          np.zeros((12, 9, 3), np.uint8), np.full((5, 70), 200, np.uint8), np.ones((9, 9, 1), np.uint8),
          np.zeros((6, 6, 4), np.uint8)]
_png = io.BytesIO()
Image.new("RGB", (33, 17), "blue").save(_png, "PNG")
IMAGES.append(_png.getvalue())
BAD_IMAGES = [5, 2.5, None, {"a": 1}, np.zeros((3, 8, 8), np.float32), np.zeros((8, 8, 2), np.uint8),
              np.zeros((2, 8, 8, 3), np.uint8), "/nonexistent/picture.png", b"not an image at all"]
words = st.text(st.characters(codec="utf-8", exclude_characters="<>"), max_size=12)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    return Idefics3Processor.from_pretrained(write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "model"))


# ----------------------------------------------------------------------------------------------- processor calls
VALID_OPTIONS = {
    "padding_side": st.sampled_from(["left", "right"]), "add_special_tokens": st.booleans(),
    "pad_to_multiple_of": st.integers(1, 9), "image_seq_len": st.integers(1, 20),
    "size": st.integers(16, 160) | st.builds(lambda n: {"longest_edge": n}, st.integers(16, 160)),
    "max_image_size": st.integers(32, 96), "do_image_splitting": st.booleans(),
    "return_tensors": st.sampled_from(["np", "ms", None]),
}
BAD_OPTIONS = {
    "text": st.sampled_from([5, [], ["a", 3], [["a"]], b"bytes", {"a": 1}]),
    "padding": st.sampled_from(["yes", 2, [True], "max"]),
    "max_length": st.sampled_from([-1, 0, "10", 2.5, [4]]),
    "padding_side": st.sampled_from(["center", 1, "LEFT"]),
    "add_special_tokens": st.sampled_from(["yes", 1, None]),
    "pad_to_multiple_of": st.sampled_from([0, -3, "8", 2.5]),
    "image_seq_len": st.sampled_from([0, -1, "3", 2.5, True]),
    "size": st.sampled_from([0, -5, "big", {"shortest_edge": 5}, [1], 10**40]),
    "max_image_size": st.sampled_from([0, 5000, "x", {"longest_edge": -1}]),
    "do_image_splitting": st.sampled_from(["no", 1, []]),
    "return_tensors": st.sampled_from(["pt", 1, "numpy"]),
}


@st.composite
def calls(draw):
    """(keyword arguments of a processor call, the argument made invalid or None)."""
    tags = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))
    prompts = ["".join(draw(words) + "<image>" for _ in range(k)) + draw(words) for k in tags]
    per_prompt = [[IMAGES[draw(st.integers(0, len(IMAGES) - 1))] for _ in range(k)] for k in tags]
    flat = [image for sample in per_prompt for image in sample]
    kwargs = {"text": prompts[0] if len(prompts) == 1 and draw(st.booleans()) else prompts}
    if flat:
        kwargs["images"] = draw(st.sampled_from([flat, per_prompt] + ([flat[0]] if len(flat) == 1 else [])))
    for name, values in VALID_OPTIONS.items():
        if draw(st.booleans()):
            kwargs[name] = draw(values)
    kwargs["padding"] = draw(st.sampled_from([True, "longest"] + ([False, "do_not_pad"] if len(tags) == 1 else [])))
    if draw(st.booleans()):
        kwargs["padding"], kwargs["max_length"] = "max_length", draw(st.integers(1, 400))
    bad = draw(st.sampled_from([None, None, None, "images", "max_length", *BAD_OPTIONS]))
    if bad == "images":
        kwargs["images"] = draw(bad_images(flat, per_prompt))
    elif bad == "max_length":  # padding to a length that is not given, or not a positive integer
        kwargs["padding"] = "max_length"
        kwargs["max_length"] = draw(st.just(None) | BAD_OPTIONS["max_length"])
    elif bad is not None:
        kwargs[bad] = draw(BAD_OPTIONS[bad])
    return kwargs, bad


@st.composite
def bad_images(draw, flat, per_prompt):
    """Images that do not fit the prompts (count, nesting) or are not images."""
    extra = IMAGES[0]
    choices = [flat + [extra], [per_prompt[0] + [extra]] + per_prompt[1:]]  # one image too many
    if flat:  # one too few, or one that is not an image
        choices += [flat[:-1] or None, [draw(st.sampled_from(BAD_IMAGES))] + flat[1:]]
    if len(flat) > 1:  # a mix of nested and flat
        choices.append([flat[:1], *flat[1:]])
    if len(per_prompt) > 1:  # one list too few
        choices.append(per_prompt[:-1])
    return draw(st.sampled_from(choices))


def rows(value) -> list:
    """Rows of a (B, ...) result as numpy arrays, whatever return_tensors gave (numpy, MindSpore, lists)."""
    return list(value.asnumpy() if hasattr(value, "asnumpy") else value)


ERROR_NAMES = {"images": "image", "max_length": "max_length"}


def check_call(processor, case) -> None:
    kwargs, bad = case
    try:
        out = processor(**kwargs)
    except Idefics3Error as e:
        assert bad is not None, f"a valid call was refused: {e}"
        assert ERROR_NAMES.get(bad, bad) in str(e) and "\n" not in str(e), (bad, str(e))
        return
    assert bad is None, f"{bad}={kwargs[bad]!r} was accepted"
    ids, mask = [np.asarray(r) for r in rows(out["input_ids"])], [np.asarray(r) for r in rows(out["attention_mask"])]
    prompts = [kwargs["text"]] if isinstance(kwargs["text"], str) else kwargs["text"]
    assert len(ids) == len(mask) == len(prompts)
    seq_len = kwargs.get("image_seq_len") or processor.image_seq_len
    frames = np.zeros(len(prompts), int)
    if "pixel_attention_mask" in out:
        pam = np.stack(rows(out["pixel_attention_mask"]))
        frames = pam.reshape(*pam.shape[:2], -1).any(-1).sum(-1)
    side = kwargs.get("padding_side") or processor.tokenizer.padding_side
    for row, keep, n in zip(ids, mask, frames):
        assert (row[keep == 1] == processor.image_token_id).sum() == n * seq_len
        real = np.flatnonzero(keep)  # contiguous, on the other side than the padding (an empty prompt has none)
        if real.size:
            assert (real == np.arange(real[0], real[0] + real.size)).all()
            assert real[0] == 0 if side == "right" else real[-1] == keep.size - 1
    length = len(ids[0])
    if kwargs["padding"] == "max_length":
        assert length >= kwargs["max_length"]
    if kwargs.get("pad_to_multiple_of") and kwargs["padding"] not in (False, "do_not_pad"):
        assert length % kwargs["pad_to_multiple_of"] == 0


@BUDGETS
def test_fuzzed_processor_calls_give_consistent_inputs_or_name_the_bad_argument(processor, budget):
    run_cases(calls(), lambda case: check_call(processor, case), budget)


# ----------------------------------------------------------------------------------------------- chat messages
BAD_PARTS = {  # what is made wrong → values, and a word the error must contain
    "conversation": (st.sampled_from([[], "hello", 5, None, {"role": "user"}]), "conversation"),
    "message": (st.sampled_from(["hi", 3, [], None, {"content": "no role"}, {"role": "user"}]), "message"),
    "role": (st.sampled_from([None, 1, ["user"], {"a": 1}]), "role"),
    "content": (st.sampled_from([None, 5, {"type": "text"}, ["text"], [5], b"bytes"]), "content"),
    "type": (st.sampled_from([None, 3, "video", ["text"], ""]), "type"),
    "text": (st.sampled_from([None, 5, ["a"], {"t": 1}]), "text"),
    "flags": (st.just(None), "continue_final_message"),
}


@st.composite
def conversations(draw):
    """(conversation, add_generation_prompt, continue_final_message, the part made wrong or None)."""
    messages = []
    for i in range(draw(st.integers(1, 4))):
        role = "user" if i % 2 == 0 else "assistant"
        items = [{"type": "image"} if draw(st.booleans()) else {"type": "text", "text": draw(words)}
                 for _ in range(draw(st.integers(1, 3)))]
        messages.append({"role": role, "content": draw(words) if draw(st.booleans()) else items})
    last = messages[-1]["content"]
    can_continue = isinstance(last, str) or any(item["type"] == "text" for item in last)
    add, cont = draw(st.sampled_from([(False, False), (True, False)] + ([(False, True)] if can_continue else [])))
    bad = draw(st.sampled_from([None, None, *BAD_PARTS]))
    i = draw(st.integers(0, len(messages) - 1))
    lists = [m for m in messages if isinstance(m["content"], list)]
    texts = [item for m in lists for item in m["content"] if item["type"] == "text"]
    if bad == "conversation":
        return draw(BAD_PARTS[bad][0]), add, cont, bad
    if bad == "message":
        messages[i] = draw(BAD_PARTS[bad][0])
    elif bad == "role":
        messages[i]["role"] = draw(BAD_PARTS[bad][0])
    elif bad == "content":
        messages[i]["content"] = draw(BAD_PARTS[bad][0])
    elif bad == "type" and lists:
        draw(st.sampled_from(lists))["content"][0]["type"] = draw(BAD_PARTS[bad][0])
    elif bad == "text" and texts:
        draw(st.sampled_from(texts))["text"] = draw(BAD_PARTS[bad][0])
    elif bad == "flags":
        add, cont = True, True
    else:
        bad = None
    return messages, add, cont, bad


def check_chat(processor, case) -> None:
    conversation, add, cont, bad = case
    try:
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=add, continue_final_message=cont)
    except Idefics3Error as e:
        assert bad is not None, f"a valid conversation was refused: {e}"
        assert BAD_PARTS[bad][1] in str(e) and "\n" not in str(e), (bad, str(e))
        return
    assert bad is None, f"a conversation with a bad {bad} was accepted"
    items = [item for message in conversation
             for item in ([{"type": "text", "text": message["content"]}] if isinstance(message["content"], str)
                          else message["content"])]
    if cont:  # the prompt ends with the last text of the last message: what follows it is not rendered
        last = conversation[-1]["content"]
        dropped = 0 if isinstance(last, str) else [i["type"] for i in reversed(last)].index("text")
        items = items[:len(items) - dropped]
    pieces = ["<image>" if item["type"] == "image" else item["text"] for item in items]
    at = 0
    for piece in pieces:  # every text and image tag, in order
        at = prompt.index(piece, at) + len(piece)
    if add:
        assert prompt.endswith("Assistant:")


@BUDGETS
def test_fuzzed_chat_messages_render_in_order_or_name_what_is_wrong(processor, budget):
    run_cases(conversations(), lambda case: check_chat(processor, case), budget)
