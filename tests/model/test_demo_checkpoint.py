"""The demo checkpoint (written with numpy + tokenizers, no torch) is a real transformers checkpoint."""
import numpy as np
import pytest

from conftest import relative_l2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "model")


def test_transformers_loads_the_demo_and_agrees_with_us(demo, ms_cpu):
    import torch
    from transformers import Idefics3ForConditionalGeneration as HFModel

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from reference import corrected_position_ids

    ref = HFModel.from_pretrained(str(demo), attn_implementation="eager").eval()
    ours = Idefics3ForConditionalGeneration.from_pretrained(demo)
    cfg = ours.config
    rng = np.random.default_rng(0)
    ids = rng.integers(60, 200, size=(1, 40))
    ids[0, 5:5 + 2 * cfg.image_seq_len] = cfg.image_token_id
    pv = rng.standard_normal((1, 2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad(), corrected_position_ids():
        r = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv)).logits.numpy()
    assert relative_l2(ours(ids, pixel_values=pv).logits.asnumpy(), r) < 1e-5


def test_transformers_processor_reads_the_demo_files(demo):
    from PIL import Image
    from transformers import Idefics3Processor

    from mindone_idefics3.demo import write_demo_image

    processor = Idefics3Processor.from_pretrained(str(demo))
    image = Image.open(write_demo_image(demo / "img.png"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|begin_of_text|>User:<image>What is it?<end_of_utterance>\nAssistant:"
    out = processor(text=prompt, images=[[image]], return_tensors="np")
    assert out["pixel_values"].shape[-2:] == (64, 64)
    assert (out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() % 16 == 0
