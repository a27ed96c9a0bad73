"""The embedded demo: the scene generator, the shipped weights (HF-loadable, HF-equal), the evaluation
command, the out-of-box generate.py answer, and a few steps of the training recipe."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dyrate_ref.loading import DEFAULT_WEIGHTS
from dyrate_ref.demo.scenes import (COLORS, NUMBERS, POSITIONS, SIZE, describe, eval_set, object_f1, parse_description,
                               questions, random_scene)

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
    rng = random.Random(1)
    for _ in range(300):
        s = random_scene(rng)
        kinds = [x.kind for x in s.shapes]
        for kind, q, a in questions(s, rng):
            if kind == "count":
                assert a == NUMBERS[len(s.shapes)]
            elif kind in ("color", "position"):
                shape_kind = q.rstrip("?").split()[-1]
                assert kinds.count(shape_kind) == 1
                only = next(x for x in s.shapes if x.kind == shape_kind)
                assert a == (only.color if kind == "color" else only.position)
            else:
                color, shape_kind = q.rstrip("?").split()[-2:]
                assert a == ("yes" if any(x.color == color and x.kind == shape_kind for x in s.shapes) else "no")
        assert sorted(parse_description(describe(s))) == sorted((x.color, x.kind, x.position) for x in s.shapes)


def test_object_f1():
    s = random_scene(random.Random(3), 3, 3)
    assert object_f1(describe(s), s) == 1.0
    first = s.shapes[0]
    wrong = describe(s).replace(f"{first.color} {first.kind}", f"{'red' if first.color != 'red' else 'blue'} {first.kind}", 1)
    assert object_f1(wrong, s) == pytest.approx(2 / 3)
    assert object_f1("nothing here", s) == 0.0


def test_eval_scenes_are_not_training_scenes():
    train = {repr(random_scene(random.Random(seed))) for seed in range(50)}
    assert not {repr(i.scene) for i in eval_set(30)} & train


TINY = {"vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, projection_dim=32),
        "text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16)}


def test_the_v3_recipe_runs_on_a_trained_tower_with_its_options(tmp_path):
    """--recipe v3 --tower DIR: a fresh tokenizer, projector and decoder on the tower of a directory this
    script wrote, with the training-only turn, the image withheld at first and the attention loss; the
    tower is the source's, the kind-swap sensitivity is logged, and the loss falls."""
    from dyrate_ref.demo.train import train
    from dyrate_ref.loading import load_model
    source, out = str(tmp_path / "source"), str(tmp_path / "v3")
    train(source, steps=1, batch=2, lr=1e-3, seed=0, minutes=None, overrides=TINY, show_progress=False, vision_steps=2)
    log = (tmp_path / "log.txt").open("w")
    model, history, _ = train(out, steps=24, batch=4, lr=3e-3, seed=0, minutes=None, overrides=TINY,
                              show_progress=False, tower=source, recipe="v3", echo=1.0, withhold=8, attend=1.0,
                              eval_every=12, eval_scenes=2, swap_scenes=2, log=log)
    log.close()
    tower = load_model(source).vision_tower.state_dict()
    assert all(torch.equal(v, model.vision_tower.state_dict()[k]) for k, v in tower.items())  # frozen, the source's
    text = (tmp_path / "log.txt").read_text()
    assert "vision tower from" in text and text.count("kind_swap_kl") == 2 and " echo " in text
    assert sum(history[-4:]) / 4 < sum(history[:4]) / 4


def test_a_few_training_steps_make_the_loss_fall_and_training_continues_from_saved_weights(tmp_path):
    from dyrate_ref.demo.train import heldout_conversations, heldout_exact, probe_tower, train
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    first, later = str(tmp_path / "first"), str(tmp_path / "later")
    log = (tmp_path / "log.txt").open("w")
    model, history, _ = train(first, steps=30, batch=4, lr=3e-3, seed=0, minutes=None, overrides=TINY,
                              show_progress=False, vision_steps=5, eval_every=15, eval_scenes=2, probe=True, log=log)
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    loaded = load_model(first)  # what it wrote is a loadable llava-hf directory, equal to the trained model
    for (name, a), b in zip(loaded.named_parameters(), model.parameters()):
        assert torch.equal(a, b.detach()), name
    log.close()
    text = (tmp_path / "log.txt").read_text()
    assert "probe held-out occupied-cell accuracy: kind" in text and text.count("heldout ") == 2
    # --init: stage 1 is skipped, the weights continue from the first run's (its loss starts where that ended)
    log = (tmp_path / "log2.txt").open("w")
    _, history2, _ = train(later, steps=5, batch=4, lr=1e-3, seed=0, minutes=None, show_progress=False,
                           init=first, log=log)
    log.close()
    assert "init from" in (tmp_path / "log2.txt").read_text()
    assert history2[0] < history[0] * 0.8
    # the probe and the held-out exact match run on a small scene set and give fractions
    acc = probe_tower(loaded, train_scenes=40, test_scenes=20, steps=5)
    assert set(acc) == {"kind", "color"} and all(0.0 <= v <= 1.0 for v in acc.values())
    proc = Processor(first, loaded.config)
    exact = heldout_exact(loaded, heldout_conversations(proc, 2), proc)
    assert set(exact) >= {"count", "describe"} and all(0.0 <= v <= 1.0 for v in exact.values())


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
def test_examples_carry_the_prompts_the_docs_use():
    with open(os.path.join(DEFAULT_WEIGHTS, "examples", "examples.json")) as f:
        examples = json.load(f)
    for ex in examples:
        kinds = {p["kind"] for p in ex["prompts"]}
        assert {"describe", "count", "exist"} <= kinds and all(p["prompt"] and p["answer"] for p in ex["prompts"])
        assert os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "examples", ex["file"]))


# The demo model's targets (the demo-model issue). The shipped model misses them: the test says so by
# being an expected failure with the measured figures, visible in every test run ("xfailed"); strict, so
# a model that meets them makes this test fail until the marker is removed.
TARGET_QA, TARGET_F1 = 0.95, 0.90


@shipped
@pytest.mark.xfail(strict=True, reason="known shortfall: the shipped demo model misses the >= 95 % per-kind and "
                                       "F1 >= 0.90 targets (docs/embedded_model.md has the measured table)")
def test_shipped_model_meets_the_demo_targets():
    from dyrate_ref.generation import generate
    from dyrate_ref.loading import load_model
    from dyrate_ref.processing import Processor
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    scores = {}
    for item in eval_set(25):
        ids, px = proc.input_ids(item.question), proc.pixel_values(item.scene.draw())
        text = proc.decode(generate(model, ids, px, 80, stop_ids=proc.stop_ids).tokens)
        ok = object_f1(text, item.scene) if item.kind == "describe" else float(text.strip() == item.answer)
        scores.setdefault(item.kind, []).append(ok)
    means = {k: sum(v) / len(v) for k, v in scores.items()}
    assert all(means[k] >= TARGET_QA for k in ("color", "count", "exist", "position")), means
    assert means["describe"] >= TARGET_F1, means


@shipped
def test_evaluate_quick_has_every_row(tmp_path):
    """The evaluation runs end to end on a few scenes with every standard row, the control included.
    (Accuracy is not asserted here: 4 scenes say little; the targets are the test above.)"""
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "dyrate_ref.tools.evaluate", "--quick", "--json", str(out), "--plot",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for name in ("| none |", "| none, image blanked (control) |", "| FastV K=2 R=0.5 |", "| VTW K=", "| DyRate K=",
                 "| random keep, counts of DyRate", "rising", "| attention mass"):
        assert name in r.stdout, name
    figures = json.loads(out.read_text())
    none = figures["rows"][0]
    assert none["method"] == "none" and none["em_delta"] == 0.0 and none["lm_flops"] == 1.0
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "attention_over_generation.png").exists()


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
                            "--max-new-tokens", "5", "--workers", workers, "--extra", "mass:layer=2:share=0.5", "--json", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr
        figures.append(json.loads(out.read_text())["rows"])
    for a, b in zip(*figures):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
