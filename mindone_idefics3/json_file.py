"""Reading the JSON files of a checkpoint (config, processor, tokenizer, index): one Idefics3Error per bad file."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import Idefics3Error


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or one Idefics3Error saying what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON, a number too long, nesting too deep
        raise Idefics3Error(f"{path} is not valid JSON ({e}); download or write it again") from None
    except OSError as e:
        raise Idefics3Error(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise Idefics3Error(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data
