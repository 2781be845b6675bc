"""The server's logs: one format for all of them (`--log-format text|json`) and the access log, one line per request.

The access log is the logger `mindone_idefics3.serve.access` at INFO whatever `--log-level` says (off with
`--no-access-log`); requests to /health, /ready and /metrics that succeed are logged at DEBUG, so probes every few
seconds do not drown the requests. A line carries the request id (the completion's `id`, also sent back in the
`X-Request-Id` header of every response), method, path, status, client address, and for chat completions the
prompt and completion tokens, time to first token and total seconds. Headers are never logged (the API key is one).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict

ACCESS_LOGGER = "mindone_idefics3.serve.access"
PROBE_PATHS = ("/health", "/ready", "/metrics")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
# the order of the access fields in a text line (the JSON object has them all)
ACCESS_FIELDS = ("status", "client", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s", "total_s",
                 "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the access fields of an access record."""

    def format(self, record: logging.LogRecord) -> str:
        out: Dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                               f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "access", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str = "text", access_log: bool = True) -> None:
    """Root handler on stderr in `fmt`; uvicorn's loggers go through it too (start uvicorn with log_config=None)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    if access_log and level.upper() == "DEBUG":
        access.setLevel(logging.DEBUG)


def log_access(fields: Dict[str, Any]) -> None:
    """One access line: `<request id> "<METHOD> <path>" status=... client=... ...` (fields that are None are left
    out of the text line)."""
    probe = fields.get("path") in PROBE_PATHS and fields.get("status") == 200
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logging.DEBUG if probe else logging.INFO
    if not logger.isEnabledFor(level):
        return
    text = " ".join(f"{k}={_text(fields[k])}" for k in ACCESS_FIELDS if fields.get(k) is not None)
    logger.log(level, '%s "%s %s" %s', fields["request_id"], fields["method"], fields["path"], text,
               extra={"access": fields})


def _text(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
