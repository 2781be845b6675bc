"""VQA accuracy (VQAv2, TextVQA) with the answer normalisation of the official VQA evaluation script.

Normalisation of an answer, in the script's order:
1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the text has it next to a
   space, or when the text has a comma between two digits anywhere ("1,000"); otherwise it becomes a space;
   then every period not followed by a digit is deleted (a decimal point stays). The script's period pattern
   also means to look behind for a digit, but its lookbehind is misspelt (`(?!<=\\d)`), so it never does; we
   follow what the script does;
3. lower case, split on whitespace; number words zero..ten (and "none") become digits; the articles a, an,
   the are dropped; known contractions missing their apostrophe get it back ("dont" → "don't"); words are joined
   by single spaces.
The script normalises the prediction fully but the ground truth only in step 2, because VQAv2's annotation files
hold answers normalised already; references taken from other sources (TextVQA, the hub's copies) are raw, so,
as TextVQA's evaluator does, both sides are normalised fully here.

Accuracy of a prediction against the n human answers (10 in VQAv2 and TextVQA): the mean, over the n ways of
leaving one human answer out, of min(matches among the other n - 1 / 3, 1). With a single reference answer
that would always be 0; there the score is 1 for a match, else 0.
"""
from __future__ import annotations

import re
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The script's contractions table, as (without apostrophe → with) pairs. Its entries are kept as published,
# including the capitalised ones (never hit after lower-casing) and "somebody'd" → "somebodyd" (reversed there).
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've |
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've |
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's |
howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd |
itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't |
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've |
neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at |
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's | shouldve should've |
shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd |
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's |
someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll |
someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've |
somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've |
therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll |
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've |
werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's | whered where'd |
wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've | wholl who'll | whos who's |
whove who've | whyll why'll | whyre why're | whys why's | wont won't | wouldve would've | wouldnt wouldn't |
wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll |
yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've |
you'dve you'd've | youll you'll | youre you're | youve you've
"""
CONTRACTIONS = dict(pair.split() for pair in _CONTRACTION_PAIRS.split("|"))


def strip_punctuation(text: str) -> str:
    """Step 2 of the module docstring."""
    delete_all = bool(COMMA_BETWEEN_DIGITS.search(text))
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_words(text: str) -> str:
    """Step 3 of the module docstring."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    return normalize_words(strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    gold = [normalize_answer(a) for a in answers]
    if len(gold) == 1:
        return float(pred == gold[0])
    matches = sum(g == pred for g in gold)
    # leaving out a matching answer leaves matches - 1 among the others, leaving out another leaves matches
    per_subset = [min((matches - (g == pred)) / 3, 1.0) for g in gold]
    return sum(per_subset) / len(per_subset)
