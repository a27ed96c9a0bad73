"""What the demo's training pipeline derives over a whole run, and the evaluation set's identity.

The unit tests in test_demo.py check pieces (the schedule function, a stage's draw, that a loss falls);
here, what the pieces add up to: the learning rate each step of each stage actually gets (worked out on
paper below), what each kind of picture in a batch is asked, which examples each go/no-go figure counts,
the optimizer's state across the decoder's growth, and that the held-out items are the same whichever
options draw them (so two runs' numbers are comparable)."""

import json
import math
import os
import random

import pytest
import torch

from dyrate_ref.demo.batches import Batcher
from dyrate_ref.demo.batches import answer_ids
from dyrate_ref.demo.recipes import V4, V5
from dyrate_ref.loading import DEFAULT_WEIGHTS
from helpers import TINY, tiny_recipe

HERE = os.path.dirname(os.path.abspath(__file__))


def processor():
    from dyrate_ref.loading import config_from_dict
    from dyrate_ref.processing import Processor
    cfg = config_from_dict(json.load(open(os.path.join(DEFAULT_WEIGHTS, "config.json"))))
    return Processor(DEFAULT_WEIGHTS, cfg)


# ----------------------------------------------------------------------------------------------------
# The learning rate of every stage


def cosine(progress: float) -> float:
    """The decay's factor: 0.05 + 0.95 * (1 + cos(pi * progress)) / 2."""
    return 0.05 + 0.475 * (1 + math.cos(math.pi * progress))


def test_v4_and_v5_learning_rates_at_each_stage_boundary_and_the_decay_start():
    """v4: stages bind 0-299, bind+exist 300-599, mixture 600-2599, one shared schedule over 2,600 steps,
    peak 1e-3: warm-up (step + 1) / 100 for steps 0-99, then 1, then a cosine over the last third from
    step int(2600 * 2/3) = 1733 to 2599 (progress (step - 1733) / 867). v5 adds look 2600-4099 on its own
    schedule, peak 3e-4: warm-up (within + 1) / 30, hold, cosine from within int(1500 * 2/3) = 1000 over
    500 steps."""
    want = {0: 1e-3 / 100, 99: 1e-3, 299: 1e-3, 300: 1e-3, 599: 1e-3, 600: 1e-3,
            1732: 1e-3, 1733: 1e-3 * cosine(0), 1734: 1e-3 * cosine(1 / 867), 2166: 1e-3 * cosine(433 / 867),
            2599: 1e-3 * cosine(866 / 867)}
    for step, lr in want.items():
        assert V4.lr(step) == pytest.approx(lr, rel=1e-9), step
        assert V5.lr(step) == pytest.approx(lr, rel=1e-9), step  # v5's appended stage leaves v4's steps alone
    assert V4.lr(2599) == pytest.approx(5.0003e-5, rel=1e-4)  # 1e-3 * (0.05 + 0.475 * (pi/867)^2 / 2)
    look = {2600: 3e-4 / 30, 2628: 3e-4 * 29 / 30, 2629: 3e-4, 3599: 3e-4, 3600: 3e-4 * cosine(0),
            3850: 3e-4 * cosine(250 / 500), 4099: 3e-4 * cosine(499 / 500)}
    for step, lr in look.items():
        assert V5.lr(step) == pytest.approx(lr, rel=1e-9), step
    assert V5.lr(3850) == pytest.approx(3e-4 * 0.525) and V5.lr(4099) == pytest.approx(1.50028e-5, rel=1e-4)
    assert V5.steps == 4100 and V5.stage_at(4099) == (V5.stages[-1], 1499)


def test_train_applies_each_steps_rate_and_keeps_adams_state_across_the_growth(tmp_path, monkeypatch):
    """train() on v5 cut to 3 steps a stage (bind on 1 layer, growing to 2 at bind+exist), the optimizer's
    step recorded as it is called. Shared schedule over the 9 steps of the first three stages, warm-up 2:
    step 0 1e-3 / 2, steps 1-5 1e-3, cosine from int(9 * 2/3) = 6 over 3 steps: progress 0, 1/3, 2/3 ->
    1e-3, 1e-3 * (0.05 + 0.475 * 1.5) = 7.625e-4, 1e-3 * (0.05 + 0.475 * 0.5) = 2.875e-4; the look stage's
    own warm-up of 30 steps at 3e-4: 1e-5, 2e-5, 3e-5. Adam's step count before each step: the weights
    the 1-layer decoder had keep counting through the growth (3 at step 3), the new layer's start at 0."""
    from dyrate_ref.demo.train import train
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        counts = [float(self.state[p]["step"]) if p in self.state else 0.0 for p in self.param_groups[0]["params"]]
        seen.append((self.param_groups[0]["lr"], max(counts), min(counts), len(self.param_groups[0]["params"])))
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(str(tmp_path / "m"), tiny_recipe(V5, 3), overrides=TINY, show_progress=False)
    stage2 = seen[-12:]  # stage 1 (the tower's 2 steps) comes first
    want = [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7.625e-4, 2.875e-4, 1e-5, 2e-5, 3e-5]
    assert [s[0] for s in stage2] == pytest.approx(want, rel=1e-9)
    assert [s[1] for s in stage2[:4]] == [0.0, 1.0, 2.0, 3.0]  # the old weights' moments survive the growth
    assert stage2[3][2] == 0.0 and stage2[2][2] == 2.0  # ... and the grown layer's start fresh
    assert stage2[3][3] > stage2[2][3]  # the new layer's weights are trained from the growth on


def test_the_optimizer_after_growth_carries_the_moments_of_the_weights_it_had():
    """optimizer(model, recipe, previous): each weight the model had keeps its exp_avg / exp_avg_sq /
    step as they were; the grown layers' weights have no state until their first step."""
    from dyrate_ref.demo.batches import grow
    from dyrate_ref.demo.train import optimizer
    from dyrate_ref.loading import load_model
    from helpers import hf_config, make_checkpoint
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, hf_config(text=dict(num_hidden_layers=1)))
        model = load_model(d)
    for p in model.parameters():
        p.requires_grad_(True)
    opt, params = optimizer(model, V4)
    for _ in range(2):
        opt.zero_grad()
        sum(p.square().sum() for p in params).backward()
        opt.step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    grow(model, 2)
    opt2, params2 = optimizer(model, V4, opt)
    old = set(before)
    assert old < set(params2)
    for p in params2:
        if p in old:
            assert all(torch.equal(opt2.state[p][k], v) for k, v in before[p].items())
            assert float(opt2.state[p]["step"]) == 2.0
        else:
            assert p not in opt2.state
    assert any(p not in old for p in params2)


# ----------------------------------------------------------------------------------------------------
# What each kind of picture in a batch is asked


class Recording(Batcher):
    """A Batcher that remembers, per picture, the stage it was drawn as and what it was asked."""

    def __init__(self, *args):
        super().__init__(*args)
        self.drawn = []

    def turns(self, scene, stage):
        t = super().turns(scene, stage)
        if t:
            self.drawn.append((stage.name, scene, t))
        return t


def within_4se(count: int, n: int, p: float) -> bool:
    return abs(count / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_a_mixture_batch_asks_each_kind_of_picture_its_own_questions():
    """v4's mixture, seed 3, 30 batches of 16 pictures: a quarter (binomial, within 4 SE) drawn as the
    bind+exist guard -- 2-4 shapes of distinct kinds and colours, asked colour, position and existence
    only, never described; the others 1-5 shapes, asked every question the scene allows (the count; colour
    and position of each kind seen once; a yes and a no existence question; a look-then-reason question
    on 2+ shapes) and described half the time. The rows are exactly the pictures' questions, in order,
    tokenised as inference tokenises them, each on its own picture."""
    from dyrate_ref.demo.scenes import all_questions
    proc = processor()
    b = Recording(proc, V4, 3)
    mix = V4.stage("mixture")
    pictures = 0
    for _ in range(30):
        start = len(b.drawn)
        px, rows = b.batch(mix)
        drawn = b.drawn[start:]
        assert px.shape[0] == len(drawn) == mix.scenes
        asked = [(s, kind, p) for s, kind, p, *_ in rows]
        want = [(i, kind, proc.input_ids(q).tolist()) for i, (_, _, turns) in enumerate(drawn) for kind, q, _ in turns]
        assert asked == want
        pictures += len(drawn)
    guard = [(scene, turns) for name, scene, turns in b.drawn if name == "bind+exist"]
    own = [(scene, turns) for name, scene, turns in b.drawn if name == "mixture"]
    assert len(guard) + len(own) == pictures and within_4se(len(guard), pictures, 0.25)
    for scene, turns in guard:
        assert 2 <= len(scene.shapes) <= 4 and len({s.kind for s in scene.shapes}) == len(scene.shapes)
        assert len({s.color for s in scene.shapes}) == len(scene.shapes)
        assert {k for k, _, _ in turns} <= {"color", "position", "exist"} and len(turns) == 4 * len(scene.shapes) // 2 + 2
    described = 0
    for scene, turns in own:
        kinds = [k for k, _, _ in turns]
        allowed = [k for k, _, _ in all_questions(scene, random.Random(0))]
        described += "describe" in kinds
        assert [k for k in kinds if k != "describe"] == allowed
    assert within_4se(described, len(own), 0.5)


def test_look_rows_are_blind_at_the_recipes_share_and_no_other_row_is():
    """v5's look stage, seed 4, 30 batches: every look row's reasoning starts at its " So" token; half
    (within 4 SE) of the look rows are blind, and no row of another kind ever is; v4 has no blind rows."""
    from dyrate_ref.demo.batches import reasoning_start
    proc = processor()
    batcher = Batcher(proc, V5, 4)
    rows = [r for _ in range(30) for r in batcher.batch(V5.stage("look"))[1]]
    look = [r for r in rows if r[1] == "look"]
    assert len(look) > 100 and not any(r[5] for r in rows if r[1] != "look")
    assert within_4se(sum(r[5] for r in look), len(look), 0.5)
    for _, _, _, a, reason_at, _ in look:
        assert proc.decode(a[reason_at:reason_at + 1]).strip() == "So"
    assert all(r[4] is None for r in rows if r[1] != "look")
    assert reasoning_start(proc, "A red circle in the center. So the circle is red.") == len(
        answer_ids(proc, "A red circle in the center.")) - 1
    batcher = Batcher(proc, V4, 4)
    v4 = [r for _ in range(10) for r in batcher.batch(V4.stage("mixture"))[1]]
    assert any(r[1] == "look" for r in v4) and not any(r[5] for r in v4)


# ----------------------------------------------------------------------------------------------------
# Which examples each go/no-go figure counts


def test_the_go_no_go_populations():
    """heldout_examples: "color3+" / "position3+" are exactly the colour / position questions on scenes of
    3 or more shapes (the go/no-go's 'colour on 3-5 shapes'); each look-then-reason question gives three
    entries: "look" (whole answer scored, sighted), "look_reason" (scored from its " So" token, sighted)
    and "look_blind" (scored from there, and blind from there)."""
    from dyrate_ref.demo.batches import heldout_examples, reasoning_start
    from dyrate_ref.demo.scenes import eval_set
    proc = processor()
    ex = heldout_examples(proc, 30, "color")
    items = eval_set(30)
    for kind in ("color", "position"):
        want = [(i.scene.seed, i.question) for i in items if i.kind == kind and len(i.scene.shapes) >= 3]
        got = [(s.seed, proc.decode(p)) for s, p, _, k, _, _ in ex if k == kind + "3+"]
        assert len(got) == len(want) > 5 and all(q.endswith(w[1] + " ASSISTANT:") for (_, q), w in zip(got, want))
        assert [g[0] for g in got] == [w[0] for w in want]
        assert all(first == 0 and blind is None for *_, k, first, blind in ex if k == kind + "3+")
    looks = [e for e in ex if e[3] == "look"]
    assert len(looks) > 5
    for kind, blind_too in (("look_reason", False), ("look_blind", True)):
        twins = [e for e in ex if e[3] == kind]
        assert len(twins) == len(looks)
        for (s, p, a, _, first, blind), (s0, p0, a0, _, first0, blind0) in zip(twins, looks):
            b = reasoning_start(proc, proc.decode(a0[:-1]))
            assert (s, p, a) == (s0, p0, a0) and (first0, blind0) == (0, None)
            assert first == b > 0 and blind == (b if blind_too else None)


def greedy(model, proc, scene, prompt_ids: list[int], prefix: list[int], n: int, blind_from: int | None = None):
    """n greedy tokens after prompt + prefix, by full forwards without a cache (blind_from: the answer
    index from whose prediction on the picture is hidden, as heldout_exact hides it)."""
    from dyrate_ref.demo.batches import blind_masks
    px = proc.pixel_values(scene.draw())
    out = list(prefix)
    for _ in range(n):
        ids = torch.tensor(prompt_ids + out)
        mask = blind_masks(ids == model.config.image_token_index,
                           [None if blind_from is None else len(prompt_ids) - 1 + blind_from], len(ids), 0, "cpu")
        x = model.embed(ids[None], model.image_features(px))
        pos = torch.arange(len(ids))
        for i, layer in enumerate(model.model.layers):
            x, _ = layer(x, *model.rope(pos), pos, None, i, mask)
        out.append(int(model.logits(x)[0, -1].argmax()))
    return out


@torch.no_grad()
def test_heldout_exact_counts_only_each_populations_scored_tokens():
    """A constructed held-out set on the shipped model, four entries per kind: "color" from the model's own
    greedy answer (a hit) and the same with its last token changed (a miss): 0.5. "look_reason" scored
    from index 2: an answer whose first token is wrong but whose rest is the greedy continuation after it
    (a hit, the wrong token is not scored) and one wrong at index 3 (a miss): 0.5. "look_blind" scored
    from 2 with the picture hidden from 2 on: its own blind greedy continuation is a hit (1.0), although
    the sighted continuation differs from it there."""
    from dyrate_ref.demo.batches import heldout_exact
    from dyrate_ref.demo.scenes import eval_set
    from dyrate_ref.loading import load_model
    model = load_model(DEFAULT_WEIGHTS).eval()
    proc = processor()
    items = eval_set(5)
    item = next(i for i in items if i.kind == "color")
    desc = next(i for i in items if i.kind == "describe" and i.scene is item.scene)
    p = proc.input_ids(item.question).tolist()
    own = greedy(model, proc, item.scene, p, [], 6)
    wrong_last = own[:-1] + [(own[-1] + 1) % 500]
    first_wrong = (own[0] + 7) % 500
    after_wrong = greedy(model, proc, item.scene, p, [first_wrong], 5)
    wrong_at_3 = own[:3] + [(own[3] + 1) % 500] + own[4:]
    pd = proc.input_ids(desc.question).tolist()
    blind = greedy(model, proc, desc.scene, pd, [], 8, blind_from=2)
    sighted = greedy(model, proc, desc.scene, pd, blind[:2], 6)
    assert sighted != blind, "the picture must matter after the cut for this case to test the mask"
    s = item.scene
    examples = [(s, p, own, "color", 0, None), (s, p, wrong_last, "color", 0, None),
                (s, p, after_wrong, "look_reason", 2, None), (s, p, wrong_at_3, "look_reason", 2, None),
                (desc.scene, pd, blind, "look_blind", 2, 2)]
    got = heldout_exact(model, examples, proc)
    assert got == {"color": 0.5, "look_blind": 1.0, "look_reason": 0.5}


# ----------------------------------------------------------------------------------------------------
# The evaluation set's identity


def key(it):
    return (it.id, it.prompt, it.kind, it.answer, it.references, it.cluster, it.seed)


def test_the_held_out_items_are_the_same_whichever_options_draw_them():
    """scene_items: with or without the look-then-reason kind the other items are the same (ids, prompts,
    answers, clusters, seeds), in the same order; 5 scenes are the first 5 of 40 (evaluate --quick's 4 of
    its 300, premise's 40); the validation split shares no scene with the test split; the training log's
    held-out checks read the test split's first scenes."""
    from dyrate_ref.demo.batches import heldout_examples
    from dyrate_ref.tools.data import scene_items
    with_look, without = scene_items(40, "test", look=True), scene_items(40, "test", look=False)
    assert [key(i) for i in with_look if i.kind != "look"] == [key(i) for i in without]
    assert any(i.kind == "look" for i in with_look) and not any(i.kind == "look" for i in without)
    few = scene_items(5, "test")
    assert [key(i) for i in few] == [key(i) for i in with_look[:len(few)]]
    assert len({i.cluster for i in few}) == 5
    validation = scene_items(40, "validation")
    assert not {i.cluster for i in validation} & {i.cluster for i in with_look}
    assert [key(i) for i in scene_items(5, "validation")] == [key(i) for i in validation][:len(scene_items(5, "validation"))]
    proc = processor()
    logged = [s.seed for s, *_ in heldout_examples(proc, 5, "color")]
    assert list(dict.fromkeys(logged)) == [int(i.cluster.removeprefix("scene")) for i in few if i.kind == "describe"]


@pytest.mark.parametrize("P", [0, 3])
def test_the_look_rows_blind_mask_at_its_boundary_query(P):
    """blind_masks at its edges, worked out by hand: image keys at positions 1..3; a row blind from
    position 6 (the query that predicts " So") has its query at position 5 still see the image and its
    query at 6 not, while both still see every text key before them; a row that is not blind sees the
    image from every query; no query sees a key after it. With a shared prefix (P = 3) the row's first
    query sits at position 3, the same positions hold."""
    from dyrate_ref.demo.batches import blind_masks
    T = 9 - P
    image_at = torch.zeros(P + T, dtype=torch.bool)
    image_at[1:4] = True
    mask = blind_masks(image_at, [6, None], T, P, "cpu")  # [2, 1, T, P + T]
    assert mask.shape == (2, 1, T, P + T)
    row = lambda r, pos: mask[r, 0, pos - P]  # noqa: E731  (the query at original position `pos`)
    assert row(0, 5)[1:4].all() and not row(0, 6)[1:4].any() and not row(0, 8)[1:4].any()
    assert row(0, 6)[0] and row(0, 6)[4:7].all() and not row(0, 6)[7:].any()
    assert all(row(1, pos)[1:4].all() for pos in range(max(P, 4), 9))
    assert blind_masks(image_at, [None, None], T, P, "cpu") is None
