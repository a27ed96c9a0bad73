"""DyRate's premise, tested on any checkpoint: do later answer tokens need the image less?

  python -m dyrate_ref.tools.premise [--weights DIR] [--data FILE.jsonl | --scenes N [--split S] [--kinds K,...]] [--layer K]
      [--steps 0,1,2,4,8,16] [--fractions 0.5,0.25,0.1,0] [--json FILE] [--plot FILE.png]

For each item, the model's own unpruned greedy answer is the reference. Then, for every answer step s
and kept fraction f of a grid, the visual tokens are cut to f·N from step s on (the ones layer K-1's
attention of step s's query ranks highest; layers < K always see every token, as in every method here),
and the cost of the cut is measured two ways:

- teacher-forced on the unpruned answer (one masked no-cache forward per cut,
  generation.recompute_logits): KL(unpruned ‖ cut) of the next-token distributions at steps >= s, and
  how often the unpruned answer's token stays the top choice there;
- free-running (the cached, evicting decode loop with a one-cut method): how often the whole answer
  stays the same, and its score (scene items: exact match, object-F1, or the look-then-reason answer's
  final yes/no; a data file's items: exact match against `answer`, where they have one).

If the premise holds, the cost falls as s grows: a cut made later in the answer hurts less. On the demo
scenes it can be checked per answer kind: descriptions, where every later word names another shape,
and the look-then-reason answers, whose last part follows from the first part and the question.

The test itself is dyrate_ref's construction (the paper states the premise; it does not say how it was
measured). It needs nothing of the demo model: --weights and --data run it on LLaVA-1.5-7B (--device cuda).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

from ..commands import (ArgumentParser, DEFAULT_WEIGHTS, Progress, UserError, add_device, add_dtype, add_threads,
                        add_weights, apply_threads, command_main, parse_first, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.premise", description=summary(__doc__))
    add_weights(p, DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--data", metavar="FILE.jsonl", help="the items (image, prompt, optional answer) instead of scenes")
    p.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 40), their questions, "
                                                            "descriptions and look-then-reason answers")
    p.add_argument("--split", default="validation", choices=("validation", "test"),
                   help="scene split (default validation: the premise decides which answers the declared comparison "
                        "is made on, a choice made before the test run; test: for the demo model's targets)")
    p.add_argument("--kinds", metavar="KIND,...", help="only these scene answer kinds (e.g. look, describe, color)")
    p.add_argument("--layer", type=int, default=1, help="K: layers < K keep every token, the cut acts on layers >= K "
                                                         "(default 1)")
    p.add_argument("--steps", default="0,1,2,4,8,16", help="answer steps s to cut from (default 0,1,2,4,8,16)")
    p.add_argument("--fractions", default="0.5,0.25,0.1,0", help="kept fractions f (default 0.5,0.25,0.1,0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default 64)")
    add_device(p)
    add_dtype(p)
    add_threads(p)
    p.add_argument("--choice", default="step,prefill",
                   help="which query picks the kept tokens: step (step s's), prefill (the prefill's), or both "
                        "(default step,prefill)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw it")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch

from ..files import check_outputs, checkpoint_inputs
from ..generation import generate
from ..loading import load_model, read_config, resolve_device, resolve_dtype, resolve_weights
from ..oracle import recompute_logits, reference_answer
from ..plots import require_matplotlib, save_figure
from ..processing import Processor
from ..pruning import Method, kept_mask, kept_count, query_scores, top_k_sorted, visual_span
from ..settings import check_layer
from .data import LOOK_SPLIT, Item, check_fits, data_inputs, read_items, scene_items, vocabulary_note, write_json
from .metrics import kl_divergence
from .report import clustered_mean

def parse_indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise ValueError("is not a comma-separated list of token indices") from None


@dataclass(frozen=True)
class CutAt(Method):
    """The premise test's one cut: every visual token until step `at`, then f·N of them held to the
    end: the best by step `at`'s scores, or, with `chosen`, those (the tokens the prefill's query
    ranked best: the variant that separates *when* a cut is made from *which* tokens a later query
    picks). Not a user method: the tool builds it."""
    name: ClassVar[str] = "cut-at"
    layer: int = 1
    at: int = 0  # the answer step of the cut
    fraction: float = 0.5  # kept fraction of the N visual tokens from step `at` on
    chosen: tuple[int, ...] | None = None  # the visual tokens kept from step `at` on (default: the best by its scores)

    def choose(self, t, keep, scores):
        if t != self.at:
            return keep
        if self.chosen is not None:
            return keep[torch.isin(keep, torch.tensor(self.chosen, device=keep.device))]
        return top_k_sorted(keep, scores, kept_count(scores.numel(), 1 - self.fraction))


CHOICES = ("step", "prefill")  # which query picks the tokens a cut keeps
# The JSON keeps the records of the first WITNESSES items beside the table, so that a test can recompute
# them from the current weights (tests/test_figures.py): premise.png cannot outlive its model.
WITNESSES = 2


@torch.no_grad()
def cut_costs(model, processor, item: Item, K: int, steps, fractions, max_new_tokens: int,
              choices=CHOICES) -> list[dict]:
    """One record per (choice, s, f) the answer is long enough for. choice "step": the tokens kept are the
    best by step s's query (what a method deciding at step s sees); "prefill": the best by the prefill's
    query, whatever s (so a difference between the two at the same s is *which* tokens, and a trend in
    s under "prefill" is *when* alone)."""
    ids, px = processor.input_ids(item.prompt), processor.pixel_values(item.picture())
    tokens, full, probs = reference_answer(model, ids, px, max_new_tokens, processor.stop_ids, probs_of=(K - 1,))
    T = len(tokens)  # full [T, V]; probs: layer K-1's, unpruned
    span = visual_span(ids.to(full.device), model.config.image_token_index)
    P, N = ids.numel(), span[1]
    text = processor.decode(tokens)
    base_score = item.grade(text)
    out = []
    prefill_scores = query_scores(probs[K - 1][:, :, P - 1:P], span)[0]  # the prefill's query: row P-1
    everything = torch.arange(N, device=full.device)
    cuts = [(s, s) for s in steps if s < T]  # (the step recorded, the step cut from)
    after = look_end(processor, tokens) if item.kind == "look" else None
    if after is not None:
        cuts.append((AFTER_LOOK, after))
    for choice in choices:
        for label, s in cuts:
            scores = prefill_scores if choice == "prefill" else query_scores(probs[K - 1][:, :, P + s - 1:P + s], span)[0]
            for f in fractions:
                kept = top_k_sorted(everything, scores, kept_count(N, 1 - f))
                rows = torch.stack([kept_mask(everything, N)] * s + [kept_mask(kept, N)] * (T - s))  # [T, N]
                cut = recompute_logits(model, ids, px, tokens, rows, K)  # [T, V]
                d = kl_divergence(full[s:], cut[s:], torch.float64).clamp_min(0)  # [T - s]
                top1 = (cut[s:].argmax(-1) == torch.tensor(tokens[s:], device=cut.device)).float()
                method = CutAt(K, s, f, tuple(kept.tolist()) if choice == "prefill" else None)
                free = generate(model, ids, px, max_new_tokens, method, stop_ids=processor.stop_ids)
                ftext = processor.decode(free.tokens)
                out.append({"id": item.id, "kind": item.kind, "cluster": item.cluster, "choice": choice, "step": label,
                            "fraction": f,
                            "kl": float(d.mean()), "top1": float(top1.mean()),
                            "same_answer": float(free.tokens == tokens), "score": item.grade(ftext),
                            "base_score": base_score})
    return out


AFTER_LOOK = "after the look"  # the step label of a look-then-reason answer's cut right after its looking part


def look_end(processor, tokens: list[int]) -> int | None:
    """The step of a look-then-reason answer whose token begins its reasoning part (the first token
    after the description's last "." before " So "), or None if the answer has none: cutting from there
    withdraws the image from everything after the looking part."""
    text = processor.decode(tokens)
    end = text.find("." + LOOK_SPLIT)
    if end < 0:
        return None
    for t in range(len(tokens)):
        if len(processor.decode(tokens[:t + 1])) > end + 1:  # this token writes past the looking part's "."
            return t
    return None


def _order(key):
    kind, choice, s, f = key
    return (kind != "all", kind, choice != "step", choice, isinstance(s, str), s if isinstance(s, int) else 0, -f)


def summarise_cuts(records: list[dict]) -> list[dict]:
    """Means over items per (kind, choice, s, f), with the standard error of the answer agreement
    clustered by picture (report.clustered_mean: the questions about one scene are not independent)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for kind in (r["kind"], "all"):
            if kind == "all" and r["step"] == AFTER_LOOK:
                continue  # an item-specific step: only its own kind has it
            groups.setdefault((kind, r["choice"], r["step"], r["fraction"]), []).append(r)
    rows = []
    for (kind, choice, s, f), rs in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        n = len(rs)
        mean, se = clustered_mean([r["same_answer"] for r in rs], [r["cluster"] for r in rs])
        scored = [r for r in rs if r["score"] is not None]
        rows.append({"kind": kind, "choice": choice, "step": s, "fraction": f, "n": n, "kl": sum(r["kl"] for r in rs) / n,
                     "top1": sum(r["top1"] for r in rs) / n, "same_answer": mean, "same_answer_se": se,
                     "score": sum(r["score"] for r in scored) / len(scored) if scored else None,
                     "base_score": sum(r["base_score"] for r in scored) / len(scored) if scored else None})
    return rows


def cut_table(rows: list[dict]) -> str:
    lines = ["| answers | tokens kept by | cut from step s | kept fraction f | items | mean KL at steps >= s (nats) | "
             "top-1 kept % | same answer % (±SE) | score (unpruned) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "" if r["score"] is None else f"{r['score']:.3f} ({r['base_score']:.3f})"
        by = "step s's query" if r["choice"] == "step" else "the prefill's query"
        lines.append(f"| {r['kind']} | {by} | {r['step']} | {r['fraction']:g} | {r['n']} | {r['kl']:.4f} | "
                     f"{100 * r['top1']:.1f} | {100 * r['same_answer']:.1f} ± {100 * r['same_answer_se']:.1f} | {score} |")
    return "\n".join(lines)


def plot(path: str, rows: list[dict], title: str):
    """Per answer kind, KL (top) and same-answer share (bottom) against the cut's step: solid lines keep
    the tokens step s's query ranks best, dashed ones the prefill's choice; a star is the cut right after
    a look-then-reason answer's looking part."""
    plt = require_matplotlib()
    numeric = [r for r in rows if isinstance(r["step"], int)]
    # Only answers long enough to be cut at three or more steps make a curve (a one-word answer and its EOS
    # end at s = 1); the table has them all.
    kinds = [k for k in dict.fromkeys(r["kind"] for r in rows) if len({r["step"] for r in numeric if r["kind"] == k}) > 2]
    if len(kinds) > 1 and "all" in kinds:  # "all" mixes kinds whose answers end at different steps
        kinds.remove("all")
    kinds = kinds or list(dict.fromkeys(r["kind"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    colours = {f: f"C{i}" for i, f in enumerate(fractions)}
    end = max((r["step"] for r in numeric), default=0)
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.6 * len(kinds), 5.8), squeeze=False, sharex=True)
    for j, kind in enumerate(kinds):
        for f in fractions:
            for choice, style in (("step", "-"), ("prefill", "--")):
                rs = sorted((r for r in numeric if r["kind"] == kind and r["fraction"] == f and r["choice"] == choice),
                            key=lambda r: r["step"])
                if not rs:
                    continue
                s = [r["step"] for r in rs]
                label = f"kept {f:g}" + ("" if choice == "step" else ", prefill's choice")
                axes[0][j].plot(s, [r["kl"] for r in rs], style, color=colours[f], marker="o", ms=3, label=label)
                axes[1][j].errorbar(s, [100 * r["same_answer"] for r in rs], yerr=[100 * r["same_answer_se"] for r in rs],
                                    fmt=style, color=colours[f], marker="o", ms=3, capsize=2, label=label)
            for r in (r for r in rows if r["kind"] == kind and r["fraction"] == f and r["step"] == AFTER_LOOK
                      and r["choice"] == "step"):
                axes[0][j].plot([end + 2], [r["kl"]], "*", color=colours[f], ms=10)
                axes[1][j].errorbar([end + 2], [100 * r["same_answer"]], yerr=[100 * r["same_answer_se"]], fmt="*",
                                    color=colours[f], ms=10, capsize=2)
                axes[1][j].annotate("after the look", (end + 2, 100 * r["same_answer"]), fontsize=7,
                                    xytext=(-40, -12), textcoords="offset points")
        axes[0][j].set_title(f"{kind} (n = {max((r['n'] for r in rows if r['kind'] == kind), default=0)})", fontsize=10)
        axes[0][j].set_yscale("symlog", linthresh=1e-3)
        axes[1][j].set_ylim(-5, 105)
        axes[1][j].set_xlabel("visual tokens cut from answer step s")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean KL after the cut (nats,\nteacher-forced)")
    axes[1][0].set_ylabel("same answer as unpruned %\n(free-running, ±1 SE)")
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False, bbox_to_anchor=(0.5, -0.01),
               fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    save_figure(fig, path)


def parse_list(text: str, flag: str, kind):
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers") from None
    return values


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.weights is not None:
        args.weights = resolve_weights(args.weights)  # a folder, or a hub id found in the local cache
    if args.data and args.scenes is not None:
        raise UserError("--data replaces the scenes: leave out --scenes")
    if args.scenes is not None and args.scenes < 1:
        raise UserError(f"--scenes {args.scenes}: give a positive number of held-out scenes")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    steps = parse_list(args.steps, "--steps", int)
    fractions = parse_list(args.fractions, "--fractions", float)
    if any(s < 0 for s in steps):
        raise UserError(f"--steps {args.steps!r}: every step must be >= 0")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise UserError(f"--fractions {args.fractions!r}: every kept fraction must lie in [0, 1]")
    choices = args.choice.split(",")
    if not choices or any(c not in CHOICES for c in choices):
        raise UserError(f"--choice {args.choice!r}: use step, prefill or step,prefill")
    resolve_device(args.device, auto=False)
    dtype = resolve_dtype(args.dtype, args.device)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot} must end in .png")
    check_outputs([("--json", args.json), ("--plot", args.plot)],
                  checkpoint_inputs(args.weights) + data_inputs(args.data))
    if args.plot:
        require_matplotlib()
    if args.data and (args.kinds or args.split != "validation"):
        raise UserError("--kinds and --split pick scene items; a --data file's items are all used")
    items = read_items(args.data) if args.data else scene_items(args.scenes or 40, args.split)
    if args.kinds:
        kinds = args.kinds.split(",")
        known = sorted({it.kind for it in items})
        if any(k not in known for k in kinds):
            raise UserError(f"--kinds {args.kinds!r}: the scene answer kinds are {', '.join(known)}")
        items = [it for it in items if it.kind in kinds]
    cfg = read_config(args.weights)
    K = check_layer(args.layer, cfg.text_config.num_hidden_layers, "--layer")
    proc = Processor(args.weights, cfg)
    check_fits(items, proc, cfg.text_config.max_position_embeddings)
    note = vocabulary_note(items, proc)
    if note:
        sys.stderr.write(note + "\n")
    model = load_model(args.weights, dtype=dtype, device=args.device, config=cfg)
    bar = Progress(len(items), "premise test", " items")
    records = []
    for it in items:
        records += cut_costs(model, proc, it, K, steps, fractions, args.max_new_tokens, choices)
        bar.update(1)
    bar.close()
    rows = summarise_cuts(records)
    witnesses = [r for r in records if r["id"] in {it.id for it in items[:WITNESSES]}]
    what = args.data or f"{len(items)} held-out scene prompts ({args.split} split)"
    print(f"Cutting the visual tokens to a fraction f from answer step s on (K = {K}), on {what}:\n")
    print(cut_table(rows))
    if args.json:
        write_json(args.json, {"weights": os.path.basename(os.path.normpath(args.weights)), "layer": K, "data": what,
                               "steps": steps, "fractions": fractions, "choices": choices,
                               "max_new_tokens": args.max_new_tokens, "rows": rows, "witnesses": witnesses})
    if args.plot:
        plot(args.plot, rows, f"Do later answer tokens need the image less? Cuts from step s, K = {K}, {what}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
