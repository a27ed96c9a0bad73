"""settings.py: how flags and specs become a method. Every default is filled in once, each value says
where it came from, a method that cannot run cannot be built, and the flags a reader greps for in cli.py
are exactly the methods' settings."""

import json
from dataclasses import dataclass, fields
from typing import ClassVar

import pytest

from dyrate_ref import cli, pruning
from dyrate_ref.commands import UserError
from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config
from dyrate_ref.predictor import RatePredictor
from dyrate_ref.pruning import VTW, DyRate, DyRateSchedule, FastV, Method, NoPruning
from dyrate_ref.settings import Context, make_method, metadata, parse_settings
from dyrate_ref.tools import baselines, evaluate

IMAGE = f"{DEFAULT_WEIGHTS}/examples/scene1.png"


def ctx():
    return Context(DEFAULT_WEIGHTS, 8, read_config(DEFAULT_WEIGHTS))


def test_metadata_holds_only_the_methods_own_settings():
    assert metadata(NoPruning()) == {"method": "none"}
    fastv, origins = make_method(FastV, {"rate": 0.25}, ctx())
    assert metadata(fastv, origins) == {"method": "fastv", "layer": "2", "layer_from": "default", "rate": "0.25",
                                       "rate_from": "flag", "score": "last", "score_from": "default"}
    vtw, origins = make_method(VTW, {}, ctx())
    found = json.load(open(f"{DEFAULT_WEIGHTS}/vtw_calibration.json"))["layer"]  # what the shipped calibration says
    want = (str(found), "vtw_calibration.json") if found else ("4", "L/2, vtw_calibration.json found no layer within its eta")
    assert metadata(vtw, origins) == {"method": "vtw", "layer": want[0], "layer_from": want[1]}
    dyrate, origins = make_method(DyRate, {}, ctx())
    assert {k: (o.kind, o.text) for k, o in origins.items()} == {
        "layer": ("file", "predictor file"), "confidence": ("file", "predictor file"),
        "score": ("file", "predictor file"), "predictor": ("file", "shipped with the weights")}
    assert dyrate.score == dyrate.predictor.score
    other = {"last": "mean"}.get(dyrate.score, "last")
    with pytest.raises(UserError, match=f"--score {other} differs from the predictor's score"):
        make_method(DyRate, {"score": other}, ctx())
    with pytest.raises(UserError, match="method fastv: score 'accumulated'"):
        make_method(FastV, {"score": "accumulated"}, ctx())
    fallback = make_method(VTW, {}, Context("/nonexistent", 8))[1]["layer"]  # no calibration file: L/2, said so
    assert (fallback.kind, fallback.text) == ("fallback", "L/2, no vtw_calibration.json")
    assert dyrate.layer == dyrate.predictor.layer and dyrate.confidence == dyrate.predictor.confidence
    schedule, origins = make_method(DyRateSchedule, {"schedule": (0.1, 0.5)}, ctx())
    assert metadata(schedule, origins) == {"method": "dyrate-schedule", "layer": "2", "layer_from": "default",
                                           "schedule": "0.1,0.5", "schedule_from": "flag", "score": "last",
                                           "score_from": "default"}


def test_settings_are_checked_once_with_one_message():
    for cls, given in ((FastV, {"layer": 8}), (VTW, {"layer": 0}), (DyRateSchedule, {"layer": 9, "schedule": (0.5,)})):
        with pytest.raises(UserError, match=r"--layer \d is outside 1\.\.7 \(the model has 8 layers\)"):
            make_method(cls, given, ctx())
    K = make_method(DyRate, {}, ctx())[0].layer  # the shipped predictor's
    with pytest.raises(UserError, match=f"differs from the predictor's K={K}"):
        make_method(DyRate, {"layer": K % 7 + 1}, ctx())
    with pytest.raises(UserError, match="dyrate-schedule needs --schedule"):
        make_method(DyRateSchedule, {}, ctx())
    with pytest.raises(UserError, match="ships no dyrate_predictor.safetensors"):
        make_method(DyRate, {}, Context("/nonexistent", 8))
    with pytest.raises(UserError, match=r"--schedule does not apply to --method dyrate \(it belongs to dyrate-schedule\)"):
        parse_settings(DyRate, {"schedule": "0.5"}, pruning.METHODS)
    with pytest.raises(UserError, match="--rates is now --schedule; give --schedule 0.5"):
        parse_settings(DyRateSchedule, {"rates": "0.5"}, pruning.METHODS)
    with pytest.raises(UserError, match="--ratio is now --rate"):
        parse_settings(FastV, {"ratio": "0.5"}, pruning.METHODS)


def test_a_method_that_cannot_run_cannot_be_built():
    """The value is refused when it is made, not at its first step: DyRate without its predictor (or at
    another layer than its predictor's), a schedule without rates, a share outside [0, 1]."""
    pred = RatePredictor(3)
    assert DyRate(3, pred, 0.5).layer == 3
    with pytest.raises(TypeError):
        DyRate(3)  # the predictor and its confidence are not optional
    for bad in (lambda: DyRate(3, None, 0.5), lambda: DyRate(2, pred, 0.5), lambda: DyRate(3, pred, 1.5),
                lambda: DyRateSchedule(2, ()), lambda: DyRateSchedule(2, (0.5, 1.01)), lambda: FastV(2, -0.1),
                lambda: FastV(2, 0.5, "first")):
        with pytest.raises(ValueError):
            bad()
    # the edges themselves are settings that run
    assert FastV(2, 0.0).rate == 0.0 and FastV(2, 1.0).rate == 1.0 and DyRate(3, pred, 1.0).confidence == 1.0


def test_the_cli_flags_are_exactly_the_methods_settings():
    """cli.py writes the method flags out (a reader greps for --confidence there); each is a setting of a
    method and each setting has its flag; the renamed ones are refused; --method's help names them all."""
    settings = {f.name for cls in pruning.METHODS.values() for f in fields(cls)}
    renamed = {"ratio", "rates"}
    assert settings == set(cli.METHOD_FLAGS) - renamed
    parser = cli.build_parser()
    for name in settings | renamed:
        assert f"--{name}" in parser._option_string_actions
    help_text = parser._option_string_actions["--method"].help
    assert all(name in help_text for name in pruning.METHODS)


def test_the_shipped_predictors_confidence_is_a_setting():
    """--confidence decodes the same predictor more cautiously: on an answer where the shipped predictor
    cuts at its own confidence, at c = 1 it holds every token to the end."""
    from PIL import Image
    from dyrate_ref.generation import generate
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    c = Context(DEFAULT_WEIGHTS, 8, model.config)
    own, _ = make_method(DyRate, {}, c)
    cautious, _ = make_method(DyRate, {"confidence": 1.0}, c)
    ids = proc.input_ids("What color is the star? Look first.")
    px = proc.pixel_values(Image.open(f"{DEFAULT_WEIGHTS}/examples/scene1.png"))
    kept_own = [int(k.sum()) for k in generate(model, ids, px, 30, own).record.kept_masks]
    kept_cautious = generate(model, ids, px, 30, cautious).record
    T = len(kept_cautious.kept_masks)
    assert min(kept_own) < 144  # the precondition: at its own confidence it cuts in this answer
    assert [int(k.sum()) for k in kept_cautious.kept_masks] == [144] * T and set(kept_cautious.rates) == {0.0}


@dataclass(frozen=True)
class KeepEvery(Method):
    """Toy method: at the prefill keep every `stride`-th visual token, then hold."""
    name: ClassVar[str] = "every"
    layer: int = 2
    stride: int = 2

    def choose(self, t, kept, scores):
        return kept[::self.stride] if t == 0 else kept


def test_a_new_method_runs_through_evaluate_extra(monkeypatch, tmp_path):
    """A tool's spec needs only the class in the registry and its settings' parsers."""
    monkeypatch.setitem(baselines.REGISTRY, "every", KeepEvery)
    monkeypatch.setitem(baselines.PARSE, "stride", int)
    out = tmp_path / "e.json"
    assert evaluate.run(["--scenes", "1", "--only-extra", "--no-control", "--extra", "every:stride=4",
                         "--max-new-tokens", "6", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"none", "every K=2 stride=4"}
    assert rows["every K=2 stride=4"]["kept"] == pytest.approx(36.0)
