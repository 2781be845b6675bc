"""Multiple choice (MMMU, MMStar): which option a free-text answer chose, then exact match with the key.

The chosen letter is read the way those benchmarks' parsers read it (MMMU's `parse_multi_choice_response`,
VLMEvalKit's `can_infer` used by MMStar), first rule that finds something wins:
1. a bracketed letter, "(B)"; the last one when there are several (MMMU);
2. an explicit "answer is B" / "Answer: B" / "answer: (B)"; the last one;
3. an answer that starts with a letter followed by punctuation or nothing: "B", "B.", "B)", "B: ...";
4. option letters standing as words once the punctuation . ( ) [ ] , : ; ! * # { } " ' is blanked: the one
   letter found, or the last of several (MMMU; upper case only, so the article "a" is not an option);
5. an option's text inside the answer (case-insensitive): the last one to appear (MMMU), the longer on a tie.
Nothing found is a wrong answer (MMMU would pick an option at random, MMStar would ask a judge model; both make
the score depend on something other than the answer).
"""
from __future__ import annotations

import re
import string
from typing import Dict, Mapping, Optional, Sequence, Union

Choices = Union[Sequence[str], Mapping[str, str]]
BLANKED = re.compile(r"[.()\[\],:;!*#{}\"']")
EXPLICIT = re.compile(r"answer(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\b")
LEADING = re.compile(r"^\W*([A-Z])(?:[.):\]]|\s*$)")


def options_of(choices: Choices) -> Dict[str, str]:
    """{"A": text, ...} from a list (lettered in order) or a {letter: text} mapping."""
    if isinstance(choices, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in choices.items()}
    return {string.ascii_uppercase[i]: str(text) for i, text in enumerate(choices)}


def extract_choice(response: str, options: Mapping[str, str]) -> Optional[str]:
    """The letter the response chose, or None (see the module docstring for the rules)."""
    text = response.strip()
    bracketed = {letter: text.rfind(f"({letter})") for letter in options if f"({letter})" in text}
    if bracketed:
        return max(bracketed, key=bracketed.get)
    explicit = [m.group(1) for m in EXPLICIT.finditer(text) if m.group(1) in options]
    if explicit:
        return explicit[-1]
    leading = LEADING.match(text)
    if leading and leading.group(1) in options:
        return leading.group(1)
    words = [w for w in BLANKED.sub(" ", text).split() if w in options]
    if words:
        return words[-1]
    if len(text) == 1 and text.upper() in options:  # "b"
        return text.upper()
    lowered = text.lower()
    found = {letter: lowered.rfind(option.strip().lower()) for letter, option in options.items()
             if option.strip() and option.strip().lower() in lowered}
    if found:
        return max(found, key=lambda letter: (found[letter], len(options[letter])))
    return None


def answer_key(answers: Sequence[str], options: Mapping[str, str]) -> set:
    """The right letters: each reference answer as a letter, or the letter of the option it spells out."""
    keys = set()
    for answer in answers:
        answer = answer.strip()
        if answer.upper() in options:
            keys.add(answer.upper())
        else:
            keys.update(letter for letter, text in options.items() if text.strip().lower() == answer.lower())
    return keys


def choice_accuracy(prediction: str, answers: Sequence[str], choices: Choices) -> float:
    options = options_of(choices)
    return float(extract_choice(prediction, options) in answer_key(answers, options))
