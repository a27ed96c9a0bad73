"""The evaluation's charts (evaluate --plot), drawn like plots.py's figures (matplotlib, written whole):

  plot_layers          the attention mass on the image per decoder layer over the answer, mean over many
                       answers with a 95 % confidence band
  plot_pareto          accuracy against cost, one line per family through its settings
  plot_mass            one curve of the attention mass on the image over an answer (the tutorial's figure)
  plot_kept_patches    the picture at chosen steps, evicted patches darkened, one labelled panel each
"""

from __future__ import annotations

import torch
from PIL import Image

from ..plots import patch_panel, require_matplotlib, save_figure


def plot_layers(path: str, data: dict, title: str):
    """data (as tools/data.attention_over_generation writes it): means, sems [L][T], per layer, the mean
    attention mass on the image at answer position t and its standard error; counts [T]: answers long
    enough to have position t. One panel per layer, with a 95 % band."""
    plt = require_matplotlib()
    means, sems, counts = torch.tensor(data["means"]), torch.tensor(data["sems"]), data["counts"]
    L, T = means.shape
    cols = 4 if L > 4 else L
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    t = torch.arange(T)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= L:
            ax.axis("off")
            continue
        m, s = means[i], sems[i]
        ax.fill_between(t, (m - 1.96 * s).clamp_min(0), m + 1.96 * s, alpha=0.25, lw=0)
        ax.plot(t, m, lw=1.5)
        ax.set_title(f"layer {i}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("mass on image")
        if i // cols == rows - 1:
            ax.set_xlabel("answer position t")
    fig.suptitle(f"{title}\n(mean over {int(counts[0])} held-out descriptions; band: 95 % confidence; "
                 f"positions reached by ≥ {int(counts[-1])} answers)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_pareto(path: str, points: list[dict], title: str):
    """points: {panel (the cost axis), ylabel (the accuracy axis), method (the family), label, x (cost
    relative to none), y (accuracy), yerr}; one panel per (accuracy, cost), one line per family through
    its settings in order of cost, error bars of yerr (the caller's: ±2 SE)."""
    plt = require_matplotlib()
    order = lambda key: list(dict.fromkeys(p[key] for p in points))  # noqa: E731
    rows, cols = order("ylabel"), order("panel")
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(5.6 * len(cols), 3.6 * len(rows)), squeeze=False)
    styles, seen = {}, {}
    for r, ylabel in enumerate(rows):
        for c, panel in enumerate(cols):
            ax = axes[r][c]
            here = [p for p in points if p["panel"] == panel and p["ylabel"] == ylabel]
            for family in order("method"):
                pts = sorted((p for p in here if p["method"] == family), key=lambda p: p["x"])
                if not pts:
                    continue
                i = len(styles)  # families whose points coincide (a control at its method's counts) stay visible:
                # sizes differ and every other family is drawn hollow
                st = styles.setdefault(family, dict(marker="osD^vP*Xh<>"[i % 11], color=f"C{i % 10}", ms=9 - 2 * (i % 3),
                                                    mfc="none" if i % 2 else None))
                h = ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts], yerr=[p.get("yerr", 0) for p in pts],
                                fmt="-" + st["marker"], color=st["color"], ms=st["ms"], mfc=st["mfc"] or st["color"],
                                lw=1, capsize=2)
                seen.setdefault(family, h)
            ax.set_xlabel(panel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_xlim(0, 1.05)
            if "%" in ylabel:  # a share cannot pass 100 %, whatever ±2 SE says
                ax.set_ylim(top=min(ax.get_ylim()[1], 101))
            ax.grid(alpha=0.3)
    fig.legend(list(seen.values()), list(seen.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(seen)), frameon=False)
    fig.suptitle(title + "\n(one line per family through its settings; error bars: ±2 standard errors, clustered by picture)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_mass(path: str, mass: list[float], tokens: list[str], title: str, layer: int):
    """The attention mass on the image per generated token, the tokens written under the axis."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    t = list(range(len(mass)))
    ax.plot(t, mass, marker="o", ms=3, lw=1.2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("generated token (the word it produced)")
    ax.set_ylabel(f"layer {layer}'s attention mass\non the image (head mean)")
    ax.set_xticks(t)
    ax.set_xticklabels([repr(s)[1:-1] for s in tokens], rotation=90, fontsize=7)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_kept_patches(path: str, base: Image.Image, panels: list[tuple[str, torch.Tensor]], grid: int,
                      has_cls: bool, title: str):
    """panels: (label, keep bool [N]) each -> the picture with evicted patches darkened, labelled."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (label, keep) in zip(axes[0], panels):
        patch_panel(ax, base, keep, grid, has_cls, label, 9)
    fig.suptitle(title + "\n(evicted patches darkened)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
