"""How the demo model is trained, as values: a `Recipe` is its stages, each a task mixture on scenes of
some size for some steps; `RECIPES` holds every recipe the training script can run.

Why v4's stages look as they do (measured on this 2-core CPU, a 4 x 128 decoder on the frozen tower,
docs/embedded_model.md): the decoder learns to find a shape by its kind (kind -> patches binding) in
100-400 steps when binding questions are the whole batch, and not in 1,700 when they are a small share
of a mixture of every task; restating the asked kind right before the answer word ("The circle is
red.") shortens the plateau further. So v4 first trains binding alone, then the existence lookup with
it, then the whole mixture with warm-up batches kept in it as a guard, its learning rate decayed over
the last third (a constant rate wobbled between .85 and .95).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..processing import CLIP_MEAN, CLIP_STD
from .scenes import SIZE

# The architecture: LLaVA-1.5 at toy size. CLIP ViT 96 px / 8 px patches -> 144 visual tokens, the last
# encoder layer's features ("vision_feature_layer": -1, so no layer is computed for nothing), a 2-layer
# GELU projector, an 8-layer Llama decoder with grouped-query attention (pruning from K = 2 acts on 6 of
# its 8 layers, 3/4 of the depth). v4's decoder is 8 x 128 (v2's was 8 x 256): the controlled runs that
# learnt binding were 128 wide, and at 256 a run of v4's length did not fit a working session on two
# CPU cores (3.7 s a mixture step at 256 against ~1 s at 128).
CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": None,  # filled in from the tokenizer
    "image_seq_length": 144,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 160, "intermediate_size": 640,
                      "num_hidden_layers": 4, "num_attention_heads": 4, "num_channels": 3, "image_size": SIZE,
                      "patch_size": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 160},
    "text_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 8,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                    "vocab_size": None, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
}
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": SIZE},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                "do_convert_rgb": True}

ALL_KINDS = ("count", "color", "position", "exist", "look")


@dataclass(frozen=True)
class Stage:
    """Steps of stage 2 (projector and decoder; the tower stays frozen) on one task mixture.

    kinds: the question kinds asked of each picture (every question of these kinds that it allows,
        scenes.all_questions); describe: the share of pictures also described;
    shapes: (fewest, most) shapes per picture; distinct: every shape of a picture differs from the
        others in kind and in colour, so no question can be answered without reading which it asks about;
    guard: the share of each batch's pictures drawn as `guard_stage`'s are (the binding warm-up kept in
        the mixture, so that what it taught is not traded away for the easier tasks);
    lr: this stage's peak learning rate (the recipe's schedule scales it);
    layers: the decoder's depth during this stage (None: the config's). A stage deeper than the one
        before grows the decoder (batches.grow: new layers interleaved, each starting as the identity,
        so the model computes exactly what it did);
    warmup, decay: a stage with its own schedule (decay > 0: linear warm-up over `warmup` steps, then a
        cosine to 5 % over the stage's last `decay` share), as a fine-tuning stage appended to a finished
        recipe has; the other stages share the recipe's schedule, which is then unchanged by the append."""
    name: str
    steps: int
    kinds: tuple[str, ...]
    shapes: tuple[int, int] = (1, 5)
    distinct: bool = False
    describe: float = 0.0
    guard: float = 0.0
    guard_stage: str | None = None
    lr: float = 1e-3
    scenes: int = 16  # pictures per batch
    layers: int | None = None
    warmup: int = 0
    decay: float = 0.0


@dataclass(frozen=True)
class Gate:
    """An early go/no-go signal, set where a controlled run's curve showed its plateau
    (docs/embedded_model.md): in stage `stage`, from its step `after` on (None: at its last step only),
    every metric of `floors` must reach its floor (exceed it, with `strict`). `what` names the window in
    the log (default: the stage and its step)."""
    stage: str
    floors: tuple[tuple[str, float], ...]
    after: int | None = None
    strict: bool = False
    what: str = ""


@dataclass(frozen=True)
class Recipe:
    """A whole training run: each question is its own single-turn example, the picture's prefix computed
    once and shared by its questions (exactly the full forward's logits). look: the look-then-reason
    form (scenes.LOOK_FORMS). blind: the share of look-then-reason rows whose reasoning part cannot see
    the picture (every query from the one that predicts " So" on has the visual keys masked, in every
    layer), so that the reasoning is learnt from the description's text. weights: each answer weighs
    `weights[kind]` whatever its length (with a "reason" weight, a look-then-reason answer's looking
    part weighs "look" and its reasoning part "reason") (with every answer token weighing 1, descriptions
    were 69 % of the loss). gates: the early go/no-go signals (Gate). warmup: linear warm-up steps; decay: the share of all stage-2 steps, at the end,
    over which the rate follows a cosine down to 5 % (before it, each stage's peak is held)."""
    name: str
    stages: tuple[Stage, ...]
    look: str = "exist"
    blind: float = 0.0
    weights: tuple[tuple[str, float], ...] = ()
    warmup: int = 100
    decay: float = 1 / 3
    vision_steps: int = 500
    description: str = ""
    gates: tuple[Gate, ...] = ()

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def shared_steps(self) -> int:
        """The steps of the stages that follow the recipe's schedule (not their own)."""
        return sum(s.steps for s in self.stages if not s.decay)

    def start_of(self, name: str) -> int:
        """The stage-2 step at which stage `name` begins."""
        start = 0
        for stage in self.stages:
            if stage.name == name:
                return start
            start += stage.steps
        raise KeyError(name)

    def stage_at(self, step: int) -> tuple[Stage, int]:
        """-> (the stage that stage-2 step `step` belongs to, the step within it)."""
        for stage in self.stages:
            if step < stage.steps:
                return stage, step
            step -= stage.steps
        return self.stages[-1], step

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def lr(self, step: int) -> float:
        stage, within = self.stage_at(step)
        if stage.decay:
            return stage.lr * schedule(within, stage.steps, stage.warmup, stage.decay)
        return stage.lr * schedule(step, self.shared_steps, self.warmup, self.decay)

    def weight(self, kind: str) -> float:
        return dict(self.weights).get(kind, 1.0)

    @property
    def weights_reasoning(self) -> bool:
        """Whether a look-then-reason answer's reasoning part weighs apart from its looking part (weight
        "reason"), instead of the whole answer weighing "look"."""
        return "reason" in dict(self.weights)


def schedule(step: int, steps: int, warmup: int, decay: float) -> float:
    """Linear warm-up, then 1, then a cosine to 0.05 over the last `decay` share of the steps."""
    if step < warmup:
        return (step + 1) / warmup
    start = max(warmup, int(steps * (1 - decay)))
    if step < start:
        return 1.0
    progress = (step - start) / max(1, steps - start)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, steps: int, peak: float, warmup: int = 300) -> float:
    """Warm-up, then a cosine over everything after it (stage 1's schedule)."""
    return peak * schedule(step, steps, warmup, 1.0)


BIND = ("color", "position")
# The binding warm-up runs on a 4-layer decoder, which then grows to the config's 8: measured with this
# code (docs/embedded_model.md), 4 layers bound kind to patches by step 200 of the warm-up (colour on 3-5
# shapes .86, kind-swap KL .85) where 8 layers trained from the start had reached .41 and .85 by step 500.
V4 = Recipe(
    name="v4",
    description="binding warm-up on 4 decoder layers (colour and position of every shape, 2 shapes of distinct "
                "kinds and colours), grown to 8, then existence joins it, then the full mixture with a binding "
                "guard; answers restate what was asked",
    stages=(
        Stage("bind", 300, BIND, shapes=(2, 2), distinct=True, layers=4),
        Stage("bind+exist", 300, BIND + ("exist",), shapes=(2, 4), distinct=True),
        Stage("mixture", 2000, ALL_KINDS, shapes=(1, 5), describe=0.5, guard=0.25, guard_stage="bind+exist"),
    ),
    weights=(("describe", 1.5), ("look", 1.5), ("exist", 1.5)),
    # the answer must depend on the asked kind by the warm-up's end, and colour on 3-5 shapes be well above
    # naming a random shape; in the mixture, from its step 400 on, colour and position at least .9
    gates=(Gate("bind", (("kind_swap_kl", 1.0), ("color3+", 0.6)), strict=True, what="end of warm-up"),
           Gate("mixture", (("color", 0.9), ("position", 0.9)), after=400)),
)

# v5 = v4, then a look-then-reason stage (docs/embedded_model.md, the controlled fine-tuning runs from v4):
# the look form whose reasoning copies the asked kind's colour from the description ("So the star is
# green."), and half of the look rows blind after the look, the one change that made the verdict from text
# alone climb in those runs (.58 -> .85 in 400 steps on the existence form). The stage keeps v4's whole
# mixture (every kind stays trained), at the fine-tuning runs' rate (3e-4, 30-step warm-up, cosine over
# its last third). The reasoning part weighs apart from the description ("reason" 4.0): with the whole
# look answer weighing 3.0 its colour word was 1 token of ~30, and the first run's text-only verdict did
# not climb (.00, .13, .32, .23 at steps 100-400; log in docs/embedded_model.md). Trained from scratch by
# `--recipe v5`, or from the shipped v4 by `--recipe v5 --init weights/dyrate-shapes --from-stage look`
# (the log says which).
V5 = Recipe(
    name="v5", look="color", blind=0.5,
    description="v4, then a look-then-reason stage: colour questions answered by describing the picture and "
                "copying the asked kind's colour from the description, half of them blind after the look",
    stages=V4.stages + (
        Stage("look", 1500, ALL_KINDS, shapes=(2, 5), describe=0.5, guard=0.25, guard_stage="mixture", lr=3e-4,
              warmup=30, decay=1 / 3),
    ),
    weights=(("describe", 1.5), ("look", 1.5), ("reason", 4.0), ("exist", 1.5)),
    # the first run (whole look answer weighing one) sat at .23-.32 from text alone at the stage's steps 300-400
    gates=V4.gates + (Gate("look", (("look_blind", 0.6),), after=300),),
)

RECIPES = {r.name: r for r in (V5, V4)}
SHIPPED = "v5"  # the recipe of weights/dyrate-shapes, demo.train's default
