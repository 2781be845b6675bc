"""Whether another process on this host still runs (a converter's partial output, an msrun rank)."""
from __future__ import annotations

import os


def is_alive(pid: int) -> bool:
    """True while `pid` runs; an exited child its parent has not reaped yet (a zombie) counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: kill(pid, 0) is all there is to know
