"""Helpers for comparing with the reference (transformers on CPU torch), used by the tests and the benchmarks.

`corrected_position_ids`: transformers 4.55–4.57 buckets vision patch rows/cols with `k / nb · (1 − 1e−6)` in
fp32 (in Idefics3's embeddings and in SmolVLM's copy of them), which maps a full tile to 0,0,1,…,N−2 instead of
the identity the checkpoints were trained with (their PRs 41371/41374/47133). Inside this context manager their
`forward` uses the integer rule of docs/design.md §2 — row k → min(k·N // nb, N−1) — so both sides compute the
same, correct thing. Everything else in the reference runs unmodified. Needs torch and transformers (the `test`
extra); importing this module does not.
"""
from __future__ import annotations

import contextlib


def _corrected_embeddings_forward(self, pixel_values, patch_attention_mask):
    import torch

    batch_size, _, max_im_h, max_im_w = pixel_values.shape
    embeddings = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    n = self.num_patches_per_side
    grid_h, grid_w = max_im_h // self.patch_size, max_im_w // self.patch_size
    position_ids = torch.zeros((batch_size, grid_h * grid_w), dtype=torch.long)
    for i, p_mask in enumerate(patch_attention_mask):
        nb_h, nb_w = int(p_mask[:, 0].sum()), int(p_mask[0].sum())
        rows = torch.clamp(torch.arange(nb_h) * n // nb_h, max=n - 1)
        cols = torch.clamp(torch.arange(nb_w) * n // nb_w, max=n - 1)
        position_ids[i][p_mask.reshape(-1)] = (rows[:, None] * n + cols[None, :]).reshape(-1)
    return embeddings + self.position_embedding(position_ids)


@contextlib.contextmanager
def corrected_position_ids():
    """Run transformers' Idefics3 and SmolVLM with the correct (integer) vision position ids while inside
    (SmolVLM's modeling file holds its own copy of Idefics3's embeddings, with the same bug)."""
    from transformers.models.idefics3 import modeling_idefics3
    from transformers.models.smolvlm import modeling_smolvlm

    classes = (modeling_idefics3.Idefics3VisionEmbeddings, modeling_smolvlm.SmolVLMVisionEmbeddings)
    originals = [cls.forward for cls in classes]
    for cls in classes:
        cls.forward = _corrected_embeddings_forward
    try:
        yield
    finally:
        for cls, original in zip(classes, originals):
            cls.forward = original


def transformers_chat_answer(path, messages, images, max_new_tokens: int, stops) -> str:
    """transformers' greedy answer to a whole conversation (its processor and model, corrected vision position
    ids), decoded as a chat turn: up to the first stop token, special tokens skipped, not stripped."""
    import torch
    from transformers import Idefics3ForConditionalGeneration as HFModel
    from transformers import Idefics3Processor as HFProcessor

    processor = HFProcessor.from_pretrained(str(path))
    model = HFModel.from_pretrained(str(path), attn_implementation="eager").eval()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt")
    with torch.no_grad(), corrected_position_ids():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stops),
                             pad_token_id=0)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return processor.decode(new[:cut], skip_special_tokens=True)
