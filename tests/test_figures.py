"""tools/figures.py: the README's and the tutorial's figures are drawn from data files beside them, and
those files hold what the current weights compute (recomputed here), so a figure cannot outlive its model."""

import json
import os

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
    from dyrate_ref.errors import UserError
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    before = sorted(os.listdir(DEFAULT_WEIGHTS))
    for out in (DEFAULT_WEIGHTS, os.path.join(DEFAULT_WEIGHTS, "examples")):
        with pytest.raises(UserError, match="would overwrite a file of the --weights folder"):
            figures.run(["--out", out])
    assert sorted(os.listdir(DEFAULT_WEIGHTS)) == before
