"""Train the embedded demo model from scratch on generated scenes, with the project's own model code.

  python -m dyrate_ref.demo.train --out weights/dyrate-shapes [--seed 0] [--init DIR] [--device cuda]

Writes a complete llava-hf directory: config.json, model.safetensors (transformers 5.x key layout),
tokenizer.json / tokenizer_config.json / special_tokens_map.json (a byte-level BPE trained here on the
scene vocabulary, <image> a special token) and preprocessor_config.json. Then train the predictor with
train_predictor and calibrate VTW (docs/embedded_model.md, "Reproducing the embedded model").

Recipe, and why (a naive single-stage run of this size reached only chance-level position answers
after 16 minutes: the decoder cannot learn to read a vision tower that has not yet learned to see):
- LLaVA-1.5 architecture at toy size: CLIP ViT 96 px / 8 px patches -> 144 visual tokens, the last
  encoder layer's features ("vision_feature_layer": -1, so no layer is computed for nothing), a 2-layer
  GELU projector, an 8-layer Llama decoder with grouped-query attention (pruning from K=2 acts on 6 of
  its 8 layers; on LLaVA-1.5-7B's 32 the same K acts on 30, so K is not carried over as a share of depth).
- A byte-level BPE (capped at 512 entries; v2's stopped at 400) trained on the scene texts, so every
  prompt and answer word is one token.
- Stage 1 (like LLaVA's pretrained CLIP tower, here made in minutes): the vision tower alone learns to
  name, at every patch, the kind and colour of the object covering it and the 3x3 cell the patch is
  in, through a linear head that is then thrown away. Then probe_tower fits a fresh linear probe on the
  frozen tower and logs its held-out accuracy: it tells a tower that cannot see from a decoder that
  cannot read.
- Stage 2: the projector and decoder train on multi-turn conversations, LLaVA's own format: each
  picture carries every question it allows and, 70 % of the time, its description, so its 144 visual
  tokens are paid for once per several answers. The loss is on answer tokens only. The tower stays
  frozen, as LLaVA-1.5 keeps CLIP frozen (v1 of this model trained it on at half rate and lost shape
  kinds; freezing also skips the tower's backward). Per-kind held-out exact match (heldout_exact: what
  greedy decoding would answer) is logged every --eval-every steps.
- A curriculum on scene size (at most 2 shapes, then 3, then 5 from 30 % of stage 2 on) and a
  warm-up + cosine learning rate.
- float32 by default; --bf16 autocasts matmuls to bfloat16 (fp32 master weights), which pays only on
  CPUs with AMX or AVX512-BF16 and on GPUs. The shipped weights are fp32.
- The run is fixed by --vision-steps / --steps (deterministic for a seed); --minutes only stops early.
  --init DIR continues from a directory this script wrote (stage 1 skipped, 5-shape scenes throughout,
  a fresh warm-up and cosine), appending to its train_log.txt when DIR is --out.

The v3 recipe (--recipe v3; --tower DIR starts a fresh tokenizer, projector and decoder on a trained
tower), aimed at a decoder that reads the question, which v2's does not (the kind-swap test, demo/reading.py, logged
every --eval-every steps as the go/no-go signal): every picture's questions differ by their words
(scenes.all_questions: colour and position of every kind seen once, a yes and a near-miss no, the
look-then-reason kind), the loss weighted per answer rather than per token, scenes of distinct kinds
and colours first, text embeddings and visual tokens started at the same scale (balance_init) with a
penalty that keeps the visual tokens within VISUAL_RMS_CAP of the text (--visual-penalty), no weight
decay on the embeddings and the LM head, and optionally a training-only "which shape does this ask
about" turn (--echo), a ramp of the visual tokens in from zero (--read-first), the image withheld from
every text token for the first steps (--withhold) and a loss asking the answer's query of a colour or
position question to attend to the asked shape's patches (--attend). Measured this round
(docs/embedded_model.md): none of these has yet made the decoder read the question within the
go/no-go window; the shipped model is still v2.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from ..errors import ArgumentParser, UserError, command_main
from ..loading import load_model, read_config, save_weights
from ..model import LlavaConfig, LlavaForConditionalGeneration
from ..processing import CLIP_MEAN, CLIP_STD, PROMPT_TEMPLATE, ImageSettings, Processor, pixel_values
from ..progress import Progress
from ..pruning import visual_span
from .bpe import save_tokenizer_files, train_bpe
from .reading import kind_swap_kl, kind_swap_pairs
from .scenes import (COLORS, DESCRIBE_PROMPT, SHAPES, SIZE, all_questions, describe, eval_set, exist_pair, look_answer,
                     look_question, object_map, questions, random_scene)

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
    "text_config": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
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


def tokenizer_corpus(seed: int = 123, scenes: int = 3000, recipe: str = "v2") -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(scenes):
        s = random_scene(rng)
        texts.append(describe(s))
        for _, q, a in (questions(s, rng) if recipe == "v2" else all_questions(s, rng)):
            texts.append(PROMPT_TEMPLATE.format(prompt=q).replace("<image>", "") + " " + a)
            if recipe == "v3":
                texts.append(f"{ECHO_PROMPT} {q}")
    texts.append(PROMPT_TEMPLATE.format(prompt=DESCRIBE_PROMPT).replace("<image>", ""))
    return texts


def init_weights(model: torch.nn.Module, seed: int):
    """HF's LLaVA init: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 and ("norm" in name):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# Loss weight of one answer (each answer's tokens share it): per answer, not per token, so that the
# long descriptions do not drown the short questions (v2 averaged over tokens: descriptions were 69 % of
# the loss and reading the question's kind word earned almost nothing). Questions : long answers is
# about 3 : 1 over a conversation.
TURN_WEIGHT = {"describe": 1.5, "look": 1.5}
ECHO_PROMPT = "Which shape does this ask about:"  # v3's training-only turn (--echo)
RECIPES = ("v2", "v3")


def distinct_scene(rng: random.Random, min_shapes: int, max_shapes: int):
    """A scene whose shapes all differ in kind and in colour: the curriculum's start, where no colour or
    position question can be answered without reading which kind it asks about."""
    while True:
        scene = random_scene(rng, min_shapes, max_shapes)
        if len({s.kind for s in scene.shapes}) == len({s.color for s in scene.shapes}) == len(scene.shapes):
            return scene


class Batcher:
    """Multi-turn conversations about generated scenes. The first turn is tokenised by the same
    Processor inference uses (prompt ids with <image> expanded, then answer ids: space + answer + EOS);
    later turns continue as `USER: {q} ASSISTANT:` without the image. The description is asked 70 % of
    the time, in random order with the questions, so each picture's 144 visual tokens pay for several
    answers. Recipe v2 (the shipped model): one question of each kind the scene allows
    (scenes.questions), every answer token weighing the same. Recipe v3: every question the scene
    allows (scenes.all_questions: colour and position of every kind seen once, a yes and a near-miss
    no, a look-then-reason question), so the answers on one picture differ by the question's words,
    each answer weighing TURN_WEIGHT whatever its length."""

    def __init__(self, processor: Processor, seed: int, recipe: str = "v2", echo: float = 0.0):
        self.processor = processor
        self.rng = random.Random(seed)
        self.eos = processor.eos_id
        self.recipe, self.echo = recipe, echo

    def conversation_v2(self, max_shapes: int):
        scene = random_scene(self.rng, 1, max_shapes)
        turns = list(questions(scene, self.rng))
        if self.rng.random() < 0.7:
            turns.append(("describe", DESCRIBE_PROMPT, describe(scene)))
        self.rng.shuffle(turns)
        return self.tokens(scene, turns, per_answer=False)

    def conversation(self, scene):
        turns = all_questions(scene, self.rng)
        if self.echo and self.rng.random() < self.echo:
            # Training only: which kind does a question ask about? Answerable from the text alone, so
            # nothing is gained by attending to the picture: the path from the answer position to the
            # question's kind word is learnt first, then the colour and position questions use it.
            kind, q, _ = self.rng.choice([t for t in turns if t[0] in ("color", "position")] or [turns[0]])
            m = re.search(r"the (\w+)\?$", q)
            if m:
                turns.append(("echo", f"{ECHO_PROMPT} {q}", m.group(1)))
        if self.rng.random() < 0.7:
            turns.append(("describe", DESCRIBE_PROMPT, describe(scene)))
        self.rng.shuffle(turns)
        return self.tokens(scene, turns, per_answer=True), self.look_target(scene, turns[0])

    def look_target(self, scene, turn):
        """For --attend: where the first answer's query should look. A colour or position question asks
        about one kind seen once: -> (the query's position, bool [N] of the patches that shape covers);
        other first turns -> None."""
        kind, q, _ = turn
        if kind not in ("color", "position"):
            return None
        asked = re.search(r"the (\w+)\?$", q).group(1)
        kinds, _ = patch_targets(scene)  # [N]
        return len(self.processor.input_ids(q)) - 1, kinds == 1 + SHAPES.index(asked)

    def tokens(self, scene, turns, per_answer: bool):
        """-> (image, ids, labels, weights): per_answer, each answer's tokens share its TURN_WEIGHT;
        else every answer token weighs 1 (the per-token mean)."""
        ids, labels, weights = [], [], []
        for i, (kind, q, a) in enumerate(turns):
            if i == 0:
                p = self.processor.input_ids(q).tolist()
            else:
                p = self.processor.tokenizer.encode(f"USER: {q} ASSISTANT:", add_special_tokens=False).ids
            ans = self.processor.answer_ids(a)
            w = TURN_WEIGHT.get(kind, 1.0) / len(ans) if per_answer else 1.0
            ids += p + ans
            labels += [-100] * len(p) + ans
            weights += [0.0] * len(p) + [w] * len(ans)
        return scene.draw(), ids, labels, weights

    def batch(self, size: int, max_shapes: int, distinct: bool = False):
        if self.recipe == "v2":
            return collate([self.conversation_v2(max_shapes) for _ in range(size)], self.processor)
        scenes = [distinct_scene(self.rng, 2, min(4, max_shapes)) if distinct else random_scene(self.rng, 1, max_shapes)
                  for _ in range(size)]
        convs, looks = zip(*(self.conversation(s) for s in scenes))
        return (*collate(list(convs), self.processor), looks)


def collate(convs, processor: Processor):
    """[(image, ids, labels[, weights])] -> ids, labels [B, T] (right-padded with EOS / -100),
    px [B, 3, H, W], weights [B, T] (per-token loss weights; without them every answer token weighs 1)."""
    T = max(len(c[1]) for c in convs)
    ids = torch.full((len(convs), T), processor.eos_id, dtype=torch.long)
    labels = torch.full((len(convs), T), -100, dtype=torch.long)
    weights = torch.zeros(len(convs), T)
    for b, (_, i, l, *w) in enumerate(convs):
        ids[b, :len(i)] = torch.tensor(i)
        labels[b, :len(l)] = torch.tensor(l)
        weights[b, :len(l)] = torch.tensor(w[0]) if w else (torch.tensor(l) != -100).float()
    px = torch.cat([processor.pixel_values(c[0]) for c in convs])  # [B, 3, 96, 96]
    return ids, labels, px, weights


def patch_targets(scene, patch: int = 8):
    """Per patch (row-major, like the visual tokens): the index into ("none",)+SHAPES of the object that
    covers most of it (>= 1/4 of its pixels), and likewise into ("none",)+colours. -> two LongTensors [N]."""
    grid = SIZE // patch
    m = torch.frombuffer(bytearray(object_map(scene).tobytes()), dtype=torch.uint8).view(SIZE, SIZE).long()
    cells = m.view(grid, patch, grid, patch).permute(0, 2, 1, 3).reshape(grid * grid, patch * patch)  # [N, p*p]
    counts = torch.stack([(cells == i + 1).sum(1) for i in range(len(scene.shapes))], 1)  # [N, n_shapes]
    best, which = counts.max(1)
    covered = best * 4 >= patch * patch
    kinds = torch.tensor([1 + SHAPES.index(s.kind) for s in scene.shapes])
    colors = torch.tensor([1 + list(COLORS).index(s.color) for s in scene.shapes])
    return torch.where(covered, kinds[which], 0), torch.where(covered, colors[which], 0)


def cell_targets(scene):
    """Per 3x3 cell: index into ("none",)+SHAPES and into ("none",)+colours. -> two LongTensors [9]."""
    kind, color = torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long)
    for s in scene.shapes:
        kind[s.cell], color[s.cell] = 1 + SHAPES.index(s.kind), 1 + list(COLORS).index(s.color)
    return kind, color


def patch_cells(vc) -> torch.Tensor:
    """The 3x3 cell (0..8, row-major) each patch lies in: LongTensor [N]."""
    grid = vc.image_size // vc.patch_size
    idx = torch.arange(grid * grid)
    return (idx // grid * 3 // grid) * 3 + (idx % grid) * 3 // grid  # [N]


def tower_features(model: LlavaForConditionalGeneration, px: torch.Tensor) -> torch.Tensor:
    """The feature layer's patch tokens, what the projector reads: px [B, 3, H, W] -> [B, N, C_vis]."""
    vc = model.config.vision_config
    return model.vision_tower.hidden_states(px, upto=vc.num_hidden_layers)[-1][:, 1:]


def pretrain_vision(model: LlavaForConditionalGeneration, steps: int, batch: int, lr: float, seed: int,
                    bf16: bool, show_progress: bool = True, log=None, device="cpu"):
    """Stage 1, in the spirit of LLaVA's pretrained CLIP: teach the vision tower alone to say, at every
    patch, which kind and colour of object covers it and which of the 3x3 cells the patch lies in (a
    linear head read off the feature layer, thrown away afterwards). Dense labels make this fast; stage 2
    then only has to teach the decoder to read. The cell target matters: without it the tower is free
    to wash its position embedding out of the features, and the decoder, which sees visual tokens only
    through RoPE distances that shift with the question's length, then cannot tell where anything is."""
    vc = model.config.vision_config
    n_kind, n_color = 1 + len(SHAPES), 1 + len(COLORS)
    head = torch.nn.Linear(vc.hidden_size, n_kind + n_color + 9).to(device)
    params = list(model.vision_tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng = random.Random(seed + 1)
    settings = ImageSettings.from_dict(PREPROCESSOR)
    cell = patch_cells(vc)[None].to(device)  # [1, N]
    bar = Progress(steps, "stage 1: vision tower", " steps", after_s=0.0 if show_progress else float("inf"))
    history = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(100, max(1, steps // 10)))
        scenes = [random_scene(rng) for _ in range(batch)]
        px = torch.cat([pixel_values(s.draw(), settings) for s in scenes]).to(device)  # [B, 3, H, W]
        kind, color = zip(*(patch_targets(s, vc.patch_size) for s in scenes))
        kind, color = torch.stack(kind).to(device), torch.stack(color).to(device)  # [B, N] each
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = head(tower_features(model, px)).float()  # [B, N, 5 + 7 + 9]
        k, c = n_kind, n_kind + n_color
        loss = F.cross_entropy(out[..., :k].reshape(-1, k), kind.reshape(-1)) + \
            F.cross_entropy(out[..., k:c].reshape(-1, n_color), color.reshape(-1)) + \
            F.cross_entropy(out[..., c:].reshape(-1, 9), cell.expand(len(scenes), -1).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        with torch.no_grad():
            obj = kind > 0
            acc = float((out[..., :k].argmax(-1)[obj] == kind[obj]).float().mean()) if obj.any() else 0.0
        bar.update(1, f"loss {history[-1]:.4f} object-patch kind acc {acc:.3f}")
        if log is not None and step % 50 == 0:
            log.write(f"stage1 {step} {history[-1]:.5f} {acc:.4f}\n")
            log.flush()
    bar.close()
    return history


@torch.no_grad()
def probe_tower(model: LlavaForConditionalGeneration, train_scenes: int = 1500, test_scenes: int = 500,
                steps: int = 300, device="cpu", seed: int = 7) -> dict:
    """Can a *linear* read-out of the tower's patch tokens name what sits in each 3x3 cell? A fresh
    probe (cell features = mean of the cell's patch tokens -> kind and colour, 'none' included) is fitted
    on training scenes and scored on held-out ones (the evaluation's seed stream), counting occupied
    cells only. It tells a tower that cannot see from a decoder that cannot read: the probe is not the
    stage-1 head, and it is fitted after the tower is frozen."""
    vc = model.config.vision_config
    settings = ImageSettings.from_dict(PREPROCESSOR)
    cells = patch_cells(vc).to(device)  # [N]
    pool = torch.zeros(9, cells.numel(), device=device)
    pool[cells, torch.arange(cells.numel(), device=device)] = 1.0
    pool = pool / pool.sum(1, keepdim=True)  # [9, N]: averages the patches of each cell

    def featurize(rng, n):
        xs, ks, cs = [], [], []
        for i in range(0, n, 100):
            scenes = [random_scene(rng) for _ in range(min(100, n - i))]
            px = torch.cat([pixel_values(s.draw(), settings) for s in scenes]).to(device)
            xs.append(pool @ tower_features(model, px).float())  # [b, 9, C_vis]
            k, c = zip(*(cell_targets(s) for s in scenes))
            ks.append(torch.stack(k))
            cs.append(torch.stack(c))
        return torch.cat(xs).flatten(0, 1), torch.cat(ks).flatten().to(device), torch.cat(cs).flatten().to(device)

    x_tr, k_tr, c_tr = featurize(random.Random(seed), train_scenes)
    x_te, k_te, c_te = featurize(random.Random(10_000_019 + seed), test_scenes)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    result = {}
    for name, y_tr, y_te, n in (("kind", k_tr, k_te, 1 + len(SHAPES)), ("color", c_tr, c_te, 1 + len(COLORS))):
        probe = torch.nn.Linear(x_tr.shape[1], n).to(device)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(steps):
            with torch.enable_grad():
                loss = F.cross_entropy(probe(x_tr), y_tr)
                opt.zero_grad()
                loss.backward()
                opt.step()
        occupied = y_te > 0
        result[name] = float((probe(x_te).argmax(-1)[occupied] == y_te[occupied]).float().mean())
    return result


def heldout_conversations(processor: Processor, n_scenes: int, echo: bool = False):
    """Single-turn (image, ids, labels, kind) examples from the evaluation's seed stream, plus one
    look-then-reason question per scene of 2+ shapes. Colour and position questions on scenes of 3-5
    shapes are also counted as "color3+" / "position3+": there, naming some shape of the scene (the
    failure of v2) is right only by chance."""
    out = []
    rng = random.Random(77)
    items = eval_set(n_scenes)
    for item in items:
        p = processor.input_ids(item.question).tolist()
        ans = processor.answer_ids(item.answer)
        out.append((item.scene.draw(), p + ans, [-100] * len(p) + ans, item.kind))
        if item.kind in ("color", "position") and len(item.scene.shapes) >= 3:
            out.append((item.scene.draw(), p + ans, [-100] * len(p) + ans, item.kind + "3+"))
        if echo and item.kind in ("color", "position"):  # can it read the question at all?
            e = processor.input_ids(f"Which shape does this ask about: {item.question}").tolist()
            a = processor.answer_ids(re.search(r"the (\w+)\?$", item.question).group(1))
            out.append((item.scene.draw(), e + a, [-100] * len(e) + a, "echo"))
    for scene in dict.fromkeys(i.scene for i in items):
        if len(scene.shapes) >= 2:
            color, kind, _ = exist_pair(scene, rng, rng.random() < 0.5)
            p = processor.input_ids(look_question(color, kind)).tolist()
            ans = processor.answer_ids(look_answer(scene, color, kind))
            out.append((scene.draw(), p + ans, [-100] * len(p) + ans, "look"))
    return out


@torch.no_grad()
def heldout_exact(model: LlavaForConditionalGeneration, examples, processor: Processor, device="cpu",
                  bf16: bool = False) -> dict:
    """Per question kind (and 'describe'), the share of held-out answers whose every token is the argmax
    under teacher forcing, i.e. exactly the answer greedy decoding would give. Cheap enough to log."""
    hits: dict[str, list[float]] = {}
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        ids, labels, px, _ = collate([(img, a, b) for img, a, b, _ in chunk], processor)
        ids, labels, px = ids.to(device), labels.to(device), px.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            x = model.embed(ids, model.image_features(px))
            x, _ = model.run_layers(x, torch.arange(ids.shape[1], device=device), None, range(len(model.model.layers)))
            pred = model.logits(x[:, :-1]).argmax(-1)  # [B, T-1]
        target = labels[:, 1:]
        ok = ((pred == target) | (target == -100)).all(1)  # [B]
        for (_, _, _, kind), good in zip(chunk, ok.tolist()):
            hits.setdefault(kind, []).append(float(good))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


# The visual tokens may not outgrow the text: v2's entered the decoder at norm ~474 against the text
# embeddings' ~0.35, its attention saturated on them, and the question's words got ~0 weight and ~0
# gradient. Balancing the two at initialisation alone did not hold (the projector's output grew 7x in
# 480 steps), so a penalty keeps the visual tokens' RMS at most VISUAL_RMS_CAP times the text
# embeddings' mean RMS while training. It acts on weights only: the saved model is plain LLaVA-1.5.
VISUAL_RMS_CAP = 1.5
VISUAL_PENALTY = 1.0


def loss_fn(model: LlavaForConditionalGeneration, ids, labels, px, frozen_tower: bool = False, weights=None,
            penalty: float = 0.0, visual_scale: float = 1.0, withhold: bool = False, looks=None, attend: float = 0.0):
    """Next-token cross-entropy on answer tokens, weighted per token (weights [B, T], default 1 each),
    plus `penalty` x the visual-scale penalty. ids, labels [B, T]; px [B, 3, H, W]. withhold: no text
    token may attend to a visual token (training only: the image withheld while the question is learnt
    to be read; a scale would not do it, RMSNorm undoes scales)."""
    if frozen_tower:  # LLaVA-1.5 keeps its CLIP tower frozen; no graph through it saves ~a third of a step
        with torch.no_grad():
            feats = tower_features(model, px.to(model.lm_head.weight.dtype))  # [B, N, C_vis]
        feats = model.multi_modal_projector(feats)  # [B, N, C]
    else:
        feats = model.image_features(px)  # [B, N, C]
    x = model.embed(ids, feats * visual_scale)  # [B, T, C]
    pos = torch.arange(ids.shape[1], device=ids.device)  # right padding: every row starts at position 0
    masks = None
    if withhold:  # every row's image sits at the same positions (the first turn's prompt is the same)
        visual = ids[0] == model.config.image_token_index  # [T]
        causal = pos[None, :] <= pos[:, None]  # [T, T]
        mask = causal & ~(visual[None, :] & ~visual[:, None])  # text queries never see visual keys
        masks = {i: mask for i in range(len(model.model.layers))}
    L = len(model.model.layers)
    x, probs = model.run_layers(x, pos, None, range(L), masks=masks, probs_of=L // 2 if attend else None)
    logits = model.logits(x[:, :-1])  # [B, T-1, V]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="none")  # [B*(T-1)]
    w = (labels[:, 1:] != -100).float() if weights is None else weights[:, 1:].to(ce.device)
    loss = (ce * w.reshape(-1)).sum() / w.sum()
    if attend and looks is not None:
        # Training only (--attend): the answer's query of a colour or position question, in layer L/2, is
        # asked to put its attention on the patches of the shape it asks about (its best head's mass).
        start, _ = visual_span(ids[0], model.config.image_token_index)
        terms = []
        for b, look in enumerate(looks):
            if look is not None:
                q, target = look
                p = probs[b, :, q, start:start + target.numel()]  # [H, N]
                terms.append(-(p[:, target.to(p.device)].sum(-1).max() + 1e-6).log())
        if terms:
            loss = loss + attend * torch.stack(terms).mean()
    if penalty:
        text_rms = model.model.embed_tokens.weight.float().pow(2).mean(-1).sqrt().mean().detach()
        vis_rms = feats.float().pow(2).mean(-1).sqrt()  # [B, N]
        loss = loss + penalty * F.relu(vis_rms / text_rms - VISUAL_RMS_CAP).pow(2).mean()
    return loss


def max_shapes_at(step: int, steps: int) -> int:
    """Curriculum: small scenes first."""
    frac = step / steps
    return 2 if frac < 0.12 else 3 if frac < 0.3 else 5


def distinct_until(step: int, steps: int) -> bool:
    """v3 curriculum: the first 15 % of stage 2 on scenes of 2-4 shapes of distinct kinds and colours
    (every answer needs the question's words), then scenes of 1-5 random shapes."""
    return step < 0.15 * steps


@torch.no_grad()
def balance_init(model: LlavaForConditionalGeneration, seed: int, embed_rms: float = 1.0, scenes: int = 256):
    """Start text and visual tokens at the same scale (RMS `embed_rms` per token): text embeddings
    N(0, embed_rms^2); the projector's first layer reads the tower's features standardised (their mean
    and spread over `scenes` training pictures folded into its weight and bias) and its second layer is
    scaled so the visual tokens' RMS is embed_rms on those pictures. Weights only."""
    g = torch.Generator().manual_seed(seed + 5)
    emb = model.model.embed_tokens.weight
    emb.copy_(torch.randn(emb.shape, generator=g) * embed_rms)
    rng = random.Random(seed + 6)
    settings = ImageSettings.from_dict(PREPROCESSOR)
    dev = emb.device
    px = torch.cat([pixel_values(random_scene(rng).draw(), settings) for _ in range(scenes)]).to(dev)
    feats = torch.cat([tower_features(model, px[i:i + 64]) for i in range(0, scenes, 64)]).flatten(0, 1)  # [n, C_vis]
    mean, std = feats.mean(0), feats.std(0) + 1e-5
    proj = model.multi_modal_projector
    c_in, c = proj.linear_1.weight.shape[1], proj.linear_1.weight.shape[0]
    w1 = torch.randn(proj.linear_1.weight.shape, generator=g).to(dev) / math.sqrt(c_in) / std[None]
    proj.linear_1.weight.copy_(w1)
    proj.linear_1.bias.copy_(-(w1 @ mean))
    proj.linear_2.weight.copy_(torch.randn(proj.linear_2.weight.shape, generator=g).to(dev) / math.sqrt(c))
    proj.linear_2.bias.zero_()
    out = torch.cat([proj(tower_features(model, px[i:i + 64])) for i in range(0, scenes, 64)])  # [n, N, C]
    proj.linear_2.weight.mul_(embed_rms / out.pow(2).mean(-1).sqrt().mean())


def lr_at(step: int, steps: int, peak: float, warmup: int = 300) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def build(out_dir: str, seed: int, overrides: dict | None = None, recipe: str = "v2"):
    """Tokenizer files, config.json and preprocessor_config.json; -> (tokenizer, LlavaConfig, raw config).
    overrides: {"vision_config": {...}, "text_config": {...}} merged into CONFIG (tests use a tiny one).
    The vocabulary (512: 256 bytes + merges) is large enough that every word of the prompts and answers
    is one token ("Describe", " color", " purple")."""
    tok = train_bpe(tokenizer_corpus(recipe=recipe), vocab_size=512)
    os.makedirs(out_dir, exist_ok=True)
    raw = json.loads(json.dumps(CONFIG))
    for part, values in (overrides or {}).items():
        raw[part].update(values)
    raw["image_token_index"] = tok.token_to_id("<image>")
    vocab = tok.get_vocab_size()
    raw["text_config"].update(vocab_size=vocab + (-vocab % 8), bos_token_id=tok.token_to_id("<s>"),
                              eos_token_id=tok.token_to_id("</s>"), pad_token_id=tok.token_to_id("<pad>"))
    raw["pad_token_id"] = tok.token_to_id("<pad>")
    save_tokenizer_files(tok, out_dir, raw["text_config"]["max_position_embeddings"])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)
    return tok, LlavaConfig.from_dict(raw), raw


def write_examples(out_dir: str, n: int = 4, seed: int = 424_242):
    """A few pictures to try, from a seed stream used neither by training nor by the evaluation, with
    their ground truth and the prompts the README and the tutorial use (each with its right answer) in
    examples/examples.json."""
    folder = os.path.join(out_dir, "examples")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        scene = random_scene(rng, 2 + i % 3, 2 + i % 3)
        name = f"scene{i + 1}.png"
        scene.draw().save(os.path.join(folder, name))
        asked = questions(scene, random.Random(seed + 1 + i))  # its own stream: the scenes stay as they were
        prompts = [{"prompt": DESCRIBE_PROMPT, "kind": "describe", "answer": describe(scene)}]
        prompts += [{"prompt": q, "kind": kind, "answer": a} for kind, q, a in asked]
        records.append({"file": name, "description": describe(scene), "prompts": prompts,
                        "shapes": [[s.color, s.kind, s.position] for s in scene.shapes]})
    with open(os.path.join(folder, "examples.json"), "w") as f:
        json.dump(records, f, indent=2)


def _log(log, line: str):
    if log is not None:
        log.write(line + "\n")
        log.flush()


def train(out_dir: str, steps: int, batch: int, lr: float, seed: int, minutes: float | None,
          bf16: bool = False, log=None, overrides: dict | None = None, show_progress: bool = True,
          vision_steps: int = 1000, init: str | None = None, device: str = "cpu", eval_every: int = 0,
          eval_scenes: int = 40, probe: bool = False, train_tower: bool = False, tower: str | None = None,
          penalty: float | None = None, swap_scenes: int = 30, echo: float = 0.0, read_first: int = 0,
          recipe: str = "v2", withhold: int = 0, attend: float = 0.0):
    """Stage 1 (unless `init` or `tower` gives a trained tower), the tower probe, then stage 2.
    init: a llava-hf directory written by this script to continue from (its tokenizer and config are
    copied; stage 1 is skipped since its tower is already trained).
    tower: a llava-hf directory written by this script whose vision tower is taken as stage 1's result;
    the tokenizer, projector and decoder are new (balance_init)."""
    torch.manual_seed(seed)
    t0 = time.time()
    penalty = (VISUAL_PENALTY if recipe == "v3" else 0.0) if penalty is None else penalty
    if tower:
        _, cfg, _ = build(out_dir, seed, overrides, recipe)
        model = LlavaForConditionalGeneration(cfg)
        init_weights(model, seed)
        source = load_model(tower, device="cpu")
        model.vision_tower.load_state_dict(source.vision_tower.state_dict())
        del source
        model.to(device)
        balance_init(model, seed)
        _log(log, f"# vision tower from {tower}: stage 1 skipped; fresh tokenizer, projector and decoder")
        vision_steps = 0
    elif init:
        cfg = read_config(init)
        if os.path.abspath(init) != os.path.abspath(out_dir):
            os.makedirs(out_dir, exist_ok=True)
            for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json"):
                shutil.copyfile(os.path.join(init, name), os.path.join(out_dir, name))
        model = load_model(init, device=device)
        for p in model.parameters():
            p.requires_grad_(True)
        _log(log, f"# init from {init}: stage 1 skipped; stage 2 steps below continue that run's")
        vision_steps = 0
    else:
        _, cfg, _ = build(out_dir, seed, overrides, recipe)
        model = LlavaForConditionalGeneration(cfg)
        init_weights(model, seed)
        model.to(device)
    write_examples(out_dir)
    model.train()
    if vision_steps:
        pretrain_vision(model, vision_steps, 64, lr, seed, bf16, show_progress, log, device)
    if probe:
        acc = probe_tower(model, device=device)
        _log(log, f"probe held-out occupied-cell accuracy: kind {acc['kind']:.4f} color {acc['color']:.4f}")
        if show_progress:
            sys.stderr.write(f"tower probe (held-out, occupied cells): kind {acc['kind']:.4f}, color {acc['color']:.4f}\n")
    processor = Processor(out_dir, cfg)
    batcher = Batcher(processor, seed + (1000 if init else 0), recipe, echo)
    heldout = heldout_conversations(processor, eval_scenes, echo > 0) if eval_every else []
    swaps = kind_swap_pairs(swap_scenes) if eval_every else []
    frozen = not train_tower
    for p in model.vision_tower.parameters():
        p.requires_grad_(not frozen)
    # Stage 2. By default the tower is frozen, as LLaVA-1.5 freezes CLIP: what stage 1 taught it stays,
    # and the step skips the tower's backward. With --train-tower it learns at half the rate.
    groups = []
    for is_vision in (True, False):
        named = [(n, p) for n, p in model.named_parameters()
                 if n.startswith("vision_tower.") == is_vision and p.requires_grad]
        if not named:
            continue
        scale = 0.5 if is_vision else 1.0
        # No decay on the embeddings and the LM head: in v2 decay held the text embeddings at their tiny
        # initial scale while the visual tokens grew.
        decays = [p.dim() >= 2 and (recipe == "v2" or ("embed_tokens" not in n and "lm_head" not in n))
                  for n, p in named]
        groups.append({"params": [p for (n, p), d in zip(named, decays) if d], "weight_decay": 0.05, "scale": scale})
        groups.append({"params": [p for (n, p), d in zip(named, decays) if not d], "weight_decay": 0.0, "scale": scale})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    bar = Progress(steps, "stage 2: conversations", " steps", after_s=0.0 if show_progress else float("inf"))
    history = []
    smooth = None
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(300, max(1, steps // 8))) * g["scale"]
        looks = None
        if recipe == "v2":
            ids, labels, px, weights = batcher.batch(batch, 5 if init else max_shapes_at(step, steps))
        else:
            ids, labels, px, weights, looks = batcher.batch(batch, 5, distinct=not init and distinct_until(step, steps))
        ids, labels, px = ids.to(device), labels.to(device), px.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, ids, labels, px, frozen_tower=frozen, weights=weights, penalty=penalty,
                           visual_scale=min(1.0, step / read_first) if read_first else 1.0,
                           withhold=step < withhold, looks=looks, attend=attend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        value = loss.item()
        history.append(value)
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        bar.update(1, f"loss {smooth:.4f} lr {opt.param_groups[-1]['lr']:.2e}")
        if step % 50 == 0:
            _log(log, f"{step} {time.time() - t0:.1f} {smooth:.5f}")
        if eval_every and (step % eval_every == eval_every - 1 or step == steps - 1):
            model.eval()
            acc = heldout_exact(model, heldout, processor, device, bf16)
            acc["kind_swap_kl"] = kind_swap_kl(model, processor, swaps, device)
            model.train()
            _log(log, f"heldout {step + 1} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "kind_swap_kl")
                 + f" kind_swap_kl {acc['kind_swap_kl']:.2e}")
        if minutes is not None and time.time() - t0 > minutes * 60:
            sys.stderr.write(f"\nstopping at step {step + 1}: --minutes {minutes} reached\n")
            _log(log, f"# stopped at step {step + 1}: --minutes {minutes} reached")
            break
        if step % 500 == 499:
            save_weights(model, out_dir)  # a usable checkpoint even if the run is cut short
    bar.close()
    save_weights(model, out_dir)
    return model, history, time.time() - t0


def run(argv=None) -> int:
    p = ArgumentParser(prog="python -m dyrate_ref.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory to write (e.g. weights/dyrate-shapes)")
    p.add_argument("--vision-steps", type=int, default=500, help="stage 1 steps, batch 64 (default 500)")
    p.add_argument("--steps", type=int, default=1800, help="stage 2 steps (default 1800)")
    p.add_argument("--batch", type=int, default=16, help="stage 2 conversations per step (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and order (default 0)")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast: faster on CPUs with AMX or AVX512-BF16 and on GPUs, far slower without")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="continue from a directory this script wrote (skips stage 1; the log says so)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--eval-every", type=int, default=200,
                   help="log held-out per-kind exact match every N stage-2 steps (0: never; default 200)")
    p.add_argument("--train-tower", action="store_true", help="let stage 2 train the tower too (half rate)")
    p.add_argument("--tower", default=None, metavar="DIR",
                   help="take the vision tower of a directory this script wrote (skips stage 1); the tokenizer, "
                        "projector and decoder start fresh")
    p.add_argument("--recipe", default="v2", choices=RECIPES,
                   help="v2 (default: the shipped model's) or v3 (the question-reading attempt; see above)")
    p.add_argument("--echo", type=float, default=0.0,
                   help="share of conversations given a training-only 'which shape does this ask about' turn (default 0)")
    p.add_argument("--read-first", type=int, default=0, metavar="STEPS",
                   help="ramp the visual tokens in from zero over the first STEPS stage-2 steps (default 0: off)")
    p.add_argument("--withhold", type=int, default=0, metavar="STEPS",
                   help="for the first STEPS stage-2 steps no text token may attend to the image (default 0: off)")
    p.add_argument("--attend", type=float, default=0.0, metavar="W",
                   help="with --recipe v3: weight of a training-only loss asking layer L/2's answer query of a colour "
                        "or position question to attend to the asked shape's patches (default 0: off)")
    p.add_argument("--visual-penalty", type=float, default=None,
                   help=f"weight of the penalty that keeps visual tokens within {VISUAL_RMS_CAP}x the text "
                        f"embeddings' scale (default: {VISUAL_PENALTY} with --recipe v3, else 0)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.vision_steps < 0 or args.batch < 1:
        raise UserError("--steps and --batch must be at least 1, --vision-steps at least 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but this machine has no CUDA device; use --device cpu")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder to write the model into")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out {args.out}: folder {os.path.dirname(os.path.abspath(args.out))} does not exist")
    if args.tower and os.path.abspath(args.tower) == os.path.abspath(args.out):
        raise UserError("--tower and --out are the same folder: the new model would replace the tower it starts "
                        "from; give a new --out")
    if not (math.isfinite(args.lr) and args.lr > 0) or (args.minutes is not None and not args.minutes > 0):
        raise UserError("--lr and --minutes must be positive numbers")
    if not 0.0 <= args.echo <= 1.0 or min(args.read_first, args.withhold) < 0 or not (args.visual_penalty or 0) >= 0:
        raise UserError("--echo must lie in [0, 1], --read-first, --withhold and --visual-penalty must be >= 0")
    if args.init and args.tower:
        raise UserError("--init and --tower exclude each other: --init continues a whole model, --tower starts a new "
                        "decoder on a trained tower")
    for d in (args.init, args.tower):
        if d:
            read_config(d)  # a missing or broken directory is refused before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    mode = "a" if args.init and os.path.abspath(args.init) == os.path.abspath(args.out) else "w"
    with open(os.path.join(args.out, "train_log.txt"), mode) as log:
        log.write(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"device {args.device}\n# step seconds smoothed_loss | heldout step kind exact-match ...\n")
        _, history, secs = train(args.out, args.steps, args.batch, args.lr, args.seed, args.minutes,
                                 bf16=args.bf16, log=log, vision_steps=args.vision_steps, init=args.init,
                                 device=args.device, eval_every=args.eval_every,
                                 probe=not (args.init or args.tower), train_tower=args.train_tower,
                                 tower=args.tower, penalty=args.visual_penalty, echo=args.echo,
                                 read_first=args.read_first, recipe=args.recipe, withhold=args.withhold,
                                 attend=args.attend)
    print(f"{len(history)} steps in {secs / 60:.1f} min; final smoothed loss "
          f"{sum(history[-50:]) / len(history[-50:]):.4f}; wrote {args.out}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
