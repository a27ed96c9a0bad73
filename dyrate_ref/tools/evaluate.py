"""Accuracy against cost for every method, on held-out generated scenes.

  python -m dyrate_ref.tools.evaluate [--weights DIR] [--quick] [--scenes N] [--plot DIR] [--json FILE]

One row per method and setting: none; FastV (K=2, R=0.5 and 0.75); VTW (K from the weights'
vtw_calibration.json); DyRate with the shipped predictor; DyRate with a fixed rising schedule.
Columns: QA accuracy (overall and per question kind), description object-F1 ((colour, shape, position)
triples), mean kept visual tokens per step, language-model FLOPs relative to none (FastV's way of
counting: decoder matmuls, here over every step; the vision tower + projector is the same for every
method and shown once), peak KV-cache bytes and wall-clock, both relative to none.

--plot DIR writes attention_over_generation.png: the share of attention that each generated token
gives to the visual tokens, per decoder layer, against the token's position in the answer, averaged
over the held-out descriptions (the observation DyRate builds on).
"""

from __future__ import annotations

import json
import os
import time

import torch

from ..cost import vision_flops
from ..demo.scenes import QUESTION_KINDS, eval_set, normalise, object_f1
from ..errors import ArgumentParser, UserError, command_main
from ..files import write_atomic
from ..generation import forward_no_cache, generate
from ..loading import DEFAULT_WEIGHTS, load_model, vtw_default_layer
from ..predictor import load_predictor, shipped_predictor_path
from ..processing import Processor
from ..progress import Progress
from ..pruning import PruneSettings, visual_span

RISING = (0.5, 0.6, 0.7, 0.8, 0.9)


def methods(weights_dir: str, cfg) -> list[tuple[str, PruneSettings]]:
    rows = [("none", PruneSettings()),
            ("FastV K=2 R=0.5", PruneSettings("fastv", 2, 0.5)),
            ("FastV K=2 R=0.75", PruneSettings("fastv", 2, 0.75))]
    K, note = vtw_default_layer(weights_dir, cfg.text_config.num_hidden_layers)
    rows.append((f"VTW K={K} ({note.split(':')[0]})", PruneSettings("vtw", K)))
    path = shipped_predictor_path(weights_dir)
    if path:
        pred = load_predictor(path, cfg, weights_dir)
        rows.append((f"DyRate K={pred.layer} predictor (tau={pred.meta.get('tau', '?')})",
                     PruneSettings("dyrate", pred.layer, predictor=pred)))
    rows.append((f"DyRate K=2 rising {','.join(map(str, RISING))}", PruneSettings("dyrate", 2, rates=RISING)))
    return rows


def parse_extra(spec: str, weights_dir: str, cfg) -> tuple[str, PruneSettings]:
    """--extra rows: fastv:K:R, vtw:K, dyrate:K:r0,r1,... or predictor:FILE."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "fastv":
            K, R = rest.split(":")
            return f"FastV K={K} R={R}", PruneSettings("fastv", int(K), float(R))
        if kind == "vtw":
            return f"VTW K={rest}", PruneSettings("vtw", int(rest))
        if kind == "dyrate":
            K, rates = rest.split(":")
            return f"DyRate K={K} rates {rates}", PruneSettings("dyrate", int(K), rates=tuple(map(float, rates.split(","))))
        if kind == "predictor":
            pred = load_predictor(rest, cfg, weights_dir)
            return (f"DyRate K={pred.layer} predictor {os.path.basename(rest)} (tau={pred.meta.get('tau', '?')})",
                    PruneSettings("dyrate", pred.layer, predictor=pred))
    except ValueError:
        pass
    raise UserError(f"--extra {spec!r}: use fastv:K:R, vtw:K, dyrate:K:r0,r1,... or predictor:FILE")


def run_method(model, processor, items, prune: PruneSettings, max_new_tokens: int, bar=None) -> dict:
    correct = {k: [] for k in QUESTION_KINDS}
    f1s, kept, lm_flops, kv_peak, seconds = [], [], 0, [], 0.0
    vis = vision_flops(model.config)
    for item in items:
        img = item.scene.draw()
        ids, px = processor.input_ids(item.question), processor.pixel_values(img)
        t0 = time.perf_counter()
        gen = generate(model, ids, px, max_new_tokens, prune, stop_ids=processor.stop_ids)
        seconds += time.perf_counter() - t0
        text = processor.decode(gen.tokens)
        if item.kind == "describe":
            f1s.append(object_f1(text, item.scene))
        else:
            correct[item.kind].append(normalise(text) == normalise(item.answer))
        kept += [int(k.sum()) for k in gen.record.keep]
        lm_flops += sum(gen.record.flops) - vis
        kv_peak.append(max(gen.record.kv_bytes))
        if bar:
            bar.update(1)
    qa = [c for v in correct.values() for c in v]
    return {"qa": sum(qa) / max(1, len(qa)), "qa_n": len(qa),
            **{f"qa_{k}": sum(v) / max(1, len(v)) for k, v in correct.items()},
            "f1": sum(f1s) / max(1, len(f1s)), "f1_n": len(f1s), "kept": sum(kept) / max(1, len(kept)),
            "lm_flops": lm_flops, "kv_peak": sum(kv_peak) / len(kv_peak), "seconds": seconds}


def table(results: list[tuple[str, dict]], N: int, vision: int, n_items: int) -> str:
    base = results[0][1]
    head = ("| method | QA acc | " + " | ".join(QUESTION_KINDS) + " | describe F1 | kept visual tokens (of "
            f"{N}) | LM FLOPs vs none | peak KV vs none | wall-clock vs none |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results:
        kinds = " | ".join(f"{100 * r['qa_' + k]:.1f}" for k in QUESTION_KINDS)
        lines.append(f"| {name} | {100 * r['qa']:.1f} | {kinds} | {r['f1']:.3f} | {r['kept']:.1f} | "
                     f"{r['lm_flops'] / base['lm_flops']:.3f} | {r['kv_peak'] / base['kv_peak']:.3f} | "
                     f"{r['seconds'] / base['seconds']:.3f} |")
    lines.append("")
    lines.append(f"{base['qa_n']} questions and {base['f1_n']} descriptions ({n_items} prompts). Unpruned "
                 f"language-model FLOPs: {base['lm_flops'] / max(1, n_items) / 1e6:.1f} MFLOPs per prompt on "
                 f"average; the vision tower + projector adds {vision / 1e6:.1f} MFLOPs per image for every method.")
    return "\n".join(lines)


@torch.no_grad()
def attention_over_generation(model, processor, items, max_items: int = 40):
    """Mean share of attention from generated token t to the visual tokens, per layer. -> [L, T_max]
    plus counts [T_max]. Teacher-forced on the model's own unpruned answers; one no-cache forward per
    answer, layer by layer, reading each layer's probabilities."""
    L = model.config.text_config.num_hidden_layers
    per_answer = []  # [L, T_i] each
    for item in [i for i in items if i.kind == "describe"][:max_items]:
        img = item.scene.draw()
        ids, px = processor.input_ids(item.question), processor.pixel_values(img)
        gen = generate(model, ids, px, 80, stop_ids=processor.stop_ids)
        start, N = visual_span(ids, model.config.image_token_index)
        P = ids.numel()
        _, probs = forward_no_cache(model, ids, px, gen.tokens, probs_of=range(L))  # {layer: [1, H, S, S]}
        shares = [probs[i][0, :, P - 1:, start:start + N].sum(-1).mean(0) for i in range(L)]  # [T] each
        per_answer.append(torch.stack(shares))
    T = max(a.shape[1] for a in per_answer)
    sums, counts = torch.zeros(L, T), torch.zeros(T)
    for a in per_answer:
        sums[:, :a.shape[1]] += a
        counts[:a.shape[1]] += 1
    return sums / counts.clamp_min(1), counts


def plot_attention(path: str, means: torch.Tensor, counts: torch.Tensor, min_count: int = 5):
    from ..plots import line_chart, save_png
    T = int((counts >= min_count).sum())
    series = {f"layer {i}": means[i, :T].tolist() for i in range(means.shape[0])}
    img = line_chart(series, "Share of attention to visual tokens vs position in the answer "
                             f"(mean over held-out descriptions; positions with >= {min_count} answers)",
                     "position t in the generated description", "visual share",
                     ymax=float(means[:, :T].max()) * 1.1, size=(960, 380))
    save_png(img, path)


def run(argv=None) -> int:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--quick", action="store_true", help="a few scenes only (what the tests run)")
    p.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 100; --quick: 4)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="longest answer generated (default 80)")
    p.add_argument("--plot", metavar="DIR", help="also write attention_over_generation.png into DIR")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--extra", action="append", default=[], metavar="SPEC",
                   help="add a row: fastv:K:R, vtw:K, dyrate:K:r0,r1,... or predictor:FILE (repeatable)")
    p.add_argument("--only-extra", action="store_true", help="skip the standard rows except none")
    args = p.parse_args(argv)
    if args.scenes is not None and args.scenes < 1:
        raise UserError(f"--scenes {args.scenes}: give a positive number of held-out scenes")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.plot and not os.path.isdir(args.plot):
        raise UserError(f"--plot {args.plot}: folder does not exist")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"--json {args.json}: its folder does not exist")
    model = load_model(args.weights)
    proc = Processor(args.weights, model.config)
    rows = methods(args.weights, model.config)
    if args.only_extra:
        rows = rows[:1]
    rows += [parse_extra(spec, args.weights, model.config) for spec in args.extra]
    n = args.scenes or (4 if args.quick else 100)
    items = eval_set(n)
    results = []
    bar = Progress(len(items) * len(rows), "evaluating", " prompts")
    for name, prune in rows:
        results.append((name, run_method(model, proc, items, prune, args.max_new_tokens, bar)))
    bar.close()
    print(table(results, model.config.num_image_tokens, vision_flops(model.config), len(items)))
    if args.json:
        figures = {"scenes": n, "rows": [{"method": k, **v} for k, v in results]}

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(figures, f, indent=2)
        write_atomic(args.json, write)
    if args.plot:
        means, counts = attention_over_generation(model, proc, items)
        out = os.path.join(args.plot, "attention_over_generation.png")
        plot_attention(out, means, counts)
        first, last = means[:, :3].mean(1), means[:, max(0, int((counts >= 5).sum()) - 5):int((counts >= 5).sum())].mean(1)
        print(f"\nwrote {out}; visual share, first 3 answer tokens -> last 5 (positions with >= 5 answers), per layer: "
              + ", ".join(f"L{i} {a:.3f}->{b:.3f}" for i, (a, b) in enumerate(zip(first.tolist(), last.tolist()))))
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
