"""LoRA on the fused projections against transformers + peft: gradients, and what attaching changes."""
import numpy as np
import pytest

from conftest import relative_l2
from finetune_helpers import labels_for, ours_with_lora, peft_model_like, torch_inputs
from inputs import make_batch


def test_lora_gradients_equal_peft(ckpt_a, ms_cpu):
    import mindspore as ms

    from reference import corrected_position_ids

    model, lora = ours_with_lora(ckpt_a, targets="all-linear")
    rng = np.random.default_rng(5)
    ids, mask, pv, pam = make_batch(ckpt_a, (2, 1), (5, 9), rng, partial={(1, 0): (12, 24)})
    labels = labels_for(ids, mask)
    params = lora.parameters()
    loss, grads = ms.value_and_grad(lambda: model(ids, mask, pv, pam, labels=labels).loss, None, params)()

    peft_model = peft_model_like(ckpt_a, model, lora)
    with corrected_position_ids():
        ref = peft_model(**torch_inputs(ids, mask, pv, pam, labels)).loss
    ref.backward()
    assert abs(float(loss) - ref.item()) / ref.item() < 1e-5
    named = dict(peft_model.named_parameters())
    checked = 0
    keys = [(module, ab) for module in lora.parts for ab in "AB"]  # lora.parameters() order
    for (module, ab), grad in zip(keys, grads):
        ref_grad = named[f"base_model.model.{module}.lora_{ab}.default.weight"].grad.numpy()
        assert np.abs(ref_grad).max() > 0, module
        assert relative_l2(grad.asnumpy(), ref_grad) < 1e-4, (module, ab)
        checked += 1
    assert checked == 2 * len(lora.parts) > 2 * 7 * 2  # vision, connector and text modules


def test_attach_is_peft_init_and_leaves_the_base_alone(ckpt_b, ms_cpu):
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune import lora as L

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_b.path, progress=False)
    rng = np.random.default_rng(0)
    ids, mask, pv, pam = make_batch(ckpt_b, (1,), (6,), rng)
    before = model(ids, mask, pv, pam).logits.asnumpy()
    base = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    lora = L.attach_lora(model, L.select_targets(model, "q_proj,v_proj,down_proj"), 8, 16, 0.0, seed=3)
    assert sorted({n.rsplit(".", 1)[1] for n in lora.parts}) == ["down_proj", "q_proj", "v_proj"]
    assert all(".text_model." in n for n in lora.parts)
    for part in lora.parts.values():
        a = part.lora_A.asnumpy()
        bound = 1 / np.sqrt(a.shape[1])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound  # U(-1/sqrt(in), 1/sqrt(in))
        assert not part.lora_B.asnumpy().any()
    np.testing.assert_array_equal(model(ids, mask, pv, pam).logits.asnumpy(), before)  # B = 0: no change
    again = L.attach_lora(Idefics3ForConditionalGeneration.from_pretrained(ckpt_b.path, progress=False),
                          L.select_targets(model, "q_proj,v_proj,down_proj"), 8, 16, 0.0, seed=3)
    for name, part in lora.parts.items():  # seeded
        np.testing.assert_array_equal(part.lora_A.asnumpy(), again.parts[name].lora_A.asnumpy())
    for p in model.get_parameters():
        if p.name in base:
            np.testing.assert_array_equal(p.asnumpy(), base[p.name])


@pytest.mark.parametrize("bad", ["qq_proj", "vision.down_proj", "all-linear,q_proj", ""])
def test_unknown_lora_target_is_refused(ckpt_b, ms_cpu, bad):
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.errors import Idefics3Error
    from mindone_idefics3.finetune import lora as L

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_b.path, progress=False)
    with pytest.raises(Idefics3Error, match="lora-targets"):
        L.select_targets(model, bad)
    with pytest.raises(Idefics3Error, match="lora-targets lm_head"):
        L.select_targets(model, "lm_head")  # ckpt_b ties lm_head


def test_recompute_gives_the_same_gradients(ckpt_a, ms_cpu):
    import mindspore as ms

    from finetune_helpers import labels_for

    model, lora = ours_with_lora(ckpt_a, targets="q_proj,gate_proj,down_proj")
    rng = np.random.default_rng(9)
    ids, mask, pv, pam = make_batch(ckpt_a, (1, 0), (6, 9), rng)
    labels = labels_for(ids, mask)
    grad = ms.value_and_grad(lambda: model(ids, mask, pv, pam, labels=labels).loss, None, lora.parameters())
    loss, plain = grad()
    model.model.text_model.recompute_layers = True
    loss_r, recomputed = grad()
    assert float(loss) == float(loss_r)
    for a, b in zip(plain, recomputed):
        assert relative_l2(b.asnumpy(), a.asnumpy()) < 1e-6
