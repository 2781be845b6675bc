"""From per-question scores to what is reported: the mean in percent, a 95% bootstrap interval, per category."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def percent(scores: Sequence[float]) -> float:
    return 100.0 * float(np.mean(scores)) if len(scores) else float("nan")


def bootstrap_ci95(scores: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Tuple[float, float]:
    """2.5th and 97.5th percentiles (in percent) of the mean over `samples` resamplings of the questions with
    replacement (seeded: the same scores always give the same interval)."""
    values = np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return 100.0 * float(low), 100.0 * float(high)


def by_category(scores: Sequence[float], categories: Sequence[Optional[str]]) -> Dict[str, Dict[str, float]]:
    """{category: {"score": percent, "n": count}} for the questions that have a category, sorted by name."""
    groups: Dict[str, List[float]] = defaultdict(list)
    for score, category in zip(scores, categories):
        if category is not None:
            groups[category].append(score)
    return {name: {"score": round(percent(values), 2), "n": len(values)} for name, values in sorted(groups.items())}


def table(result: dict) -> str:
    """The printed report: the headline, what counted as wrong, and the per-category table."""
    low, high = result["ci95"]
    lines = [f"{result['metric']}: {result['score']:.2f}  (n = {result['n']}, 95% bootstrap CI "
             f"{low:.2f}-{high:.2f})"]
    if result["errors"]:
        lines.append(f"{result['errors']} predictions are error records: counted as wrong")
    if result["missing"]:
        lines.append(f"{result['missing']} references have no prediction: counted as wrong")
    if result["unparsed"]:
        lines.append(f"{result['unparsed']} answers name no option: counted as wrong")
    if result["by_category"]:
        width = max(len("category"), *(len(c) for c in result["by_category"]))
        lines += ["", f"| {'category':<{width}} | {'n':>6} | {'score':>6} |", f"| {'-' * width} | -----: | -----: |"]
        lines += [f"| {name:<{width}} | {row['n']:>6} | {row['score']:>6.2f} |"
                  for name, row in result["by_category"].items()]
    return "\n".join(lines)
