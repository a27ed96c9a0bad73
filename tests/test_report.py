"""The measuring tools against hand-worked cases: the figures a reader of a table trusts without
checking. Each case is small enough to be worked out on paper, and each answer below is worked out
here, in the comments, not copied from the tool's output."""

import math
import os

import pytest
import torch

from dyrate_ref.tools import report
from dyrate_ref.tools.data import Item


def item(i, kind, cluster, **kw):
    return Item(f"i{i}", "q", kind, i, cluster, **kw)


def rec(em=None, kept=(10, 10), pf=100.0, df=20.0, kv=(50, 60), answer="a", **extra):
    r = {"answer": answer, "kept": list(kept), "prefill_flops": pf, "decode_flops": df, "kv_peak": max(kv),
         "kv_mean": sum(kv) / len(kv), "seconds": 1.0, **extra}
    if em is not None:
        r["em"] = em
    return r


# ----------------------------------------------------------------------------------------------------
# The evaluation's summary: which records each figure is averaged over, and its clustered SE.

ITEMS = [item(0, "color", "p1", answer="x"), item(1, "count", "p1", answer="x"),
         item(2, "color", "p2", answer="x"), item(3, "count", "p3", answer="x")]


def test_overall_and_per_kind_scores_are_means_over_their_own_items():
    base = [rec(1.0), rec(1.0), rec(1.0), rec(0.0)]
    mine = [rec(0.0), rec(1.0), rec(1.0), rec(1.0)]
    s = report.summarise(mine, base, ITEMS)
    # overall over the 4 items: 3/4; colour over items 0 and 2: (0 + 1)/2; count over 1 and 3: (1 + 1)/2
    assert s["em"] == 0.75 and s["em_n"] == 4
    assert s["em_color"] == 0.5 and s["em_color_n"] == 2 and s["em_count"] == 1.0 and s["em_count_n"] == 2
    # paired differences: colour d = [-1, 0] mean -0.5; count d = [0, 1] mean 0.5; overall [-1, 0, 0, 1] mean 0
    assert s["em_color_delta"] == -0.5 and s["em_count_delta"] == 0.5 and s["em_delta"] == 0.0
    # overall SE, clustered: deviations (= d, mean 0) summed per picture: p1 -1 + 0, p2 0, p3 1;
    # SE^2 = G/(G-1) * sum(s_g^2) / n^2 = 3/2 * (1 + 0 + 1) / 16
    assert s["em_se"] == pytest.approx(math.sqrt(1.5 * 2 / 16))
    # the same answers as base's on none of the items here (answers all "a" = the same): agree 1.0
    assert s["agree"] == 1.0


def test_the_look_verdict_and_f1_are_their_own_columns_not_part_of_exact_match():
    items = ITEMS[:2] + [item(4, "look", "p4", answer="x. So a red circle: yes.")]
    base = [rec(1.0), rec(1.0), rec(verdict=1.0)]
    mine = [rec(1.0), rec(0.0), rec(verdict=0.0)]
    s = report.summarise(mine, base, items)
    assert s["em"] == 0.5 and s["em_n"] == 2  # the look item is not an exact-match item
    assert s["verdict"] == 0.0 and s["verdict_n"] == 1 and s["verdict_delta"] == -1.0
    assert "em_look" not in s


def test_costs_relative_to_none_own_and_forced_by_hand():
    base = [rec(1.0, pf=100, df=20, kv=(50, 60), tokens=[1, 2]), rec(1.0, pf=100, df=40, kv=(50, 70), tokens=[3])]
    mine = [rec(1.0, kept=(5, 5), pf=50, df=10, kv=(25, 35), forced_prefill_flops=50, forced_decode_flops=12,
                forced_kv_peak=36, forced_kv_mean=31),
            rec(1.0, kept=(4,), pf=50, df=0, kv=(25,), forced_prefill_flops=50, forced_decode_flops=30,
                forced_kv_peak=45, forced_kv_mean=40)]
    c = report.costs(mine, base)
    assert c["lm_flops"] == pytest.approx((50 + 10 + 50 + 0) / (120 + 140))
    assert c["lm_flops_forced"] == pytest.approx((62 + 80) / 260)  # forced on none's answers, over none's costs
    assert c["kv_mean"] == pytest.approx((30 + 25) / (55 + 60)) and c["kv_peak"] == pytest.approx((35 + 25) / (60 + 70))
    assert c["kv_mean_forced"] == pytest.approx((31 + 40) / 115) and c["kv_peak_forced"] == pytest.approx((36 + 45) / 130)
    assert c["kept"] == pytest.approx((5 + 5 + 4) / 3)  # per step, over every step of every answer
    assert c["prefill_flops"] == pytest.approx(100 / 200) and c["decode_flops"] == pytest.approx(10 / 60)


def test_the_rise_column_by_hand():
    """Kept counts per step of four answers: [10, 10, 10] never cuts after the prefill; [10, 8, 5] first
    at step 1; [10, 10, 4, 4] at step 2; a one-step answer [6] has no later step. Rose: 2 of 4; mean
    first step (1 + 2) / 2 = 1.5 -- and the cost table prints exactly that."""
    recs = [rec(kept=k) for k in ((10, 10, 10), (10, 8, 5), (10, 10, 4, 4), (6,))]
    c = report.costs(recs, recs)
    assert c["rose"] == 0.5 and c["first_rise"] == 1.5
    assert report.rises([rec(kept=(10, 10))]) == {"rose": 0.0, "first_rise": None}
    from dyrate_ref.pruning import NoPruning
    line = next(x for x in report.cost_table([(report.Row("m", "m", NoPruning()), c)], 10, 0).splitlines()
                if x.startswith("| m |"))
    assert "| 50.0 (1.5) |" in line


THEIRS = {"FastV K={K}": {"lm_flops": 0.8, "kv_mean": 0.6}, "schedule": {"lm_flops": 1.0, "kv_mean": 1.0}}
BOUNDS = {"em": 0.01, "f1": 0.01, "verdict": 0.02}


def test_the_main_comparison_by_hand():
    """Four items on three pictures; none costs 100 FLOPs and 100 KV bytes on each. Candidates (cost on
    none's answers, as a share of none's): FastV K=2 R=0.5 at 0.6, within the bounds; FastV K=2 R=0.9 at 0.2
    but 25 points of exact match lost (out); FastV K=1 at 0.1, within the bounds but at another K (out);
    DyRate c=0.6 at 0.1 but 2 points lost (out, the bound is 1); DyRate c=0.8 at [.3, .3, .4, .2] (0.3),
    0.5 points lost (in); the schedule at [.3, .3, .3, .31] (0.3025), and at K=1 at 0.05 (another K: out). Against FastV: ratio 0.3 / 0.6 = 0.5
    <= 0.8 and <= 0.6; paired differences [-.3, -.3, -.2, -.4], mean -0.3, deviations summed per picture
    p1 0, p2 .1, p3 -.1: SE^2 = 3/2 * .02 / 16, so both targets are met. Against the schedule: ratio
    0.3 / 0.3025, differences [0, 0, .1, -.11], mean -0.0025, deviations summed per picture p1 .005,
    p2 .1025, p3 -.1075: cheaper, but not beyond 2 SE, so not met."""
    from dyrate_ref.pruning import DyRateSchedule, FastV, NoPruning
    items = [item(0, "color", "p1", answer="x"), item(1, "color", "p1", answer="x"),
             item(2, "count", "p2", answer="x"), item(3, "count", "p3", answer="x")]

    def recs(costs):
        return [rec(1.0, forced_prefill_flops=c, forced_decode_flops=0.0, forced_kv_mean=c) for c in costs]

    def summary(em_delta, cost):
        return {"em_delta": em_delta, "lm_flops_forced": cost, "kv_mean_forced": cost}
    sides = [("none", "none", NoPruning(), (100,) * 4, summary(0.0, 1.0)),
             ("fv5", "FastV K=2", FastV(2, 0.5), (60,) * 4, summary(0.0, 0.6)),
             ("fv9", "FastV K=2", FastV(2, 0.9), (20,) * 4, summary(-0.25, 0.2)),
             ("fv1", "FastV K=1", FastV(1, 0.5), (10,) * 4, summary(0.0, 0.1)),
             ("dy6", "DyRate predictor", DyRateSchedule(2, (0.5,)), (10,) * 4, summary(-0.02, 0.1)),
             ("dy8", "DyRate predictor", DyRateSchedule(2, (0.5,)), (30, 30, 40, 20), summary(-0.005, 0.3)),
             ("sc", "schedule", DyRateSchedule(2, (0.5,)), (30, 30, 30, 31), summary(0.0, 0.3025)),
             ("sc1", "schedule", DyRateSchedule(1, (0.5,)), (5,) * 4, summary(0.0, 0.05))]
    results = [(report.Row(name, fam, m), s) for name, fam, m, _, s in sides]
    records = {name: recs(costs) for name, _, _, costs, _ in sides}
    records["none"] = [rec(1.0, pf=100.0, df=0.0, kv=(100,), tokens=[1]) for _ in range(4)]
    c = report.main_comparison(results, records, items, "DyRate predictor", THEIRS, BOUNDS)
    assert c["items"] == 4 and c["DyRate predictor"]["method"] == "dy8"
    fastv, sched = c["against"]["FastV K=2"], c["against"]["schedule"]
    assert fastv["row"]["method"] == "fv5" and sched["row"]["method"] == "sc"
    for cost in ("lm_flops", "kv_mean"):
        assert fastv["costs"][cost]["ratio"] == pytest.approx(0.5)
        assert fastv["costs"][cost]["difference"] == pytest.approx(-0.3)
        assert fastv["costs"][cost]["se"] == pytest.approx(math.sqrt(1.5 * 0.02 / 16))
        assert sched["costs"][cost]["ratio"] == pytest.approx(0.3 / 0.3025)
        assert sched["costs"][cost]["difference"] == pytest.approx(-0.0025)
        assert sched["costs"][cost]["se"] == pytest.approx(math.sqrt(1.5 * (0.005 ** 2 + 0.1025 ** 2 + 0.1075 ** 2) / 16))
    assert fastv["target_met"] and not sched["target_met"]
    # which tokens: every DyRate row that has a random control at its counts, paired, in or out of the bounds
    records["random keep, counts of dy6"] = [rec(e) for e in (0.0, 0.0, 1.0, 0.0)]  # dy6's em: 1 on every item
    c2 = report.main_comparison(results, records, items, "DyRate predictor", THEIRS, BOUNDS)
    assert set(c2["random"]) == {"dy6"} and c2["random"]["dy6"]["em"]["difference"] == pytest.approx(0.75)
    assert "dy6 minus random keep at its own counts" in report.comparison_text(c2)
    # a family that names its own K (FastV's validated K, declared) is taken at that K, not at ours'
    own = report.main_comparison(results, records, items, "DyRate predictor", {"FastV K=1": {"lm_flops": 0.8}}, BOUNDS)
    assert own["against"]["FastV K=1"]["row"]["method"] == "fv1"
    text = report.comparison_text(c)
    assert "LM FLOPs is 0.500x" in text and "met" in text and "not met" in text
    # FastV R=0.5 losing two points too: no FastV row at K=2 within the bounds, nothing compared against it
    results[1] = (results[1][0], summary(-0.02, 0.6))
    c = report.main_comparison(results, records, items, "DyRate predictor", THEIRS, BOUNDS)
    assert c["against"]["FastV K=2"]["row"] is None and not c["against"]["FastV K=2"]["costs"]
    assert "no row within the bounds" in report.comparison_text(c)
    # a run without DyRate rows says so, rather than "no row within the bounds"
    c = report.main_comparison(results[:4], records, items, "DyRate predictor", THEIRS, BOUNDS)
    assert report.comparison_text(c) == "Main comparison: this run has no DyRate predictor rows; nothing to compare."


def test_the_fixed_schedule_at_mean_counts_by_hand():
    """Kept counts of three answers, N = 10: [10, 8, 6], [10, 6], [10, 10, 4, 2]. Steps every answer reaches
    (at least min(5, 3) = 3 of them): 0 and 1. Step 0: mean 10 -> rate 0; step 1: (8 + 6 + 10) / 3 = 8 ->
    rate 0.2; later steps, reached by fewer answers, repeat the last rate."""
    recs = [rec(kept=k) for k in ((10, 8, 6), (10, 6), (10, 10, 4, 2))]
    assert report.mean_schedule(recs, 10) == pytest.approx((0.0, 0.2))


def test_the_schedule_control_runs_at_its_rows_mean_counts(tmp_path):
    """evaluate_all's second pass: the control's schedule is mean_schedule of the row it follows, computed
    over every item (not a worker's share), and its kept counts are those rates' (kept_count of N)."""
    from helpers import hf_config, make_checkpoint
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    from dyrate_ref.pruning import DyRateSchedule, NoPruning, kept_count
    from dyrate_ref.tools import evaluate
    from helpers import noise_image
    make_checkpoint(str(tmp_path), hf_config(text=dict(num_hidden_layers=3)))
    model = load_model(str(tmp_path))
    proc = Processor(str(tmp_path), model.config)
    items = [Item.of(noise_image(40, 40, seed=i), "Describe it.", id=f"x{i}") for i in range(4)]
    adaptive = DyRateSchedule(1, (0.0, 0.5, 0.9))
    rows = [report.Row("none", "none", NoPruning()), report.Row("a", "a", adaptive),
            report.Row("sched", "s", DyRateSchedule(1, (0.0,)), schedule_of="a")]
    out_rows, records = evaluate.evaluate_all(model, proc, items, rows, 6, 2, None)
    N = model.config.num_image_tokens
    want = report.mean_schedule(records["a"], N)
    assert out_rows[2].method.schedule == want and rows[2].method.schedule == (0.0,)
    for r in records["sched"]:
        assert r["kept"] == [kept_count(N, want[min(t, len(want) - 1)]) for t in range(len(r["kept"]))]


def test_the_validation_choice_by_hand():
    """Cheapest on none's answers among the rows within 1 QA point, 0.01 F1 and 2 verdict points of none:
    b (0.9) loses 3 points, c (0.7) loses 0.05 F1, e (0.6) loses 3 verdict points, so a (0.95) and d (0.95,
    but less KV) qualify; d wins the KV tie-break."""
    def row(name, em, f1, flops, kv, verdict=0.0):
        return {"method": name, "em_delta": em, "f1_delta": f1, "verdict_delta": verdict, "lm_flops_forced": flops,
                "kv_mean_forced": kv}
    rows = [row("none", 0, 0, 1, 1), row("a", -0.005, 0.0, 0.95, 0.9), row("b", -0.03, 0.0, 0.9, 0.5),
            row("c", 0.0, -0.05, 0.7, 0.5), row("d", -0.01, -0.01, 0.95, 0.8), row("e", 0.0, 0.0, 0.6, 0.5, -0.03)]
    assert report.validation_choice(rows, BOUNDS)["method"] == "d"
    assert report.validation_choice(rows[:1] + rows[2:4], BOUNDS) is None


def test_validation_picks_each_methods_own_best_not_a_common_k():
    """A constructed validation table: FastV is cheapest within the bounds at K=2 with the mean score
    (its K=3 rows lose accuracy), DyRate at K=3 (its cheaper K=1 row loses 5 points), VTW nowhere. Each
    method gets its own K and score; a rule that took one K for all, or one best row overall, fails."""
    def row(name, family, flops, kv, em=0.0):
        return {"method": name, "family": family, "em_delta": em, "lm_flops_forced": flops, "kv_mean_forced": kv}
    rows = [row("none", "none", 1, 1),
            row("FastV K=3 R=0.5", "FastV K=3", 0.60, 0.6, em=-0.13),
            row("FastV K=3 R=0.1", "FastV K=3", 0.95, 0.9),
            row("FastV K=2 R=0.25 score=mean", "FastV K=2 score=mean", 0.80, 0.8),
            row("FastV K=2 R=0.5 score=mean", "FastV K=2 score=mean", 0.65, 0.7, em=-0.009),
            row("DyRate K=1 predictor (c=0.5)", "DyRate predictor", 0.50, 0.4, em=-0.05),
            row("DyRate K=3 predictor (c=0.5)", "DyRate predictor", 0.97, 0.5),
            row("VTW K=4", "VTW", 0.55, 0.5, em=-0.3)]
    choices = report.validation_choices(rows, BOUNDS)
    assert {k: v and v["method"] for k, v in choices.items()} == {
        "FastV": "FastV K=2 R=0.5 score=mean", "DyRate predictor": "DyRate K=3 predictor (c=0.5)", "VTW": None}
    assert report.validation_choice(rows, BOUNDS)["method"] == "FastV K=2 R=0.5 score=mean"  # one best overall


def test_better_than_random_by_hand():
    """Ours minus the control, item by item, SE clustered by picture: exact match d = [1, 0, 1, 0] over
    pictures p1, p1, p2, p3: mean 0.5, deviations summed per picture 0, .5, -.5, SE sqrt(3/2 * .5) / 4 =
    0.217: beyond 2 SE. F1 on two items only, d = [.1, -.1]: mean 0, not better."""
    items = [Item(f"i{k}", "q", "color", 0, c) for k, c in enumerate(["p1", "p1", "p2", "p3"])]
    ours = [{"em": 1.0}, {"em": 1.0, "f1": 0.5}, {"em": 1.0, "f1": 0.3}, {"em": 0.0}]
    control = [{"em": 0.0}, {"em": 1.0, "f1": 0.4}, {"em": 0.0, "f1": 0.4}, {"em": 0.0}]
    got = report.better_than(ours, control, items)
    assert got["em"]["difference"] == pytest.approx(0.5) and got["em"]["se"] == pytest.approx(math.sqrt(0.75) / 4)
    assert got["em"]["better"] and not got["f1"]["better"] and got["f1"]["items"] == 2 and "verdict" not in got
    worse = report.better_than(control, ours, items)
    assert not worse["em"]["better"] and worse["em"]["difference"] == pytest.approx(-0.5)
    # between one and two SE is not better: d = [1, 1, 0, 0] on four pictures, mean .5, SE sqrt(4/3) / 4 = .289
    four = [Item(f"j{k}", "q", "look", 0, f"q{k}") for k in range(4)]
    near = report.better_than([{"verdict": v} for v in (1.0, 1.0, 0.0, 0.0)], [{"verdict": 0.0}] * 4, four)
    assert near["verdict"]["se"] == pytest.approx(math.sqrt(4 / 3) / 4) and not near["verdict"]["better"]


def test_step0_table_by_shapes_and_kind():
    """Mean kept count at step 0 and at the last step, and the share of items cut at step 0, grouped by
    the picture's number of shapes and by question kind; items without a scene left out."""
    from types import SimpleNamespace as NS
    scene = lambda n: NS(shapes=tuple(range(n)))  # noqa: E731
    items = [Item(f"i{k}", "q", kind, 0, f"c{k}", scene=scene(n)) for k, (kind, n) in
             enumerate([("count", 1), ("color", 1), ("count", 5), ("describe", 5)])] + [Item("f", "q", "answer", 0, "f")]
    records = [{"kept": [100, 90]}, {"kept": [144, 144, 50]}, {"kept": [144]}, {"kept": [120, 10]}, {"kept": [1]}]
    t = report.step0_table(records, items, 144)
    assert t["by_shapes"] == {1: {"items": 2, "kept0": 122.0, "kept_last": 70.0, "cut0": 0.5},
                              5: {"items": 2, "kept0": 132.0, "kept_last": 77.0, "cut0": 0.5}}
    assert t["by_kind"]["count"] == {"items": 2, "kept0": 122.0, "kept_last": 117.0, "cut0": 0.5}
    assert set(t["by_kind"]) == {"count", "color", "describe"}
    text = report.step0_text(t, "DyRate")
    assert "| 1 | 2 | 122.0 | 50.0 | 70.0 |" in text and "| describe | 1 | 120.0 | 100.0 | 10.0 |" in text


# ----------------------------------------------------------------------------------------------------
# The decisions at their thresholds: each case sits just inside or just outside its boundary, and some
# set two criteria against each other, so that a rule on the wrong side of a boundary, or criteria read
# in the wrong order, fails here.


def test_matched_accuracy_at_its_bounds():
    """Bounds em 0.01, f1 0.01, verdict 0.02: a loss of exactly the bound is matched, a loss of 0.0001
    more is not, in each score alone; a gain never disqualifies; a score the row lacks is not required."""
    for key, bound in BOUNDS.items():
        assert report.within({f"{key}_delta": -bound}, BOUNDS)
        assert not report.within({f"{key}_delta": -bound - 1e-4}, BOUNDS), key
        assert report.within({f"{key}_delta": 0.3}, BOUNDS)
    # the criteria disagree: exact match well inside, F1 just outside -> not matched
    assert not report.within({"em_delta": 0.0, "f1_delta": -0.0101, "verdict_delta": 0.0}, BOUNDS)
    assert not report.within({"em_delta": -0.0101, "f1_delta": 0.0, "verdict_delta": 0.05}, BOUNDS)
    assert report.within({"em_delta": -0.0099, "f1_delta": -0.0099, "verdict_delta": -0.0199}, BOUNDS)
    assert report.within({}, BOUNDS)


def test_the_validation_rule_reads_lm_flops_first_then_kv():
    """x: LM FLOPs 0.900, KV 0.99; y: LM FLOPs 0.901, KV 0.10 -- FLOPs decide (x), though y's KV is far
    lower; at equal FLOPs the KV decides; a cheaper row 0.0001 beyond a bound is passed over; none (the
    first row) is never the choice, even when nothing else qualifies."""
    def row(name, flops, kv, em=0.0):
        return {"method": name, "em_delta": em, "lm_flops_forced": flops, "kv_mean_forced": kv}
    none = row("none", 1.0, 1.0)
    assert report.validation_choice([none, row("y", 0.901, 0.10), row("x", 0.900, 0.99)], BOUNDS)["method"] == "x"
    assert report.validation_choice([none, row("x", 0.9, 0.99), row("y", 0.9, 0.98)], BOUNDS)["method"] == "y"
    cheap_out = row("out", 0.5, 0.5, em=-0.0101)
    assert report.validation_choice([none, cheap_out, row("x", 0.9, 0.99)], BOUNDS)["method"] == "x"
    assert report.validation_choice([none, cheap_out], BOUNDS) is None
    assert report.validation_choice([row("none", 0.1, 0.1), row("x", 0.9, 0.99)], BOUNDS)["method"] == "x"


def comparison_at(shift: float, target: float = 1.0) -> dict:
    """The declared comparison on four items, each its own picture, none costing 100 on each. Ours (the
    only DyRate row) costs 30 on every item; theirs costs 30 - 100 d_i with d = [x + .1, x - .1, x + .1,
    x - .1] for x = `shift`: the paired differences (ours - theirs, over none's 100) have mean x and
    deviations +-0.1, so SE^2 = G/(G-1) * 4 * 0.01 / n^2 = 4/3 * 0.04 / 16, SE = 0.1 / sqrt(3) = 0.0577,
    and 2 SE = 0.11547."""
    from dyrate_ref.pruning import DyRateSchedule, NoPruning
    items = [item(i, "color", f"p{i}", answer="x") for i in range(4)]
    d = [shift + 0.1, shift - 0.1, shift + 0.1, shift - 0.1]
    theirs = [30 - 100 * x for x in d]
    sides = [("none", "none", NoPruning(), [100.0] * 4), ("ours", "DyRate predictor", DyRateSchedule(2, (0.5,)), [30.0] * 4),
             ("theirs", "schedule", DyRateSchedule(2, (0.5,)), theirs)]
    results = [(report.Row(name, fam, m), {"em_delta": 0.0, "lm_flops_forced": sum(c) / 400,
                                           "kv_mean_forced": sum(c) / 400}) for name, fam, m, c in sides]
    records = {name: [rec(1.0, forced_prefill_flops=c, forced_decode_flops=0.0, forced_kv_mean=c) for c in costs]
               for name, _, _, costs in sides}
    records["none"] = [rec(1.0, pf=100.0, df=0.0, kv=(100,), tokens=[1]) for _ in range(4)]
    c = report.main_comparison(results, records, items, "DyRate predictor",
                               {"schedule": {"lm_flops": target, "kv_mean": target}}, BOUNDS)
    return c["against"]["schedule"]


def test_the_main_comparison_at_two_standard_errors():
    """x = -0.117 is beyond 2 SE (0.11547): met; x = -0.114 is cheaper but within 2 SE: not met. With the
    target ratio below the measured one (ours 0.30 / theirs 0.417 = 0.719 > 0.7), beyond 2 SE is not
    enough: the criteria disagree and the target is not met."""
    beyond, inside = comparison_at(-0.117), comparison_at(-0.114)
    for side, x in ((beyond, -0.117), (inside, -0.114)):
        for cost in ("lm_flops", "kv_mean"):
            assert side["costs"][cost]["difference"] == pytest.approx(x)
            assert side["costs"][cost]["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert beyond["target_met"] and not inside["target_met"]
    strict = comparison_at(-0.117, target=0.7)
    assert strict["costs"]["lm_flops"]["ratio"] == pytest.approx(0.30 / 0.417)
    assert not strict["target_met"] and comparison_at(-0.117, target=0.72)["target_met"]


def test_the_shipped_predictor_has_the_layer_and_confidence_chosen_on_validation():
    """docs/validation_best.json is the evidence: DyRate's own best there (report.validation_choices) names
    the K and c the shipped predictor file holds (and it ran on the validation split, disjoint from the
    reported test scenes)."""
    import json
    import re
    from safetensors import safe_open
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    figures = json.load(open(os.path.join(here, "docs", "validation_best.json")))
    assert figures["data"].endswith(":validation")
    from dyrate_ref.tools.evaluate import MATCHED
    chosen = report.validation_choices(figures["rows"], MATCHED)["DyRate predictor"]["method"]
    K, c = re.search(r"K=(\d+)", chosen).group(1), re.search(r"c=([0-9.]+)", chosen).group(1)
    with safe_open(os.path.join(DEFAULT_WEIGHTS, "dyrate_predictor.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (int(meta["layer"]), float(meta["confidence"])) == (int(K), float(c)), chosen
    assert meta["score"] in chosen  # its file name (e2e_k2_mean...) says the score it was trained on


def test_the_kept_schedule_averages_each_step_over_the_answers_that_reach_it():
    recs = [{"kept": [10, 8, 6]}, {"kept": [10]}, {"kept": [6, 4]}]
    # N = 10: step 0 over 3 answers (10+10+6)/30; step 1 over 2 (8+4)/20; step 2 over 1: 6/10
    assert report.kept_schedule(recs, 10, min_answers=1) == pytest.approx([26 / 30, 12 / 20, 6 / 10])
    # by default a step needs 5 answers, here all 3: only step 0
    assert report.kept_schedule(recs, 10) == pytest.approx([26 / 30])


def test_the_kept_schedule_ends_where_too_few_answers_reach():
    """Five answers cut to 2 of 10 from step 1 and end at step 3; a sixth never cuts and runs to step 9.
    Steps 0-3, reached by all six: 1.0, then (5 * 2 + 10) / 60 = 1/3; steps 4-9 are the one uncut answer's
    alone: left out (the serving model repeats step 3's 1/3), not its 1.0 repeated as the peak."""
    recs = [{"kept": [10, 2, 2, 2]} for _ in range(5)] + [{"kept": [10] * 10}]
    assert report.kept_schedule(recs, 10) == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert report.kept_schedule(recs, 10, min_answers=1) == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3] + [1.0] * 6)


# ----------------------------------------------------------------------------------------------------
# trace from-openai: the top-k's order and what it keeps.

def test_an_openai_top_k_is_sorted_best_first_and_keeps_the_chosen_token():
    from dyrate_ref.tools.trace import openai_trace
    lp = {"content": [
        # listed out of order; the chosen token (7) is not among them: it is added with its own log-prob
        {"token": "token_id:7", "logprob": -2.0, "top_logprobs": [
            {"token": "token_id:3", "logprob": -1.5}, {"token": "token_id:9", "logprob": -0.5},
            {"token": "token_id:4", "logprob": -3.0}]},
        {"token": "token_id:9", "logprob": -0.1, "top_logprobs": [
            {"token": "token_id:9", "logprob": -0.1}, {"token": "token_id:2", "logprob": -2.5},
            {"token": "token_id:1", "logprob": -4.0}]}]}
    t = openai_trace({"choices": [{"logprobs": lp}]}, torch.arange(3), "r.json")
    assert t["tokens"].tolist() == [7, 9]
    # k = the smallest set's size (step 0 has 4 with the chosen one, step 1 has 3): k = 3, best first
    assert t["topk_ids"].tolist() == [[9, 3, 7], [9, 2, 1]]
    assert t["topk_logprobs"].flatten().tolist() == pytest.approx([-0.5, -1.5, -2.0, -0.1, -2.5, -4.0])


# ----------------------------------------------------------------------------------------------------
# The stop reason at the token limit, DAgger's aggregation, VTW's averaging.

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    from helpers import hf_config, make_checkpoint, noise_image
    d = str(tmp_path_factory.mktemp("tools") / "w")
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4)))
    model = load_model(d)
    return model, Processor(d, model.config), noise_image(40, 40, seed=3)


def test_an_answer_that_ends_on_its_last_allowed_token_stopped_at_eos(tiny):
    from dyrate_ref.generation import generate
    model, proc, img = tiny
    ids, px = proc.input_ids("What is it?"), proc.pixel_values(img)
    free = generate(model, ids, px, 3).tokens
    assert generate(model, ids, px, 3).stop_reason == "max_new_tokens"
    ended = generate(model, ids, px, 3, stop_ids={free[2]})  # EOS is the 3rd token of 3 allowed
    assert ended.tokens == free and ended.stop_reason == "eos"
    assert generate(model, ids, px, 3, force=free).stop_reason == "forced"


def test_dagger_rounds_aggregate_every_round_s_steps(tiny, monkeypatch):
    """train(): round 0 on the oracle's path, then each round adds the predictor's own steps to what was
    there: the final fit sees all of them, in order."""
    from dyrate_ref.predictor import CUTS, FEATURES
    from dyrate_ref.tools import train_predictor as tp
    model, proc, img = tiny
    rounds = []

    def fake_label_all(model, answered, K, margin, policy=None, show_progress=True, what="", score="last"):
        r = len(rounds)
        rounds.append(policy is not None)
        f = torch.full((3 + r, len(FEATURES)), float(r))  # round r: 3 + r steps whose features are r
        return f, torch.full((3 + r,), r % len(CUTS), dtype=torch.long), torch.zeros(3 + r)
    monkeypatch.setattr(tp, "label_all", fake_label_all)
    monkeypatch.setattr(tp, "greedy_answers", lambda *a, **k: [None])
    _, feats, labels, log = tp.train_imitation(model, proc, [], 1, 1.0, rounds=3, epochs=2, show_progress=False)
    assert rounds == [False, True, True]  # the oracle's path first, then the predictor's own
    assert feats.shape[0] == 3 + 4 + 5 and feats[:, 0].tolist() == [0.0] * 3 + [1.0] * 4 + [2.0] * 5
    assert labels.tolist() == [0] * 3 + [1] * 4 + [2 % len(CUTS)] * 5 and len(log) == 3


def test_vtw_calibration_averages_kl_over_every_generated_token(tiny, monkeypatch):
    """Two examples whose answers have 2 and 5 tokens: the mean is over the 7 tokens (a mean of the two
    examples' means would weigh the short answer's tokens 2.5x); each KL checked against the cached,
    evicting VTW loop fed the same tokens."""
    from dyrate_ref.generation import generate
    from dyrate_ref.pruning import VTW
    from dyrate_ref.tools import calibrate_vtw as cv
    from dyrate_ref.tools.data import Item
    from dyrate_ref.tools.metrics import kl_divergence
    from helpers import noise_image
    model, proc, img = tiny
    examples = [Item.of(img, "What is it?"), Item.of(noise_image(40, 40, seed=8), "Describe it.")]
    real = cv.reference_answer
    lengths = iter((2, 5))
    monkeypatch.setattr(cv, "reference_answer", lambda m, ids, px, n, *a, **kw: real(m, ids, px, next(lengths)))
    got = cv.mean_kl_per_layer(model, proc, examples, [1, 2], show_progress=False)
    for K in (1, 2):
        per_token = []
        for ex, T in zip(examples, (2, 5)):
            ids, px = proc.input_ids(ex.prompt), proc.pixel_values(ex.picture())
            full = generate(model, ids, px, T)
            withdrawn = generate(model, ids, px, T, VTW(K), force=full.tokens)
            per_token += kl_divergence(torch.stack(withdrawn.record.logits), torch.stack(full.record.logits)).tolist()
        assert len(per_token) == 7
        assert got[K] == pytest.approx(sum(per_token) / 7, rel=1e-4, abs=1e-7)


# ----------------------------------------------------------------------------------------------------
# The metrics and the output-path rule.

def test_object_f1_counts_a_repeated_shape_once():
    import random
    from dyrate_ref.demo.scenes import object_f1, random_scene
    s = random_scene(random.Random(4), 2, 2)
    a, b = s.shapes
    one = f"{a.color} {a.kind} {'in' if a.position == 'center' else 'at'} the {a.position}"
    # the first shape named twice, the second never: precision 1/2 (one of two named is a new hit),
    # recall 1/2, F1 1/2 -- not 2/3, which counting the repeat as a second hit would give
    assert object_f1(f"There are two shapes: a {one} and a {one}.", s) == pytest.approx(0.5)


def test_an_output_beside_an_input_folder_with_a_common_prefix_is_not_inside_it(tmp_path):
    from dyrate_ref.commands import UserError
    from dyrate_ref.files import check_outputs
    (tmp_path / "w").mkdir()
    (tmp_path / "w2").mkdir()
    (tmp_path / "w" / "sub").mkdir()
    check_outputs([("--json", str(tmp_path / "w2" / "x.json"))], [("the weights", str(tmp_path / "w"))])  # allowed
    check_outputs([("--json", str(tmp_path / "w.json"))], [("the weights", str(tmp_path / "w"))])  # allowed
    with pytest.raises(UserError, match="would overwrite"):
        check_outputs([("--json", str(tmp_path / "w" / "sub" / "x.json"))], [("the weights", str(tmp_path / "w"))])
    with pytest.raises(UserError, match="would overwrite"):
        os.symlink(tmp_path / "w", tmp_path / "link")
        check_outputs([("--json", str(tmp_path / "link" / "x.json"))], [("the weights", str(tmp_path / "w"))])


def test_the_premise_summary_scores_only_the_scored_items():
    from dyrate_ref.tools import premise
    recs = [{"kind": "answer", "cluster": "a", "choice": "step", "step": 0, "fraction": 0.5, "kl": 0.2, "top1": 1.0,
             "same_answer": 1.0, "score": 1.0, "base_score": 1.0},
            {"kind": "answer", "cluster": "b", "choice": "step", "step": 0, "fraction": 0.5, "kl": 0.4, "top1": 0.5,
             "same_answer": 0.0, "score": 0.0, "base_score": 1.0},
            {"kind": "caption", "cluster": "c", "choice": "step", "step": 0, "fraction": 0.5, "kl": 0.6, "top1": 0.0,
             "same_answer": 0.0, "score": None, "base_score": None}]
    rows = {r["kind"]: r for r in premise.summarise_cuts(recs)}
    # "all": KL and agreement over all 3 items; the score over the 2 that have one
    assert rows["all"]["n"] == 3 and rows["all"]["kl"] == pytest.approx(0.4) and rows["all"]["same_answer"] == pytest.approx(1 / 3)
    assert rows["all"]["score"] == 0.5 and rows["all"]["base_score"] == 1.0
    assert rows["caption"]["score"] is None and rows["answer"]["top1"] == 0.75


def test_each_record_counts_lm_flops_without_the_tower_and_is_forced_with_none_s_own_answer(tiny, tmp_path):
    """evaluate's records on two items: the prefill's LM FLOPs are the step-0 FLOPs less the vision
    tower's (the same for every method), and each method's forced costs are those of a run fed none's
    answer to that very item."""
    from dyrate_ref.cost import flops_per_step, kv_bytes_per_step, vision_flops
    from dyrate_ref.generation import generate
    from dyrate_ref.pruning import FastV, NoPruning
    from dyrate_ref.tools import evaluate
    from helpers import noise_image
    model, proc, _ = tiny
    items = []
    for i in range(2):
        noise_image(40, 40, seed=20 + i).save(tmp_path / f"{i}.png")
        items.append(Item(f"x{i}", "What is it?" if i else "Describe it.", "answer", i, f"x{i}", answer="no",
                          image_path=str(tmp_path / f"{i}.png")))
    rows = [report.Row("none", "none", NoPruning()), report.Row("fastv", "fastv", FastV(2, 0.9))]
    # none's answers of different lengths (item 1's ends at its first token), so that costs forced with the
    # wrong item's answer would differ
    import copy
    proc = copy.copy(proc)
    first = [generate(model, proc.input_ids(it.prompt), proc.pixel_values(it.picture()), 5).tokens for it in items]
    assert first[1][0] not in first[0]
    proc.stop_ids = set(proc.stop_ids) | {first[1][0]}
    records = evaluate.evaluate_rows(model, proc, items, rows, 5)
    assert [len(r["tokens"]) for r in records["none"]] == [5, 1]
    vis = vision_flops(model.config)
    for it, none, mine in zip(items, records["none"], records["fastv"]):
        ids, px = proc.input_ids(it.prompt), proc.pixel_values(it.picture())
        own = generate(model, ids, px, 5, FastV(2, 0.9), stop_ids=proc.stop_ids).record
        assert mine["prefill_flops"] == flops_per_step(own)[0] - vis and mine["decode_flops"] == sum(flops_per_step(own)[1:])
        forced = generate(model, ids, px, 5, FastV(2, 0.9), force=none["tokens"]).record
        assert mine["forced_prefill_flops"] == flops_per_step(forced)[0] - vis
        assert mine["forced_decode_flops"] == sum(flops_per_step(forced)[1:]) and mine["forced_kv_peak"] == max(kv_bytes_per_step(forced))
    # The same with base answers that are surely not the method's own (so no forced run can be skipped):
    # item i's forced costs are those of a run fed item i's base tokens, of lengths 4 and 1.
    fake = [{"tokens": [5, 6, 7, 8]}, {"tokens": [9]}]
    recs = evaluate.run_method(model, proc, items, rows[1], 5, none=fake)
    for it, base, mine in zip(items, fake, recs):
        forced = generate(model, proc.input_ids(it.prompt), proc.pixel_values(it.picture()), 5, FastV(2, 0.9),
                          force=base["tokens"]).record
        assert (mine["forced_decode_flops"], mine["forced_kv_peak"]) == (sum(flops_per_step(forced)[1:]), max(kv_bytes_per_step(forced)))


def test_the_random_shape_baseline_by_hand():
    """A model that names a random shape's colour: 1/2 on a scene of a red circle and a blue star asked
    about the circle; 2/3 on red circle, red square, blue star asked about the square."""
    from dyrate_ref.demo.scenes import Scene, Shape
    from dyrate_ref.tools.data import random_shape_colour
    two = Scene((Shape("circle", "red", 0, (10, 10), 10), Shape("star", "blue", 8, (80, 80), 10)), (0, 0, 0), 1)
    three = Scene((Shape("circle", "red", 0, (10, 10), 10), Shape("square", "red", 4, (48, 48), 10),
                   Shape("star", "blue", 8, (80, 80), 10)), (0, 0, 0), 2)
    items = [Item("a", "What color is the circle?", "color", 0, "a", answer="x", scene=two),
             Item("b", "What color is the square?", "color", 0, "b", answer="x", scene=three),
             Item("c", "How many shapes are there?", "count", 0, "c", answer="x", scene=three)]
    assert random_shape_colour(items) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_trace_compare_notes_two_traces_made_from_different_pictures():
    """input_ids are equal for any two pictures of one size: the pixels tell them apart (a bfloat16 copy
    of the same pixels still counts as the same picture)."""
    from dyrate_ref.tools.trace import LIMITS, compare
    g = torch.Generator().manual_seed(0)
    px = torch.randn(1, 3, 8, 8, generator=g)
    base = {"input_ids": torch.arange(6), "tokens": torch.tensor([1, 2]), "logits": torch.randn(2, 10, generator=g)}
    same = compare({**base, "pixel_values": px}, {**base, "pixel_values": px.bfloat16().float()}, LIMITS["float32"])
    assert same.same and same.checks["pixel_values"]["ok"]
    other = compare({**base, "pixel_values": px}, {**base, "pixel_values": torch.randn(1, 3, 8, 8, generator=g)},
                    LIMITS["float32"])
    assert not other.same and any("different images" in n for n in other.notes)


def test_the_cost_is_said_before_the_run_starts(tmp_path, capsys, monkeypatch):
    """cost_line by hand (26 rows x 18 items at 0.9 s: 468 generations, up to 468 more on none's answers,
    7.0 to 14.0 minutes; reused records are not counted again), and evaluate says it on stderr, with this
    run's own counts, before the first row runs."""
    import json
    line = report.cost_line(26, 18, 0, 0.9)
    assert "26 rows x 18 items: 468 generations, and up to 468 more" in line and "7.0 min to 14.0 min" in line
    assert "18 generations (12 reused from --results), and up to 18 more" in report.cost_line(3, 10, 12, 2.0)
    assert "about 36 s to 1.2 min" in report.cost_line(3, 10, 12, 2.0)
    from dyrate_ref.tools import evaluate
    seen, real = {}, evaluate.evaluate_all

    def spy(*args, **kwargs):
        seen["before"] = capsys.readouterr().err
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "evaluate_all", spy)
    assert evaluate.run(["--scenes", "1", "--only-extra", "--no-control", "--extra", "fastv",
                         "--max-new-tokens", "4", "--json", str(tmp_path / "e.json")]) == 0
    items = json.load(open(tmp_path / "e.json"))["prompts"]
    said = next(line for line in seen["before"].splitlines() if "rows x" in line)
    assert said.startswith(f"2 rows x {items} items: {2 * items} generations"), said


@pytest.mark.parametrize("L, layers, mapped", [(8, (1, 3, 7), (4, 12, 28)), (5, (1, 2, 4), (6, 13, 26))])
def test_the_serving_tables_k_column_is_the_depth_mapping_at_the_call_site(L, layers, mapped):
    """serving_table's "K here → on 7B" column, read off the printed table: K of an L-layer decoder maps to
    round(K x 32 / L) of 7B's 32 (2 of 5 -> 12.8 -> 13, not floor's 12), worked out by hand; the kept
    fractions it prints are each row's own (half kept: 0.50)."""
    from dyrate_ref.pruning import FastV, NoPruning
    rows = [(report.Row("none", "none", NoPruning()), {})]
    records = {"none": [{"kept": [10, 10, 10]}] * 5}
    for K in layers:
        rows.append((report.Row(f"FastV K={K}", "f", FastV(K, 0.5)), {}))
        records[f"FastV K={K}"] = [{"kept": [5, 5, 5]}] * 5
    table = report.serving_table(rows, records, 10, L)
    cells = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| FastV")}
    assert cells == {f"FastV K={K}": f"{K} → {m}" for K, m in zip(layers, mapped)}
    assert all("| 0.50 / 0.50 / 0.50 |" in line for line in table.splitlines() if line.startswith("| FastV"))


def test_a_rows_name_is_the_same_however_the_predictor_path_is_written(tmp_path, monkeypatch):
    """The shipped predictor named through a relative path, a path with '..' in it, or a symlinked
    weights folder is still the shipped one: its row has no file name in it; another file's row does."""
    import shutil
    from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config
    from dyrate_ref.pruning import DyRate
    from dyrate_ref.settings import Context, make_method
    cfg = read_config(DEFAULT_WEIGHTS)
    ctx = Context(DEFAULT_WEIGHTS, 8, cfg)
    shipped = os.path.join(DEFAULT_WEIGHTS, "dyrate_predictor.safetensors")
    monkeypatch.chdir(os.path.dirname(DEFAULT_WEIGHTS))
    link = tmp_path / "w"
    os.symlink(DEFAULT_WEIGHTS, link)
    own = make_method(DyRate, {}, ctx)[0]
    want = f"DyRate K={own.layer} predictor (c={own.confidence:g})"  # the shipped file's own K and c
    for written in ("dyrate-shapes/dyrate_predictor.safetensors", "../weights/dyrate-shapes/dyrate_predictor.safetensors",
                    str(link / "dyrate_predictor.safetensors"), shipped):
        method, _ = make_method(DyRate, {"predictor": written}, ctx)
        assert report.label(method, DEFAULT_WEIGHTS) == want, written
        assert report.label(method, str(link)) == want, written
    other = tmp_path / "mine.safetensors"
    shutil.copy(shipped, other)
    method, _ = make_method(DyRate, {"predictor": str(other)}, ctx)
    assert report.label(method, DEFAULT_WEIGHTS) == want + " mine.safetensors"


# ----------------------------------------------------------------------------------------------------
# The Pareto figure's points, from the JSON's rows (what evaluate --plot draws, and what the JSON keeps).


def test_pareto_points_from_json_rows_by_hand():
    """Per accuracy key and cost panel, one point per row but the control: x the cost on none's answer
    tokens where the row has it (else its own), y and ±2 SE on the key's scale, under the row's family."""
    rows = [{"method": "none", "family": "none", "em": 0.9, "em_se": 0.0, "lm_flops": 1.0, "kv_mean": 1.0},
            {"method": "none, image blanked (control)", "family": "control", "em": 0.2, "em_se": 0.05,
             "lm_flops": 1.0, "kv_mean": 1.0},
            {"method": "FastV K=2 R=0.5", "family": "FastV K=2", "em": 0.85, "em_se": 0.01, "lm_flops": 0.6,
             "lm_flops_forced": 0.64, "kv_mean": 0.7, "kv_mean_forced": 0.66}]
    points = report.pareto_points(rows, ["em"], {"em": 100}, {"em": "exact match %"})
    assert [p["label"] for p in points] == ["none", "none", "FastV K=2 R=0.5", "FastV K=2 R=0.5"]
    fastv = [p for p in points if p["label"] == "FastV K=2 R=0.5"]
    assert [p["x"] for p in fastv] == [0.64, 0.66]  # on none's answer tokens, not its own
    assert all(p["y"] == pytest.approx(85.0) and p["yerr"] == pytest.approx(2.0) and p["method"] == "FastV K=2"
               and p["ylabel"] == "exact match %" for p in fastv)
    assert {p["panel"].split(" ")[0] for p in points} == {"LM", "mean"}
