"""Reporting: markdown tables, JSON written atomically, and matplotlib when it is installed (the `plot` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Tuple

from mindone_idefics3.files import write_json_atomically


def fmt(value, digits: int = 2) -> str:
    """A table cell: None → —, bools → yes/NO, floats with `digits` decimals."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(columns: Sequence[Tuple[str, str]], rows: Iterable[Sequence]) -> list:
    """Markdown lines. columns: (title, alignment) with alignment "c" (centred) or "r" (right); rows: cell values
    (strings are kept, other values go through fmt)."""
    align = {"c": ":---:", "r": "---:", "l": ":---"}
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "| " + " | ".join(align[a] for _, a in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(cell if isinstance(cell, str) else fmt(cell) for cell in row) + " |")
    return lines


def write_json(path: Path, data) -> None:
    """Write `data` as indented JSON, atomically (its folder created first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, data)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
