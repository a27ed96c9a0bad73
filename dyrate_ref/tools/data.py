"""Examples for the tools that calibrate and train on a frozen model: (image, prompt, answer) triples
from a JSONL file or from the demo's scene generator."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..demo.scenes import training_examples
from ..errors import UserError
from ..processing import open_image


@dataclass
class Example:
    image: object  # PIL image
    prompt: str
    answer: str


def read_examples(spec: str, processor_seed: int = 0) -> list[Example]:
    """--data: a JSONL file of {"image", "prompt", "answer"} (image paths relative to the file), or
    scenes:N for N generated scenes (the embedded demo's training distribution)."""
    if spec.startswith("scenes:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--data {spec!r}: write scenes:N with N a number") from None
        return [Example(img, q, a) for img, q, a in training_examples(n, seed=processor_seed + 7919)]
    if not os.path.isfile(spec):
        raise UserError(f"--data {spec} does not exist; give a JSONL file or scenes:N")
    out = []
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(Example(open_image(os.path.join(base, d["image"])), d["prompt"], d["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{spec}:{n}: expected {{\"image\", \"prompt\", \"answer\"}} ({e})") from None
    if not out:
        raise UserError(f"--data {spec} has no examples")
    return out
