"""The README's figures about the tree stay true: each file's "~N lines", the totals of core, demo and
tools, and tests, and every file a doc links to or shows."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def lines(pattern: str) -> int:
    return sum(sum(1 for _ in open(p, encoding="utf-8")) for p in glob.glob(os.path.join(REPO, pattern)))


def near(claimed: int, actual: int) -> bool:
    """A round figure: within 10 % (or 50 lines) of the tree."""
    return abs(claimed - actual) <= max(50, 0.1 * actual)


def test_each_files_line_count_in_the_readme_is_near_the_tree():
    found = re.findall(r"`(dyrate_ref/[\w/]+\.py)`\s+\(~([\d,]+)\s+lines", readme())
    assert len(found) >= 2, found
    for path, n in found:
        actual = lines(path)
        assert near(int(n.replace(",", "")), actual), (path, n, actual)


def test_the_readme_totals_are_near_the_tree():
    sentence = (r"About ([\d,]+) lines of core library code, ([\d,]+) more for the demo world and the measuring tools, "
                r"([\d,]+) of tests")
    m = re.search(sentence.replace(" ", r"\s+"), readme())
    assert m, "the README's line-count sentence changed: update this test with it"
    core, demo_tools, tests = (int(g.replace(",", "")) for g in m.groups())
    assert near(core, lines("dyrate_ref/*.py")), (core, lines("dyrate_ref/*.py"))
    actual = lines("dyrate_ref/demo/*.py") + lines("dyrate_ref/tools/*.py")
    assert near(demo_tools, actual), (demo_tools, actual)
    assert near(tests, lines("tests/*.py")), (tests, lines("tests/*.py"))


@pytest.mark.parametrize("doc", ["README.md", "tutorial.md", *sorted(os.path.relpath(p, REPO) for p in
                                                                        glob.glob(os.path.join(REPO, "docs", "*.md")))])
def test_every_linked_or_shown_file_exists(doc):
    text = open(os.path.join(REPO, doc), encoding="utf-8").read()
    base = os.path.dirname(os.path.join(REPO, doc))
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)  # markdown links and images
    local = [t for t in targets if not re.match(r"^[a-z]+://", t)]
    missing = [t for t in local if not os.path.exists(os.path.normpath(os.path.join(base, t)))]
    assert not missing, (doc, missing)


def test_the_v5_figures_in_the_embedded_model_page_are_the_training_logs():
    """The look-stage figures docs/embedded_model.md quotes are the held-out lines of the logs it links."""
    page = open(os.path.join(REPO, "docs", "embedded_model.md"), encoding="utf-8").read()
    for log, steps in (("v5_attempt1_train_log.txt", (2700, 2800, 2900, 3000)),
                       ("v5_candidate_train_log.txt", (2700, 2800, 2900, 3000))):
        text = open(os.path.join(REPO, "docs", log), encoding="utf-8").read()
        blind = [re.search(rf"^heldout {s} .*look_blind ([\d.]+)", text, re.M).group(1) for s in steps]
        assert " / ".join(blind) in page, (log, blind)
    text = open(os.path.join(REPO, "docs", "v5_candidate_train_log.txt"), encoding="utf-8").read()
    last = re.findall(r"^heldout \d+ (.*)$", text, re.M)[-1]
    assert "look 1.000" in last and "look_blind 1.000" in last and "30.8 min in all" in text
    assert "kind_swap_kl 1.10e+01" in last and "kind-swap 1.10e+01" in page
