"""Where a checkpoint's files are: a local directory as is, or a Hugging Face repo id fetched with huggingface_hub.

No MindSpore here: the processor uses it too. Downloads resume, land in huggingface_hub's cache (`HF_HOME`), and
`HF_HUB_OFFLINE=1` means the cache only; a repo that cannot be had is one error saying how to pass a local
directory instead.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Union

from .errors import Idefics3Error

# A whole model directory: config, weights, processor, tokenizer, chat template, generation config.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
# What the processor needs (config.json for image_seq_len): no weights.
PROCESSOR_FILES = ["preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                   "chat_template.jinja", "config.json"]


def looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/"))


def resolve_model_dir(path_or_repo: Union[str, os.PathLike], *, cache_dir: Optional[str] = None,
                      revision: Optional[str] = None, allow_patterns: Optional[List[str]] = None) -> Path:
    """A local directory as is; a hub repo id downloaded (or found in the cache): the files of `allow_patterns`
    (default: the whole model)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Idefics3Error(f"{path} is a file; pass the model directory that holds config.json")
    name = str(path_or_repo)
    if not looks_like_repo_id(name):
        raise Idefics3Error(f"{name}: no such directory, and not a Hugging Face repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=allow_patterns or MODEL_FILES))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached (no network?)"
        raise Idefics3Error(f"cannot download {name!r}: {why} and it is not in the local cache; download it on a "
                            f"machine with network (`huggingface-cli download {name} --local-dir DIR`) and pass "
                            "the local directory DIR instead") from None
    except HfHubHTTPError as e:
        raise Idefics3Error(f"cannot download {name!r} from the Hugging Face hub: {str(e).splitlines()[0]}; "
                            "check the repo id (and `huggingface-cli login` for gated repos) or pass a local "
                            "directory") from None
    except OSError as e:  # connection errors surface as OSError subclasses
        raise Idefics3Error(f"cannot download {name!r}: {e}; pass a local directory instead") from None
