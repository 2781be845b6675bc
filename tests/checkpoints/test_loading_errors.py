"""Bad checkpoints and bad inputs: one clear Idefics3Error each, and no model returned."""
import json
import shutil

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import write_reference_checkpoint
from inputs import make_batch
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.errors import Idefics3Error


@pytest.fixture
def ckpt_copy(ckpt_a, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt_a.path, dst)
    return dst


def test_missing_shard(tmp_path, ms_cpu):
    write_reference_checkpoint(tmp_path, "a", max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(Idefics3Error, match=f"missing: {shard.name}"):
        Model.from_pretrained(tmp_path)


def test_truncated_safetensors(ckpt_copy, ms_cpu):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Idefics3Error, match="truncated or corrupt"):
        Model.from_pretrained(ckpt_copy)


def test_config_of_another_model_type(ckpt_copy, ms_cpu):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Idefics3Error, match="model_type 'llava', expected 'idefics3'"):
        Model.from_pretrained(ckpt_copy)


def test_unknown_rope_type(ckpt_copy, ms_cpu):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Idefics3Error, match="rope_scaling.rope_type 'yarn' is not supported"):
        Model.from_pretrained(ckpt_copy)


def test_weight_of_the_wrong_shape_and_missing_and_unexpected_keys(ckpt_copy, ms_cpu):
    f = ckpt_copy / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.text_model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    del tensors["model.text_model.norm.weight"]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(Idefics3Error) as e:
        Model.from_pretrained(ckpt_copy)
    msg = str(e.value)
    assert f"{name}: checkpoint (64, 95), model expects (64, 96)" in msg
    assert "missing tensors (1): model.text_model.norm.weight" in msg
    assert "unexpected tensors (1): model.extra.weight" in msg


def test_pickle_only_checkpoint_is_refused(tmp_path, ckpt_a, ms_cpu):
    shutil.copy(ckpt_a.path / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(Idefics3Error, match="pickle weights"):
        Model.from_pretrained(tmp_path)


def test_bf16_on_cpu_says_what_to_use_instead(ckpt_a, ms_cpu):
    with pytest.raises(Idefics3Error, match="bf16 is not supported by MindSpore's CPU backend.*use fp32/fp16"):
        Model.from_pretrained(ckpt_a.path, dtype=ms.bfloat16)
    with pytest.raises(Idefics3Error, match="unknown dtype 'fp8'"):
        Model.from_pretrained(ckpt_a.path, dtype="fp8")


def test_missing_directory_and_offline_repo_id(tmp_path, monkeypatch, ms_cpu):
    with pytest.raises(Idefics3Error, match="no such directory"):
        Model.from_pretrained(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(Idefics3Error, match="HF_HUB_OFFLINE is set.*pass the local directory"):
        Model.from_pretrained("someorg/not-cached-model", cache_dir=str(tmp_path / "hub"))


def test_repo_id_resolves_from_the_hub_cache_offline(ckpt_a, offline_hub, ms_cpu):
    """The hub path is real code: a snapshot in the huggingface_hub cache layout loads with HF_HUB_OFFLINE=1."""
    cache, commit = offline_hub(ckpt_a.path, "someorg/tiny-idefics3")
    model = Model.from_pretrained("someorg/tiny-idefics3", cache_dir=str(cache))
    assert model.model_dir.endswith(commit)


@pytest.fixture(scope="module")
def model_a(ckpt_a, ms_cpu):
    return Model.from_pretrained(ckpt_a.path)


def test_image_token_count_mismatch(ckpt_a, model_a):
    ids, mask, pv, pam = make_batch(ckpt_a, [2], [6], np.random.default_rng(0))
    with pytest.raises(Idefics3Error, match="18 <image> tokens but pixel_values hold 1 image tile"):
        model_a(ids, mask, pv[:, :1], pam[:, :1])
    with pytest.raises(Idefics3Error, match="hold 0 image tile"):
        model_a(ids, mask)


def test_bad_shapes_and_ids(ckpt_a, model_a):
    ids, mask, pv, pam = make_batch(ckpt_a, [1], [6], np.random.default_rng(0))
    with pytest.raises(Idefics3Error, match=r"pixel_values must be \(batch, images, 3, height, width\)"):
        model_a(ids, mask, pv[0], pam)
    with pytest.raises(Idefics3Error, match="pixel_attention_mask must be"):
        model_a(ids, mask, pv, pam[..., :-1])
    with pytest.raises(Idefics3Error, match="attention_mask has shape"):
        model_a(ids, mask[:, 1:], pv, pam)
    with pytest.raises(Idefics3Error, match="outside the vocabulary"):
        model_a(ids + 1000, mask, pv, pam)
