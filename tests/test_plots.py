"""plots.py: generate.py --plot's figure, its labels and the steps whose kept patches it draws."""

from PIL import Image

from helpers import generate_run


def test_plot_is_written(pruning_env):
    root, w, img, *_ = pruning_env
    out = root / "plot.png"
    r = generate_run(w, img, "--method", "dyrate-schedule", "--schedule", "0,0.3,0.6,0.9", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    im = Image.open(out)
    assert im.width >= 600 and im.height >= 300
    # the patch overlays: later steps are darker (more patches evicted) than step 0
    strip = im.crop((0, im.height - 100, im.width, im.height)).convert("L")
    assert strip.getextrema()[0] < 60


def test_the_run_plot_s_labels_name_k_only_where_a_method_prunes():
    """generate.py --plot: K in the title only for a method with a pruning layer; whole-step ticks on a
    short answer; the caption says darkened patches were evicted (and that none were, for none)."""
    from dyrate_ref.plots import run_labels
    from dyrate_ref.pruning import FastV, NoPruning, DyRateSchedule
    none, fastv = run_labels(NoPruning(), 2, 3), run_labels(FastV(1, 0.5), 1, 40)
    assert "K =" not in none["title"] and "read at layer 1" in none["title"] and none["xticks"] == [0, 1, 2]
    assert "no patch is evicted" in none["patches"]
    assert "K = 1" in fastv["title"] and fastv["xticks"] is None and "evicted" in fastv["patches"]
    assert "K = 2" in run_labels(DyRateSchedule(2, (0.5,)), 2, 5)["title"]


def test_the_run_plot_shows_the_steps_where_the_method_cut():
    """--plot's patch panels: the prefill, the steps whose kept set shrank (the first ones), the last step,
    then evenly spaced ones; the README's look example cut at steps 23, 24 and 25 of 26, all shown."""
    from dyrate_ref.plots import panel_steps
    kept = [144] * 23 + [36, 27, 20]
    assert panel_steps(kept) == [0, 23, 24, 25]
    assert panel_steps([144] * 40) == [0, 10, 20, 39]  # nothing cut: evenly spaced
    assert panel_steps([72] * 5) == [0, 1, 2, 4] and panel_steps([144]) == [0]
    assert panel_steps([144] * 10 + [100] * 10 + [50] * 10) == [0, 10, 20, 29]
