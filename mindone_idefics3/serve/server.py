"""uvicorn's Server, with signals that end in a graceful shutdown and exit 0."""
from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT uvicorn stops accepting, waits for open requests (timeout_graceful_shutdown), runs the
    app's shutdown (the engine finishes its batch) and returns. uvicorn ≥ 0.29 then re-raises the captured signal,
    which would end the process with -15; this server restores the handlers without re-raising."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)
