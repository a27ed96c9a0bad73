"""CIDEr-D against the COCO caption toolkit's own scorer (pycocoevalcap, a test dependency) fed the same
pre-tokenised captions; exact match and VQA soft accuracy on hand-made cases."""

import math

import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer  # the [test] extra installs it

from dyrate_ref.tools.metrics import (CiderD, bootstrap_cider_difference, caption_words, exact_match, normalise_answer,
                                      vqa_accuracy)


def toolkit(candidates: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    scorer = CiderScorer(n=4, sigma=6.0)
    for c, refs in zip(candidates, references):
        scorer += (c, refs)
    score, scores = scorer.compute_score()
    return float(score), [float(x) for x in scores]


def ours(candidates: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    c = CiderD([[r.split() for r in refs] for refs in references])
    return c.corpus([x.split() for x in candidates])


SETS = {
    "several references": (
        ["a red circle at the top", "two shapes a blue square and a green star", "a yellow triangle"],
        [["a red circle at the top", "there is a red circle in the top"],
         ["two shapes a blue square at the left and a green star", "a blue square and a green star"],
         ["one shape a yellow triangle at the bottom", "a yellow triangle", "the picture shows a triangle"]]),
    "identical captions": (
        ["a red circle", "a blue square at the left", "two green stars"],
        [["a red circle"], ["a blue square at the left"], ["two green stars"]]),
    "empty candidates": (
        ["", "a blue square", ""],
        [["a red circle at the top"], ["a blue square"], ["a green star", "one green star"]]),
    "single reference each": (
        ["a man riding a horse on a beach", "a plate of food with broccoli", "a cat on a couch", "a dog"],
        [["a man rides a horse along the beach"], ["a plate with broccoli and rice"],
         ["a cat sleeping on a red couch"], ["a brown dog running in the grass"]]),
    "long against short (length penalty)": (
        ["a red circle a red circle a red circle a red circle a red circle a red circle", "a cat"],
        [["a red circle"], ["a cat sitting on the mat next to a dog"]]),
}


@pytest.mark.parametrize("name", SETS)
def test_cider_d_equals_the_coco_toolkit(name):
    candidates, references = SETS[name]
    want, want_each = toolkit(candidates, references)
    got, got_each = ours(candidates, references)
    assert got == pytest.approx(want, abs=1e-6)
    assert got_each == pytest.approx(want_each, abs=1e-6)


def test_cider_d_sanity():
    # Identical captions score high but not 10: the idf of n-grams shared across images is low.
    got, each = ours(*SETS["identical captions"])
    assert all(x > 0 for x in each)
    # An empty candidate scores 0, and a single image has idf log(1) - log(1) = 0 for every n-gram.
    assert ours(*SETS["empty candidates"])[1][0] == 0.0
    assert ours(["a red circle"], [["a red circle"]])[0] == 0.0


def test_caption_words_strip_punctuation_and_case():
    assert caption_words("A red Circle, at the top-left!") == ["a", "red", "circle", "at", "the", "top", "left"]
    assert caption_words("  ") == []


def test_bootstrap_difference_of_identical_methods_is_zero_and_a_real_gap_is_seen():
    candidates, references = SETS["several references"]
    refs = [[caption_words(r) for r in rs] for rs in references * 20]
    base = [caption_words(c) for c in candidates * 20]
    d, se = bootstrap_cider_difference(refs, base, base, reps=50)
    assert d == 0.0 and se == 0.0
    worse = [w[:i % 4 + 1] for i, w in enumerate(base)]
    d, se = bootstrap_cider_difference(refs, base, worse, reps=2000)
    full = CiderD(refs)
    a, b = full.corpus(base), full.corpus(worse)
    assert d == pytest.approx(b[0] - a[0])
    # The bootstrap's SE of a mean of per-image differences approaches the textbook one, sd / sqrt(n).
    diffs = [y - x for x, y in zip(a[1], b[1])]
    n, mu = len(diffs), sum(diffs) / len(diffs)
    analytic = math.sqrt(sum((x - mu) ** 2 for x in diffs) / (n - 1) / n)
    assert d < 0 and se == pytest.approx(analytic, rel=0.1)


@pytest.mark.parametrize("prediction, answer, want", [
    ("Two.", "2", 1.0), ("two", "two", 1.0), ("The red one", "red one", 1.0), ("Yes", "yes", 1.0),
    ("yes.", "no", 0.0), ("red", "red circle", 0.0), ("top left", "top-left", 1.0),
])
def test_exact_match(prediction, answer, want):
    assert exact_match(prediction, answer) == want


def test_vqa_soft_accuracy_leave_one_out():
    # Ten human answers; the official accuracy averages min(1, matches among the other 9 / 3).
    for matches, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * matches + ["dog"] * (10 - matches)
        assert vqa_accuracy("Cat", answers) == pytest.approx(want)
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert normalise_answer("An Apple!") == "apple"
