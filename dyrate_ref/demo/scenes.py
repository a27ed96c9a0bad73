"""Generated pictures with ground truth: the embedded demo model's world.

A scene is 1-5 shapes (circle, square, triangle, star) in six colours and two sizes, each in its own
cell of a 3x3 grid (so every shape has a distinct, nameable position), on a varied background. From a
scene come short questions with one right answer and descriptions that name every shape:

    What color is the triangle?         -> The triangle is red.        (asked only of a kind seen once)
    How many shapes are there?          -> There are three shapes.
    Is there a blue circle?             -> A blue circle: yes. / no.   (the "no" cases are near misses)
    Where is the square?                -> The square is at the top left.   (a kind seen once)
    Describe the image.                 -> There are two shapes: a red circle at the top left and a
                                           blue square in the center.
    Is there a red circle? Look first.  -> There are two shapes: a red circle at the top left and a
                                           blue square in the center. So a red circle: yes.
                                           (look form "exist", v4; scenes of 2 or more shapes)
    What color is the square? Look first. -> There are two shapes: a red circle at the top left and a
                                           blue square in the center. So the square is blue.
                                           (look form "color", v5; a kind seen once, 2+ shapes)

The last answer kind looks first, then reasons: its first part is the scene's description and its
last part follows from that part and the question alone, so after the looking part the picture is no
longer needed. It is the setting in which DyRate's premise (later tokens need the image less) holds by
construction; in a description every later word names another shape and needs the picture as much as
the first. The two forms differ in what the reasoning does with the description: "exist" matches the
asked colour and kind against every listed shape (v4 copied the wrong colour into its restatement, and
the cut after the look changed 41 % of its answers); "color" finds the asked kind in the description
and copies the colour written right before it, a copy a small decoder learns from text alone.

Everything is drawn with Pillow from a seeded random.Random, so a (seed, index) pair always gives the
same picture and the same answers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SIZE = 96  # pixels; with 8-pixel patches, 12 x 12 = 144 visual tokens
SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "orange": (245, 140, 30)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_KINDS = ("color", "count", "exist", "position")
LOOK_SUFFIX = " Look first."  # appended to a question: the look-then-reason answer kind
LOOK_FORMS = ("exist", "color")  # what a look-then-reason question asks (see the module's docstring)
LOOK_FORM = "color"  # the shipped model's (v5) form: what the held-out sets and the tools' scenes:N ask


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: int  # 0..8, row-major over the 3x3 grid
    center: tuple[int, int]
    radius: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    seed: int

    def draw(self) -> Image.Image:
        return draw_scene(self)


def random_scene(rng: random.Random, min_shapes: int = 1, max_shapes: int = 5) -> Scene:
    n = rng.randint(min_shapes, max_shapes)
    cells = sorted(rng.sample(range(9), n))
    cell_px = SIZE // 3
    shapes = []
    for cell in cells:
        r = rng.choice((10, 13))  # two sizes
        cx = (cell % 3) * cell_px + cell_px // 2 + rng.randint(-2, 2)
        cy = (cell // 3) * cell_px + cell_px // 2 + rng.randint(-2, 2)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), cell, (cx, cy), r))
    # Backgrounds: light or dark greys and tints, never close to a shape colour.
    base = rng.choice([(235, 235, 235), (200, 200, 200), (60, 60, 60), (30, 30, 40), (240, 230, 210), (210, 225, 235)])
    jitter = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in base)
    return Scene(tuple(shapes), jitter, rng.randrange(2 ** 31))


def _star(cx, cy, r):
    import math
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(d: ImageDraw.ImageDraw, s: Shape, fill):
    cx, cy = s.center
    r = s.radius
    if s.kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.kind == "square":
        q = int(r * 0.85)
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif s.kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + int(r * 0.8)), (cx + r, cy + int(r * 0.8))], fill=fill)
    elif s.kind == "star":
        d.polygon(_star(cx, cy, r + 1), fill=fill)


def object_map(scene: Scene) -> Image.Image:
    """An 'L' image whose pixel is 1 + the index of the shape drawn there, 0 for background: the
    ground truth of which object covers which pixel (the demo's vision pretraining reads it)."""
    img = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(img)
    for i, s in enumerate(scene.shapes):
        draw_shape(d, s, i + 1)
    return img


def draw_scene(scene: Scene) -> Image.Image:
    rng = random.Random(scene.seed)
    img = Image.new("RGB", (SIZE, SIZE), scene.background)
    d = ImageDraw.Draw(img)
    # a little texture so backgrounds are not flat: faint lines
    for _ in range(rng.randint(0, 6)):
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in scene.background)
        d.line([(rng.randint(0, SIZE), rng.randint(0, SIZE)), (rng.randint(0, SIZE), rng.randint(0, SIZE))],
               fill=shade, width=1)
    for s in scene.shapes:
        draw_shape(d, s, COLORS[s.color])
    return img.filter(ImageFilter.SMOOTH) if rng.random() < 0.3 else img


# ----------------------------------------------------------------------------------------------------
# Questions and answers


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_description(scene: Scene) -> str:
    n = len(scene.shapes)
    parts = [f"{article(s.color)} {s.color} {s.kind} {'in' if s.position == 'center' else 'at'} the {s.position}"
             for s in scene.shapes]  # row-major reading order: cells are sorted
    if n == 1:
        return f"There is one shape: {parts[0]}."
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"There are {NUMBERS[n]} shapes: {listed}."


# Answers restate what was asked right before the answer word ("The circle is red.", not "red"): the
# answer word is then predicted from a query that has just read the asked kind, and the controlled runs
# bound kind to patches from that query in 100-400 steps (bare answers, v2's, sat on a plateau for
# 400-1,700).


def color_answer(s: Shape) -> str:
    return f"The {s.kind} is {s.color}."


def position_answer(s: Shape) -> str:
    return f"The {s.kind} is {'in' if s.position == 'center' else 'at'} the {s.position}."


def count_answer(n: int) -> str:
    return "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes."


def exist_answer(color: str, kind: str, present: bool) -> str:
    return f"{article(color).capitalize()} {color} {kind}: {'yes' if present else 'no'}."


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """One question of each kind this scene can answer unambiguously: (kind, question, answer)."""
    kinds = [s.kind for s in scene.shapes]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
    out = [("count", "How many shapes are there?", count_answer(len(scene.shapes)))]
    if unique:
        s = rng.choice(unique)
        out.append(("color", f"What color is the {s.kind}?", color_answer(s)))
        s = rng.choice(unique)
        out.append(("position", f"Where is the {s.kind}?", position_answer(s)))
    present = {(s.color, s.kind) for s in scene.shapes}
    if rng.random() < 0.5:
        color, kind = rng.choice(sorted(present))
    else:  # a near miss: a colour or a kind that is in the picture, but not together
        s = rng.choice(scene.shapes)
        options = [(c, s.kind) for c in COLORS if (c, s.kind) not in present] + \
                  [(s.color, k) for k in SHAPES if (s.color, k) not in present]
        color, kind = rng.choice(options)
    out.append(("exist", f"Is there {article(color)} {color} {kind}?",
                exist_answer(color, kind, (color, kind) in present)))
    return out


DESCRIBE_PROMPT = "Describe the image."


def exist_pair(scene: Scene, rng: random.Random, want_yes: bool) -> tuple[str, str, bool]:
    """A (colour, kind) to ask about: present if want_yes, else a near miss (a colour or a kind that is
    in the picture, but not together). -> (colour, kind, present)."""
    present = {(s.color, s.kind) for s in scene.shapes}
    if want_yes:
        color, kind = rng.choice(sorted(present))
        return color, kind, True
    s = rng.choice(scene.shapes)
    options = [(c, s.kind) for c in COLORS if (c, s.kind) not in present] + \
              [(s.color, k) for k in SHAPES if (s.color, k) not in present]
    color, kind = rng.choice(options)
    return color, kind, (color, kind) in present


def look_question(color: str, kind: str) -> str:
    return f"Is there {article(color)} {color} {kind}?{LOOK_SUFFIX}"


def look_answer(scene: Scene, color: str, kind: str) -> str:
    """Look (the description), then reason from it and the question alone; the verdict restates the
    asked thing right before its yes / no, as the existence answer does."""
    present = any(s.color == color and s.kind == kind for s in scene.shapes)
    return f"{scene_description(scene)} So {article(color)} {color} {kind}: {'yes' if present else 'no'}."


def look_item(scene: Scene, rng: random.Random, form: str = "exist") -> tuple[str, str] | None:
    """One look-then-reason (question, answer) for a scene of 2+ shapes, or None where the form has
    none. "exist": a yes or a near-miss no existence question (v4); "color": the colour of a kind seen
    once, copied in the reasoning part from where the description names that kind (v5)."""
    if len(scene.shapes) < 2:
        return None
    if form == "exist":
        color, kind, _ = exist_pair(scene, rng, rng.random() < 0.5)
        return look_question(color, kind), look_answer(scene, color, kind)
    kinds = [s.kind for s in scene.shapes]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
    if not unique:
        return None
    s = rng.choice(unique)
    return f"What color is the {s.kind}?{LOOK_SUFFIX}", f"{scene_description(scene)} So the {s.kind} is {s.color}."


LOOK_SPLIT = " So "  # where the looking part ends and the reasoning part begins


def look_verdict(text: str) -> str | None:
    """The final answer of a look-then-reason answer, or None if it has none: "yes" / "no" for the
    "exist" form ("So a red circle: yes."), "<kind> <colour>" for the
    "color" form ("So the star is green." -> "star green")."""
    low = text.lower()
    m = re.search(r"\bso the ([a-z]+) is ([a-z]+)\b", low)
    if m:
        return f"{m.group(1)} {m.group(2)}"
    m = re.search(r"\bso an? [a-z]+ [a-z]+: (yes|no)\b", low)
    return m.group(1) if m else None


def all_questions(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = ("count", "color", "position", "exist", "look"),
                  look: str = "exist") -> list[tuple[str, str, str]]:
    """Every question of the given kinds the scene allows, asked so that the answers depend on the
    question's words: colour and position of every kind seen once, the count, a yes and a near-miss no
    existence question, and (2+ shapes) a look-then-reason question of form `look`. The demo model's training reads
    these; `kinds` picks a warm-up's share of them."""
    seen = [s.kind for s in scene.shapes]
    out = []
    if "count" in kinds:
        out.append(("count", "How many shapes are there?", count_answer(len(scene.shapes))))
    for s in scene.shapes:
        if seen.count(s.kind) == 1:
            if "color" in kinds:
                out.append(("color", f"What color is the {s.kind}?", color_answer(s)))
            if "position" in kinds:
                out.append(("position", f"Where is the {s.kind}?", position_answer(s)))
    if "exist" in kinds:
        for want_yes in (True, False):
            color, kind, present = exist_pair(scene, rng, want_yes)
            out.append(("exist", f"Is there {article(color)} {color} {kind}?", exist_answer(color, kind, present)))
    if "look" in kinds and len(scene.shapes) >= 2:
        if look == "exist":  # v4's draw, kept as it was so that v4's batches are unchanged
            color, kind, _ = exist_pair(scene, rng, rng.random() < 0.5)
            out.append(("look", look_question(color, kind), look_answer(scene, color, kind)))
        else:
            item = look_item(scene, rng, look)
            if item:
                out.append(("look", *item))
    return out


@dataclass(frozen=True)
class EvalItem:
    scene: Scene
    kind: str  # a QUESTION_KINDS entry or "describe"
    question: str
    answer: str


TEST_SEED = 10_000_019  # the held-out scenes every reported table uses
VALIDATION_SEED = 10_000_051  # held-out scenes for choosing settings (K, c) before the test set is looked at


def eval_set(n_scenes: int, seed: int = TEST_SEED, look: bool = False, look_form: str = LOOK_FORM) -> list[EvalItem]:
    """The fixed held-out set: per scene, one question of each kind it allows, plus a description, and
    with `look` a look-then-reason question of form `look_form` on scenes of 2+ shapes (from its own
    stream, so the other items are the same with or without it). Its seed stream is disjoint from
    training's (train_demo draws from seeds < 10_000_000)."""
    rng = random.Random(seed)
    look_rng = random.Random(seed + 1)
    items = []
    for _ in range(n_scenes):
        scene = random_scene(rng)
        for kind, q, a in questions(scene, rng):
            items.append(EvalItem(scene, kind, q, a))
        items.append(EvalItem(scene, "describe", DESCRIBE_PROMPT, scene_description(scene)))
        if look and len(scene.shapes) >= 2:
            item = look_item(scene, look_rng, look_form)
            if item:
                items.append(EvalItem(scene, "look", *item))
    return items


def training_examples(n: int, seed: int = 0, look_form: str = LOOK_FORM):
    """(scene, prompt, answer) triples, one question, description or look-then-reason answer each, for
    predictor training and VTW calibration: the mixture DyRate's rate is learnt on, where some answers
    need the picture to their end (descriptions) and some only while they look (look-then-reason). Not
    the held-out evaluation stream."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        r = rng.random()
        if r < 0.35:
            out.append((scene, DESCRIBE_PROMPT, scene_description(scene)))
        elif r < 0.6 and (item := look_item(scene, rng, look_form)):
            out.append((scene, *item))
        else:
            kind, q, a = rng.choice(questions(scene, rng))
            out.append((scene, q, a))
    return out


# ----------------------------------------------------------------------------------------------------
# Scoring


TRIPLE = re.compile(r"(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r") (?:at|in) the (" +
                    "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")")


def parse_description(text: str) -> list[tuple[str, str, str]]:
    return TRIPLE.findall(text.lower())


def object_f1(predicted: str, truth: Scene) -> float:
    """F1 of (colour, shape, position) triples named in a description against the scene's."""
    pred = parse_description(predicted)
    gold = [(s.color, s.kind, s.position) for s in truth.shapes]
    remaining = list(gold)
    hits = 0
    for t in pred:
        if t in remaining:
            remaining.remove(t)
            hits += 1
    if not pred or not gold:
        return float(pred == gold)
    p, r = hits / len(pred), hits / len(gold)
    return 0.0 if hits == 0 else 2 * p * r / (p + r)
