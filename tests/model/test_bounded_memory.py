"""Bounded memory: vision in chunks of tiles and prefill one layer per compiled call, long prompts in blocks of
queries — each equal to the one-call computation (fp32, relative L2 ≤ 1e-5) and to transformers."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import relative_l2
from inputs import make_batch, reference_logits
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.generation import prefill
from mindone_idefics3.model.idefics3 import prepare_vision_inputs
from mindone_idefics3.ops import attention as attention_ops

# Five real tiles in a padded batch: partial tiles (masked patches) next to full ones, and a zero padding image.
BATCH = dict(images_per_row=[3, 2], text_lens=[6, 11], partial={(0, 1): (18, 11), (1, 0): (9, 24)})


@pytest.fixture(scope="module")
def model_a(ckpt_a, ms_cpu):
    return Model.from_pretrained(ckpt_a.path, progress=False)


def _features(model, pv, pam, chunk, use_jit):
    cfg = model.config.vision_config
    vision = prepare_vision_inputs(pv, pam, cfg.patch_size, cfg.patches_per_side)
    model.model.vision_chunk = chunk
    try:
        return model.model.image_features(vision, ms.float32, use_jit).asnumpy()
    finally:
        model.model.vision_chunk = None


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "pynative"])
def test_vision_chunks_equal_one_call_of_the_whole_tower(ckpt_a, model_a, use_jit):
    _, _, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(3), **BATCH)
    cfg = model_a.config.vision_config
    vision = prepare_vision_inputs(pv, pam, cfg.patch_size, cfg.patches_per_side)
    assert len(vision.pixel_values) == 5  # the zero padding image is not encoded
    whole = model_a.model(Tensor(vision.pixel_values), Tensor(vision.patch_keep),
                          Tensor(vision.position_ids)).asnumpy()  # every tile in one call, all layers inline
    for chunk in (1, 2, 5):
        got = _features(model_a, pv, pam, chunk, use_jit)
        assert got.shape == whole.shape
        assert relative_l2(got, whole) < 1e-5, chunk


def test_one_compiled_vision_layer_serves_every_layer_and_chunk(ckpt_a, model_a):
    _, _, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(4), **BATCH)
    _features(model_a, pv, pam, 1, True)
    graph = model_a.model._vision_layer_graph
    _features(model_a, pv, pam, 2, True)
    assert model_a.model._vision_layer_graph is graph  # one jit function for the tower, whatever the chunking


def test_compiled_prefill_equals_pynative_and_the_reference(ckpt_a, model_a):
    """The compiled per-layer prefill (a bucketed, left-padded prompt) = the PyNative one = transformers."""
    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(6), **BATCH)
    ref = reference_logits(ckpt_a, ids, mask, pv, pam)[:, -1]
    compiled, _ = prefill(model_a, ids.astype(np.int32), mask, pv, pam, cache_len=192, use_jit=True)
    eager, _ = prefill(model_a, ids.astype(np.int32), mask, pv, pam, cache_len=192, use_jit=False)
    assert relative_l2(compiled.asnumpy(), eager.asnumpy()) < 1e-5
    assert relative_l2(compiled.asnumpy(), ref) < 1e-5


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_attention_in_blocks_of_queries_equals_one_block(monkeypatch, ms_cpu, compiled):
    rng = np.random.default_rng(0)
    q = Tensor(rng.standard_normal((2, 4, 37, 8), np.float32))
    k, v = (Tensor(rng.standard_normal((2, 2, 37, 8), np.float32)) for _ in range(2))
    keep = rng.random((2, 37)) > 0.2
    keep[:, -1] = True
    slots = Tensor(np.arange(37, dtype=np.int32))
    bias = attention_ops.attention_bias(attention_ops.make_keep_mask(Tensor(keep), slots))
    key_bias = attention_ops.attention_bias(attention_ops.make_keep_mask(Tensor(keep)))

    def run(q, k, v, bias):
        return attention_ops.attention(q, k, v, bias, 8 ** -0.5)

    one = [run(q, k, v, b).asnumpy() for b in (bias, key_bias, None)]
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 2 * 4 * 37 * 5)  # blocks of 5 queries, 8 blocks
    fn = ms.jit(run) if compiled else run
    for expected, b in zip(one, (bias, key_bias, None)):
        got = fn(q, k, v, b).asnumpy()
        assert got.shape == (2, 37, 32)
        assert relative_l2(got, expected) < 1e-6


def test_long_prompt_through_blocks_equals_the_reference(ckpt_a, model_a, monkeypatch):
    """A forward whose attention runs in blocks of queries (forced small) still matches transformers."""
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 4 * 16 * 64)
    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(8), images_per_row=[2], text_lens=[40])
    got = model_a(ids, mask, pv, pam).logits.asnumpy()
    assert relative_l2(got, reference_logits(ckpt_a, ids, mask, pv, pam)) < 1e-5


def test_prefill_in_chunks_equals_one_call_and_the_reference(ckpt_a, model_a, monkeypatch):
    """Eager prefill in chunks of 64 tokens, each attending over the slots filled so far (forced by a small score
    budget) = the whole prompt in one call = transformers, with left padding; and a generated continuation is
    unchanged."""
    from mindone_idefics3.generation import generate

    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(9), images_per_row=[2, 1], text_lens=[150, 60])
    ids = ids.astype(np.int32)
    text = model_a.model.text_model
    ref = reference_logits(ckpt_a, ids, mask, pv, pam)[:, -1]
    whole, _ = prefill(model_a, ids, mask, pv, pam, cache_len=512, use_jit=True)
    whole_tokens = generate(model_a, ids, mask, pv, pam, max_new_tokens=6)
    slots = -(-ids.shape[1] // 64) * 64
    assert text.prefill_chunk(2, slots, slots) == slots  # the default budget takes these prompts whole
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 2 * 4 * slots * 64)  # chunks of 64 at the prompt's keys
    text.setup_caches(2, 512)
    assert slots >= 192 and text.prefill_chunk(2, slots, slots) == 64  # three chunks or more
    calls = []
    real_graph = text._layer_graph

    def recording(x, rope, mask, chunk_slots, index, cache, shape, *state):
        calls.append((cache, shape, mask.shape))
        return real_graph(x, rope, mask, chunk_slots, index, cache, shape, *state)

    monkeypatch.setattr(text, "_layer_graph", recording)
    chunked, _ = prefill(model_a, ids, mask, pv, pam, cache_len=512, use_jit=True)
    monkeypatch.setattr(text, "_layer_graph", real_graph)
    layers = len(text.layers)
    # each chunk attends over the keys filled so far, not the cache's 512 slots; its mask laid out per KV group
    assert [shape for _, shape, _ in calls[::layers]] == [(2, 64, end) for end in range(64, slots + 1, 64)]
    assert [m for _, _, m in calls[::layers]] == [(2, 2, 2 * 64, end) for end in range(64, slots + 1, 64)]
    assert relative_l2(chunked.asnumpy(), whole.asnumpy()) < 1e-5
    assert relative_l2(chunked.asnumpy(), ref) < 1e-5
    np.testing.assert_array_equal(generate(model_a, ids, mask, pv, pam, max_new_tokens=6), whole_tokens)


def test_vision_attention_takes_a_chunk_in_one_block_while_text_splits(ckpt_a, model_a, monkeypatch):
    """A vision call is bounded by its chunk of tiles, so its attention computes all of a tile's queries at once
    (blocks cost 45% of a SigLIP layer in MindSpore's CPU graphs), even under a budget that would split them; the
    text path (query_blocks=True, the default) still splits."""
    calls = []
    real = attention_ops._attention_block

    def counting(q, *args):
        calls.append(q.shape[2])
        return real(q, *args)

    monkeypatch.setattr(attention_ops, "_attention_block", counting)
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 64)
    _, _, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(9), **BATCH)
    got = _features(model_a, pv, pam, 1, False)  # PyNative: the Python attention runs once per layer and tile
    cfg = model_a.config.vision_config
    assert len(calls) == 5 * cfg.num_hidden_layers and set(calls) == {cfg.patches_per_side ** 2}
    monkeypatch.setattr(attention_ops, "_attention_block", real)
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 1 << 22)
    assert relative_l2(got, _features(model_a, pv, pam, 1, False)) < 1e-6

    calls.clear()
    monkeypatch.setattr(attention_ops, "_attention_block", counting)
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 64)
    q = Tensor(np.random.default_rng(10).standard_normal((1, 2, 32, 8), np.float32))
    attention_ops.attention(q, q, q, None, 8 ** -0.5)
    assert calls == [1] * 32  # 64 scores: one query of 2 heads × 32 keys per block
    calls.clear()
    attention_ops.attention(q, q, q, None, 8 ** -0.5, query_blocks=False)
    assert calls == [32]


def test_a_mask_laid_out_for_the_kv_groups_equals_the_broadcast_one(monkeypatch, ms_cpu):
    """`grouped_bias` (the prefill's mask, one plain add per layer) gives the attention of the (B, 1, Sq, Sk) bias,
    in one block and in blocks of queries."""
    rng = np.random.default_rng(1)
    q = Tensor(rng.standard_normal((2, 6, 37, 8), np.float32))
    k, v = (Tensor(rng.standard_normal((2, 2, 37, 8), np.float32)) for _ in range(2))
    keep = rng.random((2, 37)) > 0.2
    keep[:, -1] = True
    slots = Tensor(np.arange(37, dtype=np.int32))
    bias = attention_ops.attention_bias(attention_ops.make_keep_mask(Tensor(keep), slots))
    grouped = attention_ops.grouped_bias(bias, 6, 2)
    assert grouped.shape == (2, 2, 3 * 37, 37)
    one = attention_ops.attention(q, k, v, bias, 8 ** -0.5).asnumpy()
    assert relative_l2(attention_ops.attention(q, k, v, grouped, 8 ** -0.5).asnumpy(), one) < 1e-6
    monkeypatch.setattr(attention_ops, "SCORE_BLOCK_ELEMENTS", 2 * 6 * 37 * 5)  # blocks of 5 queries
    assert relative_l2(attention_ops.attention(q, k, v, grouped, 8 ** -0.5).asnumpy(), one) < 1e-6
    assert attention_ops.grouped_bias(None, 6, 2) is None
    key_only = attention_ops.attention_bias(attention_ops.make_keep_mask(Tensor(keep)))
    assert attention_ops.grouped_bias(key_only, 6, 2) is key_only


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_attention_with_a_new_key_equals_attention_over_the_keys_with_it_appended(ms_cpu, compiled):
    """A continuous decode step's attention (`attention_with_new_key`: the cache read in place, its masked slots
    holding anything, the step's key added to the softmax by hand) equals `attention` over the cache with the new
    key appended — also when the cache's scores are far above the new key's, or all masked."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 6, 1, 8)).astype(np.float32)
    k, v = (rng.normal(0, 3, (3, 2, 40, 8)).astype(np.float32) for _ in range(2))
    k_new, v_new = (rng.standard_normal((3, 2, 1, 8)).astype(np.float32) for _ in range(2))
    keep = rng.random((3, 40)) > 0.3
    keep[1] = False  # a row with nothing cached: the new key alone
    k[2, :, 5] = 50 * q[2, ::3, 0]  # a cached key whose score dwarfs the new one's
    keep[2, 5] = True
    fn = attention_ops.attention_with_new_key
    if compiled:
        fn = ms.jit(fn, capture_mode="ast")
    bias = attention_ops.attention_bias(Tensor(keep[:, None, None, :]))
    got = fn(Tensor(q), Tensor(k), Tensor(v), bias, Tensor(k_new), Tensor(v_new), 8 ** -0.5).asnumpy()
    full = np.concatenate([keep, np.ones((3, 1), bool)], 1)
    want = attention_ops.attention(Tensor(q), Tensor(np.concatenate([k, k_new], 2)),
                                   Tensor(np.concatenate([v, v_new], 2)),
                                   attention_ops.attention_bias(Tensor(full[:, None, None, :])), 8 ** -0.5).asnumpy()
    assert got.shape == (3, 1, 48)
    assert relative_l2(got, want) < 1e-6
    np.testing.assert_allclose(got[1].reshape(2, 3, 8), np.repeat(v_new[1], 3, axis=1), rtol=1e-6)
