"""Data for the tools, from a JSONL file a person can write by hand or from the demo's scene generator.

One JSON object per line (blank lines are skipped):

    {"image": "images/0001.jpg", "prompt": "Describe the image.", "references": ["A dog ...", "..."]}
    {"image": "images/0002.jpg", "prompt": "What colour is the bus?", "answer": "red",
     "answers": ["red", "red", "dark red", ...], "id": "vqa-42"}

- `image`: a path, relative to the JSONL file (or absolute);
- `prompt`: the user's text (the `<image>` marker is added by the processor when it is absent);
- `references` (captions, scored by CIDEr-D) and/or `answer` (scored by exact match); `answers`, the
  human answers of a VQA item, adds VQA soft accuracy;
- `id` (optional): a unique name; the line number otherwise.
Every line is checked, images opened included, before any model work: a bad line is refused with its
line number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..demo.world import scene_world
from ..commands import UserError
from ..files import check_input_file, write_atomic
from ..oracle import reference_answer
from ..processing import open_image
from ..pruning import visual_span
from .metrics import exact_match, vqa_accuracy

# The tools' one door to the demo's scene world, opened here once (tests/test_layout.py keeps it so).
WORLD = scene_world()
LOOK_SPLIT = WORLD.look_split


# ----------------------------------------------------------------------------------------------------
# The one item type of every tool (evaluate, premise, calibrate_vtw, train_predictor): a scene, a data
# file's line, or a picture in memory.


@dataclass(frozen=True)
class Item:
    """One item of a tool, from the scene world, a data file or a picture in memory: the prompt and what
    it is graded against. Scene items carry their scene (drawn on demand; object-F1 and the blank control
    read it)."""
    id: str  # unique within the set: the key of the results file
    prompt: str  # the user's text
    kind: str  # scenes: a question kind, "describe" or "look"; files: "caption" or "answer"; training: "example"
    seed: int  # seeds a random baseline per item, so a subset of the items draws what the whole set would
    cluster: str  # items that share a picture: standard errors are clustered by it
    references: tuple[str, ...] = ()  # captions: CIDEr-D
    answer: str | None = None  # exact match (a look-then-reason item: its final yes / no)
    answers: tuple[str, ...] = ()  # VQA accuracy
    image_path: str | None = None  # files
    scene: object | None = field(default=None, compare=False)  # scenes
    image: Image.Image | None = field(default=None, compare=False)  # a picture in memory (Item.of)

    @classmethod
    def of(cls, image: Image.Image, prompt: str, answer: str | None = None, id: str = "item") -> "Item":
        """An item from a picture in memory (what a library user or a test has at hand)."""
        return cls(id, prompt, "answer" if answer is not None else "example", 0, id, answer=answer, image=image)

    def picture(self, blank: bool = False) -> Image.Image:
        """The image; blank: the control's image without content (the scene's empty background, or a
        grey picture of the file image's size)."""
        if self.scene is None:
            img = self.image if self.image is not None else open_image(self.image_path, '"image"')
            return Image.new("RGB", img.size, (128, 128, 128)) if blank else img
        return WORLD.picture(self.scene, blank)

    def grades(self, text: str) -> dict:
        """What can be graded from this answer alone (CIDEr-D needs the whole set: report.summarise):
        em (exact match on the whole normalised answer), verdict (a look-then-reason answer's final
        yes / no against the right one), vqa, f1 (a scene's description: object-F1)."""
        out = {}
        if self.kind == "look":
            out["verdict"] = float(WORLD.verdict(text) == WORLD.verdict(self.answer))
        elif self.answer is not None:
            out["em"] = exact_match(text, self.answer)
        if self.answers:
            out["vqa"] = vqa_accuracy(text, list(self.answers))
        if self.scene is not None and self.kind == "describe":
            out["f1"] = WORLD.object_f1(text, self.scene)
        return out

    def grade(self, text: str) -> float | None:
        """The item's one grade (object-F1, the verdict, exact match or VQA accuracy, the first it has), or
        None for a caption, which only a whole set grades (CIDEr-D)."""
        s = self.grades(text)
        return next((s[k] for k in ("f1", "verdict", "em", "vqa") if k in s), None)


def _strings(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a non-empty list of strings")
    return tuple(value)


def parse_line(line: str, base: str) -> Item:
    """One JSONL line -> Item (clustered by its image); ValueError says what is wrong with it."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object")
    if not isinstance(d.get("image"), str) or not d["image"]:
        raise ValueError('no "image" path')
    if not isinstance(d.get("prompt"), str) or not d["prompt"].replace("<image>", "").strip():
        raise ValueError('no "prompt"')
    if d["prompt"].count("<image>") > 1:
        raise ValueError('"prompt" has more than one <image> marker; the model takes one image per prompt')
    if "references" not in d and "answer" not in d:
        raise ValueError('neither "references" (captions) nor "answer" (VQA)')
    refs = _strings(d["references"], '"references"') if "references" in d else ()
    if "answer" in d and not isinstance(d["answer"], str):
        raise ValueError('"answer" must be a string')
    answers = _strings(d["answers"], '"answers"') if "answers" in d else ()
    if answers and "answer" not in d:
        raise ValueError('"answers" needs an "answer" too')
    if "id" in d and not isinstance(d["id"], (str, int)):
        raise ValueError('"id" must be a string or a number')
    path = os.path.join(base, d["image"])
    try:
        open_image(path, '"image"')
    except UserError as e:
        raise ValueError(str(e)) from None
    return Item(str(d.get("id", "")), d["prompt"], "caption" if refs else "answer", 0, path, references=refs,
                answer=d.get("answer"), answers=answers, image_path=path)


def read_items(path: str, flag: str = "--data") -> list[Item]:
    """Every line of a JSONL evaluation file, checked; the first bad line is refused with its number. An
    item without an id is named by its line; each seeds its random baselines from its id."""
    check_input_file(path, flag, "a JSONL file")
    base = os.path.dirname(os.path.abspath(path))
    items, seen = [], set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text; give a JSONL file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = parse_line(line, base)
        except ValueError as e:
            raise UserError(f"{path}, line {n}: {e}") from None
        if not item.id:
            item = dataclasses.replace(item, id=f"line{n}")
        item = dataclasses.replace(item, seed=zlib.crc32(item.id.encode()))
        if item.id in seen:
            raise UserError(f"{path}, line {n}: id {item.id!r} already used on an earlier line; ids must be unique")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise UserError(f"{flag} {path} has no items")
    return items


def read_examples(spec: str, processor_seed: int = 0, flag: str = "--data") -> list[Item]:
    """--data (or --heldout) of the calibration and training tools: a JSONL file as above (captions,
    answers or both: the tools work on the model's own greedy answers, so a caption-only file does), or
    scenes:N for N generated scenes (the embedded demo's training distribution)."""
    if spec.startswith("scenes:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"{flag} {spec!r}: write scenes:N with N a number") from None
        if n < 1:
            raise UserError(f"{flag} {spec!r}: give at least one scene (scenes:N with N >= 1)")
        if n > MAX_SCENES:
            raise UserError(f"{flag} {spec!r}: at most scenes:{MAX_SCENES}")
        return [Item(f"example{i}", q, "example", i, f"example{i}", answer=a, scene=scene)
                for i, (scene, q, a) in enumerate(WORLD.training(n, seed=processor_seed + 7919))]
    check_input_file(spec, flag, "a JSONL file or scenes:N")
    return read_items(spec, flag)


MAX_SCENES = 1_000_000  # more generated scenes than any run here could use: a typo, refused at once


def data_inputs(spec: str | None, flag: str = "--data") -> list[tuple[str, str]]:
    """The files a --data (or --heldout) value makes a command read, as check_outputs inputs: the JSONL
    file and every image its lines name (none for scenes:N). Lines that do not parse are skipped here:
    read_items refuses them with their line numbers."""
    if not spec or spec.startswith("scenes:") or not os.path.isfile(spec):
        return []
    out = [(f"the {flag} file", spec)]
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                image = json.loads(line).get("image")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(image, str) and image:
                out.append((f"an image the {flag} file names (line {n})", os.path.join(base, image)))
    return out


def scene_items(n_scenes: int, split: str = "test", look: bool = True) -> list[Item]:
    """The held-out scene world as items: per scene its questions (exact match), its description
    (object-F1, and CIDEr-D against the ground truth) and, with `look`, a look-then-reason question on
    scenes of 2+ shapes (its verdict); clustered by scene. split "test": the scenes every reported table
    uses; "validation": a disjoint set, for choosing settings first."""
    out = []
    for it in WORLD.held_out(n_scenes, split, look):
        gold = dict(references=(it.answer,)) if it.kind == "describe" else dict(answer=it.answer)
        out.append(Item(f"scene{it.scene.seed}:{it.kind}", it.question, it.kind, it.scene.seed % 1_000_003,
                        f"scene{it.scene.seed}", scene=it.scene, **gold))
    return out


def kind_swap(model, processor, n_scenes: int) -> float:
    """Does the model read the question? The mean symmetric KL of the answer word when only the asked
    shape kind changes, on the same picture (demo/reading.py), over n_scenes held-out scenes."""
    return WORLD.kind_swap(model, processor, n_scenes)


def attention_over_generation(model, processor, prompts, max_items: int = 40, min_count: int = 5,
                              witnesses: int = 2) -> dict:
    """Share of attention from generated token t to the visual tokens, per layer, over the model's own
    unpruned descriptions (teacher-forced, one no-cache forward each). -> the figure's data: means and
    standard errors [L][T] and counts [T], for the positions at least min_count answers reach, and the
    first `witnesses` answers' own shares [L][T_i] (tests/test_figures.py recomputes them)."""
    L = model.config.text_config.num_hidden_layers
    described = [i for i in prompts if i.kind == "describe"][:max_items]
    per_answer = []  # [L, T_i] each
    for p in described:
        ids, px = processor.input_ids(p.prompt), processor.pixel_values(p.picture())
        start, N = visual_span(ids, model.config.image_token_index)
        P = ids.numel()
        _, _, probs = reference_answer(model, ids, px, 80, processor.stop_ids, probs_of=range(L))  # {layer: [1, H, S, S]}
        per_answer.append(torch.stack([probs[i][0, :, P - 1:, start:start + N].sum(-1).mean(0) for i in range(L)]))
    T = max(a.shape[1] for a in per_answer)
    counts = torch.tensor([sum(a.shape[1] > t for a in per_answer) for t in range(T)])
    T = int((counts >= min(min_count, len(per_answer))).sum())
    means, sems = torch.zeros(L, T), torch.zeros(L, T)
    for t in range(T):
        x = torch.stack([a[:, t] for a in per_answer if a.shape[1] > t], 1)  # [L, n_t]
        means[:, t] = x.mean(1)
        sems[:, t] = x.std(1) / x.shape[1] ** 0.5 if x.shape[1] > 1 else 0.0
    rounded = lambda x: [[round(v, 6) for v in row] for row in x.tolist()]  # noqa: E731
    return {"answers": len(per_answer), "means": rounded(means), "sems": rounded(sems), "counts": counts[:T].tolist(),
            "witnesses": [{"id": p.id, "mass": rounded(a)} for p, a in zip(described[:witnesses], per_answer)]}


def random_shape_colour(items: list[Item]) -> float:
    """The baseline beside the kind-swap figure: the expected exact match on the colour questions of a
    model that answers with the colour of a random shape of the scene (one that ignores the asked kind)."""
    hits = [WORLD.random_shape_colour(i.scene, i.prompt) for i in items if i.kind == "color" and i.scene is not None]
    return sum(hits) / max(1, len(hits))


def check_fits(items: list[Item], processor, context: int, flag: str = "--data"):
    """Every item's prompt, with its image's tokens, fits the model's context with room for an answer
    (generate.py's rule), checked before the model loads; the first that does not is named."""
    for it in items:
        n = len(processor.input_ids(it.prompt))
        if n >= context:
            raise UserError(f"{flag}: item {it.id} is {n} tokens with the image, which does not fit the model's "
                            f"context of {context}; shorten its prompt")


def vocabulary_note(items: list[Item], processor) -> str | None:
    """generate.py's out-of-vocabulary note for a whole data file: how many items' prompts have characters
    the model's vocabulary has no token for (spelt out byte by byte, never seen in training), which ones,
    and the first such item; None when every prompt is in the vocabulary."""
    hit = [(it, processor.unknown_characters(it.prompt)) for it in items]
    hit = [(it, chars) for it, chars in hit if chars]
    if not hit:
        return None
    chars = "".join(dict.fromkeys(c for _, cs in hit for c in cs))
    return (f"note: {len(hit)} of {len(items)} prompts have characters not in the model's vocabulary ({chars[:10]}), "
            f"the first item {hit[0][0].id}; the model never saw them in training, so its answers may ignore them")


def write_json(path: str, obj):
    """JSON, indented for a reader, written whole or not at all."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    write_atomic(path, write)
