"""The scene world as the tools see it: one value, handed out by `scene_world()`.

The tools (evaluate, premise, calibrate_vtw, train_predictor) run on a user's JSONL data as well as on
the demo's generated scenes. So that none of them has to know that scenes exist, tools/data.py asks for
this value once and turns what it offers into the tools' one item type; nothing else of the tools
imports demo/ (tests/test_layout.py keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from .reading import kind_swap_kl, kind_swap_pairs
from .scenes import COLORS, LOOK_SPLIT, SHAPES, TEST_SEED, VALIDATION_SEED, EvalItem, Scene, eval_set, look_verdict, \
    object_f1, object_map, training_examples


@dataclass(frozen=True)
class SceneWorld:
    """What a tool may ask of the scene world."""
    look_split: str = LOOK_SPLIT  # where a look-then-reason answer's looking part ends (" So ")

    def held_out(self, n_scenes: int, split: str = "test", look: bool = True) -> list[EvalItem]:
        """The fixed held-out items of n_scenes scenes: "test" (every reported table) or "validation" (a
        disjoint set, for choosing settings first); with `look`, the look-then-reason items too."""
        return eval_set(n_scenes, TEST_SEED if split == "test" else VALIDATION_SEED, look=look)

    def training(self, n: int, seed: int) -> list[tuple[Scene, str, str]]:
        """n (scene, prompt, answer) examples of the training distribution."""
        return training_examples(n, seed=seed)

    def picture(self, scene: Scene, blank: bool = False) -> Image.Image:
        """The scene drawn; blank: its empty background (the control without content)."""
        return (replace(scene, shapes=()) if blank else scene).draw()

    def verdict(self, text: str) -> str | None:
        """A look-then-reason answer's final answer ("star green"), or None if it has none."""
        return look_verdict(text)

    def object_f1(self, text: str, scene: Scene) -> float:
        """A description's F1 of (colour, shape, position) triples against the scene's."""
        return object_f1(text, scene)

    def kind_swap(self, model, processor, n_scenes: int) -> float:
        """Does the model read the question? The kind-swap KL over n_scenes held-out scenes (reading.py)."""
        return kind_swap_kl(model, processor, kind_swap_pairs(n_scenes))

    def shape_count(self, scene: Scene) -> int:
        """How many shapes the picture holds (1-5)."""
        return len(scene.shapes)

    def patch_regions(self, scene: Scene, prompt: str, side: int, cover: float = 0.0):
        """Which of the side x side image patches (row-major, the visual tokens' order) lie on a shape:
        -> (on a shape bool [N], on the asked shape bool [N] or None). A patch is on a shape when more than
        `cover` of its pixels are (default: any pixel); the asked shape is the one shape the prompt names by kind (and colour,
        if it names one), None for questions about no single shape (count, describe, an absent one)."""
        import numpy as np
        import torch
        ids = torch.from_numpy(np.asarray(object_map(scene).resize((side * 8, side * 8), Image.NEAREST))).long()
        ids = ids.view(side, 8, side, 8).permute(0, 2, 1, 3).reshape(side * side, 64)  # [N, pixels of a patch]
        words = prompt.lower().rstrip("?. ").replace("?", "").split()
        kind = next((k for k in SHAPES if k in words), None)
        colour = next((c for c in COLORS if c in words), None)
        named = [i for i, s in enumerate(scene.shapes) if s.kind == kind and colour in (None, s.color)]
        on_shape = (ids > 0).float().mean(1) > cover  # [N]
        asked = (ids == named[0] + 1).float().mean(1) > cover if len(named) == 1 else None
        return on_shape, asked

    def random_shape_colour(self, scene: Scene, prompt: str) -> float:
        """For a colour question about one shape: the chance that a random shape of the scene has the
        asked one's colour (what a model that ignores the asked kind scores)."""
        asked = next(s for s in scene.shapes if prompt.rstrip("?").endswith(s.kind))
        return sum(s.color == asked.color for s in scene.shapes) / len(scene.shapes)


def scene_world() -> SceneWorld:
    """The tools' one door to the scene world."""
    return SceneWorld()
