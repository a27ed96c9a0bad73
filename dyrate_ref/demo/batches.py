"""Stage 2's data and loss: pictures and their questions as token rows, the loss over the answers, and
the held-out checks the training log prints.

Two formats (recipes.Recipe.format):
- "rows" (v4): every question of a picture is its own single-turn example, tokenised exactly as
  inference tokenises it (Processor.input_ids, then space + answer + EOS). All rows begin with the same
  prompt prefix (`USER:` and the 144 visual tokens), so the prefix is run once per picture and its keys
  and values are shared by that picture's rows: the same logits as running every row whole, for the
  cost of one row per question (tests/test_demo.py checks the equality).
- "conversation" (v2): the questions of a picture in one multi-turn conversation.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from ..model import KVCache, LlamaDecoderLayer, LlavaForConditionalGeneration
from ..processing import Processor
from .recipes import Recipe, Stage
from .scenes import (DESCRIBE_PROMPT, all_questions, describe, eval_set, exist_pair, look_answer, look_question,
                     questions, random_scene)


def distinct_scene(rng: random.Random, min_shapes: int, max_shapes: int):
    """A scene whose shapes all differ in kind and in colour (at most 4: there are 4 kinds)."""
    while True:
        scene = random_scene(rng, min_shapes, min(4, max_shapes))
        if len({s.kind for s in scene.shapes}) == len({s.color for s in scene.shapes}) == len(scene.shapes):
            return scene


class Batcher:
    """Draws stage 2's batches for a recipe from its own random stream."""

    def __init__(self, processor: Processor, recipe: Recipe, seed: int):
        self.processor, self.recipe = processor, recipe
        self.rng = random.Random(seed)

    def scene(self, stage: Stage):
        lo, hi = stage.shapes
        return distinct_scene(self.rng, lo, hi) if stage.distinct else random_scene(self.rng, lo, hi)

    def turns(self, scene, stage: Stage) -> list[tuple[str, str, str]]:
        """(kind, question, answer) for one picture under a stage's mixture."""
        restate = self.recipe.restate
        if self.recipe.format == "conversation":  # v2: one question of each kind
            turns = [t for t in questions(scene, self.rng, restate) if t[0] in stage.kinds]
        else:
            turns = all_questions(scene, self.rng, stage.kinds, restate)
        if stage.describe and self.rng.random() < stage.describe:
            turns.append(("describe", DESCRIBE_PROMPT, describe(scene)))
        return turns

    def batch(self, stage: Stage):
        """-> (pixels [S, 3, H, W], rows): rows are (picture index, kind, prompt ids, answer ids); for the
        conversation format one row per picture, kind "conversation", its turns joined."""
        pictures, rows = [], []
        for _ in range(stage.scenes):
            drawn_as = stage
            if stage.guard and self.rng.random() < stage.guard:
                drawn_as = self.recipe.stage(stage.guard_stage)
            scene = self.scene(drawn_as)
            turns = self.turns(scene, drawn_as)
            if not turns:
                continue
            s = len(pictures)
            pictures.append(self.processor.pixel_values(scene.draw()))
            if self.recipe.format == "conversation":
                self.rng.shuffle(turns)
                rows.append((s, "conversation", *self.conversation(turns)))
            else:
                rows += [(s, kind, self.processor.input_ids(q).tolist(), self.processor.answer_ids(a))
                         for kind, q, a in turns]
        return torch.cat(pictures), rows

    def conversation(self, turns):
        """v2: the first turn as inference tokenises it, later turns as `USER: {q} ASSISTANT:` without the
        image. -> (ids of everything, labels: -100 outside the answers)."""
        ids, labels = [], []
        for i, (_, q, a) in enumerate(turns):
            if i == 0:
                p = self.processor.input_ids(q).tolist()
            else:
                p = self.processor.tokenizer.encode(f"USER: {q} ASSISTANT:", add_special_tokens=False).ids
            ans = self.processor.answer_ids(a)
            ids += p + ans
            labels += [-100] * len(p) + ans
        return ids, labels


def common_prefix(rows) -> int:
    """Tokens every row shares at its start, less one, so that each row's last prompt token (whose
    logits predict the answer's first token) stays in the row's own part."""
    first = rows[0][2]
    P = min(len(r[2]) for r in rows) - 1
    for _, _, prompt, _ in rows:
        n = 0
        while n < P and prompt[n] == first[n]:
            n += 1
        P = n
    return P


def row_loss(model: LlavaForConditionalGeneration, px: torch.Tensor, rows, recipe: Recipe, pad_id: int,
             frozen_tower: bool = True) -> torch.Tensor:
    """The weighted next-token cross-entropy over the answers of `rows`, the shared prefix run once per
    picture. px [S, 3, H, W]; rows: (picture, kind, prompt ids, answer ids) as Batcher.batch gives them
    (for "conversation" rows the answer ids are the labels of the whole row, -100 outside answers)."""
    dev = model.lm_head.weight.device
    if frozen_tower:  # LLaVA-1.5 keeps its CLIP tower frozen: no graph through it saves ~a third of a step
        with torch.no_grad():
            vc = model.config.vision_config
            feats = model.vision_tower.hidden_states(px.to(dev), upto=vc.num_hidden_layers)[-1][:, 1:]
        feats = model.multi_modal_projector(feats)  # [S, N, C]
    else:
        feats = model.image_features(px.to(dev))  # [S, N, C]
    P = 0 if recipe.format == "conversation" else common_prefix(rows)  # a conversation row shares nothing
    L = len(model.model.layers)
    shared = None
    if P:
        # The shared prefix: S pictures' keys and values, which each row then reads for its own picture.
        prefix_ids = torch.tensor(rows[0][2][:P], device=dev)[None].expand(len(px), P)  # [S, P]
        shared = KVCache(L)
        model.run_layers(model.embed(prefix_ids, feats), torch.arange(P, device=dev), shared, range(L))
    # Rows of similar length run together (descriptions are ~4x longer than the questions): padding
    # every question to a description's length would cost more than the whole batch's real tokens.
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]) + len(rows[r][3]))
    groups = [order] if len(order) < 8 else [order[:len(order) * 3 // 4], order[len(order) * 3 // 4:]]
    total, weight = 0.0, 0.0
    for group in groups:
        ce, w = _group_ce(model, feats, shared, [rows[r] for r in group], recipe, P, pad_id)
        total, weight = total + ce, weight + w
    return total / weight


def _group_ce(model, feats, shared: KVCache | None, rows, recipe: Recipe, P: int, pad_id: int):
    """-> (the weighted sum of the answer tokens' cross-entropy over `rows`, the sum of their weights);
    each row sees its picture's shared prefix (P tokens in `shared`) or, with P = 0, holds it whole."""
    dev = feats.device
    ids, labels, weights = [], [], []
    for _, kind, prompt, ans in rows:
        if recipe.format == "conversation":  # the whole conversation; `ans` holds its labels
            ids.append(prompt)
            labels.append(ans)
            weights.append([float(t != -100) for t in ans])
            continue
        ids.append(prompt[P:] + ans)
        labels.append([-100] * (len(prompt) - P) + ans)
        w = recipe.weight(kind) / len(ans) if recipe.per_answer else 1.0
        weights.append([0.0] * (len(prompt) - P) + [w] * len(ans))
    T = max(len(i) for i in ids)
    ids_t = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels_t = torch.full((len(rows), T), -100, dtype=torch.long)
    weights_t = torch.zeros(len(rows), T)
    for b in range(len(rows)):
        ids_t[b, :len(ids[b])] = torch.tensor(ids[b])
        labels_t[b, :len(labels[b])] = torch.tensor(labels[b])
        weights_t[b, :len(weights[b])] = torch.tensor(weights[b])
    ids_t, labels_t, weights_t = ids_t.to(dev), labels_t.to(dev), weights_t.to(dev)
    picture = torch.tensor([r[0] for r in rows], device=dev)  # [R]
    L = len(model.model.layers)
    if shared is not None:
        cache = KVCache(L)
        for layer in range(L):
            cache.k[layer] = shared.k[layer].index_select(0, picture)  # [R, Hkv, P, D]
            cache.v[layer] = shared.v[layer].index_select(0, picture)  # [R, Hkv, P, D]
            cache.pos[layer] = shared.pos[layer]  # [P]
        x = model.embed(ids_t, None)  # [R, T, C]
    else:
        cache = None
        x = model.embed(ids_t, feats.index_select(0, picture))  # [R, T, C]
    x, _ = model.run_layers(x, torch.arange(P, P + T, device=dev), cache, range(L))  # right padding: causal is enough
    logits = model.logits(x[:, :-1])  # [R, T-1, V]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels_t[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="none")  # [R*(T-1)]
    w = weights_t[:, 1:].reshape(-1)
    return (ce * w).sum(), w.sum()


@torch.no_grad()
def grow(model: LlavaForConditionalGeneration, depth: int, seed: int = 0) -> LlavaForConditionalGeneration:
    """Deepen the decoder to `depth` layers (a multiple of its depth), in place: after each layer come
    new ones whose output projections (attention o_proj, MLP down_proj) are zero, so each adds nothing
    to the residual stream yet and the model's logits are exactly what they were; their other weights
    are drawn as at initialisation (normal(0, 0.02)), so gradients reach them at once."""
    old = list(model.model.layers)
    assert depth % len(old) == 0, f"grow: {depth} layers is not a multiple of {len(old)}"
    tc = dataclasses.replace(model.config.text_config, num_hidden_layers=depth)
    g = torch.Generator().manual_seed(seed + 11)
    dev = model.lm_head.weight.device
    layers = []
    for layer in old:
        layers.append(layer)
        for _ in range(depth // len(old) - 1):
            new = LlamaDecoderLayer(tc)
            for name, p in new.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            layers.append(new.to(dev))
    model.model.layers = torch.nn.ModuleList(layers)
    model.config = dataclasses.replace(model.config, text_config=tc)
    return model


# ----------------------------------------------------------------------------------------------------
# Held-out checks for the log.


def heldout_examples(processor: Processor, n_scenes: int, restate: bool = True):
    """Single-turn (image, prompt ids, answer ids, kind) examples from the evaluation's seed stream, plus
    one look-then-reason question per scene of 2+ shapes. Colour and position questions on scenes of 3-5
    shapes are also counted as "color3+" / "position3+": there, naming some shape of the scene (v2's
    failure) is right only by chance."""
    out = []
    rng = random.Random(77)
    items = eval_set(n_scenes, restate=restate)
    for item in items:
        p, ans = processor.input_ids(item.question).tolist(), processor.answer_ids(item.answer)
        out.append((item.scene, p, ans, item.kind))
        if item.kind in ("color", "position") and len(item.scene.shapes) >= 3:
            out.append((item.scene, p, ans, item.kind + "3+"))
    for scene in dict.fromkeys(i.scene for i in items):
        if len(scene.shapes) >= 2:
            color, kind, _ = exist_pair(scene, rng, rng.random() < 0.5)
            p = processor.input_ids(look_question(color, kind)).tolist()
            out.append((scene, p, processor.answer_ids(look_answer(scene, color, kind, restate)), "look"))
    return out


@torch.no_grad()
def heldout_exact(model: LlavaForConditionalGeneration, examples, processor: Processor) -> dict:
    """Per question kind (and 'describe'), the share of held-out answers whose every token is the argmax
    under teacher forcing, i.e. exactly the answer greedy decoding would give. Cheap enough to log."""
    dev = model.lm_head.weight.device
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        T = max(len(p) + len(a) for _, p, a, _ in chunk)
        ids = torch.full((len(chunk), T), processor.eos_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, (_, p, a, _) in enumerate(chunk):
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            labels[b, len(p):len(p) + len(a)] = torch.tensor(a)
        px = torch.cat([processor.pixel_values(s.draw()) for s, _, _, _ in chunk]).to(dev)
        pred = model(ids.to(dev), px)[:, :-1].argmax(-1).cpu()  # [B, T-1]
        target = labels[:, 1:]
        ok = ((pred == target) | (target == -100)).all(1)  # [B]
        for (_, _, _, kind), good in zip(chunk, ok.tolist()):
            hits.setdefault(kind, []).append(float(good))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
