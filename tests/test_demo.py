"""The embedded demo: the scene generator, the shipped weights (HF-loadable, HF-equal), the evaluation
command, the out-of-box generate.py answer, and a few steps of the training recipe."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dyrate_ref.loading import DEFAULT_WEIGHTS
from dyrate_ref.demo.scenes import (scene_description, COLORS, NUMBERS, POSITIONS, SIZE, eval_set, object_f1,
                                    parse_description, questions, random_scene)
from helpers import TINY, tiny_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generator_is_deterministic_per_seed():
    a = [random_scene(random.Random(5)) for _ in range(3)]
    b = [random_scene(random.Random(5)) for _ in range(3)]
    assert a == b
    assert a[0].draw().tobytes() == b[0].draw().tobytes()
    assert random_scene(random.Random(6)) != a[0]
    assert [i.answer for i in eval_set(5)] == [i.answer for i in eval_set(5)]


def test_ground_truth_matches_the_drawing():
    rng = random.Random(0)
    for _ in range(200):
        s = random_scene(rng)
        img = s.draw()
        assert len(s.shapes) in range(1, 6) and len({x.cell for x in s.shapes}) == len(s.shapes)
        for shape in s.shapes:
            got = img.getpixel(shape.center)
            want = COLORS[shape.color]
            assert max(abs(g - w) for g, w in zip(got, want)) <= 30, (shape, got)  # SMOOTH blurs a little
            col, row = shape.center[0] * 3 // SIZE, shape.center[1] * 3 // SIZE
            assert POSITIONS[row * 3 + col] == shape.position


def test_questions_have_one_right_answer():
    """Each answer restates what was asked right before its answer word (v4's format), and is right."""
    rng = random.Random(1)
    for _ in range(300):
        s = random_scene(rng)
        kinds = [x.kind for x in s.shapes]
        for kind, q, a in questions(s, rng):
            if kind == "count":
                n = len(s.shapes)
                assert a == (f"There are {NUMBERS[n]} shapes." if n > 1 else "There is one shape.")
            elif kind in ("color", "position"):
                shape_kind = q.rstrip("?").split()[-1]
                assert kinds.count(shape_kind) == 1
                only = next(x for x in s.shapes if x.kind == shape_kind)
                if kind == "color":
                    assert a == f"The {shape_kind} is {only.color}."
                else:
                    where = "in" if only.position == "center" else "at"
                    assert a == f"The {shape_kind} is {where} the {only.position}."
            else:
                color, shape_kind = q.rstrip("?").split()[-2:]
                present = any(x.color == color and x.kind == shape_kind for x in s.shapes)
                assert a.lower() == f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape_kind}: {'yes' if present else 'no'}."
        assert sorted(parse_description(scene_description(s))) == sorted((x.color, x.kind, x.position) for x in s.shapes)


def grade_answer(item, text: str) -> float:
    """A scene item graded as the tools grade it (tools/data.py's Item, what every table reports)."""
    from dyrate_ref.tools.data import Item
    gold = dict(references=(item.answer,)) if item.kind == "describe" else dict(answer=item.answer)
    return Item("x", item.question, item.kind, 0, "x", scene=item.scene, **gold).grade(text)


def test_scoring_is_exact_match_on_the_whole_restated_answer():
    from dyrate_ref.demo.scenes import EvalItem
    s = random_scene(random.Random(9), 3, 3)
    shape = s.shapes[0]
    item = EvalItem(s, "color", f"What color is the {shape.kind}?", f"The {shape.kind} is {shape.color}.")
    other = next(k for k in ("circle", "square", "triangle", "star") if k != shape.kind)
    assert grade_answer(item, f" The {shape.kind} is {shape.color}.") == 1.0
    assert grade_answer(item, f"the {shape.kind.upper()} is {shape.color}") == 1.0  # normalised: case, punctuation
    assert grade_answer(item, shape.color) == 0.0  # the bare word is not the answer
    assert grade_answer(item, f"The {other} is {shape.color}.") == 0.0  # the wrong kind restated
    assert grade_answer(item, f"The {shape.kind} is {shape.color}. The {shape.kind} is {shape.color}.") == 0.0


def test_look_then_reason_items_restate_the_asked_thing_before_the_verdict():
    from dyrate_ref.demo.scenes import LOOK_SPLIT, EvalItem, look_answer, look_question, look_verdict
    s = random_scene(random.Random(2), 3, 3)
    here, kinds = s.shapes[1], {x.kind for x in s.shapes}
    absent = next(c for c in COLORS if (c, here.kind) not in {(x.color, x.kind) for x in s.shapes})
    yes, no = look_answer(s, here.color, here.kind), look_answer(s, absent, here.kind)
    assert yes == f"{scene_description(s)} So {'an' if here.color[0] in 'aeiou' else 'a'} {here.color} {here.kind}: yes."
    assert no.endswith(f" {absent} {here.kind}: no.") and no.startswith(scene_description(s))
    assert yes.split(LOOK_SPLIT)[0] == scene_description(s)  # the looking part is the description, whole
    assert (look_verdict(yes), look_verdict(no)) == ("yes", "no")
    # v5's form: the colour of a kind seen once, copied from where the description names that kind
    from dyrate_ref.demo.scenes import look_item
    for seed in range(30):
        scene = random_scene(random.Random(seed), 2, 5)
        drawn = look_item(scene, random.Random(seed), "color")
        kinds_seen = [x.kind for x in scene.shapes]
        if drawn is None:
            assert all(kinds_seen.count(k) > 1 for k in kinds_seen)
            continue
        q, a = drawn
        asked = q.split("the ")[1].split("?")[0]
        only = next(x for x in scene.shapes if x.kind == asked)
        assert kinds_seen.count(asked) == 1 and a == f"{scene_description(scene)} So the {asked} is {only.color}."
        assert f"{only.color} {asked}" in a.split(LOOK_SPLIT)[0]  # the reasoning's answer is written in the look
        assert look_verdict(a) == f"{asked} {only.color}" and look_verdict(a.replace(only.color + ".", "x.")) != look_verdict(a)
    assert look_verdict(scene_description(s)) is None and kinds
    item = EvalItem(s, "look", look_question(absent, here.kind), no)
    assert grade_answer(item, no) == 1.0 and grade_answer(item, yes) == 0.0
    looks = [i for i in eval_set(20, look=True, look_form="exist") if i.kind == "look"]
    assert looks and all(look_verdict(i.answer) == ("yes" if any(
        f"{x.color} {x.kind}" in i.question for x in i.scene.shapes) else "no") for i in looks)


def test_object_f1():
    s = random_scene(random.Random(3), 3, 3)
    assert object_f1(scene_description(s), s) == 1.0
    first = s.shapes[0]
    wrong = scene_description(s).replace(f"{first.color} {first.kind}", f"{'red' if first.color != 'red' else 'blue'} {first.kind}", 1)
    assert object_f1(wrong, s) == pytest.approx(2 / 3)
    assert object_f1("nothing here", s) == 0.0


def test_eval_scenes_are_not_training_scenes():
    train = {repr(random_scene(random.Random(seed))) for seed in range(50)}
    assert not {repr(i.scene) for i in eval_set(30)} & train


def test_growing_the_decoder_keeps_its_logits_and_its_new_layers_learn():
    """batches.grow: 4 -> 8 layers, the logits unchanged to the bit; the new layers get gradients."""
    from dyrate_ref.demo.batches import grow
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    from helpers import hf_config, make_checkpoint
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, hf_config(text=dict(num_hidden_layers=2)))
        model = load_model(d)
        proc = Processor(d, model.config)
        ids, px = proc.input_ids("Describe the image."), proc.pixel_values(Image.new("RGB", (40, 30), (200, 10, 10)))
        with torch.no_grad():
            before = model(ids[None], px)
        old = list(model.model.layers)
        grow(model, 4)
        assert len(model.model.layers) == 4 and model.config.text_config.num_hidden_layers == 4
        assert model.model.layers[0] is old[0] and model.model.layers[2] is old[1]  # interleaved, in order
        with torch.no_grad():
            after = model(ids[None], px)
        assert torch.equal(before, after)
        after = model(ids[None], px)
        after.logsumexp(-1).sum().backward()
        new = model.model.layers[1]
        assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0
        with pytest.raises(AssertionError, match="multiple"):
            grow(model, 6)


def test_the_recipe_registry_and_its_stages():
    from dyrate_ref.demo.recipes import RECIPES, SHIPPED, V4, V5, schedule
    assert set(RECIPES) == {"v4", "v5"} and SHIPPED == "v5" and RECIPES["v4"] is V4
    # v5 is v4 then its own look stage, whose schedule leaves v4's steps' learning rates as they were
    assert V5.stages[:len(V4.stages)] == V4.stages and V5.stages[-1].name == "look"
    assert [V5.lr(s) for s in range(0, V4.steps, 97)] == [V4.lr(s) for s in range(0, V4.steps, 97)]
    look = V5.start_of("look")
    assert look == V4.steps and V5.lr(look) == pytest.approx(3e-4 / 30) and V5.lr(look + 29) == pytest.approx(3e-4)
    assert V5.lr(look + 999) == pytest.approx(3e-4) and V5.lr(V5.steps - 1) < 3e-4 * 0.06
    names = [s.name for s in V4.stages]
    assert names[0] == "bind" and V4.stages[0].kinds == ("color", "position") and V4.stages[0].distinct
    mixture = V4.stages[-1]
    assert set(mixture.kinds) == {"count", "color", "position", "exist", "look"} and mixture.describe > 0
    assert mixture.guard > 0 and mixture.guard_stage in names
    # stage_at walks the stages in order; the schedule warms up, holds, then decays over the last third
    first, second = V4.stages[0].steps, V4.stages[1].steps
    assert V4.stage_at(0) == (V4.stages[0], 0) and V4.stage_at(first) == (V4.stages[1], 0)
    assert V4.stage_at(first + second + 5) == (mixture, 5) and V4.steps == sum(s.steps for s in V4.stages)
    assert schedule(0, 300, 100, 1 / 3) == pytest.approx(0.01) and schedule(150, 300, 100, 1 / 3) == 1.0
    assert schedule(199, 300, 100, 1 / 3) == 1.0 and schedule(299, 300, 100, 1 / 3) < 0.06
    assert schedule(250, 300, 100, 1 / 3) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_a_stage_draws_what_it_declares():
    """bind: colour and position of every shape of 2-shape scenes of distinct kinds and colours; the
    mixture: its guard share drawn as the guard stage is, the rest as itself."""
    from dyrate_ref.demo.batches import Batcher
    from dyrate_ref.demo.recipes import V4
    from dyrate_ref.processing import Processor
    from dyrate_ref.loading import config_from_dict
    cfg = config_from_dict(json.load(open(os.path.join(DEFAULT_WEIGHTS, "config.json"))))
    b = Batcher(Processor(DEFAULT_WEIGHTS, cfg), V4, seed=3)
    bind = V4.stage("bind")
    for _ in range(20):
        scene = b.scene(bind)
        assert len(scene.shapes) == 2 and len({s.kind for s in scene.shapes}) == len({s.color for s in scene.shapes}) == 2
        turns = b.turns(scene, bind)
        assert sorted(q for _, q, _ in turns) == sorted(
            [f"What color is the {s.kind}?" for s in scene.shapes] + [f"Where is the {s.kind}?" for s in scene.shapes])
    px, rows = b.batch(bind)
    assert px.shape[0] == bind.scenes and len(rows) == 4 * bind.scenes
    mix = V4.stage("mixture")
    kinds = [k for _ in range(30) for _, k, *_ in b.batch(mix)[1]]
    assert {"count", "look", "describe", "exist"} <= set(kinds)


def test_shared_prefix_loss_equals_running_every_row_whole():
    """The picture's prefix run once and shared by its rows gives the loss of each row run whole."""
    import torch.nn.functional as F
    from dyrate_ref.demo.batches import Batcher, row_loss
    from dyrate_ref.demo.recipes import V4
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    px, rows = Batcher(proc, V4, seed=5).batch(tiny_recipe(V4).stage("mixture"))
    assert len({len(p) for _, _, p, *_ in rows}) > 1 and len(rows) >= 8  # rows of several lengths, two groups
    with torch.no_grad():
        shared = row_loss(model, px, rows, V4, proc.eos_id)
        total = weight = 0.0
        for s, kind, p, a, _, _ in rows:
            logits = model(torch.tensor(p + a)[None], px[s:s + 1])[0, :-1]
            ce = F.cross_entropy(logits, torch.tensor([-100] * len(p) + a)[1:], ignore_index=-100, reduction="sum")
            total, weight = total + ce * V4.weight(kind) / len(a), weight + V4.weight(kind)
    assert float(shared) == pytest.approx(float(total / weight), rel=1e-5)


def test_blind_rows_loss_equals_a_no_cache_forward_with_the_same_mask():
    """v5's rows: the shared-prefix loss, with blind look rows (their reasoning queries cannot see the
    visual keys, in every layer) and the reasoning part weighed apart, equals each row run whole without
    a cache under the same mask; a blind row's loss differs from its sighted twin's (the mask acts)."""
    import dataclasses
    import torch.nn.functional as F
    from dyrate_ref.demo.batches import Batcher, blind_masks, row_loss
    from dyrate_ref.demo.recipes import V5
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    recipe = dataclasses.replace(tiny_recipe(V5), blind=0.5)
    px, rows = Batcher(proc, recipe, seed=5).batch(recipe.stage("look"))
    assert any(r[5] for r in rows) and any(r[1] == "look" for r in rows)

    def whole(s, p, a, reason_at, blind):
        ids = torch.tensor(p + a)
        mask = blind_masks(ids == model.config.image_token_index, [len(p) - 1 + reason_at if blind else None],
                           len(ids), 0, "cpu")
        x = model.embed(ids[None], model.image_features(px[s:s + 1]))
        pos = torch.arange(len(ids))
        for i, layer in enumerate(model.model.layers):
            x, _ = layer(x, *model.rope(pos), pos, None, i, mask)
        return F.cross_entropy(model.logits(x)[0, :-1], torch.tensor([-100] * len(p) + a)[1:], ignore_index=-100,
                               reduction="none")[len(p) - 1:]  # [len(a)]
    with torch.no_grad():
        shared = row_loss(model, px, rows, recipe, proc.eos_id)
        total = weight = 0.0
        for s, kind, p, a, reason_at, blind in rows:
            ce = whole(s, p, a, reason_at, blind)
            if reason_at is None:
                w = torch.full((len(a),), recipe.weight(kind) / len(a))
            else:
                w = torch.tensor([recipe.weight(kind) / reason_at] * reason_at
                                 + [recipe.weight("reason") / (len(a) - reason_at)] * (len(a) - reason_at))
            total, weight = total + (ce * w).sum(), weight + w.sum()
        s, _, p, a, reason_at, _ = next(r for r in rows if r[5])
        assert not torch.allclose(whole(s, p, a, reason_at, True), whole(s, p, a, reason_at, False))
    assert float(shared) == pytest.approx(float(total / weight), rel=1e-5)


def test_every_stage_of_v4_and_v5_runs_through_the_training_code(tmp_path):
    """A few steps of each stage of both recipes, through train() itself: stage 1 on a tiny tower, then
    --tower on it; the log names each stage, prints the held-out checks and the go/no-go line; the
    tower stays frozen; what was written loads and equals the trained model; the loss falls."""
    from dyrate_ref.demo.recipes import V4, V5
    from dyrate_ref.demo.train import train
    from dyrate_ref.loading import load_model
    source = str(tmp_path / "source")
    train(source, tiny_recipe(V4, 1), overrides=TINY, show_progress=False)
    for recipe in (V4, V5):
        out, logfile = str(tmp_path / recipe.name), tmp_path / f"{recipe.name}.txt"
        with logfile.open("w") as log:
            model, history, _ = train(out, tiny_recipe(recipe, 6), overrides=TINY, show_progress=False, tower=source,
                                      eval_every=100, eval_scenes=2, swap_scenes=2, log=log)
        text = logfile.read_text()
        assert all(f"# stage {s.name!r} from step {6 * i}" in text for i, s in enumerate(recipe.stages))
        assert "# the decoder grows from 1 to 2 layers" in text
        assert len(model.model.layers) == 2
        assert text.count("heldout ") == len(recipe.stages) and "kind_swap_kl" in text  # at each stage's end
        assert "go/no-go end of warm-up" in text and "look_blind" in text
        tower = load_model(source).vision_tower.state_dict()
        assert all(torch.equal(v, model.vision_tower.state_dict()[k]) for k, v in tower.items())
        for (name, a), b in zip(load_model(out).named_parameters(), model.parameters()):
            assert torch.equal(a, b.detach()), name
        assert len(history) == 6 * len(recipe.stages)
        assert sum(history[-3:]) < sum(history[:3]), history


def test_training_continues_from_saved_weights_and_the_checks_give_fractions(tmp_path):
    from dyrate_ref.demo.batches import heldout_examples, heldout_exact
    from dyrate_ref.demo.recipes import V4
    from dyrate_ref.demo.tower import probe_tower
    from dyrate_ref.demo.train import train
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    first, later = str(tmp_path / "first"), str(tmp_path / "later")
    _, history, _ = train(first, tiny_recipe(V4, 8), overrides=TINY, show_progress=False)
    with (tmp_path / "log.txt").open("w") as log:
        _, history2, _ = train(later, tiny_recipe(V4, 2), show_progress=False, init=first, log=log)
    assert "init from" in (tmp_path / "log.txt").read_text()
    assert history2[0] < history[0] * 0.9  # it starts where the first run ended, not from scratch
    loaded = load_model(first)
    acc = probe_tower(loaded, train_scenes=40, test_scenes=20, steps=5)
    assert set(acc) == {"kind", "color"} and all(0.0 <= v <= 1.0 for v in acc.values())
    proc = Processor(first, loaded.config)
    exact = heldout_exact(loaded, heldout_examples(proc, 2), proc)
    assert set(exact) >= {"count", "describe", "look"} and all(0.0 <= v <= 1.0 for v in exact.values())


def test_go_no_go_reads_the_windows_the_recipe_names():
    from dyrate_ref.demo.recipes import V4, V5
    from dyrate_ref.demo.train import go_no_go
    assert go_no_go(V4, "bind", 300, {"kind_swap_kl": 5.4, "color3+": 0.78}).startswith("go/no-go end of warm-up: go")
    assert "NO-GO" in go_no_go(V4, "bind", 300, {"kind_swap_kl": 0.9, "color3+": 0.78})
    assert "NO-GO" in go_no_go(V4, "bind", 300, {"kind_swap_kl": 5.4, "color3+": 0.5})
    assert go_no_go(V4, "mixture", 900, {"color": 0.1, "position": 0.1, "kind_swap_kl": 0}) is None
    assert "NO-GO" in go_no_go(V4, "mixture", 1000, {"color": 0.95, "position": 0.89, "kind_swap_kl": 9})
    assert ": go" in go_no_go(V4, "mixture", 1200, {"color": 0.95, "position": 0.9, "kind_swap_kl": 9})
    look = V5.start_of("look")
    assert go_no_go(V5, "look", look + 299, {"look_blind": 0.0}) is None  # the window opens at its step 300
    assert "NO-GO" in go_no_go(V5, "look", look + 300, {"look": 1.0, "look_blind": 0.59})
    assert ": go" in go_no_go(V5, "look", look + 300, {"look": 0.5, "look_blind": 0.6})
    # at the edges: the warm-up's gate only at its last step and strictly above its floors; the mixture's
    # window opens at its step 400 (stage-2 step 1,000), not one before; a stage without a gate says nothing
    ok = {"kind_swap_kl": 5.4, "color3+": 0.78}
    assert go_no_go(V4, "bind", 299, ok) is None
    assert "NO-GO" in go_no_go(V4, "bind", 300, {"kind_swap_kl": 1.0, "color3+": 0.78})
    assert "NO-GO" in go_no_go(V4, "bind", 300, {"kind_swap_kl": 1.01, "color3+": 0.6})
    assert go_no_go(V4, "mixture", 999, {"color": 0.1, "position": 0.1}) is None
    assert go_no_go(V4, "bind+exist", 600, {"color": 0.1, "position": 0.1}) is None
    assert go_no_go(V4, "look", 4000, {}) is None if "look" in [s.name for s in V4.stages] else True


# ----------------------------------------------------------------------------------------------------
# The shipped weights

shipped = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "model.safetensors")),
                             reason="the embedded weights are not in this checkout")


@shipped
def test_shipped_directory_is_complete_and_small():
    names = set(os.listdir(DEFAULT_WEIGHTS))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "preprocessor_config.json", "dyrate_predictor.safetensors",
              "vtw_calibration.json"):
        assert f in names, f
    total = sum(os.path.getsize(os.path.join(DEFAULT_WEIGHTS, f)) for f in names if os.path.isfile(os.path.join(DEFAULT_WEIGHTS, f)))
    assert total <= 30e6
    from dyrate_ref.loading import load_model
    cfg = load_model(DEFAULT_WEIGHTS).config
    assert cfg.num_image_tokens >= 144 and cfg.text_config.num_hidden_layers >= 4


@shipped
def test_shipped_model_equals_hf():
    """HF loads the directory unmodified (model and tokenizer); logits agree within 1e-4 (fp32) on
    scenes and on a real photograph."""
    from skimage import data
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    hf = LlavaForConditionalGeneration.from_pretrained(DEFAULT_WEIGHTS, attn_implementation="eager").eval()
    hf_tok = AutoTokenizer.from_pretrained(DEFAULT_WEIGHTS)
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    images = [i.scene.draw() for i in eval_set(3)[::4]] + [Image.fromarray(data.astronaut())]
    for img in images:
        ids = proc.input_ids("Describe the image.")
        assert ids.tolist()[:3] == hf_tok(proc.prompt_text("Describe the image."))["input_ids"][:3]
        px = proc.pixel_values(img)
        with torch.no_grad():
            want = hf(input_ids=ids[None], pixel_values=px).logits[0]
            got = model(ids[None], px)[0]
        assert (got - want).abs().max().item() <= 1e-4


README_EXAMPLE = "scene1.png"  # the picture of the README's first command


def readme_command(image: str, prompt: str) -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        head = f.read()[:3000]
    assert f"--image weights/dyrate-shapes/examples/{image} --prompt \"{prompt}\"" in head
    return [sys.executable, os.path.join(REPO, "generate.py"), "--image",
            os.path.join(DEFAULT_WEIGHTS, "examples", image), "--prompt", prompt]


@shipped
def test_readme_first_example_answer_is_right():
    """The README's first command, as written there, answers with the scene's exact ground truth."""
    with open(os.path.join(DEFAULT_WEIGHTS, "examples", "examples.json")) as f:
        ex = next(e for e in json.load(f) if e["file"] == README_EXAMPLE)
    r = subprocess.run(readme_command(README_EXAMPLE, "Describe the image."), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ex["description"], (r.stdout, ex["description"])


@shipped
def test_readme_dyrate_examples_answer_right_and_the_look_example_says_what_it_kept(tmp_path):
    """--method dyrate on the README's first picture: the description is still the ground truth, and the
    README's look-then-reason command answers the description then the right verdict, with the kept
    count at the end and the per-step counts the README states (read from the trace it writes)."""
    import re
    from safetensors.torch import load_file
    with open(os.path.join(DEFAULT_WEIGHTS, "examples", "examples.json")) as f:
        truth = next(e for e in json.load(f) if e["file"] == README_EXAMPLE)["description"]
    r = subprocess.run(readme_command(README_EXAMPLE, "Describe the image.") + ["--method", "dyrate"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == truth, (r.stdout, r.stderr)
    look = "What color is the star? Look first."
    trace = str(tmp_path / "look.safetensors")
    r = subprocess.run(readme_command(README_EXAMPLE, look) + ["--method", "dyrate", "--trace", trace],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == truth + " So the star is green.", (r.stdout, r.stderr)
    kept = load_file(trace)["kept_masks"].sum(1).tolist()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        head = f.read()[:6000]
    assert f"{kept[-1]}/144 visual tokens kept at the end" in r.stderr and f"{kept[-1]}/144 visual tokens kept" in head
    assert look in head
    said = re.search(r"It dropped a quarter of the picture at the prefill and kept the other (\d+) tokens to the end", head)
    assert said, "the README's sentence about the kept counts changed: update this test with it"
    assert kept == [int(said.group(1))] * len(kept) and kept[0] == 144 - 36, kept  # a quarter of 144, every step


@shipped
def test_examples_carry_the_prompts_the_docs_use():
    with open(os.path.join(DEFAULT_WEIGHTS, "examples", "examples.json")) as f:
        examples = json.load(f)
    for ex in examples:
        kinds = {p["kind"] for p in ex["prompts"]}
        assert {"describe", "count", "exist"} <= kinds and all(p["prompt"] and p["answer"] for p in ex["prompts"])
        assert os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "examples", ex["file"]))


# The demo model's targets (the v5 issue), on 25 held-out scenes (the full 300-scene tables are
# docs/targets.json and docs/look_after.json): every question kind >= 95 %, describe object-F1 >= 0.95,
# the look-then-reason answers >= 95 %, and >= 98 % of them unchanged when every visual token is withdrawn
# right after the looking part, while withdrawing them from the first answer step changes most.
TARGET_QA, TARGET_F1, TARGET_VERDICT, TARGET_AFTER_LOOK = 0.95, 0.95, 0.95, 0.98


def shipped_scores(look: bool) -> dict:
    from dyrate_ref.generation import generate
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    scores = {}
    for item in eval_set(25, look=look):
        if look and item.kind != "look":
            continue
        ids, px = proc.input_ids(item.question), proc.pixel_values(item.scene.draw())
        text = proc.decode(generate(model, ids, px, 80, stop_ids=proc.stop_ids).tokens)
        scores.setdefault(item.kind, []).append(grade_answer(item, text))
    return {k: sum(v) / len(v) for k, v in scores.items()}


@shipped
def test_shipped_model_meets_the_demo_targets():
    means = shipped_scores(look=False)
    assert all(means[k] >= TARGET_QA for k in ("color", "count", "exist", "position")), means
    assert means["describe"] >= TARGET_F1, means


@shipped
def test_shipped_model_meets_the_look_then_reason_target():
    assert shipped_scores(look=True)["look"] >= TARGET_VERDICT


@shipped
def test_shipped_model_needs_the_picture_only_while_it_looks():
    """Every visual token withdrawn (layers >= 3) right after the looking part leaves the answers as they
    were; withdrawn from the first answer step, it changes most of them (tools/premise.py's cuts)."""
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    from dyrate_ref.tools.data import scene_items
    from dyrate_ref.tools.premise import AFTER_LOOK, cut_costs
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    records = [r for it in scene_items(25) if it.kind == "look"
               for r in cut_costs(model, proc, it, 3, (0,), (0.0,), 80, ("step",))]
    after = [r["same_answer"] for r in records if r["step"] == AFTER_LOOK]
    first = [r["same_answer"] for r in records if r["step"] == 0]
    assert len(after) == len(first) >= 10
    assert sum(after) / len(after) >= TARGET_AFTER_LOOK and sum(first) / len(first) < 0.5, (after, first)


@shipped
def test_evaluate_quick_has_every_row(tmp_path):
    """The evaluation runs end to end on a few scenes with every standard row, the control included.
    (Accuracy is not asserted here: 4 scenes say little; the targets are the test above.)"""
    out = tmp_path / "eval.json"
    figs = tmp_path / "figures"  # not there yet: evaluate makes it
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.evaluate", "--quick", "--split", "validation", "--json",
                        str(out), "--plot", str(figs)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for name in ("| none |", "| none, image blanked (control) |", "| FastV K=", "| VTW K=", "| DyRate K=",
                 "| random keep, counts of DyRate", "| fixed schedule, mean counts of DyRate", "Main comparison",
                 "Each method's own best on the validation split", "  FastV: ", "  DyRate predictor: "):
        assert name in r.stdout, name
    figures = json.loads(out.read_text())
    assert set(figures["validation_choices"]) >= {"FastV", "DyRate predictor", "VTW"}
    none = figures["rows"][0]
    assert none["method"] == "none" and none["em_delta"] == 0.0 and none["lm_flops"] == 1.0
    assert (figs / "pareto.png").stat().st_size > 1000 and (figs / "attention_over_generation.png").exists()


def test_evaluate_refuses_a_non_positive_scene_count():
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.evaluate", "--scenes", "0"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "positive" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_evaluate_workers_give_the_same_figures(tmp_path):
    """--workers 2 shares the items between two forked processes; the table must not change (the random
    baseline is seeded by the scene, not by its place in a worker's share)."""
    from helpers import hf_config, make_checkpoint
    w = tmp_path / "w"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=4)))
    figures = []
    for workers in ("1", "2"):
        out = tmp_path / f"eval{workers}.json"
        r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.evaluate", "--weights", str(w), "--quick",
                            "--max-new-tokens", "5", "--workers", workers, "--extra", "mass:layer=2:mass=0.5", "--json", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr
        figures.append(json.loads(out.read_text())["rows"])
    for a, b in zip(*figures):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
