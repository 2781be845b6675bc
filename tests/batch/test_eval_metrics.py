"""Each metric of idefics3-eval against cases computed by hand from its benchmark's definition."""
import pytest

from mindone_idefics3.eval.anls import anls, levenshtein
from mindone_idefics3.eval.choice import answer_key, choice_accuracy, extract_choice, options_of
from mindone_idefics3.eval.exact import exact_match
from mindone_idefics3.eval.relaxed import relaxed_accuracy
from mindone_idefics3.eval.vqa import normalize_answer, strip_punctuation, vqa_accuracy


# ------------------------------------------------------------------------------------------------ VQA
@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"),  # number word; final period dropped
    ("the  Cat", "cat"),  # article dropped, case and spaces
    ("an apple", "apple"),
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"),  # manualMap stops at ten
    ("dont", "don't"), ("isnt it", "isn't it"), ("Im", "im"),  # contractions; "Im" is capitalised in the table
    ("1,000", "1000"),  # comma between digits: every listed mark is deleted
    ("1,000 (approx)", "1000 approx"),
    ("yes, sir", "yes sir"),  # comma next to a space: deleted
    ("red,blue", "red blue"),  # comma not next to a space: becomes a space
    ("3.5", "3.5"), ("3.5.", "3.5"), ("end.", "end"), ("e.g", "eg"),  # a period stays only before a digit
    ("A man's hat!", "man's hat"),  # apostrophes are not punctuation here
    ("top-left", "top left"), ("well -known", "well known"),
    ("\tyes\n", "yes"),
    ("(a)", ""),  # the brackets become spaces, then "a" is an article and dropped: the script's behaviour
])
def test_vqa_normalisation_table(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_punctuation_rule_looks_at_the_original_text():
    # "?" is next to a space in the original, so it is deleted; "!" is not, so it becomes a space
    assert strip_punctuation("why ?really!yes") == "why really yes"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_leave_one_out_mean(matches, expected):
    # 10 humans, `matches` of them said "2": leaving out a matching human leaves matches-1 matches, leaving out
    # another leaves matches; each subset scores min(m / 3, 1). 1 match: 9 x 1/3 / 10 = 0.3; 3: (3 x 2/3 + 7) / 10
    answers = ["two"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dog", ["a dog", "the dog", "dog", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]) \
        == pytest.approx(0.9)


def test_vqa_accuracy_with_one_reference_is_a_match():
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0


# ------------------------------------------------------------------------------------------------ ANLS
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("prediction, answers, expected", [
    ("abcd", ["abcd"], 1.0),
    (" ABCD ", ["abcd"], 1.0),  # lower-cased and stripped
    ("abcx", ["abcd"], 0.75),  # NL 1/4
    ("abxy", ["abcd"], 0.0),  # NL 2/4 = 0.5: at the threshold scores 0
    ("abcxy", ["abcde"], pytest.approx(0.6)),  # NL 2/5 = 0.4, just under the threshold: 1 - 0.4
    ("abxyz", ["abcde"], 0.0),  # NL 3/5 = 0.6
    ("abc", ["xyz", "abd"], pytest.approx(2 / 3)),  # best over the answers
    ("", [""], 1.0),
])
def test_anls_cases(prediction, answers, expected):
    assert anls(prediction, answers) == expected


# ------------------------------------------------------------------------------------------------ relaxed
@pytest.mark.parametrize("prediction, answer, right", [
    ("10.4", "10", True), ("10.5", "10", True),  # 5% exactly is within
    ("10.6", "10", False), ("9.5", "10", True), ("9.4", "10", False),
    ("5%", "0.05", True), ("5.2%", "5%", True),
    ("-20", "-19.5", True),
    ("0", "0", True), ("0.0", "0", False),  # a zero reference has no relative error: text comparison
    ("Yes", "yes", True), (" Paris ", "paris", True), ("Lyon", "Paris", False),
    ("1,000", "1000", False),  # not a number for the metric (no comma parsing in the benchmark's code)
])
def test_relaxed_accuracy(prediction, answer, right):
    assert relaxed_accuracy(prediction, [answer]) == float(right)


def test_relaxed_accuracy_takes_the_best_answer():
    assert relaxed_accuracy("12", ["100", "12.3"]) == 1.0


# ------------------------------------------------------------------------------------------------ mc
OPTIONS = options_of(["a cat", "a dog", "a bird", "a fish"])


@pytest.mark.parametrize("response, letter", [
    ("(B)", "B"), ("B", "B"), ("B.", "B"), ("B) a dog", "B"), ("b", "B"), ("**D**", "D"),
    ("The answer is B", "B"), ("Answer: C", "C"), ("answer: (D)", "D"),
    ("B. A dog", "B"),  # the leading letter, not the article "A"
    ("I think (A) is wrong, the answer is (C)", "C"),  # the last bracketed letter
    ("It must be C, not D", "D"),  # several bare letters: the last one (MMMU)
    ("It is a bird.", "C"),  # an option's text
    ("a dog chasing a cat", "A"),  # several option texts: the last one to appear
    ("None of them", None),
])
def test_choice_extraction(response, letter):
    assert extract_choice(response, OPTIONS) == letter


def test_choice_accuracy_and_answer_key():
    assert options_of({"a": "x", "B": "y"}) == {"A": "x", "B": "y"}
    assert answer_key(["b"], OPTIONS) == {"B"} and answer_key(["A Dog"], OPTIONS) == {"B"}
    assert choice_accuracy("The answer is (B).", ["B"], ["a cat", "a dog"]) == 1.0
    assert choice_accuracy("The answer is (A).", ["B"], ["a cat", "a dog"]) == 0.0
    assert choice_accuracy("I cannot tell", ["B"], ["a cat", "a dog"]) == 0.0


# ------------------------------------------------------------------------------------------------ exact
def test_exact_match_normalises_case_spaces_and_a_final_period():
    assert exact_match("  New   York. ", ["new york"]) == 1.0
    assert exact_match("New York City", ["new york"]) == 0.0
    assert exact_match("b", ["a", "B"]) == 1.0
