"""Training against torch + peft + transformers: 10 AdamW steps of LoRA, schedules, full fine-tuning gradients."""
import numpy as np
import pytest

from conftest import relative_l2
from finetune_data import write_dataset
from finetune_helpers import peft_model_like

STEPS = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("parity")
    return write_demo_checkpoint(root / "model"), write_dataset(root / "data", 8)


class _Path:
    def __init__(self, path):
        self.path = path


def test_ten_lora_adamw_steps_equal_torch_peft(demo, ms_cpu, tmp_path):
    import mindspore as ms
    import torch
    from transformers import get_scheduler

    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
    from mindone_idefics3.finetune import lora as L
    from mindone_idefics3.finetune.data import TrainingData, collate_examples, scored_tokens
    from mindone_idefics3.finetune.trainer import TrainConfig, Trainer
    from reference import corrected_position_ids
    from finetune_helpers import torch_inputs

    model_dir, data_path = demo
    processor = Idefics3Processor.from_pretrained(model_dir, do_image_splitting=False)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, progress=False)
    lora = L.attach_lora(model, L.select_targets(model, L.DEFAULT_TARGETS + ",proj"), 4, 8.0, 0.0, seed=0)
    rng = np.random.default_rng(0)
    for part in lora.parts.values():  # B non-zero: A's gradients are not zero from the first step
        part.lora_B.set_data(ms.Tensor((rng.standard_normal(part.lora_B.shape) * 0.05).astype(np.float32)))
    peft_model = peft_model_like(_Path(model_dir), model, lora)
    for p in model.get_parameters():
        p.requires_grad = False
    for p in lora.parameters():
        p.requires_grad = True
    config = TrainConfig(learning_rate=3e-3, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-7, lr_scheduler="cosine",
                         warmup_steps=3, max_grad_norm=0.5, grad_accum=2, batch_size=2, max_steps=STEPS, seed=4)
    data = TrainingData.open(data_path)
    trainer = Trainer(model, processor, data, lora.parameters(), config, tmp_path)
    ours = [trainer.train_step() for _ in range(STEPS)]

    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=STEPS)
    theirs, clipped = [], 0
    for step in range(STEPS):
        batches = [collate_examples(trainer.samples(idx, data), processor.tokenizer.pad_token_id)
                   for idx in trainer.micro_batches(step, 0)]
        total = sum(scored_tokens(b["labels"]) for b in batches)
        loss_sum = 0.0
        for b in batches:
            with corrected_position_ids():
                out = peft_model(**torch_inputs(b["input_ids"], b["attention_mask"], b.get("pixel_values"),
                                                b.get("pixel_attention_mask"), b["labels"]),
                                 num_items_in_batch=torch.tensor(total))
            out.loss.backward()
            loss_sum += out.loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
        clipped += float(norm) > 0.5
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        theirs.append(loss_sum)
    for record, ref in zip(ours, theirs):
        assert abs(record["loss"] - ref) / abs(ref) < 1e-4, ([r["loss"] for r in ours], theirs)
    assert clipped > 0  # the clipping path ran
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3  # the weights moved
    trained = lora.state()
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            ours_name = name.replace(".default.weight", ".weight")
            assert relative_l2(trained[ours_name], param.detach().numpy()) < 1e-4, name


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_equal_transformers(kind, warmup):
    import torch
    from transformers import get_scheduler

    from mindone_idefics3.finetune.optim import lr_factor

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" and warmup else kind
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=12)
    for step in range(12):
        assert lr_factor(kind, step, warmup, 12) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_full_fine_tuning_gradients_equal_transformers(ckpt_a, ms_cpu):
    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune.cli import trainable_full
    from mindone_idefics3.finetune.export import hf_state_dict
    from reference import corrected_position_ids
    from finetune_helpers import labels_for, torch_inputs
    from inputs import make_batch

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False)
    rng = np.random.default_rng(11)
    ids, mask, pv, pam = make_batch(ckpt_a, (1, 2), (7, 4), rng, partial={(1, 1): (20, 12)})
    labels = labels_for(ids, mask)
    params = trainable_full(model, train_vision=True)
    loss, grads = ms.value_and_grad(lambda: model(ids, mask, pv, pam, labels=labels).loss, None, params)()
    # our gradients under transformers' names: the fused ones split like the weights
    from mindone_idefics3.finetune.trainer import padding_rows

    grads = list(grads)
    for i, row in padding_rows(model, params).items():  # what the trainer does (torch's padding_idx)
        grads[i][row] = 0
    names_of = {id(p): n for n, p in model.parameters_and_names()}
    by_name = {names_of[id(p)]: g for p, g in zip(params, grads)}

    class Grads:  # hf_state_dict reads `parameters_and_names` and `config`
        config = model.config

        def parameters_and_names(self):
            return [(n, g) for n, g in by_name.items()]

    ours = hf_state_dict(Grads())
    from transformers import Idefics3ForConditionalGeneration as HFModel

    ref = HFModel.from_pretrained(str(ckpt_a.path), attn_implementation="eager")
    with corrected_position_ids():
        out = ref(**torch_inputs(ids, mask, pv, pam, labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) / out.loss.item() < 1e-5
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.grad is not None}
    checked = ["model.text_model.layers.0.self_attn.q_proj.weight", "model.text_model.layers.1.self_attn.v_proj.weight",
               "model.text_model.layers.1.mlp.up_proj.weight", "model.text_model.layers.0.mlp.down_proj.weight",
               "model.text_model.norm.weight", "model.text_model.embed_tokens.weight", "lm_head.weight",
               "model.connector.modality_projection.proj.weight",
               "model.vision_model.encoder.layers.1.self_attn.k_proj.weight",
               "model.vision_model.embeddings.patch_embedding.weight", "model.vision_model.post_layernorm.bias"]
    for name in checked:
        assert relative_l2(ours[name], ref_grads[name]) < 1e-4, (name, np.abs(ref_grads[name]).max())


def test_full_fine_tuning_freezes_the_vision_tower_by_default(ckpt_b, ms_cpu):
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune.cli import trainable_full

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_b.path, progress=False)
    names = {id(p): n for n, p in model.parameters_and_names()}
    frozen_vision = [names[id(p)] for p in trainable_full(model, False)]
    assert frozen_vision and not any("vision_model" in n for n in frozen_vision)
    assert any("connector" in n for n in frozen_vision) and any("text_model" in n for n in frozen_vision)
    assert any("vision_model" in names[id(p)] for p in trainable_full(model, True))


def test_two_ranks_of_batch_1_feed_adamw_what_one_worker_of_batch_2_does(demo, ms_cpu, tmp_path):
    """Data parallel without msrun: rank 0 of 2 runs its real train_step, its AllReduce adding rank 1's sums (one
    fp32 a + b, as msrun's AllReduce of two workers is: benchmarks/data_parallel_rounding.py), and hands AdamW the
    gradients and scale one worker with batches of 2 hands it. Compared before the update: AdamW's first step
    lr·g/(|g| + eps) turns the rounding of a gradient that cancels to a few eps into ~1e-6 of weight (the slow
    msrun test's known limit, docs/finetune.md)."""
    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
    from mindone_idefics3.distributed import World
    from mindone_idefics3.finetune import lora as L
    from mindone_idefics3.finetune.data import TrainingData
    from mindone_idefics3.finetune.trainer import TrainConfig, Trainer

    model_dir, data_path = demo
    processor = Idefics3Processor.from_pretrained(model_dir, do_image_splitting=False)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, progress=False)
    lora = L.attach_lora(model, L.select_targets(model, L.DEFAULT_TARGETS), 8, 16.0, 0.0, seed=0)
    rng = np.random.default_rng(1)
    for part in lora.parts.values():  # B non-zero: A's gradients are not zero either
        part.lora_B.set_data(ms.Tensor((rng.standard_normal(part.lora_B.shape) * 0.05).astype(np.float32)))
    for p in model.get_parameters():
        p.requires_grad = False
    params = lora.parameters()
    for p in params:
        p.requires_grad = True
    names = [p.name for p in params]
    data = TrainingData.open(data_path)
    rank_one = []  # rank 1's gradient sums and totals for the step

    class RankZeroOfTwo(World):
        def all_reduce(self, tensors):
            return [a + b for a, b in zip(tensors, rank_one, strict=True)]

    def trainer(batch, world):
        config = TrainConfig(learning_rate=1e-2, grad_accum=2, batch_size=batch, max_steps=3, seed=0)
        return Trainer(model, processor, data, params, config, tmp_path, world, progress=False)

    one, two, other = trainer(2, World(0, 1)), trainer(1, RankZeroOfTwo(0, 2)), trainer(1, World(1, 2))
    fed = {}
    for name, tr in (("one", one), ("two", two)):
        tr.optimizer.step = lambda grads, lr, grad_scale, name=name: fed.__setitem__(
            name, [g.asnumpy().astype(np.float64) * grad_scale for g in grads])
    for step in range(2):  # AdamW is held: both steps at the same weights, each with its own examples
        one.step = two.step = other.step = step
        grads, totals = other.local_sums()
        rank_one[:] = grads + [totals]
        a, b = one.train_step(), two.train_step()
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-6 and a["tokens"] == b["tokens"], (a, b)
        for name, x, y in zip(names, fed["one"], fed["two"]):  # measured: ≤ 7e-7 of a weight's largest
            assert np.abs(x - y).max() <= 2e-6 * np.abs(x).max(), (step, name)
