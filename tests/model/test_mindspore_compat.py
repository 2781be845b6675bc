"""The supported MindSpore range: refused outside it at import, and the installed release offers the APIs the code
calls with the arguments it passes (the compatibility job of .ci/run runs this on the oldest supported release)."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import pytest

from mindone_idefics3.compat import UnsupportedMindSpore, check_mindspore, installed_mindspore_version, supported
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.version import MINDSPORE_REQUIRES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("version", ["2.7.0", "2.7.1", "2.7.2", "2.8.0", "2.9.0", "2.10.0", "2.10.3"])
def test_releases_in_the_range_are_supported(version):
    assert supported(version)
    assert check_mindspore(version) == version


@pytest.mark.parametrize("version", ["2.6.0", "2.7.0rc1", "2.11.0", "2.11.0rc1", "3.0.0", "1.10.1", "nightly"])
def test_releases_outside_the_range_are_one_clear_error(version):
    with pytest.raises(UnsupportedMindSpore) as info:
        check_mindspore(version)
    message = str(info.value)
    assert f"mindspore{MINDSPORE_REQUIRES}" in message and version in message
    # Catchable both as the package's error and as the import error it is when raised by `import mindone_idefics3`.
    assert isinstance(info.value, Idefics3Error) and isinstance(info.value, ImportError)


def test_the_installed_release_is_read_without_importing_it():
    assert installed_mindspore_version() == ms.__version__
    assert supported(ms.__version__)


def _import_with_mindspore(tmp_path: Path, version_file: str = None) -> subprocess.CompletedProcess:
    """`import mindone_idefics3` in a fresh interpreter that finds a stand-in `mindspore` package first."""
    fake = tmp_path / "mindspore"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('the stand-in mindspore must not be imported')\n")
    if version_file is not None:
        (fake / "version.py").write_text(version_file)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", "import mindone_idefics3"], env=env, capture_output=True, text=True,
                          timeout=120)


def test_importing_the_package_with_an_unsupported_mindspore_fails_naming_the_range(tmp_path):
    result = _import_with_mindspore(tmp_path, "__version__ = '2.6.0'\n")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mindone_idefics3.compat.UnsupportedMindSpore:"), result.stderr
    assert "2.6.0" in last and f"mindspore{MINDSPORE_REQUIRES}" in last


def test_importing_the_package_with_a_supported_mindspore_passes(tmp_path):
    result = _import_with_mindspore(tmp_path, "__version__ = '2.7.1'\n")
    assert result.returncode == 0, result.stderr


def test_a_mindspore_without_a_version_is_refused(tmp_path):
    result = _import_with_mindspore(tmp_path)
    assert result.returncode != 0 and "no MindSpore is installed" in result.stderr


def _parameters(fn):
    return inspect.signature(fn).parameters


def test_the_ascend_kernels_take_the_arguments_the_seam_passes():
    """ops/kernels.py imports these from mindspore.ops and ops/attention.py, norms.py, rope.py, llama.py call them
    with these arguments: an installed release that renamed one would fail only on an NPU."""
    from mindone_idefics3.ops import kernels

    fa = _parameters(kernels.flash_attention_score)
    assert list(fa)[:4] == ["query", "key", "value", "head_num"]
    assert {"attn_mask", "scalar_value", "input_layout", "sparse_mode"} <= set(fa)
    fia = _parameters(kernels.fused_infer_attention_score)
    assert list(fia)[:3] == ["query", "key", "value"]
    for name in ("atten_mask", "actual_seq_lengths_kv", "num_heads", "scale", "input_layout", "num_key_value_heads",
                 "inner_precise"):
        assert fia[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    # Called positionally: (x, gamma, eps), (x1, x2, gamma, eps), (x, cos, sin, mode), (input, dim).
    assert list(_parameters(kernels.rms_norm)) == ["x", "gamma", "epsilon"]
    assert list(_parameters(kernels.add_rms_norm)) == ["x1", "x2", "gamma", "epsilon"]
    assert list(_parameters(kernels.rotary_position_embedding)) == ["x", "cos", "sin", "mode"]
    assert list(_parameters(kernels.swiglu)) == ["input", "dim"]


def test_jit_and_device_apis_the_package_uses_exist():
    assert {"capture_mode", "jit_level"} <= set(_parameters(ms.jit))
    assert callable(ms.set_device) and callable(ms.get_current_device)
    assert callable(ms.device_context.ascend.is_available)
    assert callable(ms.device_context.cpu.op_tuning.threads_num)
    from mindspore._c_expression import DeviceManagerConf, RuntimeConf

    assert callable(DeviceManagerConf.get_instance().is_device_enable)
    assert callable(RuntimeConf.get_instance().is_op_threads_num_configured)
