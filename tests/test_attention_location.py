"""tools/attention_location.py: which patches a scene's shapes cover (a hand-built scene), the shares and
concentration by hand, and docs/attention_location.json against what the current weights compute."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dyrate_ref.demo.scenes import Scene, Shape
from dyrate_ref.tools import attention_location as al
from dyrate_ref.tools.data import WORLD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")


def test_patch_regions_of_a_hand_built_scene():
    """A blue square at the centre (pixels 40..56 each way: patches 5..7 in rows and columns) and a red
    circle of radius 6 at (16, 16) (pixels 10..22: patches 1..2); 8-pixel patches, 12 x 12."""
    scene = Scene((Shape("square", "blue", 4, (48, 48), 10), Shape("circle", "red", 0, (16, 16), 6)), (90, 90, 90), 1)
    square = {r * 12 + c for r in (5, 6, 7) for c in (5, 6, 7)}
    circle = {r * 12 + c for r in (1, 2) for c in (1, 2)}
    on, asked = WORLD.patch_regions(scene, "What color is the square?", 12)
    assert set(on.nonzero().squeeze(1).tolist()) == square | circle
    assert set(asked.nonzero().squeeze(1).tolist()) == square
    assert set(WORLD.patch_regions(scene, "Is there a red circle? Look first.", 12)[1].nonzero().squeeze(1).tolist()) == circle
    assert WORLD.patch_regions(scene, "Is there a red square?", 12)[1] is None  # named, but not in the picture
    assert WORLD.patch_regions(scene, "How many shapes are there?", 12)[1] is None


def test_shares_and_concentration_by_hand():
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0, 0.0])
    shapes = torch.tensor([True, False, True] + [False] * 7)
    got = al.locate(p, {"shapes": shapes, "asked": None, "background": ~shapes})
    assert set(got) == {"shapes", "background"}  # a region an item lacks (None) is left out
    assert got["shapes"] == pytest.approx((0.6, 0.2)) and got["background"] == pytest.approx((0.4, 0.8))
    top, entropy = al.concentration(p)
    want = -sum(x * math.log(x) for x in p.tolist() if x > 0) / math.log(10)
    assert top == pytest.approx(0.5) and entropy == pytest.approx(want)  # top 10 % of 10 tokens: one
    assert al.concentration(torch.full((20,), 0.05)) == pytest.approx((0.1, 1.0))
    # R = 0.1 of 10 tokens drops the lowest one; R = 0.5 the lowest five
    assert al.dropped_on_shapes(p, shapes) == 0.0  # a zero on the background
    assert al.dropped_on_shapes(torch.tensor([0.01] + [0.11] * 9), shapes) == 1.0  # token 0, on a shape
    q = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.09, 0.06, 0.05, 0.03, 0.015, 0.005])  # drops 5..9
    assert al.dropped_on_shapes(q, torch.arange(10).ge(4) & torch.arange(10).le(8), 0.5) == pytest.approx(0.8)
    t = al.layer_means([{q: [{"top10": 0.5, "entropy": 0.9, "shapes": (0.6, 0.2)}] for q in al.QUERIES},
                  {q: [{"top10": 0.3, "entropy": 0.7, "shapes": (0.2, 0.2), "asked": (0.1, 0.05)}] for q in al.QUERIES}], 1)
    row = t["queries"]["last"][0]
    assert row["top10"] == pytest.approx(0.4) and row["shapes"]["ratio"] == pytest.approx(2.0)
    assert row["asked"] == pytest.approx({"share": 0.1, "area": 0.05, "ratio": 2.0, "items": 1})


def test_the_docs_table_is_what_the_shipped_weights_compute():
    """docs/attention_location.json (what docs/attention_location.png draws) recomputed on the same
    scenes with the current weights."""
    from dyrate_ref.commands import DEFAULT_WEIGHTS
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    from dyrate_ref.tools.data import scene_items
    shipped = json.load(open(os.path.join(DOCS, "attention_location.json")))
    split, n = shipped["source"].split(" scenes:")
    model = load_model(DEFAULT_WEIGHTS)
    now = al.measure_layers(model, Processor(DEFAULT_WEIGHTS, model.config), scene_items(int(n), split), show_progress=False)
    assert now["items"] == shipped["items"] and now["layers"] == shipped["layers"]
    for q in al.QUERIES:
        for a, b in zip(shipped["queries"][q], now["queries"][q]):
            assert a["top10"] == pytest.approx(b["top10"], abs=1e-5)
            assert a["dropped_on_shapes"] == pytest.approx(b["dropped_on_shapes"], abs=1e-9)
            for region in al.REGIONS:
                assert a[region]["share"] == pytest.approx(b[region]["share"], abs=1e-5)
                assert a[region]["area"] == pytest.approx(b[region]["area"], abs=1e-9)


def test_bad_input_is_one_line(tmp_path):
    out = tmp_path / "x.txt"
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.attention_location", "--scenes", "1",
                        "--plot", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "FILE.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
