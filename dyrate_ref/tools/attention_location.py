"""Where each layer's attention to the image goes: the picture that says which layer's score can find the
content, and so which K a pruning method should read.

    python -m dyrate_ref.tools.attention_location [--weights DIR] [--scenes N] [--split validation|test]
        [--data FILE.jsonl] [--json FILE] [--plot FILE.png]

For every decoder layer, on the unpruned prompt (the prefill), two queries' attention over the N visual
tokens, averaged over heads and normalised to a share of the query's attention on the image: the
prompt's last query (score "last") and the mean over the question's text queries (score "mean";
pruning.SCORES). On the scene world it reports each query's share on the shapes' patches, on the asked
shape's and on the background, beside the share of the patches each covers (their area): a share above
its area means the layer looks there more than a uniform glance would; and where the tokens FastV at
R = 0.1 would drop by that query lie (on shapes, against the shapes' area: a random drop's share). On any data (a user's JSONL, no
ground truth) it reports how concentrated the attention is: the share on its top 10 % of tokens and its
entropy over log N (1: spread evenly). The figure plots the table, drawn from the JSON it writes.
"""

from __future__ import annotations

import math

from ..commands import (ArgumentParser, DEFAULT_WEIGHTS, Progress, UserError, add_threads, add_weights, apply_threads,
                        command_main, parse_first, summary)

QUERIES = ("last", "mean")
REGIONS = ("shapes", "asked", "background")
DROP_RATE = 0.1  # what FastV at R = 0.1 would drop: where those tokens lie


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.attention_location", description=summary(__doc__))
    add_weights(p, DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    add_threads(p)
    p.add_argument("--scenes", type=int, default=40, help="held-out scenes (default 40)")
    p.add_argument("--split", choices=("validation", "test"), default="validation",
                   help="scene split (default validation: where K and the score are chosen)")
    p.add_argument("--data", metavar="FILE.jsonl", help="a JSONL of {image, prompt} instead of scenes: "
                                                        "concentration only (no shapes to locate)")
    p.add_argument("--json", metavar="FILE", help="write the table as JSON (what --plot draws)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the figure")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch

from ..files import check_outputs, checkpoint_inputs, write_atomic
from ..loading import load_model, resolve_weights, weight_inputs
from ..oracle import forward_no_cache
from ..processing import Processor
from ..pruning import kept_count, query_scores, visual_span
from .data import WORLD, data_inputs, read_items, scene_items, write_json


def concentration(p: torch.Tensor) -> tuple[float, float]:
    """A distribution over the N visual tokens p [N] (sums to 1) -> (share on its top 10 % of tokens,
    entropy / log N)."""
    N = p.numel()
    top = p.sort(descending=True).values[:max(1, math.ceil(0.1 * N))].sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(N)
    return float(top), float(entropy)


def locate(p: torch.Tensor, regions: dict) -> dict:
    """p [N], a query's share of image attention per token; regions {name: bool mask [N] or None} -> per
    region its attention share and its area (the share of the N patches it covers)."""
    return {name: (float(p[mask].sum()), float(mask.float().mean())) for name, mask in regions.items()
            if mask is not None}


def dropped_on_shapes(p: torch.Tensor, shapes: torch.Tensor, rate: float = DROP_RATE) -> float:
    """The share of the tokens FastV at rate R would drop by this score -- the N - kept_count(N, R)
    lowest -- that lie on a shape (a random choice: the shapes' area)."""
    n = p.numel()
    return float(shapes[p.sort().indices[:n - kept_count(n, rate)]].float().mean())


@torch.no_grad()
def item_layers(model, processor: Processor, item, side: int) -> dict:
    """One item's prefill, every layer: {query: [per layer {"top10", "entropy", region: (share, area)}]}."""
    ids, px = processor.input_ids(item.prompt), processor.pixel_values(item.picture())
    L = model.config.text_config.num_hidden_layers
    _, probs = forward_no_cache(model, ids, px, [], probs_of=tuple(range(L)))
    span, (first, end) = visual_span(ids, model.config.image_token_index), processor.text_rows(ids)
    regions = {}
    if item.scene is not None:
        shapes, asked = WORLD.patch_regions(item.scene, item.prompt, side)
        regions = {"shapes": shapes, "asked": asked, "background": ~shapes}
    out = {q: [] for q in QUERIES}
    for layer in range(L):
        rows = query_scores(probs[layer], span)  # [P, N]
        for q, s in (("last", rows[-1]), ("mean", rows[first:end].mean(0))):
            p = s / s.sum().clamp_min(1e-12)  # [N]: the share of this query's image attention
            top, entropy = concentration(p)
            row = {"top10": top, "entropy": entropy, **locate(p, regions)}
            if regions:
                row["dropped_on_shapes"] = dropped_on_shapes(p, regions["shapes"])
            out[q].append(row)
    return out


def layer_means(per_item: list[dict], L: int) -> dict:
    """Means over items, per query and layer: top10, entropy, and per region its mean share, its mean
    area and their ratio (over the items that have the region)."""
    out = {"layers": L, "items": len(per_item), "queries": {}}
    for q in QUERIES:
        rows = []
        for layer in range(L):
            at = [it[q][layer] for it in per_item]
            row = {k: sum(a[k] for a in at) / len(at) for k in ("top10", "entropy", "dropped_on_shapes") if k in at[0]}
            for region in REGIONS:
                has = [a[region] for a in at if region in a]
                if has:
                    share, area = (sum(v[i] for v in has) / len(has) for i in (0, 1))
                    row[region] = {"share": share, "area": area, "ratio": share / area, "items": len(has)}
            rows.append(row)
        out["queries"][q] = rows
    return out


def measure_layers(model, processor: Processor, items, show_progress: bool = True) -> dict:
    side = int(round(model.config.num_image_tokens ** 0.5))
    bar = Progress(len(items), "attention per layer", " items") if show_progress else None
    per_item = []
    for item in items:
        per_item.append(item_layers(model, processor, item, side))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return layer_means(per_item, model.config.text_config.num_hidden_layers)


def location_text(t: dict) -> str:
    lines = []
    located = any("shapes" in r for r in t["queries"]["last"])
    head = "| query | layer | top 10 % share | entropy / log N |" + (
        " on shapes (area) | ratio | on the asked shape (area) | ratio | on background (area) | ratio |"
        f" R = {DROP_RATE:g} would drop, share on shapes |" if located else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for q in QUERIES:
        for layer, r in enumerate(t["queries"][q]):
            cells = [q, str(layer), f"{r['top10']:.3f}", f"{r['entropy']:.3f}"]
            if located:
                for region in REGIONS:
                    v = r.get(region)
                    cells += [f"{v['share']:.3f} ({v['area']:.3f})", f"{v['ratio']:.2f}"] if v else ["", ""]
                cells.append(f"{r['dropped_on_shapes']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_location(t: dict, path: str):
    """One panel per query: each region's share over its area by layer (1: a uniform glance), and one of
    concentration; drawn from the table alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    located = any("shapes" in r for r in t["queries"]["last"])
    panels = (list(QUERIES) if located else []) + ["concentration"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    layers = list(range(t["layers"]))
    top = max(r[g]["ratio"] for q in QUERIES for r in t["queries"][q] for g in REGIONS if g in r) if located else 1
    for ax, panel in zip(axes[0], panels):
        if panel == "concentration":
            for q, style in zip(QUERIES, ("-", "--")):
                rows = t["queries"][q]
                ax.plot(layers, [r["top10"] for r in rows], "o" + style, color="C3", label=f"{q}: top 10 % share")
                ax.plot(layers, [r["entropy"] for r in rows], "s" + style, color="C4", label=f"{q}: entropy / log N")
            ax.set_ylim(0, 1.05)
            ax.set_title("how concentrated (any data)")
        else:
            rows = t["queries"][panel]
            for i, region in enumerate(REGIONS):
                ax.plot(layers, [r[region]["ratio"] if region in r else float("nan") for r in rows], "o-",
                        color=f"C{i}", label=region)
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_ylim(0, 1.1 * top)  # both query panels on one scale
            ax.set_ylabel("attention share / area share")
            ax.set_title(f"query: {panel}" + (" (the prompt's last token)" if panel == "last" else " (the question's text)"))
        ax.set_xlabel("layer (K = layer + 1 reads it)")
        ax.set_xticks(layers)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    weights = resolve_weights(args.weights)
    if args.scenes < 1:
        raise UserError(f"--scenes {args.scenes} must be at least 1")
    if args.plot and not args.plot.endswith(".png"):
        raise UserError(f"--plot {args.plot}: the figure is a PNG; name it FILE.png")
    check_outputs([("--json", args.json), ("--plot", args.plot)],
                  checkpoint_inputs(weights, weight_inputs(weights)) + data_inputs(args.data))
    items = read_items(args.data) if args.data else scene_items(args.scenes, args.split, look=True)
    model = load_model(weights)
    t = measure_layers(model, Processor(weights, model.config), items)
    t["source"] = args.data or f"{args.split} scenes:{args.scenes}"
    print(location_text(t))
    if args.json:
        write_json(args.json, t)
    if args.plot:
        draw_location(t, args.plot)
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
