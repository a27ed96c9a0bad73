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
from dataclasses import dataclass

from ..demo.scenes import training_examples
from ..errors import UserError
from ..processing import open_image


@dataclass(frozen=True)
class DataItem:
    id: str
    image_path: str  # absolute
    prompt: str
    references: tuple[str, ...] = ()
    answer: str | None = None
    answers: tuple[str, ...] = ()


def _strings(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a non-empty list of strings")
    return tuple(value)


def parse_line(line: str, base: str) -> DataItem:
    """One JSONL line -> DataItem; ValueError says what is wrong with it."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object")
    if not isinstance(d.get("image"), str) or not d["image"]:
        raise ValueError('no "image" path')
    if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
        raise ValueError('no "prompt"')
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
        open_image(path)
    except UserError as e:
        raise ValueError(str(e)) from None
    return DataItem(str(d.get("id", "")), path, d["prompt"], refs, d.get("answer"), answers)


def read_items(path: str) -> list[DataItem]:
    """Every line of a JSONL evaluation file, checked; the first bad line is refused with its number."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path} does not exist; give a JSONL file")
    base = os.path.dirname(os.path.abspath(path))
    items, seen = [], set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError:
        raise UserError(f"--data {path} is not UTF-8 text; give a JSONL file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = parse_line(line, base)
        except ValueError as e:
            raise UserError(f"{path}, line {n}: {e}") from None
        if not item.id:
            item = dataclasses.replace(item, id=f"line{n}")
        if item.id in seen:
            raise UserError(f"{path}, line {n}: id {item.id!r} already used on an earlier line; ids must be unique")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise UserError(f"--data {path} has no items")
    return items


@dataclass
class Example:
    image: object  # PIL image
    prompt: str
    answer: str


def read_examples(spec: str, processor_seed: int = 0) -> list[Example]:
    """--data of the calibration and training tools: a JSONL file as above whose lines have an "answer"
    (the text the model should produce), or scenes:N for N generated scenes (the embedded demo's
    training distribution)."""
    if spec.startswith("scenes:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--data {spec!r}: write scenes:N with N a number") from None
        return [Example(img, q, a) for img, q, a in training_examples(n, seed=processor_seed + 7919)]
    if not os.path.isfile(spec):
        raise UserError(f"--data {spec} does not exist; give a JSONL file or scenes:N")
    out = []
    for item in read_items(spec):
        if item.answer is None:
            raise UserError(f"{spec}: item {item.id} has no \"answer\"; these tools need the text to expect")
        out.append(Example(open_image(item.image_path), item.prompt, item.answer))
    return out
