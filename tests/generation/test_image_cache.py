"""The image-feature cache: a hit gives exactly the features (and answers) of a fresh run, entries are keyed by the
pixels the vision tower sees (never by name), one image at a time, and the byte bound holds."""
import numpy as np
import pytest
from PIL import Image

from inputs import make_batch
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3 import Idefics3Processor
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.image_cache import ImageFeatureCache
from mindone_idefics3.processing import load_image
from mindone_idefics3.processing.chat_template import question_turns


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ms_cpu):
    from mindone_idefics3.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "model")
    return Model.from_pretrained(path, progress=False), Idefics3Processor.from_pretrained(path)


def photo(seed: int, size=(150, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_a_hit_gives_the_features_and_answer_of_a_fresh_run(demo):
    model, processor = demo
    inputs = processor.chat_inputs(question_turns("What is it?", 2), [photo(1), photo(2, (60, 200))])
    assert [len(t) for t in inputs.image_tiles] == [2] and inputs.image_tiles[0][0] > 1  # the first image is split
    fresh = model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).asnumpy()
    cache = ImageFeatureCache(2**30)
    first, encoded = cache.features(model, inputs, use_jit=False)
    again, encoded_again = cache.features(model, inputs, use_jit=False)
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    assert encoded == fresh.shape[0] and encoded_again == 0
    np.testing.assert_array_equal(first.asnumpy(), fresh)
    np.testing.assert_array_equal(again.asnumpy(), fresh)
    plain = model.generate(**inputs, max_new_tokens=8, eos_token_id=[])
    cached = model.generate(**inputs, max_new_tokens=8, eos_token_id=[], image_hidden_states=again)
    np.testing.assert_array_equal(cached, plain)


def test_one_changed_pixel_is_a_miss_for_that_image_only(demo):
    model, processor = demo
    a, b = photo(3), photo(4)
    changed = np.array(b)
    changed[10, 20, 0] ^= 0xFF
    cache = ImageFeatureCache(2**30)
    cache.features(model, processor.chat_inputs(question_turns("Q", 2), [a, b]), use_jit=False)
    features, encoded = cache.features(model, processor.chat_inputs(question_turns("Q", 2),
                                                                    [a, Image.fromarray(changed)]), use_jit=False)
    assert (cache.hits, cache.misses) == (1, 3)
    inputs = processor.chat_inputs(question_turns("Q", 2), [a, Image.fromarray(changed)])
    np.testing.assert_array_equal(features.asnumpy(), model.get_image_features(
        inputs["pixel_values"], inputs["pixel_attention_mask"]).asnumpy())
    assert encoded == inputs.image_tiles[0][1]  # only the changed image went through vision


def test_the_same_file_name_with_other_pixels_is_never_a_hit(demo, tmp_path):
    model, processor = demo
    path = tmp_path / "page.png"
    cache = ImageFeatureCache(2**30)
    for seed in (5, 6):
        photo(seed).save(path)
        cache.features(model, processor.chat_inputs(question_turns("Q", 1), [load_image(str(path))]), use_jit=False)
    assert (cache.hits, cache.misses) == (0, 2)


def test_the_byte_bound_evicts_the_least_recently_used_and_zero_keeps_nothing(ckpt_a, ms_cpu):
    model = Model.from_pretrained(ckpt_a.path, progress=False)
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 1, 1], [4, 4, 4], np.random.default_rng(0))
    rows = [dict(pixel_values=pv[b:b + 1], pixel_attention_mask=pam[b:b + 1]) for b in range(3)]
    one = model.get_image_features(pv[:1], pam[:1]).nbytes  # every row: one tile, as many bytes
    cache = ImageFeatureCache(2 * one)
    for row in rows:
        cache.features(model, row, use_jit=False)
        assert cache.bytes <= 2 * one
    assert len(cache) == 2 and cache.bytes == 2 * one
    cache.features(model, rows[0], use_jit=False)  # evicted first: a miss again
    assert (cache.hits, cache.misses) == (0, 4)
    cache.features(model, rows[0], use_jit=False)
    assert cache.hits == 1
    off = ImageFeatureCache(0)
    for _ in range(2):
        features, encoded = off.features(model, rows[1], use_jit=False)
        assert encoded == 1 and len(off) == 0 and off.bytes == 0
    with pytest.raises(Idefics3Error, match=">= 0 MB"):
        ImageFeatureCache(-1)


def test_rows_of_a_batch_share_their_images(ckpt_a, ms_cpu):
    """Collated rows: each row's images are found separately, zero padding images left out."""
    model = Model.from_pretrained(ckpt_a.path, progress=False)
    ids, mask, pv, pam = make_batch(ckpt_a, [2, 1], [5, 9], np.random.default_rng(1))
    pv[1, 0], pam[1, 0] = pv[0, 1], pam[0, 1]  # row 1's image is row 0's second
    cache = ImageFeatureCache(2**30)
    from mindone_idefics3.processing.processor import ProcessorOutput

    inputs = ProcessorOutput(pixel_values=pv, pixel_attention_mask=pam)
    inputs.image_tiles = [[1, 1], [1]]
    features, encoded = cache.features(model, inputs, use_jit=False)
    assert (cache.hits, cache.misses, encoded) == (1, 2, 2)
    np.testing.assert_array_equal(features.asnumpy(), model.get_image_features(pv, pam).asnumpy())
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], image_hidden_states=features)
    np.testing.assert_array_equal(out, model.generate(ids, mask, pv, pam, max_new_tokens=6, eos_token_id=[]))


def test_rows_that_do_not_tell_their_images_apart_count_as_one_image_each(ckpt_a, ms_cpu):
    """Collated plain dicts (no image_tiles, e.g. fine-tuning's samples): each row's real tiles are one entry."""
    from mindone_idefics3.processing.collate import collate

    model = Model.from_pretrained(ckpt_a.path, progress=False)
    ids, mask, pv, pam = make_batch(ckpt_a, [2, 1], [5, 9], np.random.default_rng(2))
    rows = [dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], pixel_values=pv[b:b + 1, :k],
                 pixel_attention_mask=pam[b:b + 1, :k]) for b, k in enumerate((2, 1))]
    batch = collate(rows, 0)
    assert batch.image_tiles == [None, None]
    cache = ImageFeatureCache(2**30)
    features, encoded = cache.features(model, batch, use_jit=False)
    assert (cache.misses, encoded) == (2, 3)
    np.testing.assert_array_equal(features.asnumpy(), model.get_image_features(pv, pam).asnumpy())
