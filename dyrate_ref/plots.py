"""Pictures with Pillow only: line charts and kept-patch overlays.

plot_run (generate.py --plot FILE.png):
  (a) per generated token, the share of layer K-1 attention that goes to visual tokens, and how many
      visual tokens are kept;
  (b) the image the model saw, with evicted patches darkened, at a few steps.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from .files import write_atomic

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def line_chart(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str, size=(900, 320),
               ymax: float | None = None, right: dict[str, list[float]] | None = None, right_label: str = "",
               right_max: float | None = None) -> Image.Image:
    """A plain line chart. `right` series use a second y axis on the right."""
    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs = font(13), font(11)
    left, top, rgt, bottom = 60, 30, W - (60 if right else 20), H - 45
    d.text((left, 8), title, fill="black", font=f)
    d.rectangle([left, top, rgt, bottom], outline=(160, 160, 160))
    n = max([len(v) for v in list(series.values()) + list((right or {}).values())] + [2])
    ymax = ymax or max([max(v) for v in series.values() if v] + [1e-9])

    def xy(i, v, vmax):
        return left + (rgt - left) * i / max(n - 1, 1), bottom - (bottom - top) * min(v / vmax, 1.0)

    for k in range(5):  # grid and y ticks
        y = bottom - (bottom - top) * k / 4
        d.line([left, y, rgt, y], fill=(235, 235, 235))
        d.text((5, y - 6), f"{ymax * k / 4:.2g}", fill="black", font=fs)
        if right:
            d.text((rgt + 5, y - 6), f"{right_max * k / 4:.0f}", fill="black", font=fs)
    for k in range(0, n, max(1, n // 10)):
        x = left + (rgt - left) * k / max(n - 1, 1)
        d.text((x - 4, bottom + 4), str(k), fill="black", font=fs)
    d.text(((left + rgt) // 2 - 40, H - 20), xlabel, fill="black", font=fs)
    d.text((5, top - 18), ylabel, fill="black", font=fs)
    if right:
        d.text((rgt - 60, top - 18), right_label, fill="black", font=fs)
    everything = [(name, v, ymax) for name, v in series.items()] + [(name, v, right_max) for name, v in (right or {}).items()]
    for j, (name, values, vmax) in enumerate(everything):
        color = COLORS[j % len(COLORS)]
        pts = [xy(i, v, vmax) for i, v in enumerate(values)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts if len(pts) <= 60 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        lx = left + 10 + 300 * (j // 4)
        ly = top + 6 + 16 * (j % 4)
        d.rectangle([lx, ly + 3, lx + 14, ly + 9], fill=color)
        d.text((lx + 18, ly - 1), name, fill="black", font=fs)
    return img


def image_from_pixels(pixel_values: torch.Tensor, mean, std) -> Image.Image:
    """Undo normalisation of pixel_values [1, 3, H, W] -> the RGB image the vision tower saw."""
    m = torch.tensor(mean)[:, None, None]
    s = torch.tensor(std)[:, None, None]
    x = ((pixel_values[0].float().cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)  # [3, H, W]
    return Image.frombytes("RGB", (x.shape[2], x.shape[1]), bytes(x.permute(1, 2, 0).contiguous().flatten().tolist()))


def kept_overlay(img: Image.Image, keep: torch.Tensor, grid: int, has_cls: bool, scale: int = 3) -> Image.Image:
    """Darken the patches whose visual token is evicted. keep: bool [N] (N = grid² (+1 CLS first))."""
    big = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).convert("RGBA")
    shade = Image.new("RGBA", big.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(shade)
    patches = keep[1:] if has_cls else keep
    cell = big.width / grid
    for i, k in enumerate(patches.tolist()):
        if not k:
            r, c = divmod(i, grid)
            d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=(0, 0, 0, 170))
    return Image.alpha_composite(big, shade).convert("RGB")


def save_png(img: Image.Image, path: str):
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def plot_run(path: str, pixel_values: torch.Tensor, processor, gen, prune, steps: int = 4):
    cfg = processor.config
    rec = gen.record
    N = gen.state.span[1]
    share = [float(s) for s in rec.visual_share]
    kept = [int(k.sum()) for k in rec.keep]
    chart = line_chart({f"attention to visual tokens (layer {gen.state.K - 1})": share},
                       f"{prune.method}: visual attention and kept tokens per generated token",
                       "generated token t", "share", ymax=max(share + [1e-6]) * 1.1,
                       right={"kept visual tokens": kept}, right_label="kept", right_max=N)
    T = len(kept)
    picks = sorted({0, T // 3, (2 * T) // 3, T - 1}) if T > 1 else [0]
    base = image_from_pixels(pixel_values, processor.image.image_mean, processor.image.image_std)
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    has_cls = cfg.vision_feature_select_strategy == "full"
    scale = max(1, 200 // base.width)
    tiles = [kept_overlay(base, rec.keep[t].cpu(), grid, has_cls, scale) for t in picks[:steps]]
    tw = tiles[0].width
    canvas = Image.new("RGB", (max(chart.width, (tw + 20) * len(tiles) + 20), chart.height + tiles[0].height + 50), "white")
    canvas.paste(chart, (0, 0))
    d = ImageDraw.Draw(canvas)
    for j, (t, tile) in enumerate(zip(picks, tiles)):
        x = 20 + j * (tw + 20)
        d.text((x, chart.height + 8), f"step {t}: {kept[t]}/{N} kept", fill="black", font=font(12))
        canvas.paste(tile, (x, chart.height + 28))
    save_png(canvas, path)
