"""Relaxed accuracy, ChartQA's metric (from the paper, "within 5% of the gold answer" for numbers, as Pix2Struct's
evaluation implements it).

An answer that parses as a number (a trailing % divides it by 100) is right when its relative error against a
numeric, non-zero reference is at most 5%; otherwise the strings must be equal ignoring case and surrounding
whitespace. The score of a question is the best over its reference answers.
"""
from __future__ import annotations

from typing import Optional, Sequence

MAX_RELATIVE_ERROR = 0.05


def as_number(text: str) -> Optional[float]:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, answer: str) -> bool:
    p, a = as_number(prediction), as_number(answer)
    if p is not None and a:  # a reference of 0 has no relative error: compared as text
        return abs(p - a) / abs(a) <= MAX_RELATIVE_ERROR
    return prediction.strip().lower() == answer.strip().lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    return float(any(relaxed_match(prediction, a) for a in answers))
