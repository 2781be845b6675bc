"""Shared pieces of the fine-tuning tests: our model with LoRA, transformers + peft with the same adapter."""
from __future__ import annotations

import numpy as np

from conftest import IMAGE_TOKEN


def labels_for(ids, mask):
    """Score every real non-image token (the `--train-on all` convention)."""
    return np.where((mask == 0) | (ids == IMAGE_TOKEN), -100, ids)


def ours_with_lora(ckpt, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", r=4, alpha=8.0,
                   seed=1, b_scale=0.1):
    """Our model with LoRA attached; B made non-zero (so gradients of A are not zero) from `seed`."""
    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.finetune import lora as L

    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt.path, progress=False)
    lora = L.attach_lora(model, L.select_targets(model, targets), r, alpha, 0.0, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for part in lora.parts.values():
        part.lora_B.set_data(ms.Tensor((rng.standard_normal(part.lora_B.shape) * b_scale).astype(np.float32)))
    return model, lora


def peft_model_like(ckpt, model, lora):
    """transformers' model wrapped by peft with our adapter's config and weights (fp32, eager attention)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics3ForConditionalGeneration as HFModel

    from mindone_idefics3.finetune import lora as L
    from mindone_idefics3.model.lora import module_slots

    hf = HFModel.from_pretrained(str(ckpt.path), attn_implementation="eager")
    names = [s.name for s in module_slots(model)]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                        target_modules=L.target_regex(list(lora.parts), names))
    peft_model = get_peft_model(hf, config)
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
             torch.tensor(v) for k, v in lora.state().items()}
    missing = set(state) - set(dict(peft_model.named_parameters()))
    assert not missing, sorted(missing)[:3]
    with torch.no_grad():
        params = dict(peft_model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    wrapped = {n[len("base_model.model."):-len(".lora_A.default.weight")] for n in params if ".lora_A." in n}
    assert wrapped == set(lora.parts), "peft wraps other modules than ours"
    return peft_model


def torch_inputs(ids, mask, pv, pam, labels):
    import torch

    position_ids = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(position_ids), labels=torch.tensor(labels))
    if pv is not None:
        kwargs.update(pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(pam).bool())
    return kwargs
