"""Accuracy against cost for every method, on held-out generated scenes.

  python -m dyrate_ref.tools.evaluate [--weights DIR] [--quick] [--scenes N] [--plot DIR] [--json FILE]

One row per method and setting (methods()): none and a control with every picture blanked (the model
must answer from the image, not the text); FastV (K=2, R=0.5, 0.75, 0.9); VTW at the weights' calibrated
layer; DyRate with the shipped predictor at its own decoding confidence and a sweep; random keep at the
predictor's own kept counts (does choosing by attention matter?); DyRate with a fixed rising schedule;
the attention-mass rule (keep the fewest tokens holding a share p of the step's visual attention).

Accuracy table: QA accuracy overall and per question kind, description object-F1 ((colour, shape,
position) triples), each method's paired difference from none with its standard error, and how often
the answer is exactly none's. Cost table, relative to none: kept visual tokens, language-model FLOPs
(FastV's way of counting: decoder matmuls over every step, split into prefill and decode; the vision
tower + projector is the same for every method and stated once), KV-cache bytes (peak and mean over the
answer's steps) and wall-clock.

--plot DIR writes pareto.png (QA accuracy against LM FLOPs and against mean KV bytes, every row a point,
±1 SE) and attention_over_generation.png (the share of attention each generated token gives to the
image, per decoder layer, over the held-out descriptions: the observation DyRate builds on).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import time
from dataclasses import dataclass

import torch

from ..cost import serving, vision_flops
from ..demo.scenes import QUESTION_KINDS, eval_set, normalise, object_f1
from ..errors import ArgumentParser, UserError, command_main
from ..files import write_json
from ..generation import forward_no_cache, generate
from ..loading import DEFAULT_WEIGHTS, load_model, vtw_default_layer
from ..model import TextConfig
from ..plots import plot_layers, plot_pareto, require_matplotlib
from ..predictor import load_predictor, shipped_predictor_path
from ..processing import Processor
from ..progress import Progress
from ..pruning import PruneSettings, visual_span

RISING = (0.5, 0.6, 0.7, 0.8, 0.9)
SWEEP = (0.3, 0.4, 0.5, 0.7)  # DyRate decoding confidences drawn as the predictor's curve


@dataclass(frozen=True)
class Row:
    name: str
    family: str  # one marker per family in the Pareto plot
    prune: PruneSettings
    blank: bool = False  # the control: every picture replaced by its empty background
    match: str | None = None  # random baseline: keep as many tokens at each step as this row did


def methods(weights_dir: str, cfg, quick: bool = False) -> list[Row]:
    """The standard table: none and its blank-image control; FastV at several R; VTW at its calibrated
    layer; DyRate with the shipped predictor (its own confidence and a sweep) and a fixed rising
    schedule; the attention-mass rule; random keep at the shipped predictor's counts."""
    rows = [Row("none", "none", PruneSettings()),
            Row("none, image blanked (control)", "control", PruneSettings(), blank=True)]
    rows += [Row(f"FastV K=2 R={R}", "FastV", PruneSettings("fastv", 2, R)) for R in ((0.5,) if quick else (0.5, 0.75, 0.9))]
    K, note = vtw_default_layer(weights_dir, cfg.text_config.num_hidden_layers)
    rows.append(Row(f"VTW K={K} ({note.split(':')[0]})", "VTW", PruneSettings("vtw", K)))
    path = shipped_predictor_path(weights_dir)
    if path:
        pred = load_predictor(path, cfg, weights_dir)
        main_name = f"DyRate K={pred.layer} predictor (c={pred.confidence:g})"
        rows.append(Row(main_name, "DyRate predictor", PruneSettings("dyrate", pred.layer, predictor=pred)))
        for c in () if quick else SWEEP:
            if abs(c - pred.confidence) > 1e-9:
                rows.append(Row(f"DyRate K={pred.layer} predictor (c={c:g})", "DyRate predictor",
                                PruneSettings("dyrate", pred.layer, predictor=pred.with_confidence(c))))
        rows.append(Row(f"random keep, counts of {main_name}", "random (matched counts)",
                        PruneSettings("random", pred.layer), match=main_name))
    rows.append(Row(f"DyRate K=2 rising {','.join(map(str, RISING))}", "DyRate fixed schedule",
                    PruneSettings("dyrate", 2, rates=RISING)))
    rows += [Row(f"attention mass K=2 p={p}", "attention mass", PruneSettings("mass", 2, share=p))
             for p in ((0.8,) if quick else (0.5, 0.8, 0.95))]
    return rows


def parse_extra(spec: str, weights_dir: str, cfg) -> Row:
    """--extra rows: fastv:K:R, vtw:K, dyrate:K:r0,r1,..., mass:K:p or predictor:FILE[:confidence]."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "fastv":
            K, R = rest.split(":")
            return Row(f"FastV K={K} R={R}", "FastV", PruneSettings("fastv", int(K), float(R)))
        if kind == "vtw":
            return Row(f"VTW K={rest}", "VTW", PruneSettings("vtw", int(rest)))
        if kind == "dyrate":
            K, rates = rest.split(":")
            return Row(f"DyRate K={K} rates {rates}", "DyRate fixed schedule",
                       PruneSettings("dyrate", int(K), rates=tuple(map(float, rates.split(",")))))
        if kind == "mass":
            K, share = rest.split(":")
            return Row(f"attention mass K={K} p={share}", "attention mass", PruneSettings("mass", int(K), share=float(share)))
        if kind == "predictor":
            path, _, conf = rest.partition(":")
            pred = load_predictor(path, cfg, weights_dir)
            if conf:
                pred = pred.with_confidence(float(conf))
            return Row(f"DyRate K={pred.layer} predictor {os.path.basename(path)} (c={pred.confidence:g})",
                       "DyRate predictor", PruneSettings("dyrate", pred.layer, predictor=pred))
    except ValueError:
        pass
    raise UserError(f"--extra {spec!r}: use fastv:K:R, vtw:K, dyrate:K:r0,r1,..., mass:K:p or predictor:FILE[:c]")


def blank_scene(scene):
    """The same picture without its shapes: background and texture only."""
    return dataclasses.replace(scene, shapes=())


def run_method(model, processor, items, row: Row, max_new_tokens: int, matched=None, bar=None) -> list[dict]:
    """One record per item: the answer, whether it is right (QA) or its object-F1 (describe), kept counts
    per step, FLOPs of the prefill and of the decode steps (language model only), KV bytes, seconds."""
    vis = vision_flops(model.config)
    out = []
    for i, item in enumerate(items):
        img = (blank_scene(item.scene) if row.blank else item.scene).draw()
        ids, px = processor.input_ids(item.question), processor.pixel_values(img)
        prune = row.prune
        if matched is not None:  # seeded by the scene, so a subset of the items draws what the whole set would
            prune = dataclasses.replace(prune, counts=tuple(matched[i]["kept"]), seed=item.scene.seed % 1_000_003)
        t0 = time.perf_counter()
        gen = generate(model, ids, px, max_new_tokens, prune, stop_ids=processor.stop_ids)
        seconds = time.perf_counter() - t0
        text = processor.decode(gen.tokens)
        flops, kv = gen.record.flops, gen.record.kv_bytes
        rec = {"kind": item.kind, "answer": text, "kept": [int(k.sum()) for k in gen.record.keep],
               "prefill_flops": flops[0] - vis, "decode_flops": sum(flops[1:]), "kv_peak": max(kv),
               "kv_mean": sum(kv) / len(kv), "seconds": seconds}
        if item.kind == "describe":
            rec["score"] = object_f1(text, item.scene)
        else:
            rec["score"] = float(normalise(text) == normalise(item.answer))
        out.append(rec)
        if bar:
            bar.update(1)
    return out


def evaluate_rows(model, processor, items, rows: list[Row], max_new_tokens: int, bar=None) -> dict[str, list[dict]]:
    """Every row on every item. -> {row name: records in item order}."""
    records: dict[str, list[dict]] = {}
    for row in rows:
        matched = records[row.match] if row.match else None
        records[row.name] = run_method(model, processor, items, row, max_new_tokens, matched, bar)
    return records


class _Counter:
    """A progress bar's update() for a worker process: counts into a shared integer."""

    def __init__(self, value):
        self.value = value

    def update(self, n=1):
        with self.value.get_lock():
            self.value.value += n


def evaluate_parallel(model, processor, items, rows, max_new_tokens: int, workers: int, bar) -> dict[str, list[dict]]:
    """evaluate_rows over `workers` forked processes, one thread each, each taking every workers-th item;
    the records are put back in item order. (Fork shares the loaded model; nothing is pickled but the
    records.)"""
    if workers <= 1:
        return evaluate_rows(model, processor, items, rows, max_new_tokens, bar)
    ctx = multiprocessing.get_context("fork")
    done, results = ctx.Value("i", 0), ctx.Queue()

    def work(w):
        torch.set_num_threads(1)
        results.put((w, evaluate_rows(model, processor, items[w::workers], rows, max_new_tokens, _Counter(done))))

    procs = [ctx.Process(target=work, args=(w,)) for w in range(workers)]
    for p in procs:
        p.start()
    shards, shown = {}, 0
    while len(shards) < workers:
        try:
            w, recs = results.get(timeout=1.0)
            shards[w] = recs
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("an evaluation worker failed; run with --workers 1 to see why")
        bar.update(done.value - shown)
        shown = done.value
    for p in procs:
        p.join()
    merged = {}
    for row in rows:
        merged[row.name] = [None] * len(items)
        for w, recs in shards.items():
            merged[row.name][w::workers] = recs[row.name]
    return merged


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a and its standard error (the paired difference: the same items under two methods)."""
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
    return float(d.mean()), se


def summarise(records: list[dict], base: list[dict]) -> dict:
    """Accuracy per kind and overall with its paired difference from `base` (none), agreement with
    base's answers, and costs relative to base."""
    def scores(recs, kinds):
        return [r["score"] for r in recs if r["kind"] in kinds]
    s = {}
    for name, kinds in [("qa", QUESTION_KINDS)] + [(f"qa_{k}", (k,)) for k in QUESTION_KINDS] + [("f1", ("describe",))]:
        mine, theirs = scores(records, kinds), scores(base, kinds)
        s[name] = sum(mine) / max(1, len(mine))
        s[name + "_n"] = len(mine)
        s[name + "_delta"], s[name + "_se"] = paired(theirs, mine) if mine else (0.0, 0.0)
    s["agree"] = sum(r["answer"] == b["answer"] for r, b in zip(records, base)) / len(records)
    s["kept"] = sum(sum(r["kept"]) for r in records) / sum(len(r["kept"]) for r in records)
    total = lambda recs, key: sum(r[key] for r in recs)  # noqa: E731
    lm = total(records, "prefill_flops") + total(records, "decode_flops")
    lm_base = total(base, "prefill_flops") + total(base, "decode_flops")
    s["lm_flops"] = lm / lm_base
    s["prefill_flops"] = total(records, "prefill_flops") / total(base, "prefill_flops")
    s["decode_flops"] = total(records, "decode_flops") / max(1, total(base, "decode_flops"))
    s["kv_peak"] = total(records, "kv_peak") / total(base, "kv_peak")
    s["kv_mean"] = total(records, "kv_mean") / total(base, "kv_mean")
    s["seconds"] = total(records, "seconds") / total(base, "seconds")
    s["lm_flops_per_prompt"] = lm / len(records)
    return s


def fmt(s: dict, key: str, scale: float = 100, digits: int = 1) -> str:
    return f"{scale * s[key]:.{digits}f}"


def table(results: list[tuple[Row, dict]], N: int, vision: int) -> str:
    """Two tables: accuracy (with paired differences from none) and cost (relative to none)."""
    acc = ["| method | QA % | Δ QA vs none (±SE) | " + " | ".join(QUESTION_KINDS) +
           " | describe F1 | Δ F1 (±SE) | same answer as none % |"]
    acc.append("|" + "---|" * (acc[0].count("|") - 1))
    cost = [f"| method | kept visual tokens (of {N}) | LM FLOPs | prefill FLOPs | decode FLOPs | peak KV | mean KV "
            "| wall-clock |", "|---|---|---|---|---|---|---|---|"]
    for row, s in results:
        kinds = " | ".join(fmt(s, "qa_" + k) for k in QUESTION_KINDS)
        acc.append(f"| {row.name} | {fmt(s, 'qa')} | {100 * s['qa_delta']:+.1f} ± {100 * s['qa_se']:.1f} | {kinds} | "
                   f"{s['f1']:.3f} | {s['f1_delta']:+.3f} ± {s['f1_se']:.3f} | {fmt(s, 'agree')} |")
        cost.append(f"| {row.name} | {s['kept']:.1f} | {s['lm_flops']:.3f} | {s['prefill_flops']:.3f} | "
                    f"{s['decode_flops']:.3f} | {s['kv_peak']:.3f} | {s['kv_mean']:.3f} | {s['seconds']:.3f} |")
    base = results[0][1]
    note = (f"\n{base['qa_n']} questions and {base['f1_n']} descriptions. Costs are relative to none: language-model "
            f"matmul FLOPs (none: {base['lm_flops_per_prompt'] / 1e6:.1f} MFLOPs per prompt on average; the vision tower "
            f"and projector add {vision / 1e6:.1f} MFLOPs per image for every method), KV-cache bytes (peak, and mean "
            "over the answer's steps) and wall-clock on this machine. Δ: paired difference from none over the same "
            "items, ± one standard error; a difference within two standard errors is not a difference.")
    return "\n".join(acc) + "\n\n" + "\n".join(cost) + note


# LLaVA-1.5-7B at float16 on an 80 GB GPU, for the serving arithmetic (cost.serving): 7.06 B parameters,
# 576 visual tokens in a prompt of ~616, a 64-token answer.
SERVE_7B = dict(N=576, P=616, T=64, weight_bytes=7.06e9 * 2, gpu_bytes=80e9)


def serving_table(results: list[tuple[Row, dict]], N: int) -> str:
    """What each method would buy a server at LLaVA-1.5-7B's shapes: an analytic model fed with the mean
    kept fraction each method reached here (cost.serving; labelled as such in the output)."""
    tc, c = TextConfig(), SERVE_7B  # TextConfig's defaults are Llama-7B's shapes
    lines = ["| method | kept fraction (measured here) | bytes read per decode step vs none, batch 1 | batch 8 "
             "| batch 64 | KV share of those bytes at batch 64 | largest batch in 80 GB |", "|---|---|---|---|---|---|---|"]
    base = {B: serving(tc, 2, c["N"], c["P"], c["T"], 1.0, c["weight_bytes"], c["gpu_bytes"], B) for B in (1, 8, 64)}
    for row, s in results:
        if row.blank:
            continue
        K = row.prune.layer if row.prune.method != "none" else 2
        got = {B: serving(tc, K, c["N"], c["P"], c["T"], s["kept"] / N, c["weight_bytes"], c["gpu_bytes"], B)
               for B in (1, 8, 64)}
        lines.append(f"| {row.name} | {s['kept'] / N:.3f} | " + " | ".join(
            f"{got[B]['bytes_per_step'] / base[B]['bytes_per_step']:.3f}" for B in (1, 8, 64))
            + f" | {got[64]['kv_share']:.2f} | {got[64]['max_batch']} |")
    return ("Analytic serving model (not measured): LLaVA-1.5-7B in float16 on an 80 GB GPU, 576 visual tokens in "
            "a 616-token prompt, a 64-token answer, each method's mean kept fraction as measured above.\n\n"
            + "\n".join(lines))


def pareto_points(results: list[tuple[Row, dict]]) -> list[dict]:
    points = []
    for row, s in results:
        if row.blank:
            continue
        for panel, x in (("LM FLOPs relative to none", s["lm_flops"]), ("mean KV-cache bytes relative to none", s["kv_mean"])):
            points.append({"panel": panel, "method": row.family, "label": row.name, "x": x, "y": 100 * s["qa"],
                           "yerr": 100 * s["qa_se"], "ylabel": "QA accuracy % (held-out questions)"})
    return points


@torch.no_grad()
def attention_over_generation(model, processor, items, max_items: int = 40, min_count: int = 5):
    """Share of attention from generated token t to the visual tokens, per layer, over the model's own
    unpruned descriptions (teacher-forced, one no-cache forward each). -> means, standard errors [L, T]
    and counts [T], for the positions at least min_count answers reach."""
    L = model.config.text_config.num_hidden_layers
    per_answer = []  # [L, T_i] each
    for item in [i for i in items if i.kind == "describe"][:max_items]:
        ids, px = processor.input_ids(item.question), processor.pixel_values(item.scene.draw())
        gen = generate(model, ids, px, 80, stop_ids=processor.stop_ids)
        start, N = visual_span(ids, model.config.image_token_index)
        P = ids.numel()
        _, probs = forward_no_cache(model, ids, px, gen.tokens, probs_of=range(L))  # {layer: [1, H, S, S]}
        per_answer.append(torch.stack([probs[i][0, :, P - 1:, start:start + N].sum(-1).mean(0) for i in range(L)]))
    T = max(a.shape[1] for a in per_answer)
    counts = torch.tensor([sum(a.shape[1] > t for a in per_answer) for t in range(T)])
    T = int((counts >= min(min_count, len(per_answer))).sum())
    means, sems = torch.zeros(L, T), torch.zeros(L, T)
    for t in range(T):
        x = torch.stack([a[:, t] for a in per_answer if a.shape[1] > t], 1)  # [L, n_t]
        means[:, t] = x.mean(1)
        sems[:, t] = x.std(1) / x.shape[1] ** 0.5 if x.shape[1] > 1 else 0.0
    return means, sems, counts[:T]


def run(argv=None) -> int:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--quick", action="store_true", help="a few scenes only (what the tests run)")
    p.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 300; --quick: 4)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="longest answer generated (default 80)")
    p.add_argument("--plot", metavar="DIR", help="also write pareto.png and attention_over_generation.png into DIR")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--extra", action="append", default=[], metavar="SPEC",
                   help="add a row: fastv:K:R, vtw:K, dyrate:K:r0,r1,..., mass:K:p or predictor:FILE[:c] (repeatable)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, one thread each, sharing the items (default 1; 2 on a 2-core machine halves the time)")
    p.add_argument("--only-extra", action="store_true", help="skip the standard rows except none and the control")
    p.add_argument("--no-control", action="store_true", help="with --only-extra: skip the blank-image control too")
    args = p.parse_args(argv)
    if args.scenes is not None and args.scenes < 1:
        raise UserError(f"--scenes {args.scenes}: give a positive number of held-out scenes")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.plot and not os.path.isdir(args.plot):
        raise UserError(f"--plot {args.plot}: folder does not exist")
    if args.plot:
        require_matplotlib()
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UserError(f"--json {args.json}: its folder does not exist")
    model = load_model(args.weights)
    proc = Processor(args.weights, model.config)
    if args.only_extra:
        rows = [Row("none", "none", PruneSettings())] + ([] if args.no_control else
                                                          [Row("none, image blanked (control)", "control", PruneSettings(), blank=True)])
    else:
        rows = methods(args.weights, model.config, args.quick)
    rows += [parse_extra(spec, args.weights, model.config) for spec in args.extra]
    n = args.scenes or (4 if args.quick else 300)
    items = eval_set(n)
    bar = Progress(len(items) * len(rows), "evaluating", " prompts")
    records = evaluate_parallel(model, proc, items, rows, args.max_new_tokens, args.workers, bar)
    bar.close()
    base = records[rows[0].name]
    results = [(row, summarise(records[row.name], base)) for row in rows]
    print(table(results, model.config.num_image_tokens, vision_flops(model.config)))
    print("\n" + serving_table(results, model.config.num_image_tokens))
    if args.json:
        figures = {"scenes": n, "weights": os.path.basename(os.path.normpath(args.weights)),
                   "rows": [{"method": row.name, "family": row.family, **s} for row, s in results]}
        write_json(args.json, figures)
    if args.plot:
        plot_pareto(os.path.join(args.plot, "pareto.png"), pareto_points(results),
                    f"QA accuracy against cost on {n} held-out scenes ({len(base)} prompts)")
        means, sems, counts = attention_over_generation(model, proc, items)
        out = os.path.join(args.plot, "attention_over_generation.png")
        plot_layers(out, means, sems, counts, "Share of attention that each generated token gives to the image, per layer")
        first, last = means[:, :3].mean(1), means[:, -5:].mean(1)
        print(f"\nwrote {out}; visual share, first 3 answer tokens -> last 5 (positions with >= 5 answers), per layer: "
              + ", ".join(f"L{i} {a:.3f}->{b:.3f}" for i, (a, b) in enumerate(zip(first.tolist(), last.tolist()))))
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
