"""Stage 2's data and loss: pictures and their questions as token rows, the loss over the answers, and
the held-out checks the training log prints.

Every question of a picture is its own single-turn example, tokenised exactly as inference tokenises
it (Processor.input_ids, then space + answer + EOS). All rows begin with the same prompt prefix
(`USER:` and the 144 visual tokens), so the prefix is run once per picture and its keys and values are
shared by that picture's rows: the same logits as running every row whole, for the cost of one row per
question (tests/test_demo.py checks the equality).
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from ..model import KVCache, LlamaDecoderLayer, LlavaForConditionalGeneration
from ..processing import Processor
from .recipes import Recipe, Stage
from .scenes import (scene_description, DESCRIBE_PROMPT, LOOK_SPLIT, all_questions, eval_set, exist_pair, look_answer,
                     look_item, look_question, random_scene)


def answer_ids(processor: Processor, answer: str) -> list[int]:
    """The ids the model should produce after `ASSISTANT:` for this answer, EOS included (teacher
    forcing, training). The answer starts with a space, as text after "ASSISTANT:" does."""
    ids = processor.tokenizer.encode(" " + answer.strip(), add_special_tokens=False).ids
    return ids + ([processor.eos_id] if processor.eos_id is not None else [])


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
        turns = all_questions(scene, self.rng, stage.kinds, self.recipe.look)
        if stage.describe and self.rng.random() < stage.describe:
            turns.append(("describe", DESCRIBE_PROMPT, scene_description(scene)))
        return turns

    def batch(self, stage: Stage):
        """-> (pixels [S, 3, H, W], rows): rows are (picture index, kind, prompt ids, answer ids, reason at,
        blind): reason at is None, or for a look-then-reason row the index of its answer token " So",
        where the reasoning part begins; blind: whether the row was drawn blind (the recipe's `blind`
        share), its reasoning part's queries unable to see the picture."""
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
            for kind, q, a in turns:
                reason_at = reasoning_start(self.processor, a) if kind == "look" else None
                blind = kind == "look" and bool(self.recipe.blind) and self.rng.random() < self.recipe.blind
                rows.append((s, kind, self.processor.input_ids(q).tolist(), answer_ids(self.processor, a), reason_at,
                             blind))
        return torch.cat(pictures), rows


def reasoning_start(processor: Processor, answer: str) -> int:
    """The index, in `answer`'s ids, of the token that begins its reasoning part (" So"): the looking
    part tokenises the same alone as at the head of the whole answer (the tokenizer splits at spaces)."""
    looking = answer[:answer.index(LOOK_SPLIT) + 1]
    n = len(answer_ids(processor, looking)) - (processor.eos_id is not None)
    assert answer_ids(processor, answer)[:n] == answer_ids(processor, looking)[:n], "the looking part tokenises differently"
    return n


def blind_masks(image_at: torch.Tensor, blind_from: list[int | None], T: int, P: int, dev) -> torch.Tensor | None:
    """The attention mask [R, 1, T, P + T] (True = may attend) of R rows whose queries sit at positions
    P..P+T-1 over keys at 0..P+T-1: causal, and a row with blind_from b has its queries from b on
    unable to see the visual keys (image_at [P+T] bool). None where no row is blind."""
    if all(b is None for b in blind_from):
        return None
    q_pos = torch.arange(P, P + T, device=dev)  # [T]
    k_pos = torch.arange(P + T, device=dev)  # [S]
    causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    start = torch.tensor([T + P if b is None else b for b in blind_from], device=dev)  # [R] first blind position
    blind_q = q_pos[None, :] >= start[:, None]  # [R, T]
    hidden = blind_q[:, :, None] & image_at[None, None, :]  # [R, T, S]
    return (causal[None] & ~hidden)[:, None]  # [R, 1, T, S]


def common_prefix(rows) -> int:
    """Tokens every row shares at its start, less one, so that each row's last prompt token (whose
    logits predict the answer's first token) stays in the row's own part."""
    first = rows[0][2]
    P = min(len(r[2]) for r in rows) - 1
    for _, _, prompt, *_ in rows:
        n = 0
        while n < P and prompt[n] == first[n]:
            n += 1
        P = n
    return P


def row_loss(model: LlavaForConditionalGeneration, px: torch.Tensor, rows, recipe: Recipe, pad_id: int,
             frozen_tower: bool = True) -> torch.Tensor:
    """The weighted next-token cross-entropy over the answers of `rows`, the shared prefix run once per
    picture. px [S, 3, H, W]; rows: (picture, kind, prompt ids, answer ids) as Batcher.batch gives them
"""
    dev = model.lm_head.weight.device
    if frozen_tower:  # LLaVA-1.5 keeps its CLIP tower frozen: no graph through it saves ~a third of a step
        with torch.no_grad():
            feats = model.vision_features(px.to(dev))  # [S, N, C_vis]
        feats = model.multi_modal_projector(feats)  # [S, N, C]
    else:
        feats = model.image_features(px.to(dev))  # [S, N, C]
    P = common_prefix(rows)
    L = len(model.model.layers)
    shared = None
    if P:
        # The shared prefix: S pictures' keys and values, which each row then reads for its own picture.
        prefix_ids = torch.tensor(rows[0][2][:P], device=dev)[None].expand(len(px), P)  # [S, P]
        shared = KVCache(L)
        decoder(model, model.embed(prefix_ids, feats), torch.arange(P, device=dev), shared)
    # Rows of similar length run together (descriptions are ~4x longer than the questions): padding
    # every question to a description's length would cost more than the whole batch's real tokens.
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]) + len(rows[r][3]))
    groups = [order] if len(order) < 8 else [order[:len(order) * 3 // 4], order[len(order) * 3 // 4:]]
    total, weight = 0.0, 0.0
    for group in groups:
        ce, w = _group_ce(model, feats, shared, [rows[r] for r in group], recipe, P, pad_id)
        total, weight = total + ce, weight + w
    return total / weight


def decoder(model: LlavaForConditionalGeneration, x: torch.Tensor, pos: torch.Tensor, cache: KVCache | None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every decoder layer on hidden states x [B, T, C] at positions pos [T], each under the same bool
    mask [B, 1, T, S] (None: causal by position). -> x [B, T, C]."""
    cos, sin = model.rope(pos)  # [T, D] each
    for i, layer in enumerate(model.model.layers):
        x, _ = layer(x, cos, sin, pos, cache, i, mask)
    return x


def rows_of(cache: KVCache, index: torch.Tensor) -> KVCache:
    """A cache whose batch rows are `cache`'s rows `index` [R], every layer's slots as they are."""
    out = KVCache(len(cache.k))
    for layer in range(len(cache.k)):
        if cache.k[layer] is not None:
            out.k[layer] = cache.k[layer].index_select(0, index)  # [R, Hkv, S_l, D]
            out.v[layer] = cache.v[layer].index_select(0, index)  # [R, Hkv, S_l, D]
            out.pos[layer] = cache.pos[layer]  # [S_l]
    return out


def _group_ce(model, feats, shared: KVCache | None, rows, recipe: Recipe, P: int, pad_id: int):
    """-> (the weighted sum of the answer tokens' cross-entropy over `rows`, the sum of their weights);
    each row sees its picture's shared prefix (P tokens in `shared`) or, with P = 0, holds it whole."""
    dev = feats.device
    ids, labels, weights, blind_from = [], [], [], []
    for _, kind, prompt, ans, reason_at, blind in rows:
        # the query that predicts answer token b sits at the row's position len(prompt) - 1 + b
        blind_from.append(len(prompt) - 1 + reason_at if blind else None)
        ids.append(prompt[P:] + ans)
        labels.append([-100] * (len(prompt) - P) + ans)
        w = [recipe.weight(kind) / len(ans)] * len(ans)
        if reason_at is not None and recipe.weights_reasoning:  # the looking part and the reasoning part weigh apart
            w = ([recipe.weight(kind) / reason_at] * reason_at
                 + [recipe.weight("reason") / (len(ans) - reason_at)] * (len(ans) - reason_at))
        weights.append([0.0] * (len(prompt) - P) + w)
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
    if shared is not None:
        cache = rows_of(shared, picture)  # each row reads its own picture's prefix: [R, Hkv, P, D] per layer
        x = model.embed(ids_t, None)  # [R, T, C]
    else:
        cache = None
        x = model.embed(ids_t, feats.index_select(0, picture))  # [R, T, C]
    mask = None
    if any(b is not None for b in blind_from):
        prompt_ids = torch.tensor(rows[0][2], device=dev)  # every row's prompt has the picture at the same place
        image_at = torch.zeros(P + T, dtype=torch.bool, device=dev)  # [S]
        image_at[:len(prompt_ids)] = prompt_ids == model.config.image_token_index
        mask = blind_masks(image_at, blind_from, T, P, dev)  # [R, 1, T, S]
    x = decoder(model, x, torch.arange(P, P + T, device=dev), cache, mask)  # right padding: causal is enough
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


def heldout_examples(processor: Processor, n_scenes: int, look: str = "exist"):
    """Single-turn held-out examples (image, prompt ids, answer ids, kind, scored from, blind from) from
    the evaluation's seed stream, plus one look-then-reason question of form `look` per scene that has
    one. Colour and position questions on scenes of 3-5 shapes are also counted as "color3+" /
    "position3+": there, naming some shape of the scene (v2's failure) is right only by chance. Each
    look question also gives "look_reason" (its reasoning part alone, the picture visible) and
    "look_blind" (the same with the picture hidden from the reasoning part's queries: can the verdict be
    read from the description's text?). scored from: the answer index from which tokens count; blind
    from: None, or the answer index from whose prediction on the picture is hidden."""
    out = []
    rng = random.Random(77)
    items = eval_set(n_scenes)
    for item in items:
        p, ans = processor.input_ids(item.question).tolist(), answer_ids(processor, item.answer)
        out.append((item.scene, p, ans, item.kind, 0, None))
        if item.kind in ("color", "position") and len(item.scene.shapes) >= 3:
            out.append((item.scene, p, ans, item.kind + "3+", 0, None))
    for scene in dict.fromkeys(i.scene for i in items):
        if look == "exist" and len(scene.shapes) >= 2:  # v4's held-out draw, as its log measured it
            color, kind, _ = exist_pair(scene, rng, rng.random() < 0.5)
            q, a = look_question(color, kind), look_answer(scene, color, kind)
        elif not (drawn := look_item(scene, rng, look)):
            continue
        else:
            q, a = drawn
        p, ans = processor.input_ids(q).tolist(), answer_ids(processor, a)
        b = reasoning_start(processor, a)
        out += [(scene, p, ans, "look", 0, None), (scene, p, ans, "look_reason", b, None),
                (scene, p, ans, "look_blind", b, b)]
    return out


@torch.no_grad()
def heldout_exact(model: LlavaForConditionalGeneration, examples, processor: Processor) -> dict:
    """Per question kind (and 'describe'), the share of held-out answers whose every scored token is the
    argmax under teacher forcing, i.e. exactly the answer greedy decoding would give. Cheap enough to log."""
    dev = model.lm_head.weight.device
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        T = max(len(p) + len(a) for _, p, a, _, _, _ in chunk)
        ids = torch.full((len(chunk), T), processor.eos_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, (_, p, a, _, first, _) in enumerate(chunk):
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            labels[b, len(p) + first:len(p) + len(a)] = torch.tensor(a[first:])
        px = torch.cat([processor.pixel_values(s.draw()) for s, *_ in chunk]).to(dev)
        ids = ids.to(dev)
        blind_from = [None if b is None else len(p) - 1 + b for _, p, _, _, _, b in chunk]
        mask = blind_masks(ids[0] == model.config.image_token_index, blind_from, T, 0, dev)  # [B, 1, T, T] or None
        x = model.embed(ids, model.image_features(px))  # [B, T, C]
        x = decoder(model, x, torch.arange(T, device=dev), None, mask)
        pred = model.logits(x)[:, :-1].argmax(-1).cpu()  # [B, T-1]
        target = labels[:, 1:]
        ok = ((pred == target) | (target == -100)).all(1)  # [B]
        for (_, _, _, kind, _, _), good in zip(chunk, ok.tolist()):
            hits.setdefault(kind, []).append(float(good))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}
