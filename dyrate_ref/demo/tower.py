"""Stage 1 of the demo model: the vision tower, trained alone (in the spirit of LLaVA's pretrained CLIP),
and a linear probe that tells a tower that cannot see from a decoder that cannot read."""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from ..model import LlavaForConditionalGeneration
from ..processing import ImageSettings, pixel_values
from ..commands import Progress
from .recipes import PREPROCESSOR, lr_at
from .scenes import COLORS, SHAPES, SIZE, object_map, random_scene

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


def pretrain_vision(model: LlavaForConditionalGeneration, steps: int, batch: int, lr: float, seed: int,
                    bf16: bool, show_progress: bool = True, log=None, device="cpu", deadline: float | None = None):
    """Stage 1, in the spirit of LLaVA's pretrained CLIP: teach the vision tower alone to say, at every
    patch, which kind and colour of object covers it and which of the 3x3 cells the patch lies in (a
    linear head read off the feature layer, thrown away afterwards). Dense labels make this fast; stage 2
    then only has to teach the decoder to read. The cell target matters: without it the tower is free
    to wash its position embedding out of the features, and the decoder, which sees visual tokens only
    through RoPE distances that shift with the question's length, then cannot tell where anything is.
    deadline: a time.time() at which to stop early (the run's --minutes bound the whole run)."""
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
        if deadline is not None and time.time() > deadline:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(100, max(1, steps // 10)))
        scenes = [random_scene(rng) for _ in range(batch)]
        px = torch.cat([pixel_values(s.draw(), settings) for s in scenes]).to(device)  # [B, 3, H, W]
        kind, color = zip(*(patch_targets(s, vc.patch_size) for s in scenes))
        kind, color = torch.stack(kind).to(device), torch.stack(color).to(device)  # [B, N] each
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = head(model.vision_features(px)).float()  # [B, N, 5 + 7 + 9]
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
            xs.append(pool @ model.vision_features(px).float())  # [b, 9, C_vis]
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
