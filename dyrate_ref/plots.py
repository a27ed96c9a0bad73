"""Figures, drawn with matplotlib (an optional extra: pip install -e ".[plots]").

  plot_run             generate.py --plot FILE.png: per generated token, the mass of layer K-1's
                       attention on the image and the kept count; below, the picture at a few steps
                       with the evicted patches darkened

The tutorial's and the evaluation's figures are tools/charts.py. Every figure has a title, labelled axes
with units, and its legend outside the data. Files are written whole or not at all (files.write_atomic).
"""

from __future__ import annotations

import io
from dataclasses import fields

import numpy as np
import torch
from PIL import Image

from .commands import UserError
from .files import write_atomic


def require_matplotlib():
    """The pyplot module, headless; a UserError saying how to install it if it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('figures need matplotlib, which is not installed; run: pip install -e ".[plots]"') from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    fig.clf()
    require_matplotlib().close(fig)
    data = buf.getvalue()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    write_atomic(path, write)


def image_from_pixels(pixel_values: torch.Tensor, mean, std) -> Image.Image:
    """Undo the CLIP normalisation: pixel_values [1, 3, H, W] -> the picture the model saw."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (pixel_values[0].float().cpu() * s + m).clamp(0, 1)  # [3, H, W]
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def kept_overlay(img: Image.Image, keep: torch.Tensor, grid: int, has_cls: bool) -> Image.Image:
    """The picture with every evicted patch darkened to a quarter of its brightness. keep: bool [N]
    (N = grid² patches, +1 first for CLS with the 'full' strategy)."""
    patches = keep[1:] if has_cls else keep  # [grid²]
    x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).float()  # [H, W, 3]
    H, W = x.shape[:2]
    mask = patches.view(grid, grid).float().cpu()  # [grid, grid]
    mask = mask.repeat_interleave(H // grid, 0).repeat_interleave(W // grid, 1)  # [H, W]
    dim = 0.25 + 0.75 * mask
    return Image.fromarray((x * dim[..., None]).round().clamp(0, 255).to(torch.uint8).numpy())


def patch_panel(ax, base: Image.Image, keep: torch.Tensor, grid: int, has_cls: bool, label: str, fontsize: int):
    """One panel: the picture with the patches keep (bool [N]) drops darkened, titled."""
    ax.imshow(kept_overlay(base, keep, grid, has_cls), interpolation="nearest")
    ax.set_title(label, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def token_label(word: str, token_id: int, processor) -> str:
    """How a panel title names a generated token: its text, or what it is when it has none to show."""
    if token_id in processor.stop_ids:
        return "end of answer"
    return word.strip() or repr(word)


def run_labels(method, K: int, T: int) -> dict:
    """What plot_run writes, worked out apart from drawing (the tests read it): the title names K only
    for a method that has a pruning layer among its settings (method none has none: its curve is read
    at the layer a method would split at); a short answer's axis ticks whole steps; the patches'
    caption says what darkened means."""
    prunes = any(f.name == "layer" for f in fields(method))
    title = (f"method {method.name}, K = {K}: attention to the image and kept tokens per token" if prunes else
             f"method {method.name} (nothing pruned): attention to the image per token, read at layer {K - 1}")
    ticks = list(range(T)) if T <= 16 else None  # None: matplotlib's integer locator
    note = ("darkened patches: evicted by that step (layers >= K no longer see them)" if prunes else
            "no patch is evicted: method none keeps every visual token")
    return {"title": title, "xticks": ticks, "patches": note}


def panel_steps(kept: list[int], n: int = 4) -> list[int]:
    """The steps whose kept patches plot_run draws, at most n: the prefill, the steps whose kept set
    shrank (the first ones: where the method cut), the last step, then evenly spaced steps."""
    T = len(kept)
    wanted = [0] + [t for t in range(1, T) if kept[t] < kept[t - 1]][:max(0, n - 2)] + [T - 1]
    wanted += [round((T - 1) * j / n) for j in range(1, n)]
    picks: list[int] = []
    for t in wanted:
        if t not in picks and len(picks) < n:
            picks.append(t)
    return sorted(picks)


def plot_run(path: str, pixel_values: torch.Tensor, processor, gen, method, steps: int = 4):
    """generate.py --plot: the run's visual attention and kept count per token, and kept patches."""
    plt = require_matplotlib()
    cfg = processor.config
    rec, K = gen.record, gen.state.K
    N = gen.state.span[1]
    mass = [float(s) for s in rec.visual_mass]
    kept = [int(k.sum()) for k in rec.kept_masks]
    T = len(kept)
    picks = panel_steps(kept, steps)
    base = image_from_pixels(pixel_values, processor.image.image_mean, processor.image.image_std)
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    has_cls = cfg.vision_feature_select_strategy == "full"
    words = [processor.decode([tid]) for tid in gen.tokens]

    fig = plt.figure(figsize=(10, 6.4))
    top = fig.add_axes([0.08, 0.52, 0.84, 0.36])
    t = list(range(T))
    a = top.plot(t, mass, marker="o", ms=3, color="tab:blue", label=f"attention mass on the image (layer {K - 1})")
    top.set_ylim(0, 1)
    top.set_ylabel("attention mass")
    top.set_xlabel("generated token t")
    labels = run_labels(method, K, T)
    if labels["xticks"] is not None:
        top.set_xticks(labels["xticks"])
    else:
        from matplotlib.ticker import MaxNLocator
        top.xaxis.set_major_locator(MaxNLocator(integer=True))
    right = top.twinx()
    b = right.step(t, kept, where="post", color="tab:orange", label="visual tokens kept")  # kept[t] from step t on
    right.set_ylim(0, N * 1.05)
    right.set_ylabel(f"kept (of {N})")
    top.set_title(labels["title"])
    top.grid(alpha=0.3)
    top.legend(handles=a + b, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    for j, step in enumerate(picks):
        ax = fig.add_axes([0.08 + j * 0.22, 0.02, 0.19, 0.27])
        patch_panel(ax, base, rec.kept_masks[step].cpu(), grid, has_cls,
                    f"step {step} ({token_label(words[step], gen.tokens[step], processor)}): {kept[step]}/{N} kept", 8)
    fig.text(0.5, 0.37, labels["patches"], ha="center", fontsize=8)
    save_figure(fig, path)
