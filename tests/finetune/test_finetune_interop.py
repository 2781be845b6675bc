"""Adapters and merged checkpoints between us, peft and transformers."""
import json

import numpy as np
import pytest

from conftest import relative_l2
from finetune_helpers import ours_with_lora
from inputs import make_batch


def _torch_logits(model, ids, mask, pv, pam):
    import torch

    from reference import corrected_position_ids

    position_ids = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    with torch.no_grad(), corrected_position_ids():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(position_ids), pixel_values=torch.tensor(pv),
                     pixel_attention_mask=torch.tensor(pam).bool()).logits.numpy()


@pytest.fixture(scope="module")
def saved(ckpt_a, tmp_path_factory):
    """Our adapter (text, connector and vision modules; B non-zero) saved, and our logits with it attached."""
    from mindone_idefics3.device import select_device
    from mindone_idefics3.finetune import lora as L

    select_device("CPU")
    out = tmp_path_factory.mktemp("adapter")
    model, lora = ours_with_lora(ckpt_a, targets="q_proj,v_proj,o_proj,gate_proj,down_proj,proj,vision.fc1")
    L.save_adapter(out, lora, model, str(ckpt_a.path))
    rng = np.random.default_rng(21)
    inputs = make_batch(ckpt_a, (2, 1), (6, 10), rng, partial={(0, 1): (16, 8)})
    return out, model, lora, inputs, model(*inputs).logits.asnumpy()


def test_peft_loads_our_adapter_to_equal_logits(ckpt_a, saved):
    from peft import PeftModel
    from transformers import Idefics3ForConditionalGeneration as HFModel

    out, _, lora, inputs, ours = saved
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"].startswith("^") and config["r"] == lora.r
    hf = HFModel.from_pretrained(str(ckpt_a.path), attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    wrapped = {n[len("base_model.model."):-len(".lora_A.default.weight")]
               for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert wrapped == set(lora.parts)  # the regex wraps exactly our modules (not SigLIP's q_proj/v_proj)
    assert relative_l2(ours, _torch_logits(peft_model, *inputs)) < 1e-5


def test_from_pretrained_with_adapter_merges_it(ckpt_a, saved):
    from mindone_idefics3 import Idefics3ForConditionalGeneration

    out, _, _, inputs, ours = saved
    merged = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False, adapter=out)
    assert relative_l2(merged(*inputs).logits.asnumpy(), ours) < 1e-5


def test_a_peft_saved_adapter_loads_in_ours(ckpt_a, tmp_path, ms_cpu):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics3ForConditionalGeneration as HFModel

    from mindone_idefics3 import Idefics3ForConditionalGeneration

    hf = HFModel.from_pretrained(str(ckpt_a.path), attn_implementation="eager")
    # a plain list of names: peft wraps SigLIP's q/v as well as Llama's (and the k of neither)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "fc2"],
                                               use_rslora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path))
    rng = np.random.default_rng(2)
    inputs = make_batch(ckpt_a, (1, 2), (5, 8), rng)
    ref = _torch_logits(peft_model.eval(), *inputs)
    ours = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False, adapter=tmp_path)
    assert relative_l2(ours(*inputs).logits.asnumpy(), ref) < 1e-5


def test_merged_checkpoint_loads_in_transformers(ckpt_a, saved, tmp_path):
    from transformers import Idefics3ForConditionalGeneration as HFModel

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune.export import write_hf_checkpoint
    from mindone_idefics3.model.lora import load_adapter

    out, _, _, inputs, ours = saved
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False)
    load_adapter(model, out, merge_now=True)
    write_hf_checkpoint(model, ckpt_a.path, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors"])
    hf = HFModel.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager").eval()
    assert relative_l2(_torch_logits(hf, *inputs), ours) < 1e-5
    again = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "merged", progress=False)
    assert relative_l2(again(*inputs).logits.asnumpy(), ours) < 1e-5


def test_adapter_for_another_model_is_refused(ckpt_b, saved):
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.errors import Idefics3Error

    out = saved[0]
    with pytest.raises(Idefics3Error, match="adapter"):
        Idefics3ForConditionalGeneration.from_pretrained(ckpt_b.path, progress=False, adapter=out)
