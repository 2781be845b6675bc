"""Generation: greedy ids equal transformers' generate; the static cache equals a full forward; sampling; stops."""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import relative_l2
from inputs import make_batch, reference_logits
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.generation import (SamplingParams, apply_repetition_penalty, decode_step_fn, generate_steps,
                                         prefill, prompt_slots, sample, stop_token_ids, top_k_top_p_filter)

CASES = {
    "one_image": dict(images_per_row=[1], text_lens=[7]),
    "two_images": dict(images_per_row=[2], text_lens=[9]),
    "batch_with_padding": dict(images_per_row=[1, 2], text_lens=[5, 12], partial={(1, 1): (18, 11)}),
    "text_only": dict(images_per_row=[0], text_lens=[15]),
}


@pytest.fixture(scope="module")
def model_a(ckpt_a, ms_cpu):
    return Model.from_pretrained(ckpt_a.path)


def reference_generate(ckpt, ids, mask, pv, pam, n):
    import torch

    from reference import corrected_position_ids

    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pv is not None:
        kwargs.update(pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(pam).bool())
    with torch.no_grad(), corrected_position_ids():
        out = ckpt.reference.generate(**kwargs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)
    return out.numpy()


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "pynative"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_ids_equal_reference(ckpt_a, model_a, case, use_jit):
    if not use_jit and case != "batch_with_padding":
        pytest.skip("PyNative decode is checked on the hardest case only (it is slow)")
    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(len(case)), **CASES[case])
    ours = model_a.generate(ids, mask, pv, pam, max_new_tokens=32, eos_token_id=[], use_jit=use_jit)
    ref = reference_generate(ckpt_a, ids, mask, pv, pam, 32)
    assert ours.shape == ref.shape == (ids.shape[0], ids.shape[1] + 32)
    np.testing.assert_array_equal(ours, ref)


def test_greedy_ids_equal_reference_tied_model(ckpt_b, ms_cpu):
    model = Model.from_pretrained(ckpt_b.path)
    ids, mask, pv, pam = make_batch(ckpt_b, [2, 1], [4, 9], np.random.default_rng(11))
    ours = model.generate(ids, mask, pv, pam, max_new_tokens=32, eos_token_id=[])
    np.testing.assert_array_equal(ours, reference_generate(ckpt_b, ids, mask, pv, pam, 32))


@pytest.mark.parametrize("compiled_prefill", [False, True], ids=["pynative_prefill", "compiled_prefill"])
def test_cached_decode_logits_equal_full_forward(ckpt_a, model_a, compiled_prefill):
    """At every decode step, the compiled step's logits equal a full forward over the whole sequence (after a
    PyNative prefill, or a compiled one whose prompt is left-padded to its bucket)."""
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 2], [3, 6], np.random.default_rng(7))
    b, s = ids.shape
    first_slot = prompt_slots(s, compiled_prefill)
    assert first_slot == (64 if compiled_prefill else s)
    logits, key_keep = prefill(model_a, ids.astype(np.int32), mask, pv, pam, cache_len=128,
                               use_jit=compiled_prefill)
    step = decode_step_fn(model_a, greedy=False, use_jit=True)
    seq, m = ids.copy(), mask.copy()
    rng = np.random.default_rng(0)
    for t in range(8):
        full = model_a(seq, m, pv, pam, last_only=True).logits.asnumpy()[:, -1]
        assert relative_l2(logits.asnumpy(), full) < 1e-5, f"step {t}"
        token = rng.integers(3, 280, size=(b, 1))  # any token: the cache must follow whatever was fed
        seq, m = np.concatenate([seq, token], 1), np.concatenate([m, np.ones((b, 1), m.dtype)], 1)
        logits = step(Tensor(token.astype(np.int32)), Tensor(m.sum(-1, keepdims=True).astype(np.int32) - 1),
                      Tensor([first_slot + t], ms.int32), key_keep)


def test_same_seed_same_ids_and_top_k_1_is_greedy(ckpt_a, model_a):
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 0], [6, 8], np.random.default_rng(1))
    kw = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=1.5)
    a = model_a.generate(ids, mask, pv, pam, seed=3, **kw)
    b = model_a.generate(ids, mask, pv, pam, seed=3, **kw)
    c = model_a.generate(ids, mask, pv, pam, seed=4, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = model_a.generate(ids, mask, pv, pam, max_new_tokens=12, eos_token_id=[])
    top1 = model_a.generate(ids, mask, pv, pam, seed=5, top_k=1, **kw)
    np.testing.assert_array_equal(top1, greedy)


def test_per_row_sampling_options_and_seeds_do_not_depend_on_the_batch(ckpt_a, model_a):
    """A server's batch: row 0 greedy, row 1 sampled with its own seed. Each row gets what it gets alone."""
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 0], [6, 8], np.random.default_rng(1))
    kw = dict(max_new_tokens=12, eos_token_id=[])
    both = model_a.generate(ids, mask, pv, pam, do_sample=[False, True], temperature=[1.0, 1.5], seed=[None, 3],
                            top_p=[1.0, 0.95], top_k=[0, 0], **kw)
    greedy = model_a.generate(ids, mask, pv, pam, **kw)
    np.testing.assert_array_equal(both[0], greedy[0])
    alone = slice(1, 2)
    # row 1 alone: no padding, its own images (none)
    s1 = int(mask[1].sum())
    row1 = model_a.generate(ids[alone, -s1:], mask[alone, -s1:], do_sample=True, temperature=1.5, top_p=0.95,
                            seed=3, **kw)
    np.testing.assert_array_equal(both[1, -row1.shape[1]:], row1[0])
    assert not np.array_equal(both[1], greedy[1])  # it did sample
    with pytest.raises(Idefics3Error, match="seed has 3 values for a batch of 2 rows"):
        model_a.generate(ids, mask, pv, pam, do_sample=True, seed=[1, 2, 3], **kw)


def test_each_row_ends_at_its_own_limit_or_stop_id_and_says_why(ckpt_a, model_a):
    """generate_steps: rows with their own max_new_tokens end at it ("length"), a stop id ends a row ("stop", the
    stop id is its last token), and every row's tokens equal the same rows run without those ends."""
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 0, 1], [6, 8, 4], np.random.default_rng(5))
    free = model_a.generate(ids, mask, pv, pam, max_new_tokens=9, eos_token_id=[])[:, ids.shape[1]:]
    stop = int(free[2, 2])
    stop_at = list(free[2]).index(stop)
    limits = [4, 9, 9]
    rows = [SamplingParams(max_new_tokens=n) for n in limits]
    ended, seen = {}, [[] for _ in limits]
    for t, step in enumerate(generate_steps(model_a, ids, mask, pv, pam, rows, eos_token_id=[stop])):
        for r in range(len(limits)):
            assert step.live[r] == (r not in ended)
            if step.live[r]:
                seen[r].append(int(step.tokens[r]))
            if step.finished[r] is not None:
                ended[r] = (t, step.finished[r])
    assert ended[0] == (3, "length") and seen[0] == list(free[0, :4])
    assert ended[2] == (stop_at, "stop") and seen[2] == list(free[2, :stop_at + 1])
    first_stop = list(free[1]).index(stop) if stop in free[1] else None
    want = (first_stop, "stop") if first_stop is not None else (8, "length")
    assert ended[1] == want and seen[1] == list(free[1, :want[0] + 1])


def test_one_seed_for_the_batch_draws_row_by_row_from_one_generator(ckpt_a, model_a):
    """One SamplingParams for the whole batch: its rows draw, in row order, from one generator seeded once; the
    same seed per row draws each row from its own."""
    ids, mask, pv, pam = make_batch(ckpt_a, [0, 0], [6, 6], np.random.default_rng(7))
    ids[1], mask[1] = ids[0], mask[0]  # two equal rows
    kw = dict(max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=2.0)
    shared = model_a.generate(ids, mask, pv, pam, seed=3, **kw)
    own = model_a.generate(ids, mask, pv, pam, seed=[3, 3], **kw)
    np.testing.assert_array_equal(own[0], own[1])  # equal rows, equal generators
    np.testing.assert_array_equal(shared[0, :ids.shape[1] + 1], own[0, :ids.shape[1] + 1])  # row 0 draws first
    assert not np.array_equal(shared[0], shared[1])  # ... and row 1 draws the next numbers


def test_top_p_keeps_the_smallest_set_above_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.isfinite(top_k_top_p_filter(logits, top_p=0.7))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(top_k_top_p_filter(logits, top_p=0.81))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
    kept = np.isfinite(top_k_top_p_filter(logits, top_p=0.01))  # the top token always survives
    np.testing.assert_array_equal(kept, [[True, False, False, False]])
    kept = np.isfinite(top_k_top_p_filter(logits, top_k=3, top_p=1.0))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_temperature_sharpens_and_flattens_the_distribution():
    logits = np.array([[2.0, 1.0, 0.0]], np.float32)
    rng = np.random.default_rng(0)

    def freq(temperature):
        draws = np.array([sample(logits, rng, temperature, 0, 1.0)[0] for _ in range(3000)])
        return np.bincount(draws, minlength=3) / len(draws)

    expected = np.exp(logits[0] / 0.5) / np.exp(logits[0] / 0.5).sum()
    np.testing.assert_allclose(freq(0.5), expected, atol=0.03)
    assert freq(0.05)[0] > 0.99
    assert abs(freq(100.0) - 1 / 3).max() < 0.05


def test_repetition_penalty_follows_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    seqs = rng.integers(0, 50, size=(2, 10))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(seqs), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, seqs, 1.3), ref, rtol=1e-6)


def test_end_of_utterance_stops_one_row_while_the_other_continues(ckpt_a, tmp_path, ms_cpu):
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 1], [4, 10], np.random.default_rng(2))
    base = Model.from_pretrained(ckpt_a.path)
    free = base.generate(ids, mask, pv, pam, max_new_tokens=16, eos_token_id=[])[:, ids.shape[1]:]
    # a token row 0 emits at step 3 that row 1 never emits
    candidates = [t for t in free[0, 3:] if t not in free[1] and t not in free[0, :3]]
    assert candidates, "test setup: no token distinguishes the rows"
    eou = int(candidates[0])
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt_a.path, d)
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": eou, "content": "<end_of_utterance>"}]}))
    model = Model.from_pretrained(d)
    assert eou in stop_token_ids(model)
    out = model.generate(ids, mask, pv, pam, max_new_tokens=16)[:, ids.shape[1]:]
    stop_at = list(free[0]).index(eou)
    np.testing.assert_array_equal(out[0, : stop_at + 1], free[0, : stop_at + 1])
    assert (out[0, stop_at + 1:] == 0).all()  # padded with pad_token_id after the stop
    np.testing.assert_array_equal(out[1], free[1])  # the other row went on to max_new_tokens
    assert out.shape[1] == 16


def test_generation_stops_early_when_every_row_stopped(ckpt_a, model_a):
    ids, mask, pv, pam = make_batch(ckpt_a, [1], [5], np.random.default_rng(9))
    free = model_a.generate(ids, mask, pv, pam, max_new_tokens=10, eos_token_id=[])[0, ids.shape[1]:]
    out = model_a.generate(ids, mask, pv, pam, max_new_tokens=10, eos_token_id=int(free[4]))
    first = list(free).index(free[4])
    assert out.shape[1] == ids.shape[1] + first + 1


def test_bad_generation_arguments(ckpt_a, model_a):
    ids, mask, pv, pam = make_batch(ckpt_a, [1], [5], np.random.default_rng(9))
    with pytest.raises(Idefics3Error, match="beyond the model's context of 256 tokens"):
        model_a.generate(ids, mask, pv, pam, max_new_tokens=250)
    with pytest.raises(Idefics3Error, match="temperature must be > 0"):
        model_a.generate(ids, mask, pv, pam, do_sample=True, temperature=0)
    with pytest.raises(Idefics3Error, match="top_p must be in"):
        model_a.generate(ids, mask, pv, pam, top_p=1.5)
    right_padded = np.concatenate([mask[:, 1:], np.zeros((1, 1), mask.dtype)], 1)
    with pytest.raises(Idefics3Error, match="needs left padding"):
        model_a.generate(ids, right_padded, pv, pam)


def test_compiled_and_pynative_steps_share_the_cache(ckpt_a, model_a):
    """Requests alternating between the compiled and the PyNative decode loop on one cache stay correct (a
    PyNative slice-write that rebinds the cache would leave the compiled graph reading a stale copy)."""
    x = make_batch(ckpt_a, [2], [9], np.random.default_rng(21))
    y = make_batch(ckpt_a, [1], [7], np.random.default_rng(22))
    ref_x, ref_y = reference_generate(ckpt_a, *x, 28), reference_generate(ckpt_a, *y, 28)
    for data, ref, use_jit in ((y, ref_y, True), (x, ref_x, False), (y, ref_y, True), (x, ref_x, True)):
        out = model_a.generate(*data, max_new_tokens=28, eos_token_id=[], use_jit=use_jit)
        assert model_a.model.text_model.cache_shape == (1, 128 if use_jit else 64)
        np.testing.assert_array_equal(out, ref)


def test_a_plain_forward_leaves_the_generation_cache_alone(ckpt_a, model_a):
    """After generate() set up a cache, a forward longer than that cache still works and does not write it."""
    small = make_batch(ckpt_a, [0], [5], np.random.default_rng(30))
    model_a.generate(*small, max_new_tokens=3, eos_token_id=[])
    cache = model_a.model.text_model.layers[0].self_attn.kv_cache
    before = cache.k.asnumpy().copy()
    ids, mask, pv, pam = make_batch(ckpt_a, [3], [150], np.random.default_rng(31))
    assert ids.shape[1] > model_a.model.text_model.cache_shape[1]
    logits = model_a(ids, mask, pv, pam).logits.asnumpy()
    real = mask.astype(bool)
    assert relative_l2(logits[real], reference_logits(ckpt_a, ids, mask, pv, pam)[real]) < 1e-5
    np.testing.assert_array_equal(cache.k.asnumpy(), before)
