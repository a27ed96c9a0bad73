"""A method is a value: a new one is a class and a registry entry, written here in the test file alone,
and it runs through generate.py's flags, the trace and `evaluate --extra` without touching any other
file. Settings are resolved once, and every value says where it came from."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from dyrate_ref import cli, pruning
from dyrate_ref.errors import UserError
from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config
from dyrate_ref.pruning import DyRate, FastV, Method, NoPruning, VTW
from dyrate_ref.settings import Context, metadata, parse_int, resolve, setting
from dyrate_ref.tools import evaluate

IMAGE = f"{DEFAULT_WEIGHTS}/examples/scene1.png"


@dataclass(frozen=True)
class KeepEvery(Method):
    """Toy method: at the prefill keep every `stride`-th visual token, then hold."""
    name: ClassVar[str] = "every"
    layer: int = setting(2, parse_int, "pruning layer K", "K")
    stride: int = setting(2, parse_int, "keep every stride-th visual token", "stride")

    def choose(self, t, keep, scores):
        return keep[::self.stride] if t == 0 else keep


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(pruning.METHODS, "every", KeepEvery)  # the one registry line


def test_a_new_method_runs_through_the_cli_and_the_trace(registered, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert cli.run(["--image", IMAGE, "--prompt", "Describe the image.", "--method", "every", "--stride", "3",
                    "--max-new-tokens", "4", "--trace", str(out)]) == 0
    err = capsys.readouterr().err
    assert "method every K=2 stride=3 (K: default; stride: flag)" in err, err
    keep = load_file(str(out))["visual_keep"]
    assert keep.shape[1] == 144 and keep.sum(1).tolist() == [48] * keep.shape[0]
    assert keep[0].nonzero().squeeze(1).tolist() == list(range(0, 144, 3))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["method"], meta["stride"], meta["stride_from"], meta["layer"]) == ("every", "3", "flag", "2")
    # its flag is refused for the other methods, with the usual line
    with pytest.raises(UserError, match=r"--stride does not apply to --method fastv \(it belongs to every\)"):
        cli.run(["--image", IMAGE, "--prompt", "hi", "--method", "fastv", "--stride", "2"])


def test_a_new_method_runs_through_evaluate_extra(registered, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert evaluate.run(["--scenes", "1", "--only-extra", "--no-control", "--extra", "every:stride=4",
                         "--max-new-tokens", "6", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"none", "every K=2 stride=4"}
    assert rows["every K=2 stride=4"]["kept"] == pytest.approx(36.0)


def test_metadata_holds_only_the_methods_own_settings():
    ctx = Context(DEFAULT_WEIGHTS, 8, read_config(DEFAULT_WEIGHTS))
    assert metadata(NoPruning()) == {"method": "none"}
    fastv, origins = resolve(FastV, {"rate": 0.25}, ctx)
    assert metadata(fastv, origins) == {"method": "fastv", "layer": "2", "layer_from": "default", "rate": "0.25",
                                       "rate_from": "flag", "score": "last", "score_from": "default"}
    vtw, origins = resolve(VTW, {}, ctx)
    found = json.load(open(f"{DEFAULT_WEIGHTS}/vtw_calibration.json"))["layer"]  # what the shipped calibration says
    want = (str(found), "vtw_calibration.json") if found else ("4", "L/2, vtw_calibration.json found no layer within its eta")
    assert metadata(vtw, origins) == {"method": "vtw", "layer": want[0], "layer_from": want[1]}
    dyrate, origins = resolve(DyRate, {}, ctx)
    assert {k: (o.kind, str(o)) for k, o in origins.items()} == {
        "layer": ("file", "predictor file"), "confidence": ("file", "predictor file"),
        "predictor": ("file", "shipped with the weights")}
    fallback = resolve(VTW, {}, Context("/nonexistent", 8))[1]["layer"]  # no calibration file: L/2, said so
    assert (fallback.kind, str(fallback)) == ("fallback", "L/2, no vtw_calibration.json")
    assert dyrate.layer == dyrate.predictor.layer and dyrate.confidence == dyrate.predictor.confidence


def test_settings_are_checked_once_with_one_message():
    ctx = Context(DEFAULT_WEIGHTS, 8, read_config(DEFAULT_WEIGHTS))
    for cls, given in ((FastV, {"layer": 8}), (VTW, {"layer": 0}), (DyRate, {"layer": 9, "rates": (0.5,)})):
        with pytest.raises(UserError, match=r"--layer \d is outside 1\.\.7 \(the model has 8 layers\)"):
            resolve(cls, given, ctx)
    with pytest.raises(UserError, match="differs from the predictor's K=3"):
        resolve(DyRate, {"layer": 2}, ctx)
    with pytest.raises(UserError, match="--rates and --confidence both given"):
        resolve(DyRate, {"rates": (0.5,), "confidence": 0.5}, ctx)


def test_the_shipped_predictors_confidence_is_a_setting():
    """--confidence decodes the same predictor more cautiously: on an answer where the shipped predictor
    cuts at its own confidence, at c = 1 it holds every token to the end."""
    from PIL import Image
    from dyrate_ref.generation import generate
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    ctx = Context(DEFAULT_WEIGHTS, 8, model.config)
    own, _ = resolve(DyRate, {}, ctx)
    cautious, _ = resolve(DyRate, {"confidence": 1.0}, ctx)
    ids = proc.input_ids("What color is the star? Look first.")
    px = proc.pixel_values(Image.open(f"{DEFAULT_WEIGHTS}/examples/scene1.png"))
    kept_own = [int(k.sum()) for k in generate(model, ids, px, 30, own).record.keep_masks]
    kept_cautious = generate(model, ids, px, 30, cautious).record
    T = len(kept_cautious.keep_masks)
    assert min(kept_own) < 144  # the precondition: at its own confidence it cuts in this answer
    assert [int(k.sum()) for k in kept_cautious.keep_masks] == [144] * T and set(kept_cautious.rates) == {0.0}


@dataclass(frozen=True)
class KeepListed(Method):
    """Toy method with a file-valued setting and a per-item one: at the prefill keep the tokens listed in a
    file, or, without one, a random half drawn from `seed` (which the evaluation sets per item)."""
    name: ClassVar[str] = "listed"
    layer: int = setting(2, parse_int, "pruning layer K", "K")
    listing: str | None = setting(None, str, "a file of comma-separated visual indices", "listing", input_file=True)
    draw: int = setting(0, parse_int, "seed of the random half (the evaluation sets one per item)", "draw",
                        per_item="seed")  # not named `seed`: generate.py's sampling --seed has that flag

    def choose(self, t, keep, scores):
        if t:
            return keep
        if self.listing:
            import torch
            wanted = torch.tensor([int(i) for i in open(self.listing).read().split(",")])
            return keep[torch.isin(keep, wanted)]
        import torch
        g = torch.Generator().manual_seed(self.draw)
        return keep[torch.randperm(keep.numel(), generator=g)[:keep.numel() // 2]].sort().values


def test_a_method_with_a_file_setting_and_a_per_item_setting_is_fully_declared_by_its_class(monkeypatch, tmp_path,
                                                                                          capsys):
    """One class and one registry line: its file-valued setting becomes a flag whose file no output may
    overwrite (the CLI knows nothing of it by name), and the evaluation sets its per-item seed itself."""
    monkeypatch.setitem(pruning.METHODS, "listed", KeepListed)
    listing = tmp_path / "keep.txt"
    listing.write_text("0,5,17,100")
    out = tmp_path / "t.safetensors"
    assert cli.run(["--image", IMAGE, "--prompt", "Describe the image.", "--method", "listed", "--listing",
                    str(listing), "--max-new-tokens", "2", "--trace", str(out)]) == 0
    assert load_file(str(out))["visual_keep"][0].nonzero().squeeze(1).tolist() == [0, 5, 17, 100]
    assert "listing=keep.txt" in capsys.readouterr().err  # the summary names the file by its base name
    with pytest.raises(UserError, match="would overwrite the --listing file"):
        cli.run(["--image", IMAGE, "--prompt", "hi", "--method", "listed", "--listing", str(listing),
                 "--trace", str(listing)])
    assert listing.read_text() == "0,5,17,100"
    # per item: each item's own seed, whatever the row's method says
    from dyrate_ref.tools.data import scene_items
    from dyrate_ref.tools.report import Row
    row = Row("listed", "listed", KeepListed(draw=999))
    items = scene_items(2)[:3]
    assert [evaluate.item_method(row, it, None).draw for it in items] == [it.seed for it in items]
    assert len({it.seed for it in scene_items(3)}) > 1


def test_a_setting_named_like_a_generate_flag_is_named_as_the_mistake(monkeypatch):
    @dataclass(frozen=True)
    class Clash(Method):
        name: ClassVar[str] = "clash"
        layer: int = setting(2, parse_int, "pruning layer K", "K")
        seed: int = setting(0, parse_int, "a seed", "seed")
    monkeypatch.setitem(pruning.METHODS, "clash", Clash)
    with pytest.raises(AssertionError, match="has the name of generate.py's own --seed; rename the setting"):
        cli.build_parser()
