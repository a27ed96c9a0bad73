"""The README's figures about the tree stay true: each file's "~N lines", the totals of core, demo and
tools, and tests, and every file a doc links to or shows."""

import glob
import json
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
    sentence = (r"About ([\d,]+) lines of core library code \(the reader's core — model, generation, pruning, predictor "
                r"— about ([\d,]+)\), ([\d,]+) more for the demo world and the measuring tools, ([\d,]+) of tests")
    m = re.search(sentence.replace(" ", r"\s+"), readme())
    assert m, "the README's line-count sentence changed: update this test with it"
    core, reader, demo_tools, tests = (int(g.replace(",", "")) for g in m.groups())
    assert near(core, lines("dyrate_ref/*.py")), (core, lines("dyrate_ref/*.py"))
    actual = sum(lines(f"dyrate_ref/{name}.py") for name in ("model", "generation", "pruning", "predictor"))
    assert near(reader, actual), (reader, actual)
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


# ----------------------------------------------------------------------------------------------------
# Measured figures in the prose are read from the JSON the tool wrote. A figure is written with its
# source beside it, invisible on the rendered page: 97.8<!--evaluation.json:none|em|%--> (a row's
# field, x100), 0.712<!--evaluation.json:$main_comparison/DyRate predictor/lm_flops_forced--> (a path).

MARK = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*<!--([\w.]+\.json):(.+?)-->")
MARKED_DOCS = ["docs/evaluation.md", "docs/embedded_model.md", "docs/pruning.md", "docs/benchmarks.md", "docs/your_data.md",
               "README.md"]


def figure(data: dict, key: str) -> float:
    parts = key.split("|")
    if parts[0].startswith("$"):
        value = data
        for step in parts[0][1:].split("/"):
            value = value[int(step)] if isinstance(value, list) else value[step]
    else:
        value = next(r for r in data["rows"] if r["method"] == parts[0])[parts[1]]
    return float(value) * (100 if parts[-1] == "%" else 1)


def same_figure(printed: str, value: float) -> bool:
    digits = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10 ** -digits + 1e-9


@pytest.mark.parametrize("doc", MARKED_DOCS)
def test_every_marked_figure_is_the_json_the_tool_wrote(doc):
    text = open(os.path.join(REPO, doc), encoding="utf-8").read()
    cache = {}
    for m in MARK.finditer(text):
        printed, name, key = m.groups()
        if name not in cache:
            with open(os.path.join(REPO, "docs", name), encoding="utf-8") as f:
                cache[name] = json.load(f)
        data = cache[name]
        assert same_figure(printed, figure(data, key)), (doc, m.group(0), figure(data, key))


def test_the_marks_catch_a_wrong_figure():
    data = {"rows": [{"method": "none", "em": 0.978}], "c": {"x": [0.5, 0.25]}}
    assert same_figure("97.8", figure(data, "none|em|%")) and not same_figure("97.9", figure(data, "none|em|%"))
    assert same_figure("0.25", figure(data, "$c/x/1")) and not same_figure("0.4", figure(data, "$c/x/1"))


def prose(doc: str) -> list[str]:
    """The doc's lines outside tables and code blocks."""
    out, code = [], False
    for line in open(os.path.join(REPO, doc), encoding="utf-8"):
        if line.startswith("```"):
            code = not code
        elif not code and not line.lstrip().startswith("|"):
            out.append(line)
    return out


def test_evaluation_md_quotes_no_unmarked_measurement_and_its_tables_are_the_tools_printout():
    """docs/evaluation.md: every figure in its prose with three or more decimals (settings such as R = 0.25
    have fewer), or a percentage with a decimal, carries its source mark; every table row is a line the tool printed (evaluation.txt,
    validation.txt, premise.txt, targets.txt, look_after.txt, and this round's evaluation_best.txt, validation_best.txt,
    attention_location.txt)."""
    unmarked = [m.group(0) for line in prose("docs/evaluation.md")
                for m in re.finditer(r"[-+]?\d+\.\d{3,}(?!\d|\s*<!--)|[-+]?\d+\.\d\s?%", line)
                if not re.match(r"\s*<!--", line[m.end():]) and "<!--" not in m.group(0)]
    assert not unmarked, unmarked
    printed = "".join(open(os.path.join(REPO, "docs", f), encoding="utf-8").read()
                      for f in ("evaluation.txt", "validation.txt", "premise.txt", "targets.txt", "look_after.txt",
                                "evaluation_best.txt", "validation_best.txt", "attention_location.txt"))
    rows = [line.rstrip("\n") for line in open(os.path.join(REPO, "docs", "evaluation.md"), encoding="utf-8")
            if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| answers")]
    missing = [r for r in rows if r not in printed]
    assert not missing, missing[:3]


def test_your_data_pages_table_is_the_tools_printout():
    """docs/your_data.md's table rows are lines of the evaluation it shows (cider_evaluation.txt)."""
    printed = open(os.path.join(REPO, "docs", "cider_evaluation.txt"), encoding="utf-8").read().splitlines()
    rows = [line.rstrip("\n") for line in open(os.path.join(REPO, "docs", "your_data.md"), encoding="utf-8")
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows and all(r in printed for r in rows), [r for r in rows if r not in printed][:3]
