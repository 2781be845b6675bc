"""Reading parameters from safetensors: positioned reads into the parameter's own buffer, every stored dtype into
every model dtype, fused projections concatenated in order (weights.read_parameter)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore.common.np_dtype import bfloat16
from safetensors.numpy import save_file

from mindone_idefics3.weights import CheckpointReader, read_parameter

STORED = {"f32": np.float32, "f16": np.float16, "bf16": bfloat16}


@pytest.mark.parametrize("target", [ms.float32, ms.float16])
def test_read_parameter_every_stored_dtype_and_fused_order(tmp_path, target):
    rng = np.random.default_rng(0)
    parts = {f"l.{n}_proj.weight": rng.standard_normal((3 + i, 5)).astype(np.float32) for i, n in enumerate("qkv")}
    stored = {}
    for (name, value), kind in zip(parts.items(), STORED):  # one part per stored dtype
        stored[name] = value.astype(STORED[kind])
    stored["scalar"] = np.array(2.5, np.float32)
    save_file(stored, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    np_target = np.float32 if target == ms.float32 else np.float16
    got = read_parameter(reader, tuple(parts), target)
    want = np.concatenate([v.astype(np.float32) for v in stored.values() if v.ndim == 2]).astype(np_target)
    assert got.dtype == np_target and got.shape == (12, 5) and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # bitwise, rounding included
    assert read_parameter(reader, ("scalar",), target).shape == ()
    reader.close()


LOAD_PEAK = """
import sys, resource
import mindspore
from mindone_idefics3 import Idefics3ForConditionalGeneration
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
Idefics3ForConditionalGeneration.from_pretrained(sys.argv[1], dtype=sys.argv[2], progress=False)
print(status("VmHWM") - base)
"""


@pytest.mark.parametrize("stored", [np.float32, np.float16], ids=["fp32-stored", "fp16-stored"])
def test_loading_peaks_at_the_weights_not_twice_them(tmp_path, stored):
    """Fresh process: the resident peak of from_pretrained stays near the loaded weights' size (it was 2×: a
    memory-mapped read kept the file's pages resident next to the copies)."""
    import subprocess
    import sys

    from mindone_idefics3.demo import weight_shapes, write_random_checkpoint

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                  model_type="idefics3_vision")
    text = dict(model_type="llama", vocab_size=50000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    write_random_checkpoint(tmp_path, vision, text, 2, 3, dtype=stored)
    loaded_mb = sum(int(np.prod(s)) for s in weight_shapes(vision, text, 2).values()) * 4 / 2**20  # as fp32
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path), "fp32"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = float(out.stdout.strip().splitlines()[-1])
    assert loaded_mb > 400
    assert peak < 1.25 * loaded_mb, f"loading {loaded_mb:.0f} MB of weights peaked {peak:.0f} MB above baseline"
