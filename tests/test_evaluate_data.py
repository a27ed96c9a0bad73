"""Evaluating on a JSONL file (tools/evaluate.py --data): bad lines refused with their line number before
any model work, resume after an interruption gives the same figures, and the demo's exported scenes
evaluate end to end (CIDEr-D and exact match) on the shipped model."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dyrate_ref.demo.export import export
from dyrate_ref.commands import UserError
from dyrate_ref.tools import evaluate
from dyrate_ref.tools.data import read_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


GOOD = '{"image": "red.png", "prompt": "Describe the image.", "references": ["a red picture"]}'
BAD_LINES = {
    "not JSON": ('{"image": "red.png", "prompt": ', "not JSON"),
    "not an object": ('["red.png"]', "JSON object"),
    "no image": ('{"prompt": "Describe.", "answer": "red"}', '"image"'),
    "missing image": ('{"image": "nope.png", "prompt": "Describe.", "answer": "red"}', "does not exist"),
    "unreadable image": ('{"image": "broken.png", "prompt": "Describe.", "answer": "red"}', "broken.png"),
    "no prompt": ('{"image": "red.png", "answer": "red"}', '"prompt"'),
    "empty prompt": ('{"image": "red.png", "prompt": "  ", "answer": "red"}', '"prompt"'),
    "neither references nor answer": ('{"image": "red.png", "prompt": "Describe."}', "neither"),
    "references not strings": ('{"image": "red.png", "prompt": "D.", "references": [1]}', '"references"'),
    "empty references": ('{"image": "red.png", "prompt": "D.", "references": []}', '"references"'),
    "answers without answer": ('{"image": "red.png", "prompt": "D.", "references": ["x"], "answers": ["y"]}', '"answers"'),
    "duplicate id": ('{"id": "a", "image": "red.png", "prompt": "Q?", "answer": "red"}\n'
                     '{"id": "a", "image": "red.png", "prompt": "Q?", "answer": "red"}', "already used"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_every_bad_line_is_refused_with_its_line_number(folder, case):
    line, words = BAD_LINES[case]
    f = folder / "data.jsonl"
    f.write_text(GOOD + "\n\n" + line + "\n")
    bad_line = 3 if case != "duplicate id" else 4
    with pytest.raises(UserError) as e:
        read_items(str(f))
    assert f"line {bad_line}:" in str(e.value) and words in str(e.value), str(e.value)


def test_a_bad_line_stops_the_command_before_the_model_is_loaded(folder):
    f = folder / "data.jsonl"
    f.write_text(GOOD + "\n" + BAD_LINES["missing image"][0] + "\n")
    # The weights do not exist: had the model been loaded first, the error would name them.
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.evaluate", "--data", str(f), "--weights",
                        str(folder / "no-weights")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2:" in lines[0] and "nope.png" in lines[0], r.stderr


def test_good_lines_are_read_whole(folder):
    f = folder / "data.jsonl"
    f.write_text(GOOD + "\n" + '{"image": "red.png", "prompt": "Colour?", "answer": "red", "answers": ["red", "dark red"], "id": 7}\n')
    a, b = read_items(str(f))
    assert (a.id, a.references, a.answer) == ("line1", ("a red picture",), None)
    assert (b.id, b.answer, b.answers, b.image_path) == ("7", "red", ("red", "dark red"), str(folder / "red.png"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "scenes"
    export(str(out), 2)
    return out


def run_evaluate(data, results, capsys, *extra):
    evaluate.run(["--data", str(data), "--results", str(results), "--only-extra", "--no-control",
                  "--extra", "fastv:layer=2:rate=0.75", "--bootstrap", "20", "--max-new-tokens", "24", *extra])
    out = capsys.readouterr().out
    # Everything but the wall-clock column, which is measured anew by every run.
    return [re.sub(r"\| [0-9.]+ \|$", "|", line) for line in out.splitlines() if "records from an earlier run" not in line]


def test_exported_scenes_evaluate_end_to_end(exported, tmp_path, capsys):
    items = read_items(str(exported / "data.jsonl"))
    assert sum(bool(i.references) for i in items) == 2 and all(i.answer or i.references for i in items)
    table = run_evaluate(exported / "data.jsonl", tmp_path / "r.jsonl", capsys)
    head = next(line for line in table if line.startswith("| method |"))
    assert "CIDEr-D" in head and "exact match" in head
    records = [json.loads(line) for line in open(tmp_path / "r.jsonl")][1:]
    assert len(records) == 2 * len(items)  # two rows, every item once
    # Exact match on the exported answers is plain string equality after case and punctuation.
    import re

    def normalise(text):
        return re.sub(r"[^a-z ]", "", text.lower()).strip()
    for r in records:
        item = next(i for i in items if i.id == r["id"])
        if item.answer is not None:
            assert r["em"] == float(normalise(r["answer"]) == normalise(item.answer))


def test_resume_after_an_interruption_gives_the_same_table(exported, tmp_path, capsys):
    whole = run_evaluate(exported / "data.jsonl", tmp_path / "whole.jsonl", capsys)
    lines = open(tmp_path / "whole.jsonl", "rb").read().split(b"\n")
    # Interrupted after 5 records, in the middle of writing the 6th.
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:6]) + b"\n" + lines[6][:25])
    resumed = run_evaluate(exported / "data.jsonl", cut, capsys)
    assert resumed == whole
    redone = [json.loads(x) for x in open(cut)][1:]
    assert len(redone) == len(lines) - 2  # header and the final empty string
    assert len({(r["method"], r["id"]) for r in redone}) == len(redone)
    # The 5 records before the cut were reused, not recomputed: their measured seconds are the old ones.
    assert [r["seconds"] for r in redone[:5]] == [json.loads(x)["seconds"] for x in lines[1:6]]


def test_results_of_other_settings_are_refused(exported, tmp_path, capsys):
    run_evaluate(exported / "data.jsonl", tmp_path / "r.jsonl", capsys)
    before = open(tmp_path / "r.jsonl").read()
    with pytest.raises(UserError, match="was written with max_new_tokens"):
        evaluate.run(["--data", str(exported / "data.jsonl"), "--results", str(tmp_path / "r.jsonl"),
                      "--only-extra", "--max-new-tokens", "5"])
    assert open(tmp_path / "r.jsonl").read() == before


def test_extra_rows_parse_into_the_settings_they_name():
    from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config
    from dyrate_ref.pruning import FastV, DyRateSchedule
    from dyrate_ref.settings import Context
    from dyrate_ref.tools.baselines import RandomKeep
    cfg = read_config(DEFAULT_WEIGHTS)
    ctx = Context(DEFAULT_WEIGHTS, cfg.text_config.num_hidden_layers, cfg)
    assert evaluate.parse_extra("random:layer=1:rate=0.75", ctx).method == RandomKeep(1, rate=0.75)
    assert evaluate.parse_extra("fastv:layer=3:score=mean", ctx).method == FastV(3, 0.5, "mean")
    assert evaluate.parse_extra("fastv", ctx).method == FastV(2, 0.5, "last")
    assert evaluate.parse_extra("dyrate-schedule:schedule=0.5,0.9", ctx).method == DyRateSchedule(2, (0.5, 0.9))
    row = evaluate.parse_extra("dyrate:confidence=0.6", ctx)  # the shipped predictor at another confidence
    assert row.method.confidence == 0.6 and row.method.layer == row.method.predictor.layer
    L = cfg.text_config.num_hidden_layers
    for bad, why in (("fastv:2", "use NAME"), ("fastv:score=median", "not one of last, mean, accumulated"), ("nope", "use NAME"),
                     (f"fastv:layer={L}", f"outside 1..{L - 1}"), ("fastv:rate=2", "outside [0, 1]"),
                     ("vtw:rate=0.5", "does not apply"), (f"dyrate:layer={row.method.layer % (L - 1) + 1}", "differs from the predictor"),
                     ("random:layer=0:rate=0.5", "outside 1.."), ("mass:mass=x", "not a number"),
                     ("random:layer=1", "needs rate"), ("random:counts=3:rate=0.5", "not given"), ("fastv:ratio=0.5", "ratio is now rate")):
        with pytest.raises(UserError, match="--extra") as e:
            evaluate.parse_extra(bad, ctx)
        assert why in str(e.value), (bad, str(e.value))


def test_a_standard_row_and_the_extra_spec_of_the_same_method_have_one_name():
    """Each standard row that a spec can describe, described by its spec:
    the same method and the same name, so the duplicate check finds a repeated row."""
    from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config
    from dyrate_ref.settings import Context, describe
    cfg = read_config(DEFAULT_WEIGHTS)
    ctx = Context(DEFAULT_WEIGHTS, cfg.text_config.num_hidden_layers, cfg)
    rows = evaluate.standard_rows(DEFAULT_WEIGHTS, cfg)
    standard, families = {r.name: r.method for r in rows}, {r.name: r.family for r in rows}
    K = next(r.method.layer for r in rows if r.family == "DyRate predictor")  # DyRate's controls at its K
    assert all(r.method.layer == K for r in rows if r.family.startswith(("DyRate", "random", "fixed")))
    fk, fs = evaluate.FASTV_BEST["layer"], evaluate.FASTV_BEST["score"]  # FastV at its own validated K and score
    fastv = [r.method for r in rows if r.family.startswith("FastV")]
    assert len(fastv) == len(evaluate.FASTV_RATES) and all((m.layer, m.score) == (fk, fs) for m in fastv)
    score = next(r.method.score for r in rows if r.family == "DyRate predictor")  # the schedule chooses as DyRate does
    assert all(r.method.score == score for r in rows if r.family.startswith("fixed"))
    spec_s, name_s = ("", "") if fs == "last" else (f":score={fs}", f" score={fs}")
    for spec, name in ((f"fastv:layer={fk}:rate=0.75{spec_s}", f"FastV K={fk} R=0.75{name_s}"),
                       (f"fastv:layer={fk}:rate=0.1{spec_s}", f"FastV K={fk} R=0.1{name_s}"),
                       ("vtw:layer=4", "VTW K=4"), ("vtw:layer=7", "VTW K=7"),
                       ("dyrate:confidence=0.5", f"DyRate K={K} predictor (c=0.5)")):
        row = evaluate.parse_extra(spec, ctx)
        assert row.name == name and describe(standard[name]) == describe(row.method), (spec, row.name)
        assert row.family == families[name], (spec, row.family)  # one line in the Pareto plot too
    for spec, name in (("random:layer=1:rate=0.75", "random keep K=1 R=0.75"), ("mass:mass=0.5", "attention mass K=2 p=0.5"),
                       ("dyrate-schedule:schedule=0.5,0.6,0.7,0.8,0.9", "DyRate K=2 rising 0.5,0.6,0.7,0.8,0.9")):
        assert evaluate.parse_extra(spec, ctx).name == name
    # a method no standard row has keeps a name of its own, and another predictor file is named
    assert evaluate.parse_extra("dyrate-schedule:schedule=0.9,0.5", ctx).name == "DyRate K=2 schedule 0.9,0.5"
    assert evaluate.parse_extra("fastv:score=mean", ctx).name == "FastV K=2 R=0.5 score=mean"


def test_export_refuses_an_existing_folder_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    from dyrate_ref.demo import export as export_module
    (tmp_path / "there").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export_module.run(["--out", str(tmp_path / "there"), "--scenes", "1"])

    def broken(scene):
        raise OSError("disk full")
    from dyrate_ref.demo.scenes import Scene
    monkeypatch.setattr(Scene, "draw", broken)
    with pytest.raises(OSError, match="disk full"):
        export_module.export(str(tmp_path / "new"), 1)
    assert sorted(os.listdir(tmp_path)) == ["there"]


def test_costs_on_none_answers_equal_free_costs_when_the_answers_are_identical(tmp_path, monkeypatch):
    """FastV with R = 0 keeps everything: its answers are none's, so its forced run is skipped (its own run
    is that run) -- and the costs it records equal a forced run made here; FastV R = 0.9's answers differ,
    it is forced, and its forced costs follow none's lengths."""
    from dyrate_ref.cost import flops_per_step, kv_bytes_per_step, vision_flops
    from dyrate_ref.generation import generate
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    from dyrate_ref.pruning import FastV
    from dyrate_ref.tools.data import scene_items
    from helpers import hf_config, make_checkpoint
    w = tmp_path / "w"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=4)))
    results = tmp_path / "r.jsonl"
    forced_calls = []

    def counting(*args, **kw):
        if kw.get("force") is not None:
            forced_calls.append(args[4])  # generate(model, ids, px, max_new_tokens, method, force=...)
        return generate(*args, **kw)
    monkeypatch.setattr(evaluate, "generate", counting)
    evaluate.run(["--weights", str(w), "--scenes", "2", "--only-extra", "--no-control", "--extra", "fastv:rate=0",
                  "--extra", "fastv:rate=0.9", "--max-new-tokens", "6", "--results", str(results)])
    recs = [json.loads(x) for x in open(results)][1:]
    none = {r["id"]: r for r in recs if r["method"] == "none"}
    same = [r for r in recs if r["method"] == "FastV K=2 R=0"]
    assert same and all(r["answer"] == none[r["id"]]["answer"] for r in same)
    differ = [r for r in recs if r["method"] == "FastV K=2 R=0.9"]
    assert sum(r["answer"] != none[r["id"]]["answer"] for r in differ) >= 1
    # no forced run for R = 0; one for each of R = 0.9's items whose tokens are not none's
    assert all(m.rate == 0.9 for m in forced_calls) and 1 <= len(forced_calls) <= len(differ)
    model = load_model(str(w))
    proc = Processor(str(w), model.config)
    vis = vision_flops(model.config)
    items = {it.id: it for it in scene_items(2)}
    for r in same:
        it = items[r["id"]]
        f = generate(model, proc.input_ids(it.prompt), proc.pixel_values(it.picture()), 6, FastV(2, 0.0),
                     force=none[r["id"]]["tokens"]).record
        flops, kv = flops_per_step(f), kv_bytes_per_step(f)
        assert (r["forced_prefill_flops"], r["forced_decode_flops"], r["forced_kv_mean"], r["forced_kv_peak"]) == \
            (flops[0] - vis, sum(flops[1:]), sum(kv) / len(kv), max(kv))
    for r in (r for r in recs if r["method"] == "FastV K=2 R=0.9"):
        # forced on none's tokens: as many decode steps as none's answer
        assert r["forced_kv_peak"] < none[r["id"]]["kv_peak"] and len(none[r["id"]]["tokens"]) >= 1


def test_clustered_standard_error_by_hand():
    """Four items, three pictures: d = b - a = [1, 1, 0, 1], mean 0.75; deviations summed per picture
    (x: 0.25 + 0.25, y: -0.75, z: 0.25); SE^2 = G/(G-1) * sum(s_g^2) / n^2 = 1.5 * 0.875 / 16."""
    from dyrate_ref.tools.report import paired
    mean, se = paired([0, 0, 0, 0], [1, 1, 0, 1], ["x", "x", "y", "z"])
    assert mean == pytest.approx(0.75) and se == pytest.approx((1.5 * 0.875 / 16) ** 0.5)
    # one item per picture: the usual paired SE, std / sqrt(n)
    d = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert paired([0, 0, 0, 0], [1, 1, 0, 1], ["a", "b", "c", "d"])[1] == pytest.approx(float(d.std() / 2))
    # items of one picture moving together widen the error: the same differences, two pictures
    assert paired([0] * 4, [1, 1, 0, 0], ["x", "x", "y", "y"])[1] > paired([0] * 4, [1, 1, 0, 0])[1]


def test_validation_and_test_scenes_are_disjoint():
    from dyrate_ref.demo.scenes import TEST_SEED, VALIDATION_SEED, eval_set
    test = {repr(i.scene) for i in eval_set(300, TEST_SEED)}
    val = {repr(i.scene) for i in eval_set(300, VALIDATION_SEED)}
    assert len(test) == len(val) == 300 and not test & val
    from dyrate_ref.tools.data import scene_items
    assert {p.cluster for p in scene_items(5, "validation")}.isdisjoint({p.cluster for p in scene_items(5, "test")})


def test_the_results_header_records_the_scene_count_and_a_mismatch_names_the_field(tmp_path):
    from helpers import hf_config, make_checkpoint
    w = tmp_path / "w"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=2)))
    results = tmp_path / "r.jsonl"
    args = ["--weights", str(w), "--only-extra", "--no-control", "--max-new-tokens", "2", "--results", str(results)]
    evaluate.run(["--scenes", "1", *args])
    header = json.loads(open(results).readline())
    assert header["data"] == "scenes:1"  # the scene count, not the prompt count
    with pytest.raises(UserError, match="was written with data 'scenes:1', not 'scenes:2'"):
        evaluate.run(["--scenes", "2", *args])


def test_a_one_image_caption_set_says_that_cider_is_zero_by_construction(exported, tmp_path, capsys):
    """With one captioned image every idf is 0, so CIDEr-D is 0.000 for any answer: evaluate says so (a
    two-image set, the exported one, does not get the note)."""
    lines = [json.loads(x) for x in open(exported / "data.jsonl")]
    one = [x for x in lines if "references" in x][:1]
    for x in one:
        x["image"] = str(exported / x["image"])
    f = tmp_path / "one.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in one) + "\n")
    evaluate.run(["--data", str(f), "--only-extra", "--no-control", "--max-new-tokens", "4", "--bootstrap", "2"])
    assert "one captioned image every weight is 0" in capsys.readouterr().err
    evaluate.run(["--data", str(exported / "data.jsonl"), "--only-extra", "--no-control", "--max-new-tokens", "4",
                  "--bootstrap", "2"])
    assert "captioned image" not in capsys.readouterr().err


def test_the_plot_folder_is_made_when_missing_and_a_file_there_is_refused(tmp_path):
    from dyrate_ref.files import check_folder
    check_folder(str(tmp_path / "new"), "--plot")  # a new folder in an existing one: fine, made when written
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_folder(str(tmp_path / "f"), "--plot")
    with pytest.raises(UserError, match="parent folder .* does not exist"):
        check_folder(str(tmp_path / "no" / "new"), "--plot")
