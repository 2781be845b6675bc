"""The MindSpore releases this package supports, and the one place that decides anything by MindSpore's version.

On Ascend a user cannot pick any MindSpore: the release is tied to the CANN toolkit and driver of the machine
(docs/ascend.md lists them), so the package supports a range (`version.MINDSPORE_REQUIRES`, which setup.py
declares) and refuses at import, with one error naming the range, a MindSpore outside it.

What the package uses of MindSpore was compared across the range — 2.7.0, 2.7.1, 2.8.0, 2.9.0, 2.10.0 — by the
API docs of each release and by `inspect.signature` on each PyPI wheel (tests/model/test_mindspore_compat.py
keeps checking the installed one):
- the Ascend kernels of ops/kernels.py: `flash_attention_score`, `fused_infer_attention_score`, `rms_norm`,
  `add_rms_norm`, `rotary_position_embedding`, `swiglu` — same signatures, layouts, mask polarity and dtypes;
- `mindspore.jit(function, *, capture_mode, jit_level, dynamic, fullgraph, backend)`;
- `set_device`, `device_context.ascend.is_available`, `device_context.cpu.op_tuning.threads_num`, and the
  private `DeviceManagerConf` / `RuntimeConf` checks device.py makes.
None of them differs inside the range, so nothing branches on the version today. The docs announce the first
changes for the releases after it (`rms_norm(input, normalized_shape, weight, eps)` "after 2.9.0", removal of
`rotary_position_embedding` "after 2.9.0", neither done in 2.10.0): a release that makes them gets its branch here
(from `installed_mindspore_version()`), and the range widens only with a test run on it.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional, Tuple

from .errors import Idefics3Error
from .version import MINDSPORE_REQUIRES


class UnsupportedMindSpore(Idefics3Error, ImportError):
    """MindSpore is missing, or its release is outside the supported range."""


def _release(text: str) -> Tuple[Tuple[int, ...], bool]:
    """'2.7.1' → ((2, 7, 1), False); '2.11.0rc1' → ((2, 11, 0), True): the release numbers and whether it is a
    pre-release (or dev build), which comes before the release of the same numbers."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)(.*)$", text)
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    numbers = tuple(int(p) for p in m.group(1).split("."))
    suffix = m.group(2).strip().lower()
    return numbers, bool(re.match(r"[.\-_]?(a|b|c|rc|alpha|beta|pre|preview|dev)", suffix))


def _bounds(spec: str = MINDSPORE_REQUIRES):
    """'>=2.7.0,<2.11' → ((2, 7, 0), (2, 11))."""
    parts = dict(re.match(r"(>=|<)\s*(.+)", p.strip()).groups() for p in spec.split(","))
    return _release(parts[">="])[0], _release(parts["<"])[0]


def _padded(numbers: Tuple[int, ...]) -> Tuple[int, ...]:
    return numbers + (0,) * (3 - len(numbers))


def supported(version: str) -> bool:
    """Whether MindSpore `version` is in the supported range (a pre-release of the lowest release is not)."""
    low, below = _bounds()
    numbers, pre = _release(version)
    numbers = _padded(numbers)
    if numbers == _padded(low) and pre:
        return False
    return _padded(low) <= numbers < _padded(below)


def installed_mindspore_version() -> Optional[str]:
    """The `__version__` of the MindSpore that `import mindspore` would load, read from its version.py without
    importing it (the import takes seconds; any distribution — PyPI, Ascend wheel, dev build — ships that file);
    None when there is none."""
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "version.py"
        if path.is_file():
            m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", path.read_text(encoding="utf-8"))
            if m:
                return m.group(1)
    return None


def check_mindspore(version: Optional[str] = None) -> str:
    """Raise UnsupportedMindSpore unless MindSpore `version` (default: the installed one) is supported; return it."""
    version = installed_mindspore_version() if version is None else version
    wanted = f"mindspore{MINDSPORE_REQUIRES}"
    if version is None:
        raise UnsupportedMindSpore(f"mindone_idefics3 needs {wanted}, and no MindSpore is installed; install the "
                                   "release that matches your CANN (docs/ascend.md), e.g. pip install mindspore==2.7.1")
    try:
        ok = supported(version)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise UnsupportedMindSpore(
            f"mindone_idefics3 supports {wanted}, but MindSpore {version} is installed; install a release in that "
            "range that matches your CANN toolkit and driver (docs/ascend.md lists them), e.g. "
            "pip install mindspore==2.7.1")
    return version

