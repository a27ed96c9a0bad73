"""tools/figures.py: the README's and the tutorial's figures are drawn from data files beside them, and
those files hold what the current weights compute (recomputed here), so a figure cannot outlive its model."""

import json
import os
import re

import pytest

from dyrate_ref.tools import figures

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@pytest.fixture(scope="module")
def fresh():
    return figures.figure_data()


@pytest.mark.parametrize("name", ["attention_mass", "kept_patches"])
def test_the_figures_data_is_what_the_shipped_weights_compute(fresh, name):
    """Tokens and kept sets exactly; attention masses to 1e-5 (the file rounds them to 6 decimals, and
    float32 sums in another thread count move them by ~1e-7)."""
    shipped = json.load(open(os.path.join(DOCS, f"{name}.json")))
    now = fresh[name]
    assert set(shipped) == set(now)
    for key in now:
        if key == "mass":
            assert len(shipped[key]) == len(now[key])
            assert max(abs(a - b) for a, b in zip(shipped[key], now[key])) < 1e-5
        else:
            assert shipped[key] == now[key], key


def test_each_figure_is_shown_with_the_command_that_draws_it():
    readme = open(os.path.join(os.path.dirname(DOCS), "README.md"), encoding="utf-8").read()
    tutorial = open(os.path.join(os.path.dirname(DOCS), "tutorial.md"), encoding="utf-8").read()
    for text, png in ((readme, "docs/attention_mass.png"), (tutorial, "docs/attention_mass.png"),
                      (tutorial, "docs/kept_patches.png")):
        at = text.index(f"({png})")
        assert "python -m dyrate_ref.tools.figures --out docs" in text[at - 600:at + 600], png
    for png in ("attention_mass.png", "kept_patches.png"):
        assert os.path.getmtime(os.path.join(DOCS, png)) >= os.path.getmtime(os.path.join(DOCS, png[:-4] + ".json")) - 5


def test_the_figures_are_never_written_into_the_weights_they_read():
    from dyrate_ref.commands import UserError
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    before = sorted(os.listdir(DEFAULT_WEIGHTS))
    for out in (DEFAULT_WEIGHTS, os.path.join(DEFAULT_WEIGHTS, "examples")):
        with pytest.raises(UserError, match="would overwrite a file of the --weights folder"):
            figures.run(["--out", out])
    assert sorted(os.listdir(DEFAULT_WEIGHTS)) == before


# The evaluation and premise figures plot aggregates over hundreds of items; their JSON keeps, beside the
# aggregates, the per-item records of the first two items (the witnesses), made by the same command. Those
# are recomputed here from the current weights, so a figure drawn from such a file cannot outlive its model.
# Every figure in docs/ is named here with the data file it is drawn from.
FIGURES = {"attention_mass.png": "attention_mass.json", "kept_patches.png": "kept_patches.json",
           "attention_location.png": "attention_location.json",  # tests/test_attention_location.py
           "pareto_best.png": "evaluation_best.json", "attention_over_generation.png": "attention_over_generation.json",
           "premise.png": "premise.json", "cider_pareto.png": "cider_evaluation.json"}


def test_every_figure_in_docs_has_its_data_file_beside_it():
    pngs = sorted(f for f in os.listdir(DOCS) if f.endswith(".png"))
    assert pngs == sorted(FIGURES), "a figure in docs/ without a recomputed data file (or one named here that is gone)"
    for png, data in FIGURES.items():
        assert os.path.exists(os.path.join(DOCS, data)), data


@pytest.fixture(scope="module")
def shipped():
    from dyrate_ref.loading import DEFAULT_WEIGHTS, load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    return model, Processor(DEFAULT_WEIGHTS, model.config)


def assert_records_equal(stored: dict, now: dict, what: str):
    """Answers, kept counts, FLOPs and KV bytes exactly; floats (KL, scores) to 1e-5 relative."""
    assert set(stored) == set(now), (what, set(stored) ^ set(now))
    for key, value in stored.items():
        if isinstance(value, float):
            assert now[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (what, key)
        else:
            assert now[key] == value, (what, key)


def evaluation_rows(data: dict, weights: str):
    """The rows the evaluation ran, rebuilt as evaluate.run builds them from the flags the JSON records;
    a fixed-schedule control takes the schedule the JSON records (the mean over all of its items)."""
    from dataclasses import replace

    from dyrate_ref.loading import read_config
    from dyrate_ref.settings import Context
    from dyrate_ref.tools import evaluate
    cfg = read_config(weights)
    ctx = Context(weights, cfg.text_config.num_hidden_layers, cfg)
    rows = evaluate.table_rows(ctx, data["extra"], data["only_extra"], data["no_control"])
    schedules = {r["method"]: tuple(r["schedule"]) for r in data["rows"] if "schedule" in r}
    return [replace(r, method=replace(r.method, schedule=schedules[r.name])) if r.schedule_of else r for r in rows]


def check_evaluation_witnesses(name: str, items, shipped):
    """Every row's witness records of `name` (docs/) recomputed by evaluate.run_method on the same items."""
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    from dyrate_ref.tools import evaluate
    model, processor = shipped
    data = json.load(open(os.path.join(DOCS, name)))
    witnesses = data["witnesses"]
    rows = evaluation_rows(data, DEFAULT_WEIGHTS)
    assert [r.name for r in rows] == [r["method"] for r in data["rows"]] and set(witnesses) == {r.name for r in rows}
    ids = [r["id"] for r in witnesses[rows[0].name]]
    assert len(ids) == evaluate.WITNESSES
    mine = [next(it for it in items if it.id == i) for i in ids]
    none = witnesses[rows[0].name]
    for row in rows:
        now = evaluate.run_method(model, processor, mine, row, data["max_new_tokens"],
                                  matched=witnesses[row.match] if row.match else None,
                                  none=none if row is not rows[0] else None, is_base=row is rows[0])
        for stored, fresh in zip(witnesses[row.name], now):
            fresh.pop("seconds")
            assert_records_equal(stored, fresh, f"{name}: {row.name}, {fresh['id']}")


def test_the_declared_comparisons_witnesses_are_what_the_current_weights_compute(shipped):
    """pareto_best.png's data (evaluation_best.json: 300 test scenes): every row's records of its first two
    items, the fixed-schedule and random controls included, as the shipped weights and predictor make them."""
    from dyrate_ref.tools.data import scene_items
    check_evaluation_witnesses("evaluation_best.json", scene_items(1, "test"), shipped)


def test_your_data_pages_witnesses_are_what_the_current_weights_compute(shipped, tmp_path):
    """cider_pareto.png's data (cider_evaluation.json): the scenes exported as a data file, as
    docs/your_data.md makes them, then every row's records of the file's first two items."""
    from dyrate_ref.demo.export import export
    from dyrate_ref.tools.data import read_items
    export(str(tmp_path / "yourdata"), 1)
    check_evaluation_witnesses("cider_evaluation.json", read_items(str(tmp_path / "yourdata" / "data.jsonl")), shipped)


def test_the_attention_over_generation_witnesses_are_what_the_current_weights_compute(shipped):
    """attention_over_generation.json: the first two descriptions' per-layer attention mass on the image
    at every answer position, recomputed (to 1e-5: the file rounds to 6 decimals); and the figure's means
    at each position are averages that include them (within the position's range of answers)."""
    from dyrate_ref.tools.data import scene_items
    from dyrate_ref.tools.data import attention_over_generation
    model, processor = shipped
    data = json.load(open(os.path.join(DOCS, "attention_over_generation.json")))
    ids = [w["id"] for w in data["witnesses"]]
    items = [it for it in scene_items(2, "test") if it.id in ids]
    now = attention_over_generation(model, processor, items, max_items=2, min_count=1, witnesses=2)["witnesses"]
    assert [w["id"] for w in now] == ids
    for stored, fresh in zip(data["witnesses"], now):
        assert len(stored["mass"]) == len(fresh["mass"]) == model.config.text_config.num_hidden_layers
        for a, b in zip(stored["mass"], fresh["mass"]):
            assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, stored["id"]
    assert data["counts"][0] == data["answers"] >= len(ids)


def test_the_premise_witnesses_are_what_the_current_weights_compute(shipped):
    """premise.json (premise.png's data: the validation split, K = 3): the first two items' records, every
    (choice, step, fraction) cut teacher-forced and free-running, recomputed by premise.cut_costs."""
    from dyrate_ref.tools.data import scene_items
    from dyrate_ref.tools.premise import WITNESSES, cut_costs
    model, processor = shipped
    data = json.load(open(os.path.join(DOCS, "premise.json")))
    ids = list(dict.fromkeys(r["id"] for r in data["witnesses"]))
    assert len(ids) == WITNESSES
    items = {it.id: it for it in scene_items(1, "validation")}
    now = [r for i in ids for r in cut_costs(model, processor, items[i], data["layer"], data["steps"],
                                             data["fractions"], data["max_new_tokens"], data["choices"])]
    assert len(now) == len(data["witnesses"])
    for stored, fresh in zip(data["witnesses"], now):
        assert_records_equal(stored, fresh, f"premise.json: {fresh['id']} {fresh['choice']} {fresh['step']}")


def sections(text: str) -> list[str]:
    """A markdown text cut at its headings (outside code blocks)."""
    out, code = [[]], False
    for line in text.splitlines():
        code = code != line.startswith("```")
        if line.startswith("#") and not code:
            out.append([])
        out[-1].append(line)
    return ["\n".join(s) for s in out]


def test_every_figure_shown_has_the_command_that_draws_it_in_its_section():
    """Each picture of docs/ that a page shows or links stands in a section that also gives the command
    that draws it (its tool, run as a module), so a reader can make it again."""
    tools = {"attention_mass.png": "dyrate_ref.tools.figures", "kept_patches.png": "dyrate_ref.tools.figures",
             "attention_location.png": "dyrate_ref.tools.attention_location",
             "pareto_best.png": "dyrate_ref.tools.evaluate", "attention_over_generation.png": "dyrate_ref.tools.evaluate",
             "premise.png": "dyrate_ref.tools.premise", "cider_pareto.png": "dyrate_ref.tools.evaluate"}
    assert set(tools) == set(FIGURES)
    root = os.path.dirname(DOCS)
    pages = [os.path.join(root, "README.md"), os.path.join(root, "tutorial.md")] + [
        os.path.join(DOCS, f) for f in sorted(os.listdir(DOCS)) if f.endswith(".md")]
    shown = set()
    for page in pages:
        for section in sections(open(page, encoding="utf-8").read()):
            for png in re.findall(r"\]\((?:docs/)?([\w.]+\.png)\)", section):
                shown.add(png)
                assert f"python -m {tools[png]}" in section, (os.path.basename(page), png)
    assert shown == set(FIGURES), set(FIGURES) - shown
