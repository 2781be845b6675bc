"""ANLS, DocVQA's metric: Average Normalised Levenshtein Similarity.

For one question: the best, over its reference answers, of 1 - NL where NL is the Levenshtein distance between
the lower-cased, whitespace-stripped strings divided by the longer one's length; a pair whose NL is 0.5 or more
scores 0 (the threshold τ = 0.5: such an answer is taken as wrong, not as half right). Two empty strings score 1.
"""
from __future__ import annotations

from typing import Sequence

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions (each 1) turning a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(prediction: str, answer: str) -> float:
    p, a = prediction.strip().lower(), answer.strip().lower()
    longest = max(len(p), len(a))
    if longest == 0:
        return 1.0
    nl = levenshtein(p, a) / longest
    return 1.0 - nl if nl < THRESHOLD else 0.0


def anls(prediction: str, answers: Sequence[str]) -> float:
    return max(similarity(prediction, a) for a in answers)
