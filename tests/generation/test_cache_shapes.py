"""Batches of changing shapes (batch inference) compile each cache shape once: caches and their compiled graphs
are kept for the last few shapes, cache lengths come in powers of two, and answers do not change."""
import numpy as np

from inputs import make_batch
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.generation import CACHE_BUCKET, cache_length, compiled_steps
from mindone_idefics3.model.llama import KEPT_CACHE_SHAPES


def test_cache_lengths_are_a_bucket_times_a_power_of_two():
    assert [cache_length(n) for n in (1, 64, 65, 128, 129, 257, 1000, 3500)] == \
        [64, 64, 128, 128, 256, 512, 1024, 4096]
    assert all(cache_length(n) >= n and cache_length(n) % CACHE_BUCKET == 0 for n in range(1, 3000, 7))


def test_returning_to_a_shape_reuses_its_graphs_and_gives_the_same_ids(ckpt_a, ms_cpu):
    model = Model.from_pretrained(ckpt_a.path, progress=False)
    text = model.model.text_model
    short = make_batch(ckpt_a, [1], [5], np.random.default_rng(0))
    pair = make_batch(ckpt_a, [1, 2], [4, 9], np.random.default_rng(1))
    first = model.generate(*short, max_new_tokens=6, eos_token_id=[])
    steps, shape = compiled_steps(model), text.cache_shape
    model.generate(*pair, max_new_tokens=6, eos_token_id=[])
    assert text.cache_shape != shape
    again = model.generate(*short, max_new_tokens=6, eos_token_id=[])
    assert text.cache_shape == shape and compiled_steps(model) is steps  # nothing compiled again
    np.testing.assert_array_equal(again, first)
    for length in range(KEPT_CACHE_SHAPES + 1):  # more shapes than are kept: the oldest go
        text.setup_caches(3, CACHE_BUCKET * (length + 5))
    assert len(text._kept) == KEPT_CACHE_SHAPES - 1 and shape not in text._kept
    text.drop_caches()
    assert not text._kept and text.cache_shape is None
