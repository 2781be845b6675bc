"""Idefics3 / SmolVLM vision-language models in MindSpore.

Public names are imported lazily so that `import mindone_idefics3` stays cheap (MindSpore's import takes seconds)
and the processor can be used without touching the model side. The installed MindSpore's release is checked here
(compat.py) without importing it.
"""
from .compat import check_mindspore
from .version import __version__

# A MindSpore outside the supported range is one clear error here, not a failure deep inside a model call.
check_mindspore()

_LAZY = {
    "ChatSession": "mindone_idefics3.chat",
    "Idefics3Config": "mindone_idefics3.config",
    "Idefics3ForConditionalGeneration": "mindone_idefics3.model.idefics3",
    "Idefics3Processor": "mindone_idefics3.processing.processor",
    "Idefics3Error": "mindone_idefics3.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mindone_idefics3' has no attribute {name!r}")
