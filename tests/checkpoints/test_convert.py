"""`idefics3-convert`: HF checkpoint → MindSpore checkpoint directory (streaming, verified, atomic).

Conversions run in-process through `convert.main` (exit code, stdout, stderr as the CLI gives them); the
interruption tests run the real CLI in a subprocess whose tensor stream is slowed down, so that a signal lands
mid-conversion deterministically.
"""
import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from inputs import make_batch
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3 import convert
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.version import __version__
from mindone_idefics3.weights import SAFE_INDEX, cast

ROOT = Path(__file__).resolve().parents[2]
PROCESSOR_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"model_max_length": 1024}',
    "special_tokens_map.json": '{"eos_token": "<end_of_utterance>"}',
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}<end_of_utterance>{% endfor %}",
    "preprocessor_config.json": '{"image_processor_type": "Idefics3ImageProcessor"}',
    "processor_config.json": '{"image_seq_len": 9}',
}


# ----------------------------------------------------------------------------------------------- helpers
def run(capsys, *argv):
    """The CLI in-process: (exit code, stdout, stderr)."""
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rne_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Reference fp32 → bf16 (round to nearest, ties to even) on the bit patterns; NaN → quiet NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((u >> 16) | 0x40).astype(np.uint16), rounded)


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def stored(dst: Path) -> dict:
    """name → numpy array of every tensor in a converted directory (read with safetensors, not our reader)."""
    index = json.loads((dst / SAFE_INDEX).read_text())["weight_map"]
    out = {}
    for file in sorted(set(index.values())):
        with safe_open(str(dst / file), "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def logits(model, ckpt, seed=0):
    ids, mask, pv, pam = make_batch(ckpt, [2, 1], [6, 9], np.random.default_rng(seed), partial={(1, 0): (13, 17)})
    return model(ids, mask, pv, pam).logits.asnumpy()


def siblings(dst: Path) -> list:
    """Anything the converter may have left next to DST (temporary or old directories)."""
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def read_safetensors(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes, *, header_bytes=None):
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + data)


def fail_writing(error):
    """A write_shard that starts the shard, then fails with `error`."""
    def write_shard(path, *args):
        Path(path).write_bytes(b"partial")
        raise error

    return write_shard


@pytest.fixture(scope="module")
def src_a(ckpt_a, tmp_path_factory):
    """ckpt_a plus the processor/tokenizer/chat-template files a real checkpoint carries."""
    path = tmp_path_factory.mktemp("src_a") / "hf"
    shutil.copytree(ckpt_a.path, path)
    for name, text in PROCESSOR_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def hf_fp32(ckpt_a, ms_cpu):
    return Model.from_pretrained(ckpt_a.path, dtype="fp32", progress=False)


# ----------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("shape,fused", [("a", False), ("b", True)])
def test_fp32_conversion_gives_bitwise_identical_logits(shape, fused, ckpt_a, ckpt_b, tmp_path, capsys, ms_cpu):
    ckpt = {"a": ckpt_a, "b": ckpt_b}[shape]
    dst = tmp_path / "ms"
    code, out, err = run(capsys, ckpt.path, dst, "--dtype", "fp32", *(["--fused"] if fused else []))
    assert code == 0, err
    assert out.startswith("converted ") and "fp32" in out and "verified" in out and str(dst) in out
    hf = Model.from_pretrained(ckpt.path, dtype="fp32", progress=False)
    ms_model = Model.from_pretrained(dst, dtype="fp32", progress=False)
    np.testing.assert_array_equal(logits(ms_model, ckpt), logits(hf, ckpt))
    names = set(stored(dst))
    assert any("qkv_proj" in n for n in names) == fused and any("q_proj" in n for n in names) != fused


def test_fp16_conversion_matches_loading_the_hf_directory_in_fp16(ckpt_a, tmp_path, capsys, ms_cpu):
    dst = tmp_path / "ms"
    assert run(capsys, ckpt_a.path, dst, "--dtype", "fp16")[0] == 0
    source = load_file(str(ckpt_a.path / "model.safetensors"))
    for name, value in stored(dst).items():
        assert value.dtype == np.float16
        np.testing.assert_array_equal(value.view(np.uint16), source[name].astype(np.float16).view(np.uint16))
    hf = Model.from_pretrained(ckpt_a.path, dtype="fp16", progress=False)
    ms_model = Model.from_pretrained(dst, dtype="fp16", progress=False)
    np.testing.assert_array_equal(logits(ms_model, ckpt_a), logits(hf, ckpt_a))


def test_bf16_conversion_is_round_to_nearest_even_and_loads_to_the_same_logits(ckpt_a, tmp_path, capsys, ms_cpu):
    """bf16 cannot run on MindSpore's CPU backend: check the stored bits against a reference RNE, and that loading
    DST in fp32 gives the logits of the HF checkpoint rounded to bf16 by that reference (both bitwise)."""
    dst = tmp_path / "ms"
    assert run(capsys, ckpt_a.path, dst, "--dtype", "bf16")[0] == 0
    source = load_file(str(ckpt_a.path / "model.safetensors"))
    converted = stored(dst)
    assert set(converted) == set(source)
    rounded = {}
    for name, value in converted.items():
        assert value.dtype == ms.common.np_dtype.bfloat16
        want = rne_bf16_bits(source[name])
        np.testing.assert_array_equal(value.view(np.uint16), want, err_msg=name)
        rounded[name] = bf16_bits_to_fp32(want)
    ref_dir = tmp_path / "hf_rounded"
    shutil.copytree(ckpt_a.path, ref_dir)
    save_file(rounded, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    ref = Model.from_pretrained(ref_dir, dtype="fp32", progress=False)
    ms_model = Model.from_pretrained(dst, dtype="fp32", progress=False)
    np.testing.assert_array_equal(logits(ms_model, ckpt_a), logits(ref, ckpt_a))


EDGE_BITS = np.array([
    0x3F808000, 0x3F818000,  # exact ties: to even (down, then up)
    0x3F808001, 0x3F807FFF, 0xBF808001,  # just above / below a tie
    0x7F7F7FFF, 0x7F7FFFFF, 0xFF7FFFFF,  # largest finite that stays finite; rounds up to ±inf
    0x00008000, 0x00018000, 0x80008000, 0x00000001, 0x007FFFFF,  # subnormals, incl. ties
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
    0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF,  # NaNs (a signalling NaN must not turn into inf)
], np.uint32)


def test_cast_to_bf16_rounds_to_nearest_even():
    bits = np.concatenate([EDGE_BITS, np.random.default_rng(0).integers(0, 2**32, 2**21, dtype=np.uint64)
                           .astype(np.uint32)])
    x = bits.view(np.float32)
    want = rne_bf16_bits(x)
    nan = np.isnan(x)
    wide, out = np.empty(x.size, np.float32), np.empty(x.size, ms.common.np_dtype.bfloat16)
    for got in (cast(x, ms.bfloat16), cast(x, ms.bfloat16, out=out, wide=wide)):
        got = got.view(np.uint16)
        np.testing.assert_array_equal(got[~nan], want[~nan])
        assert np.isnan(bf16_bits_to_fp32(got[nan])).all()
    # fp16 sources go through fp32 exactly, so they round the same way
    h = np.random.default_rng(1).integers(0, 2**16, 2**16, dtype=np.uint16).view(np.float16)
    h = h[~np.isnan(h)]
    np.testing.assert_array_equal(cast(h, ms.bfloat16).view(np.uint16), rne_bf16_bits(h.astype(np.float32)))


def test_cast_from_bf16_is_exact_for_every_bit_pattern():
    """The bit-shift widening equals MindSpore's bf16 → fp32 ufunc for all 65536 patterns; fp16 follows fp32."""
    b = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(ms.common.np_dtype.bfloat16)
    via_ufunc = b.astype(np.float32)
    got = cast(b, ms.float32)
    nan = np.isnan(via_ufunc)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), via_ufunc[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(cast(b, ms.float16)[~nan].view(np.uint16),
                                      via_ufunc[~nan].astype(np.float16).view(np.uint16))


@pytest.mark.slow
def test_cast_to_bf16_rounds_to_nearest_even_for_all_fp32_bit_patterns():
    step = 2**26
    wide, out = np.empty(step, np.float32), np.empty(step, ms.common.np_dtype.bfloat16)
    for start in range(0, 2**32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        got = cast(x, ms.bfloat16, out=out, wide=wide).view(np.uint16)
        nan = np.isnan(x)
        np.testing.assert_array_equal(got[~nan], rne_bf16_bits(x)[~nan])
        assert np.isnan(bf16_bits_to_fp32(got[nan])).all()


def test_small_chunks_stream_the_same_bytes(src_a, tmp_path, capsys, monkeypatch, ms_cpu):
    """Chunk boundaries inside tensors and inside fused parts change nothing."""
    assert run(capsys, src_a, tmp_path / "whole", "--dtype", "bf16", "--fused")[0] == 0
    monkeypatch.setattr(convert, "CHUNK_ELEMENTS", 1000)  # divides none of the fused parts' sizes
    assert run(capsys, src_a, tmp_path / "chunked", "--dtype", "bf16", "--fused")[0] == 0
    whole, chunked = stored(tmp_path / "whole"), stored(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name].view(np.uint16), chunked[name].view(np.uint16))


# ----------------------------------------------------------------------------------------------- the directory
def test_directory_layout_index_manifest_and_copied_files(src_a, tmp_path, capsys, ms_cpu):
    dst = tmp_path / "ms"
    (src_a / "pytorch_model.bin").write_bytes(b"pickle")  # never copied (nor read: safetensors is there)
    try:
        code, _, err = run(capsys, src_a, dst, "--dtype", "bf16", "--shard-size", "100KB")
    finally:
        (src_a / "pytorch_model.bin").unlink()
    assert code == 0, err
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) == 3 and shards[0].name == "model-00001-of-00003.safetensors"
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["config.json", "generation_config.json", "conversion_manifest.json", SAFE_INDEX, *PROCESSOR_FILES,
         *(s.name for s in shards)])
    for name in ["config.json", "generation_config.json", *PROCESSOR_FILES]:
        assert (dst / name).read_bytes() == (src_a / name).read_bytes()

    index = json.loads((dst / SAFE_INDEX).read_text())
    source_names = set(load_file(str(src_a / "model.safetensors")))
    assert set(index["weight_map"]) == source_names
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored(dst).values())
    for shard in shards:
        with safe_open(str(shard), "np") as f:
            assert f.metadata()["format"] == "ms"
            assert {index["weight_map"][k] for k in f.keys()} == {shard.name}
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) <= 100_000

    manifest = json.loads((dst / "conversion_manifest.json").read_text())
    assert manifest["tool_version"] == __version__ and manifest["dtype"] == "bf16" and manifest["verified"]
    assert manifest["fused"] is False and manifest["tensors"] == len(source_names)
    sha = {e["name"]: e["sha256"] for e in manifest["source_files"]}
    assert set(sha) == {"model.safetensors", "config.json", "generation_config.json", *PROCESSOR_FILES}
    for name, digest in sha.items():
        assert digest == hashlib.sha256((src_a / name).read_bytes()).hexdigest()
    for entry in manifest["weight_files"]:
        data = (dst / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert not siblings(dst)


def test_mindspore_load_checkpoint_reads_every_shard(src_a, tmp_path, capsys, ms_cpu):
    dst = tmp_path / "ms"
    assert run(capsys, src_a, dst, "--dtype", "bf16", "--shard-size", "100KB")[0] == 0
    expected = stored(dst)
    seen = {}
    for shard in sorted(dst.glob("model-*.safetensors")):
        seen.update(ms.load_checkpoint(str(shard), format="safetensors"))
    assert seen.keys() == expected.keys()
    for name, param in seen.items():
        assert param.dtype == ms.bfloat16
        np.testing.assert_array_equal(param.asnumpy().view(np.uint16), expected[name].view(np.uint16))


def test_fused_checkpoint_loads_straight_into_the_cells(ckpt_a, hf_fp32, tmp_path, capsys, ms_cpu):
    """With --fused the names are exactly the Cells' parameters: load_checkpoint + load_param_into_net suffice."""
    dst = tmp_path / "ms"
    assert run(capsys, ckpt_a.path, dst, "--dtype", "fp32", "--fused")[0] == 0
    params = {}
    for shard in sorted(dst.glob("model-*.safetensors")):
        params.update(ms.load_checkpoint(str(shard), format="safetensors"))
    from mindone_idefics3.config import Idefics3Config

    with ms.nn.utils.no_init_parameters():
        model = Model(Idefics3Config.from_json_file(dst / "config.json"), ms.float32)
    not_loaded, unused = ms.load_param_into_net(model, params, strict_load=True)
    assert not not_loaded and not unused
    model.set_train(False)
    np.testing.assert_array_equal(logits(model, ckpt_a), logits(hf_fp32, ckpt_a))


def test_a_converted_directory_converts_again(src_a, tmp_path, capsys, ms_cpu):
    """bf16 DST → fp16: the old manifest is replaced, values are the bf16 ones widened (exact) then rounded."""
    assert run(capsys, src_a, tmp_path / "bf16", "--dtype", "bf16", "--fused")[0] == 0
    assert run(capsys, tmp_path / "bf16", tmp_path / "fp16", "--dtype", "fp16")[0] == 0
    manifest = json.loads((tmp_path / "fp16" / "conversion_manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and "conversion_manifest.json" not in manifest["copied_files"]
    bf16, fp16 = stored(tmp_path / "bf16"), stored(tmp_path / "fp16")
    assert bf16.keys() == fp16.keys()
    for name in bf16:
        np.testing.assert_array_equal(fp16[name], bf16_bits_to_fp32(bf16[name].view(np.uint16)).astype(np.float16))


def test_repo_id_source_resolves_from_the_hub_cache(ckpt_a, tmp_path, capsys, offline_hub, ms_cpu):
    cache, commit = offline_hub(ckpt_a.path, "someorg/tiny-idefics3")
    code, _, err = run(capsys, "someorg/tiny-idefics3", tmp_path / "ms", "--cache-dir", cache)
    assert code == 0, err
    manifest = json.loads((tmp_path / "ms" / "conversion_manifest.json").read_text())
    assert manifest["source"]["location"] == "someorg/tiny-idefics3"
    assert manifest["source"]["directory"].endswith(commit)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("100KB", 10**5), ("2GiB", 2 * 2**30),
                                       ("1.5mb", 1_500_000), ("4096", 4096)])
def test_shard_size_parsing(text, size):
    assert convert.parse_size(text) == size


def test_bad_shard_size_is_a_usage_error(src_a, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main([str(src_a), str(tmp_path / "ms"), "--shard-size", "lots"])
    assert e.value.code == 2 and "not a size like 5GB" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- bad input
def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")


def _truncated(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])


def _header_longer_than_file(d):
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes((len(raw) - 8 + 100).to_bytes(8, "little") + raw[8:])


def _invalid_header_json(d):
    f = d / "model.safetensors"
    header, data = read_safetensors(f)
    raw = json.dumps(header).encode()
    write_safetensors(f, None, data, header_bytes=raw[:-40] + b"#" * 40)


def _edit_header(edit):
    def apply(d):
        f = d / "model.safetensors"
        header, data = read_safetensors(f)
        edit(header)
        write_safetensors(f, header, data)
    return apply


def _set(name, key, value):
    return _edit_header(lambda h: h[name].__setitem__(key, value))


def _offset_past_the_end(h):
    name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [begin + 4096, end + 4096]


def _overlap(h):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
    shift = h[a]["data_offsets"][1] - h[a]["data_offsets"][0]
    h[b]["data_offsets"] = [h[b]["data_offsets"][0] - shift, h[b]["data_offsets"][1] - shift]


def _split_in_two(d, index_edit=None, second_extra=None):
    """Two shards + index; `second_extra` also stores that tensor in shard 2; `index_edit(weight_map)` spoils it."""
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    if second_extra:
        halves["model-00002-of-00002.safetensors"].append(second_extra)
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(d / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if index_edit:
        index_edit(weight_map)
    (d / SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _duplicate_across_shards(d):
    _split_in_two(d, second_extra="lm_head.weight")


def _shard_missing(d):
    _split_in_two(d)
    (d / "model-00002-of-00002.safetensors").unlink()


def _shard_not_in_the_index(d):
    _split_in_two(d, index_edit=lambda wm: [wm.pop(n) for n, f in list(wm.items())
                                             if f == "model-00002-of-00002.safetensors"])


def _tensor_the_index_maps_elsewhere(d):
    _split_in_two(d, index_edit=lambda wm: wm.__setitem__(sorted(wm)[-1], "model-00001-of-00002.safetensors"))


def _index_lists_an_absent_tensor(d):
    _split_in_two(d, index_edit=lambda wm: wm.__setitem__("model.extra.weight", "model-00001-of-00002.safetensors"))


def _not_idefics3(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(cfg))


def _wrong_shape(d):
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.text_model.norm.weight"] = tensors["model.text_model.norm.weight"][:-1].copy()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _beyond_fp16(d):
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.text_model.norm.weight"][3] = 1e5
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


BAD_INPUTS = {
    "pickle_weights": (_pickle_only, "pickle weights.*safetensors"),
    "truncated_file": (_truncated, "out of range.*truncated or corrupt"),
    "header_longer_than_file": (_header_longer_than_file, "header length field says .* but only .* follow"),
    "invalid_header_json": (_invalid_header_json, "header cannot be parsed as JSON"),
    "unknown_dtype": (_set("lm_head.weight", "dtype", "Q4"), "'lm_head.weight' has unknown dtype 'Q4'"),
    "unsupported_dtype": (_set("lm_head.weight", "dtype", "I32"), "dtype I32; only F32, F16 and BF16"),
    "offsets_out_of_range": (_edit_header(_offset_past_the_end), r"data_offsets \[\d+, \d+\] are out of range"),
    "offsets_overlap": (_edit_header(_overlap), "overlaps the previous tensor"),
    "offsets_disagree_with_shape": (_set("lm_head.weight", "shape", [300, 63]), "span .* bytes but F32 .* needs"),
    "duplicate_keys_across_shards": (_duplicate_across_shards, "'lm_head.weight' is stored twice"),
    "shard_missing": (_shard_missing, "listed in model.safetensors.index.json are missing: model-00002"),
    "shard_not_in_the_index": (_shard_not_in_the_index, "model-00002-of-00002.safetensors is in the directory but "
                                                        "not in model.safetensors.index.json"),
    "tensor_the_index_maps_elsewhere": (_tensor_the_index_maps_elsewhere,
                                        "model-00002-of-00002.safetensors holds tensors the index maps elsewhere"),
    "index_lists_an_absent_tensor": (_index_lists_an_absent_tensor, "lists tensors that its shards do not hold"),
    "not_an_idefics3_config": (_not_idefics3, "model_type 'llava', expected 'idefics3'"),
    "checkpoint_does_not_match_config": (_wrong_shape, "does not match the model config.*norm.weight"),
    "values_beyond_fp16": (_beyond_fp16, "norm.weight: 1 value.* exceed fp16's range.*bf16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error_exit_2_and_no_dst(case, ckpt_a, tmp_path, capsys, ms_cpu):
    breaker, message = BAD_INPUTS[case]
    src = tmp_path / "src"
    shutil.copytree(ckpt_a.path, src)
    breaker(src)
    dst = tmp_path / "out" / "ms"
    code, out, err = run(capsys, src, dst, "--dtype", "fp16")
    assert code == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("idefics3-convert: error: ")
    assert re.search(message, err), err
    assert not dst.exists() and not siblings(dst)


def test_bad_input_leaves_an_existing_dst_untouched_even_with_force(ckpt_a, tmp_path, capsys, ms_cpu):
    src = tmp_path / "src"
    shutil.copytree(ckpt_a.path, src)
    _truncated(src)
    dst = tmp_path / "ms"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    code, _, err = run(capsys, src, dst, "--force")
    assert code == 2 and "truncated" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and not siblings(dst)


def test_the_loader_reports_the_same_header_errors(ckpt_a, tmp_path, ms_cpu):
    shutil.copytree(ckpt_a.path, tmp_path / "src")
    _edit_header(_offset_past_the_end)(tmp_path / "src")
    with pytest.raises(Idefics3Error, match="are out of range"):
        Model.from_pretrained(tmp_path / "src", progress=False)


def test_missing_source_directory(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nope", tmp_path / "ms")
    assert code == 2 and "no such directory" in err and not (tmp_path / "ms").exists()


# ----------------------------------------------------------------------------------------------- atomicity
def test_existing_dst_needs_force_and_force_replaces_it(src_a, tmp_path, capsys, ms_cpu):
    dst = tmp_path / "ms"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    code, _, err = run(capsys, src_a, dst)
    assert code == 2 and "already exists; pass --force" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    code, _, err = run(capsys, src_a, dst, "--force")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / SAFE_INDEX).exists() and not siblings(dst)


def test_dst_cannot_be_the_source(src_a, capsys):
    code, _, err = run(capsys, src_a, src_a, "--force")
    assert code == 2 and "is the source directory" in err
    assert (src_a / "model.safetensors").exists()


def test_verification_failure_names_the_tensor_and_leaves_no_dst(src_a, tmp_path, capsys, monkeypatch, ms_cpu):
    write_shard = convert.write_shard

    def corrupting(path, shard, *args):
        write_shard(path, shard, *args)
        victim = next(t for t in shard.tensors if t.name == "model.text_model.norm.weight")
        offset = convert.safetensors_header(shard.tensors, "bf16", args[2]).__len__()
        offset += sum(t.nbytes for t in shard.tensors[: shard.tensors.index(victim)])
        with open(path, "r+b") as f:
            f.seek(offset + 6)
            f.write(b"\xff")

    monkeypatch.setattr(convert, "write_shard", corrupting)
    dst = tmp_path / "ms"
    code, _, err = run(capsys, src_a, dst, "--dtype", "bf16")
    assert code == 1
    assert "verification failed" in err and "model.text_model.norm.weight: 1 of 64 values differ" in err
    assert not dst.exists() and not siblings(dst)
    monkeypatch.setattr(convert, "write_shard", write_shard)
    assert run(capsys, src_a, dst, "--dtype", "bf16", "--no-verify")[0] == 0
    assert json.loads((dst / "conversion_manifest.json").read_text())["verified"] is False


def test_not_enough_space_is_refused_up_front_and_a_full_disk_leaves_no_dst(src_a, tmp_path, capsys, monkeypatch,
                                                                           ms_cpu):
    dst = tmp_path / "ms"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    code, _, err = run(capsys, src_a, dst)
    assert code == 2 and "has 1.00 kB free; the converted checkpoint needs 252.29 kB" in err
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    monkeypatch.setattr(convert, "write_shard", fail_writing(OSError(28, "No space left on device")))
    code, _, err = run(capsys, src_a, dst)
    assert code == 1 and "No space left on device" in err and f"{dst} was left as it was" in err
    assert not dst.exists() and not siblings(dst)


@pytest.mark.parametrize("failure, code", [("no space", 2), ("disk full", 1), ("ctrl-c", 130)])
def test_a_failed_conversion_removes_the_parent_directories_it_created(failure, code, src_a, tmp_path, capsys,
                                                                        monkeypatch, ms_cpu):
    (tmp_path / "existing").mkdir()
    dst = tmp_path / "existing" / "new" / "deeper" / "ms"
    if failure == "no space":
        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    else:
        error = OSError(28, "No space left on device") if failure == "disk full" else KeyboardInterrupt()
        monkeypatch.setattr(convert, "write_shard", fail_writing(error))
    assert run(capsys, src_a, dst)[0] == code
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


def test_a_created_parent_that_received_other_files_meanwhile_is_kept(src_a, tmp_path, capsys, monkeypatch, ms_cpu):
    dst = tmp_path / "new" / "deeper" / "ms"

    def write_shard(path, *args):
        (tmp_path / "new" / "someone else's file").write_text("kept")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "write_shard", write_shard)
    assert run(capsys, src_a, dst)[0] == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "someone else's file"]


# The real CLI, with every chunk slowed down so that a signal lands mid-conversion.
SLOW_CLI = """
import sys, time
from mindone_idefics3 import convert
cast_chunks = convert.cast_chunks
def slow(*args, **kwargs):
    for chunk in cast_chunks(*args, **kwargs):
        time.sleep(0.2)
        yield chunk
convert.cast_chunks = slow
sys.exit(convert.main(sys.argv[1:]))
"""


def start_and_signal(src, dst, sig, *extra):
    """Start a slowed conversion, wait until a shard is being written, send `sig`; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(src), str(dst), "--dtype", "fp16", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(f.stat().st_size > 0 for f in dst.parent.glob(f".{dst.name}.partial-*/model-*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_conversion_leaves_no_dst_and_no_temporary_files(sig, code, src_a, tmp_path):
    dst = tmp_path / "ms"
    returncode, err = start_and_signal(src_a, dst, sig)
    assert returncode == code and f"{dst} was left as it was" in err
    assert not dst.exists() and not siblings(dst)


def test_killed_conversion_leaves_no_dst_and_the_next_run_cleans_up(src_a, tmp_path, capsys, ms_cpu):
    dst = tmp_path / "ms"
    returncode, _ = start_and_signal(src_a, dst, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert not dst.exists()
    (partial,) = siblings(dst)  # SIGKILL cannot be cleaned up after, but it is hidden and named for its process
    assert partial.startswith(f".ms.partial-{socket.gethostname()}-")
    code, _, err = run(capsys, src_a, dst)
    assert code == 0 and f"removing {dst.parent / partial}, left by an interrupted conversion" in err
    assert dst.exists() and not siblings(dst)


def test_interrupted_forced_conversion_keeps_the_old_dst(src_a, tmp_path, capsys, ms_cpu):
    dst = tmp_path / "ms"
    assert run(capsys, src_a, dst, "--dtype", "bf16")[0] == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    returncode, _ = start_and_signal(src_a, dst, signal.SIGTERM, "--force")
    assert returncode == 143
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before and not siblings(dst)


# ----------------------------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_tensor_size(tmp_path):
    """A 1.1 GB fp32 embedding converts to fp16 with a few tens of MB above the interpreter's own footprint."""
    from conftest import SHAPES  # tiny everything except the vocabulary

    import transformers

    spec = json.loads(json.dumps(SHAPES["b"]))
    spec["text_config"]["vocab_size"] = 6_000_000  # × 48 × 4 bytes = 1.15 GB, tied
    hf_cfg = transformers.Idefics3Config(image_token_id=290, pad_token_id=0, **spec)
    src = tmp_path / "big"
    src.mkdir()
    hf_cfg.to_json_file(str(src / "config.json"))
    with safe_open(str(_tiny_b(tmp_path) / "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.text_model.embed_tokens.weight"] = np.random.default_rng(0).standard_normal(
        (6_000_000, 48), dtype=np.float32)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    baseline = subprocess.run([sys.executable, "-c", "from mindone_idefics3 import convert, process; "
                               "from mindone_idefics3.model import idefics3; print(process.peak_rss_bytes())"],
                              cwd=ROOT, capture_output=True, text=True, check=True)
    proc = subprocess.run([sys.executable, "-m", "mindone_idefics3.convert", str(src), str(tmp_path / "ms"),
                           "--dtype", "fp16", "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak = convert.parse_size(proc.stdout.split("peak RSS ")[1].split(" →")[0].replace(" ", ""))
    assert peak - int(baseline.stdout) < 150e6, (peak, baseline.stdout)


def _tiny_b(tmp_path):
    from conftest import write_reference_checkpoint

    path = tmp_path / "tiny_b"
    write_reference_checkpoint(path, "b", seed=1)
    return path
