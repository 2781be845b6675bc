"""Where the processor files are: a local directory as is, or a Hugging Face repo id fetched with huggingface_hub.

Only the processor/tokenizer files (and config.json, for image_seq_len) are downloaded, not the weights.
`HF_HUB_OFFLINE=1` is honoured by huggingface_hub (cache only).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from ..errors import Idefics3Error

PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.json", "chat_template.jinja", "config.json"]


def resolve_processor_dir(path_or_repo: Union[str, os.PathLike], *, revision: Optional[str] = None,
                          cache_dir: Optional[str] = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Idefics3Error(f"{path} is a file; pass the checkpoint directory (with tokenizer.json and "
                            "preprocessor_config.json) or a Hugging Face repo id")
    name = str(path_or_repo)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        raise Idefics3Error(f"{name}: no such directory, and not a Hugging Face repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=PROCESSOR_FILES))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise Idefics3Error(f"{name!r} is not a local directory, and as a Hugging Face repo id it cannot be "
                            f"fetched: {why} and it is not in the local cache; download the repo where there is "
                            f"network (`huggingface-cli download {name} --local-dir DIR`) and pass the local "
                            "directory DIR instead") from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0]
        raise Idefics3Error(f"cannot download {name!r} from the Hugging Face hub ({first_line}); check the repo id "
                            "(gated repos need `huggingface-cli login`) or pass a local directory") from None
    except OSError as e:
        raise Idefics3Error(f"cannot download {name!r} ({e}); pass a local directory with the checkpoint "
                            "files instead") from None
