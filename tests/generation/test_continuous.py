"""Continuous batching (continuous.py): requests that join a running batch at any step, in pieces, answer exactly
what each answers alone; a parked row gives its prefix to a request that begins the same way."""
import numpy as np
import pytest
from PIL import Image

from mindone_idefics3 import Idefics3Processor
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.continuous import ContinuousBatch
from mindone_idefics3.generation import SamplingParams, stop_token_ids
from mindone_idefics3.image_cache import ImageFeatureCache


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ms_cpu):
    from mindone_idefics3.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "model")
    return path, Model.from_pretrained(path, progress=False), Idefics3Processor.from_pretrained(path)


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


class Row:
    """The row protocol of continuous.py, recording what it gets."""

    def __init__(self, inputs, params: SamplingParams):
        self.inputs, self.params = inputs, params
        self.tokens, self.reason, self.done, self.error = [], None, False, None
        self.first = None  # the step of its first token (run)

    def add(self, token, finish_reason):
        self.tokens.append(token)
        if finish_reason is not None:
            self.reason, self.done = finish_reason, True

    def fail(self, error):
        self.error, self.done = error, True


def alone(model, inputs, params: SamplingParams):
    """The new tokens `generate` gives this request by itself (up to and with its stop token)."""
    out = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                         inputs.get("pixel_attention_mask"), max_new_tokens=params.max_new_tokens,
                         do_sample=params.do_sample, temperature=params.temperature, top_k=params.top_k,
                         seed=params.seed, repetition_penalty=params.repetition_penalty)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = set(stop_token_ids(model))
    cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    return new[:cut]


def inputs_for(processor, text, images=(), history=()):
    messages = list(history) + [{"role": "user", "content": [{"type": "image"} for _ in images]
                                 + [{"type": "text", "text": text}]}]
    return processor.chat_inputs(messages, list(images))


def run(batch, arrivals, limit=500):
    """arrivals: {step number: [rows]}; steps until every row is done. Rows join while there is room; each row's
    `first` is the step at which it got its first token."""
    waiting, step, rows = [], 0, [r for group in arrivals.values() for r in group]
    while not all(r.done for r in rows):
        waiting += arrivals.get(step, [])
        while waiting and batch.has_room():
            batch.join(waiting.pop(0))
        batch.advance()
        batch.step()
        for r in rows:
            if r.tokens and r.first is None:
                r.first = step
        step += 1
        assert step < limit
    return rows


def test_rows_joining_at_any_step_answer_as_alone(demo):
    path, model, processor = demo
    cache = ImageFeatureCache(64 * 2**20)
    batch = ContinuousBatch(model, 4, 256, stop_token_ids(model), image_cache=cache, prefill_piece=64,
                            vision_piece=1)
    # sampled rows too: the demo checkpoint's greedy answers hardly depend on the prompt (they would not notice
    # keys read from the wrong row or slot); a sampled draw does
    requests = [
        (inputs_for(processor, "Describe it.", [picture(1, 150, 100)]), SamplingParams(max_new_tokens=30)),
        (inputs_for(processor, "hello there, a text-only question"), SamplingParams(max_new_tokens=9)),
        (inputs_for(processor, "Two of them?", [picture(2, 60, 200), picture(3, 90, 90)]),
         SamplingParams(max_new_tokens=14, do_sample=True, temperature=1.5, top_k=0, seed=3)),
        (inputs_for(processor, "sampled " * 20), SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9,
                                                                top_k=40, seed=7)),
        (inputs_for(processor, "Describe it.", [picture(1, 150, 100)]), SamplingParams(max_new_tokens=5)),
    ]
    rows = [Row(inputs, params) for inputs, params in requests]
    run(batch, {0: rows[:1], 3: rows[1:3], 9: rows[3:]})
    for i, (row, (inputs, params)) in enumerate(zip(rows, requests)):
        assert row.error is None, (i, row.error)
        assert row.tokens == alone(model, inputs, params), i
    assert cache.hits >= 1  # the repeated picture


def test_a_parked_row_gives_its_prefix_and_answers_stay_exact(demo):
    path, model, processor = demo
    batch = ContinuousBatch(model, 2, 512, stop_token_ids(model), image_cache=ImageFeatureCache(0),
                            prefill_piece=64, vision_piece=2)
    photo = picture(4, 150, 100)
    first_inputs = inputs_for(processor, "What is it?", [photo])
    first = Row(first_inputs, SamplingParams(max_new_tokens=10))
    run(batch, {0: [first]})
    answer = processor.decode(first.tokens, skip_special_tokens=True).strip()
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    follow_inputs = processor.chat_inputs(history + [{"role": "user", "content": [{"type": "text",
                                                                                    "text": "And then?"}]}], [photo])
    follow = Row(follow_inputs, SamplingParams(max_new_tokens=10))
    before = batch.reused_tokens
    run(batch, {0: [follow]})
    image_tokens = int((first_inputs["input_ids"] == model.config.image_token_id).sum())
    assert batch.reused_tokens - before >= image_tokens
    assert follow.tokens == alone(model, follow_inputs, follow.params)
    # the same text with another picture: nothing of the image is reused
    other_inputs = inputs_for(processor, "What is it?", [picture(5, 150, 100)])
    other = Row(other_inputs, SamplingParams(max_new_tokens=10))
    before = batch.reused_tokens
    run(batch, {0: [other]})
    first_image = int(np.flatnonzero(other_inputs["input_ids"][0] == model.config.image_token_id)[0])
    assert batch.reused_tokens - before <= first_image
    assert other.tokens == alone(model, other_inputs, other.params)


def test_a_request_too_long_for_a_row_fails_alone(demo):
    path, model, processor = demo
    batch = ContinuousBatch(model, 2, 256, stop_token_ids(model))
    good = Row(inputs_for(processor, "hi"), SamplingParams(max_new_tokens=4))
    bad = Row(inputs_for(processor, "hi"), SamplingParams(max_new_tokens=300))
    run(batch, {0: [bad, good]})
    assert bad.error is not None and "slots of a row" in str(bad.error)
    assert good.error is None and good.tokens == alone(model, good.inputs, good.params)


def test_a_step_reads_the_slot_it_writes_and_nothing_after_the_row(demo):
    """Whatever an earlier row left in the cache does not change a step: the row's own slot, as read from the cache
    (before or after the step's write: a graph does not order them), is masked and its new key taken from the step
    itself, and slots after a row's length are masked."""
    from mindspore import Tensor, ops

    _, model, _ = demo
    outs = []
    for seed in (None, 1, 2):
        batch = ContinuousBatch(model, 2, 256, stop_token_ids(model))
        rng = np.random.default_rng(0)
        for row, caches in enumerate(batch.caches):
            for layer in caches.layers:
                for cache in (layer.k, layer.v):
                    values = np.zeros(cache.shape, np.float32)
                    if seed is not None:  # an earlier occupant's keys and values, also in the slot about to be written
                        values = np.random.default_rng(seed).normal(0, 5, cache.shape).astype(np.float32)
                    if row == 0:
                        values[0, :, :10] = rng.normal(size=values[0, :, :10].shape)  # the row's own 10 tokens
                    ops.assign(cache, Tensor(values))
        keep = np.zeros((2, 256), np.bool_)
        keep[0, :10] = True  # row 0's ten tokens (each row's new key comes from the step)
        caches = [Tensor(t) for n in range(len(batch.caches[0].layers)) for row in (0, 1)
                  for t in (batch.caches[row].layers[n].k, batch.caches[row].layers[n].v)]
        _, logits = batch._step(2)(Tensor(np.array([[5], [0]], np.int32)), Tensor(np.array([[10], [0]], np.int32)),
                                   Tensor(np.array([10, 0], np.int32)), Tensor(keep), *caches)
        outs.append(logits.asnumpy()[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_a_short_shared_start_does_not_take_a_conversations_row(demo):
    """A request sharing only the first tokens with a parked conversation takes a free row, so the conversation's
    next turn still finds its whole prompt (a system prompt's request once overwrote it, leaving 2 tokens)."""
    _, model, processor = demo
    batch = ContinuousBatch(model, 4, 512, stop_token_ids(model), prefill_piece=64)
    photo = picture(6, 150, 100)
    first_inputs = inputs_for(processor, "What is it?", [photo])
    first = Row(first_inputs, SamplingParams(max_new_tokens=6))
    run(batch, {0: [first]})
    system = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    other = Row(processor.chat_inputs(system + [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                                 "text": "What is it?"}]}],
                                      [photo]), SamplingParams(max_new_tokens=6))
    run(batch, {0: [other]})
    answer = processor.decode(first.tokens, skip_special_tokens=True).strip()
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": answer}]},
               {"role": "user", "content": [{"type": "text", "text": "And then?"}]}]
    follow = Row(processor.chat_inputs(history, [photo]), SamplingParams(max_new_tokens=6))
    before = batch.reused_tokens
    run(batch, {0: [follow]})
    image_end = int(np.flatnonzero(first_inputs["input_ids"][0] == model.config.image_token_id)[-1]) + 1
    assert batch.reused_tokens - before >= image_end
    assert follow.tokens == alone(model, follow.inputs, follow.params)


def test_several_requests_join_at_once_and_the_shortest_goes_first(demo):
    """A short request that arrives while a photo is being encoded does not wait for the photo: both join, the
    one with fewer pieces left gets them first; every answer (greedy and sampled) is still the answer alone, and
    two joining requests never take the same row."""
    _, model, processor = demo
    batch = ContinuousBatch(model, 4, 512, stop_token_ids(model), image_cache=ImageFeatureCache(64 * 2**20),
                            prefill_piece=64, vision_piece=1, max_joining=3)
    photo = Row(inputs_for(processor, "Describe it.", [picture(8, 150, 100)]), SamplingParams(max_new_tokens=8))
    photo2 = Row(inputs_for(processor, "And this one?", [picture(9, 120, 120)]),
                 SamplingParams(max_new_tokens=7, do_sample=True, temperature=1.3, top_k=0, seed=5))
    short = Row(inputs_for(processor, "a short one"),
                SamplingParams(max_new_tokens=6, do_sample=True, temperature=1.1, top_k=0, seed=2))
    seen_rows = []
    original = batch.join

    def join(row):
        original(row)
        seen_rows.append([j.index for j in batch.joins])

    batch.join = join
    run(batch, {0: [photo], 2: [photo2, short]})
    assert any(len(rows) == 3 and len(set(rows)) == 3 for rows in seen_rows)  # three joining at once, three rows
    assert short.first < photo.first and short.first < photo2.first
    for row in (photo, photo2, short):
        assert row.error is None and row.tokens == alone(model, row.inputs, row.params)


def test_a_long_join_is_not_starved_by_short_ones(demo):
    """Short requests arriving at every step take the pieces first, but the photo's join still gets one piece in
    every MAX_PASSED + 1 and answers as alone."""
    from mindone_idefics3.continuous import MAX_PASSED

    _, model, processor = demo
    batch = ContinuousBatch(model, 4, 512, stop_token_ids(model), prefill_piece=64, vision_piece=1, max_joining=2)
    photo = Row(inputs_for(processor, "Describe it.", [picture(10, 150, 100)]), SamplingParams(max_new_tokens=4))
    shorts = {step: [Row(inputs_for(processor, f"short {step}"), SamplingParams(max_new_tokens=2))]
              for step in range(1, 120)}
    counting = ContinuousBatch(model, 1, 512, stop_token_ids(model), prefill_piece=64, vision_piece=1)
    counting.join(Row(photo.inputs, photo.params))
    pieces = counting.joins[0].pieces_left()  # what the photo's join needs
    run(batch, {0: [photo], **shorts}, limit=800)
    assert 5 <= pieces and photo.first <= (pieces + 1) * (MAX_PASSED + 1)
    assert photo.first < max(r.first for group in shorts.values() for r in group)
    assert photo.tokens == alone(model, photo.inputs, photo.params)


def test_a_request_given_up_while_joining_frees_its_row_and_working_cache(demo):
    _, model, processor = demo
    batch = ContinuousBatch(model, 2, 512, stop_token_ids(model), prefill_piece=64, vision_piece=1, max_joining=2)
    gone = Row(inputs_for(processor, "Describe it. " * 20, [picture(11, 150, 100)]), SamplingParams(max_new_tokens=4))
    batch.join(gone)
    while batch.joins[0].work is None:  # into its prefill pieces: it holds a working cache
        batch.advance()
    gone.done = True
    batch.advance()
    assert not batch.joins and len(batch._spare) <= batch.max_joining
    rows = [Row(inputs_for(processor, f"next {i}"), SamplingParams(max_new_tokens=5)) for i in range(2)]
    run(batch, {0: rows})
    for row in rows:
        assert row.error is None and row.tokens == alone(model, row.inputs, row.params)
    assert not gone.tokens
