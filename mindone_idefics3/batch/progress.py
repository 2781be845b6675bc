"""What a long run shows on stderr: a progress bar (rows/s, tokens/s, ETA) and one summary line at the end."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Rows and generated tokens of this process's share of the input."""

    def __init__(self, total: int, enabled: bool = True, label: str = "rows"):
        self.start = time.perf_counter()
        self.rows = self.errors = self.tokens = 0
        self.bar = tqdm(total=total, unit="row", desc=label, file=sys.stderr, disable=not enabled or total == 0,
                        dynamic_ncols=True, mininterval=1.0, smoothing=0.1)

    def update(self, records) -> None:
        for record in records:
            self.rows += 1
            self.errors += "error" in record
            self.tokens += record.get("completion_tokens", 0)
        self.bar.update(len(records))
        self.bar.set_postfix_str(f"{self.tokens_per_second:.1f} tokens/s, {self.errors} errors", refresh=False)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def close(self) -> None:
        self.bar.close()
