"""`idefics3-eval` / `python -m mindone_idefics3.eval`: score idefics3-batch's answers against references."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..cli_options import run_command
from ..errors import Idefics3Error
from .anls import anls
from .choice import choice_accuracy, extract_choice, options_of
from .exact import exact_match
from .files import read_by_id
from .relaxed import relaxed_accuracy
from .report import bootstrap_ci95, by_category, percent, table
from .vqa import vqa_accuracy

Reference = Dict[str, Any]
METRICS: Dict[str, Callable[[str, Reference], float]] = {
    "anls": lambda answer, ref: anls(answer, ref["answers"]),
    "vqa": lambda answer, ref: vqa_accuracy(answer, ref["answers"]),
    "relaxed": lambda answer, ref: relaxed_accuracy(answer, ref["answers"]),
    "mc": lambda answer, ref: choice_accuracy(answer, ref["answers"], ref["choices"]),
    "exact": lambda answer, ref: exact_match(answer, ref["answers"]),
}

EPILOG = """\
metrics (the score is a percentage; each question scores 0..1):
  anls     DocVQA: best over the answers of 1 - normalised Levenshtein distance, 0 when that is >= 0.5
  vqa      VQAv2 / TextVQA: official answer normalisation; mean over the leave-one-out subsets of the human
           answers of min(matches / 3, 1)
  relaxed  ChartQA: numbers within 5% relative error of the answer, other answers equal ignoring case
  mc       MMMU / MMStar: the option letter read from the free-text answer ("(B)", "B.", "The answer is B",
           an option's text), then exact match; needs "choices" in the references
  exact    normalised exact match (case, whitespace, a trailing period ignored)
references: one JSON object per line, {"id": ..., "answers": ["..."], "choices": [...] (mc), "category": "..."}
predictions: idefics3-batch's output ({"id", "answer", ...}); records with "error", and references without a
  prediction, count as wrong and are reported. Predictions without a reference are ignored (and counted)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idefics3-eval", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Score predictions (idefics3-batch's output) against references with\n"
                                            "a benchmark's metric: prints the score, n, a 95% bootstrap interval and\n"
                                            "a per-category table.")
    p.add_argument("--predictions", required=True, metavar="OUT.jsonl", help="idefics3-batch's output")
    p.add_argument("--references", required=True, metavar="REFS.jsonl", help="the reference answers")
    p.add_argument("--metric", required=True, choices=list(METRICS), help="how a question is scored")
    p.add_argument("--output-json", default=None, metavar="SCORE.json",
                   help='also write {"metric", "score", "n", "ci95": [lo, hi], "by_category": {...}, ...}')
    return p


def evaluate(predictions: Dict[str, dict], references: Dict[str, Reference], metric: str) -> Dict[str, Any]:
    """Score every reference (in file order); see EPILOG for what counts as wrong."""
    score_fn = METRICS[metric]
    scores: List[float] = []
    categories: List[Optional[str]] = []
    errors = missing = unparsed = 0
    for ref in references.values():
        check_reference(ref, metric)
        prediction = predictions.get(json.dumps(ref["id"]))
        if prediction is None or "error" in prediction or not isinstance(prediction.get("answer"), str):
            missing += prediction is None
            errors += prediction is not None
            scores.append(0.0)
        else:
            answer = prediction["answer"]
            if metric == "mc" and extract_choice(answer, options_of(ref["choices"])) is None:
                unparsed += 1
            scores.append(score_fn(answer, ref))
        category = ref.get("category")
        categories.append(None if category is None else str(category))
    if not scores:
        raise Idefics3Error("the references file has no rows")
    low, high = bootstrap_ci95(scores)
    return {"metric": metric, "score": round(percent(scores), 2), "n": len(scores),
            "ci95": [round(low, 2), round(high, 2)], "by_category": by_category(scores, categories),
            "errors": errors, "missing": missing, "unparsed": unparsed,
            "ignored_predictions": sum(key not in references for key in predictions)}


def check_reference(ref: Reference, metric: str) -> None:
    where = f"references line {ref['_line']}"
    answers = ref.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise Idefics3Error(f"{where}: \"answers\" must be a non-empty list of strings")
    if metric == "mc":
        choices = ref.get("choices")
        if not isinstance(choices, (list, dict)) or not choices:
            raise Idefics3Error(f"{where}: the mc metric needs \"choices\" (a list of option texts, lettered A, B, "
                                "... in order, or a {letter: text} object)")


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    predictions = read_by_id(Path(args.predictions), "predictions")
    references = read_by_id(Path(args.references), "references")
    result = evaluate(predictions, references, args.metric)
    print(table(result))
    if result["ignored_predictions"]:
        print(f"({result['ignored_predictions']} predictions have no reference: ignored)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
