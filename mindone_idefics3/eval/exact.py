"""Normalised exact match: equal after lower-casing, collapsing whitespace and dropping a trailing period."""
from __future__ import annotations

from typing import Sequence


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in answers))
