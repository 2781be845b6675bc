"""The training step's memory-bound pieces: AdamW against torch (in place, no copy of every weight), the frozen
vision tower run without a backward pass, recompute of the vision layers."""
import numpy as np
import pytest

from conftest import relative_l2
from inputs import make_batch

MB = 2**20


def test_adamw_steps_equal_torch_with_scaled_gradients_and_a_resume(ms_cpu):
    import mindspore as ms
    import torch

    from mindone_idefics3.finetune.optim import AdamW

    rng = np.random.default_rng(3)
    shapes = [(48, 24), (24,), (7, 5)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ours = [ms.Parameter(ms.Tensor(w.copy()), name=f"w{i}") for i, w in enumerate(start)]
    theirs = [torch.nn.Parameter(torch.tensor(w.copy())) for w in start]
    opt = AdamW(ours, 3e-3, (0.9, 0.98), 1e-7, 0.05)
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05)
    lrs = [0.0, 1e-3, 3e-3, 3e-3, 2e-3, 1e-3, 5e-4, 1e-4]  # a warmup step at lr 0 first
    for step, lr in enumerate(lrs):
        grads = [rng.standard_normal(s).astype(np.float32) * 40 for s in shapes]
        scale = 1 / 37 * 0.25  # 1 / labelled tokens × a clipping coefficient
        if step == 4:  # resume: a new optimizer from the saved state continues the same run
            state = opt.state()
            opt = AdamW(ours, 3e-3, (0.9, 0.98), 1e-7, 0.05)
            opt.load_state(state)
        opt.step([ms.Tensor(g) for g in grads], lr, grad_scale=scale)
        for group in ref.param_groups:
            group["lr"] = lr
        for p, g in zip(theirs, grads):
            p.grad = torch.tensor(g * np.float32(scale))
        ref.step()
    for a, b, w in zip(ours, theirs, start):
        assert relative_l2(a.asnumpy(), b.detach().numpy()) < 1e-6
        assert relative_l2(a.asnumpy(), w) > 1e-4  # the weights moved
    moments = opt.state()
    for i, p in enumerate(theirs):
        assert relative_l2(moments[f"exp_avg.{i}"], ref.state[p]["exp_avg"].numpy()) < 1e-6
        assert relative_l2(moments[f"exp_avg_sq.{i}"], ref.state[p]["exp_avg_sq"].numpy()) < 1e-6
    assert int(moments["step"][0]) == len(lrs)


def test_adamw_update_holds_no_copy_of_every_weight(ms_cpu):
    """MindSpore's experimental AdamW compiled all parameters' updates into one graph that kept ~10 temporaries
    of every weight alive at once (its first step here: +1.58 GB); the update must cost at most about one weight's
    temporaries. The first step is measured: MindSpore's memory pool keeps what it took, so later steps reuse it."""
    import mindspore as ms

    from mindone_idefics3.finetune.optim import AdamW
    from mindone_idefics3.process import peak_rss_bytes

    n, size = 8, 4 * MB  # eight weights of 16 MB
    params = [ms.Parameter(ms.Tensor(np.full(size, 0.5, np.float32)), name=f"w{i}") for i in range(n)]
    grads = [ms.Tensor(np.full(size, 0.01 * (i + 1), np.float32)) for i in range(n)]
    opt = AdamW(params, 1e-3, (0.9, 0.999), 1e-8, 0.01)  # allocates the two moments (256 MB) now
    float(params[0][:1].asnumpy()[0])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak_rss_bytes()
    opt.step(grads, 1e-3, grad_scale=0.5)
    float(params[0][:1].asnumpy()[0])
    grown = peak_rss_bytes() - before
    assert grown < 3 * size * 4, f"the update grew the peak by {grown / MB:.0f} MB"  # all weights: 128 MB
    assert float(params[0][:1].asnumpy()[0]) < 0.5  # it did update


def test_frozen_vision_tower_in_training_gives_the_same_loss_and_gradients(ckpt_a, ms_cpu):
    """Training with a frozen tower runs it compiled and outside autograd; the connector and text gradients are
    those of the recorded PyNative forward."""
    import mindspore as ms

    from finetune_helpers import labels_for
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune.cli import trainable_full

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False)
    for p in model.get_parameters():
        p.requires_grad = False
    params = trainable_full(model, train_vision=False)
    for p in params:
        p.requires_grad = True
    ids, mask, pv, pam = make_batch(ckpt_a, (1, 2), (7, 4), np.random.default_rng(5), partial={(1, 1): (20, 12)})
    labels = labels_for(ids, mask)
    grad = ms.value_and_grad(lambda: model(ids, mask, pv, pam, labels=labels).loss, None, params)
    model.set_train(False)  # not training: the tower runs in PyNative, recorded
    loss, recorded = grad()
    model.set_train(True)
    assert not model.model.vision_model.trainable_params()
    loss_frozen, frozen = grad()
    assert abs(float(loss) - float(loss_frozen)) / abs(float(loss)) < 1e-6
    connector = [i for i, p in enumerate(params) if "connector" in p.name]
    assert connector
    for a, b in zip(recorded, frozen):
        assert relative_l2(b.asnumpy(), a.asnumpy()) < 1e-5


def test_vision_recompute_gives_the_same_gradients(ckpt_a, ms_cpu):
    import mindspore as ms

    from finetune_helpers import labels_for
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune.cli import trainable_full

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False)
    params = trainable_full(model, train_vision=True)
    model.set_train(True)
    ids, mask, pv, pam = make_batch(ckpt_a, (1, 2), (7, 4), np.random.default_rng(6), partial={(1, 1): (20, 12)})
    labels = labels_for(ids, mask)
    grad = ms.value_and_grad(lambda: model(ids, mask, pv, pam, labels=labels).loss, None, params)
    loss, plain = grad()
    model.model.vision_model.recompute_layers = True
    loss_r, recomputed = grad()
    assert float(loss) == pytest.approx(float(loss_r), rel=1e-6)
    vision = [i for i, p in enumerate(params) if "vision_model.encoder" in p.name]
    assert vision and np.abs(plain[vision[0]].asnumpy()).max() > 0
    for a, b in zip(plain, recomputed):
        assert relative_l2(b.asnumpy(), a.asnumpy()) < 1e-6
