"""Accuracy against cost for every method, on held-out generated scenes.

  python -m dyrate_ref.tools.evaluate [--weights DIR] [--quick] [--scenes N] [--plot DIR] [--json FILE]
  python -m dyrate_ref.tools.evaluate --data FILE.jsonl [--results OUT.jsonl] [--weights DIR] ...

One row per method and setting (standard_rows()), each family a front: none and a control with every picture
blanked (the model must answer from the image, not the text); FastV over FASTV_RATES at the K and score its
validation chose; VTW at L/2 and L-1; DyRate with the shipped predictor over its confidence c (SWEEP), each c
with two controls: random tokens at its kept counts on the same item (does choosing by attention matter?) and
the fixed schedule at its mean kept count per step (does choosing the rate per picture matter?). The declared
comparison (MAIN_COMPARISON) comes first. --split validation: disjoint scenes.

Accuracy table: exact match overall and per question kind, description object-F1 ((colour, shape, position)
triples) and CIDEr-D, each method's paired difference from none with its standard error clustered by picture
(the questions about one scene are not independent), and how often the answer is exactly none's. Costs are
counted twice: on each method's own answers, and on none's answer tokens fed to the method (a method whose
answers collapse would otherwise look cheap). The kind-swap sensitivity (demo/reading.py: does the model read
the question?) follows the table.

Cost table, relative to none: kept visual tokens, language-model FLOPs (FastV's way of counting: decoder
matmuls over every step, split into prefill and decode; the vision tower + projector is the same for every
method and stated once), KV-cache bytes (peak and mean over the answer's steps) and wall-clock.

--plot DIR writes pareto.png (accuracy against LM FLOPs and mean KV bytes on none's answer tokens, one line
per family, ±2 clustered SE, from the --json rows) and attention_over_generation.json/.png (per layer, the
share of attention each token of the held-out descriptions gives to the image). --json keeps, beside the
aggregates, every row's records of the first WITNESSES items (tests/test_figures.py recomputes them).

Your own data: --data FILE.jsonl (the format is in tools/data.py: image, prompt, and references and/or answer
per line) runs the same rows on the file's items and scores captions by CIDEr-D (its difference from none with
a paired-bootstrap standard error over the items) and answers by exact match and, where the line has the human
`answers`, VQA soft accuracy (tools/metrics.py). --results FILE.jsonl keeps every item's output as a JSON line
as it is made; the same command again continues an interrupted run (demo.export writes scenes as such a file).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace

from ..commands import (ArgumentParser, DEFAULT_WEIGHTS, Progress, SPEC_FORM, UserError, add_weights, command_main,
                        parse_first, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.evaluate", description=summary(__doc__))
    add_weights(p, DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--data", metavar="FILE.jsonl",
                   help="evaluate on this file's items (image, prompt, references and/or answer per line) instead of scenes")
    p.add_argument("--results", metavar="FILE.jsonl",
                   help="keep every item's output here as it is made; run again to continue an interrupted evaluation")
    p.add_argument("--quick", action="store_true", help="a few scenes only (what the tests run)")
    p.add_argument("--scenes", type=int, default=None, help="held-out scenes (default 300; --quick: 4)")
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="scene split: test (default; the reported tables) or validation (disjoint: choose K, c on it)")
    p.add_argument("--max-new-tokens", type=int, default=80, help="longest answer generated (default 80)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for CIDEr-D's standard error (default 200)")
    p.add_argument("--plot", metavar="DIR", help="also write pareto.png (and, on scenes, attention_over_generation.png) into DIR")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--extra", action="append", default=[], metavar="SPEC",
                   help=f"add a row (repeatable): {SPEC_FORM}")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, one thread each, sharing the items (default 1; 2 on a 2-core machine halves the time)")
    p.add_argument("--only-extra", action="store_true", help="skip the standard rows except none and the control")
    p.add_argument("--no-control", action="store_true", help="with --only-extra: skip the blank-image control too")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch

from ..cost import flops_per_step, kv_bytes_per_step, vision_flops
from ..files import check_folder, check_outputs, checkpoint_inputs
from ..generation import generate
from ..loading import load_model, read_config, resolve_weights, shipped_predictor_path
from ..plots import require_matplotlib
from ..processing import Processor
from ..pruning import VTW, DyRate, DyRateSchedule, FastV, Method, NoPruning
from ..settings import Context, Origin, make_method
from .baselines import RandomKeep, check_layers, from_spec, spec_layers
from .charts import plot_layers, plot_pareto
from .data import (MAX_SCENES, Item, attention_over_generation, check_fits, data_inputs, kind_swap, random_shape_colour,
                   read_items, scene_items, vocabulary_note, write_json)
from .report import (METRICS, PERCENT, Row, comparison_text, cost_line, family, label, main_comparison, mean_schedule,
                     pareto_points, serving_table, step0_table, step0_text, summarise, table, validation_choices, witnesses)
from .results import Results
from .workers import run_forked

FASTV_RATES = (0.1, 0.25, 0.5, 0.75)  # FastV's front (R = 0.9 lost 25+ points everywhere on validation)
SWEEP = (0.3, 0.5, 0.7)  # DyRate's front: the predictor's decoding confidence c (0.5 the e2e route's median)
# The comparison declared before the test run, the second time (docs/evaluation.md keeps the first, at one
# K for all): each method at its own best, chosen on the validation split by report.validation_choices
# (docs/validation_best.txt). FASTV_BEST is the K and score that won FastV's validation; the standard
# rows are FastV's front there, VTW at K = 4-7, and the shipped predictor (the one DyRate's validation
# chose) over SWEEP, each c with its random and fixed-schedule controls. At matched accuracy -- every one
# of these scores at most its bound below none's -- DyRate's cheapest row against FastV's cheapest at
# FASTV_BEST and against the fixed schedule at DyRate's own mean counts, by LM FLOPs and mean KV bytes
# counted on none's answer tokens; and DyRate's tokens against random ones at its own counts. Targets:
# against FastV, LM FLOPs <= 0.8x and mean KV <= 0.6x; against the schedule, cheaper beyond 2 SE (does
# the adaptive rate pay?); against random, better beyond 2 SE on one of the scores (does its choice pay?).
MATCHED = {"em": 0.01, "f1": 0.01, "verdict": 0.02}
WITNESSES = 2  # items whose per-item records the JSON keeps (report.witnesses)
FASTV_BEST = dict(layer=2, score="mean")
MAIN_COMPARISON = dict(ours="DyRate predictor",
                       theirs={family(FastV(**FASTV_BEST)): {"lm_flops": 0.8, "kv_mean": 0.6},
                               "fixed schedule (DyRate's mean counts)": {"lm_flops": 1.0, "kv_mean": 1.0}},
                       bounds=MATCHED)


def row(method: Method, spec_name: str, weights_dir: str) -> Row:
    """A table row: the method's label and Pareto family (report.label, report.family); a method that
    names no family is drawn under its spec name."""
    return Row(label(method, weights_dir), family(method) or f"{spec_name} (--extra)", method)


def standard_specs(quick: bool, num_layers: int) -> list[str]:
    """The standard table's fixed-setting rows, as --extra specs (fronts, not points): FastV over its
    rates at the K and score that won its validation (FASTV_BEST), and VTW at L/2 and L-1 (VTW withdraws
    the whole image at one layer; on the demo model's validation no K was within the bounds, L-1 lost
    least; its own calibration's choice is printed beside the table)."""
    K, score = FASTV_BEST["layer"], FASTV_BEST["score"]
    specs = [f"fastv:layer={K}:rate={R:g}" + ("" if score == "last" else f":score={score}")
             for R in ((0.5,) if quick else FASTV_RATES)]
    vtw = (num_layers // 2,) if quick else (num_layers // 2, num_layers - 1)  # no K was within the bounds on validation
    return specs + [f"vtw:layer={k}" for k in vtw]


def base_rows(ctx: Context, control: bool = True) -> list[Row]:
    """none, and its blank-image control (the model must answer from the image, not the text)."""
    none = NoPruning()
    return [row(none, "none", ctx.weights_dir)] + ([Row("none, image blanked (control)", "control", none, blank=True)]
                                                    if control else [])


def standard_rows(weights_dir: str, cfg, quick: bool = False) -> list[Row]:
    """base_rows, standard_specs, then DyRate with the shipped predictor over its confidence sweep (its own
    c first), each with its two controls at its K: random tokens at its kept counts (does choosing by
    attention matter?) and the fixed schedule at its mean kept counts, choosing by the same score (does
    choosing the rate per picture and step matter?). Without a shipped predictor, no DyRate rows."""
    ctx = Context(weights_dir, cfg.text_config.num_hidden_layers, cfg)
    dyrate = make_method(DyRate, {}, ctx)[0] if shipped_predictor_path(weights_dir) else None
    specs = standard_specs(quick, ctx.num_layers)
    check_layers(spec_layers(specs), ctx.num_layers,
                 "the standard rows", "evaluate the extra rows alone: --only-extra --extra fastv:layer=1 ...")
    rows = base_rows(ctx) + [parse_extra(spec, ctx) for spec in specs]
    if dyrate is None:
        return rows
    own, K = dyrate.confidence, dyrate.layer
    for c in [own] + ([] if quick else [c for c in SWEEP if abs(c - own) > 1e-9]):
        main = row(replace(dyrate, confidence=c), "dyrate", weights_dir)
        rows += [main, Row(f"random keep, counts of {main.name}", "random (DyRate's counts)",
                           RandomKeep(K), match=main.name),
                 Row(f"fixed schedule, mean counts of {main.name}", "fixed schedule (DyRate's mean counts)",
                     DyRateSchedule(K, (0.0,), dyrate.score), schedule_of=main.name)]
    return rows


def parse_extra(spec: str, ctx: Context) -> Row:
    """An --extra row: NAME[:setting=value...], built by the same parsers and defaults as generate.py's
    flags (a setting the method does not have is refused the same way)."""
    method, _ = from_spec(spec, ctx, Origin("spec", f"--extra {spec}"))
    return row(method, spec.split(":")[0], ctx.weights_dir)


def table_rows(ctx: Context, extra: list[str], only_extra=False, no_control=False, quick=False) -> list[Row]:
    """The rows a run's flags ask for (the JSON records the flags: tests/test_figures.py rebuilds the rows)."""
    extra_rows = [parse_extra(spec, ctx) for spec in extra]  # a bad spec is refused before anything else
    rows = base_rows(ctx, not no_control) if only_extra else standard_rows(ctx.weights_dir, ctx.config, quick)
    return rows + extra_rows


def item_method(row: Row, prompt: Item, matched: dict | None) -> Method:
    """The row's method for one item: random keep draws with the item's seed, and a matched row keeps
    the matched row's kept counts on the same item."""
    if not isinstance(row.method, RandomKeep):
        return row.method
    counts = row.method.counts if matched is None else tuple(matched["kept"])
    return replace(row.method, seed=prompt.seed, counts=counts)


def run_method(model, processor, prompts: list[Item], row: Row, max_new_tokens: int, matched=None, bar=None,
               done=None, sink=None, none=None, is_base=False) -> list[dict]:
    """One record per prompt: the answer, its scores, kept counts per step, FLOPs of the prefill and of
    the decode steps (language model only), KV bytes, seconds. With `none` (method none's records, same
    prompts), the costs are also counted on none's answer, fed to this method (forced_*): a method whose
    answers collapse to a few tokens does not look cheap for that. Records already in `done` are reused;
    new ones are also handed to `sink` (the results file). A record whose answer tokens are none's takes
    its forced costs from its own run, which is that forced run (tests/test_evaluate_data.py)."""
    vis = vision_flops(model.config)
    out = []
    for i, p in enumerate(prompts):
        if done and (row.name, p.id) in done:
            out.append(done[(row.name, p.id)])
            if bar:
                bar.update(1)
            continue
        ids, px = processor.input_ids(p.prompt), processor.pixel_values(p.picture(row.blank))
        method = item_method(row, p, matched[i] if matched is not None else None)
        t0 = time.perf_counter()
        text = processor.text_rows(ids)  # the question's rows: the "mean" and "accumulated" scores' queries
        gen = generate(model, ids, px, max_new_tokens, method, stop_ids=processor.stop_ids, text=text)
        seconds = time.perf_counter() - t0
        answer = processor.decode(gen.tokens)
        flops, kv = flops_per_step(gen.record), kv_bytes_per_step(gen.record)
        rec = {"method": row.name, "id": p.id, "kind": p.kind, "answer": answer, **p.grades(answer),
               "kept": [int(k.sum()) for k in gen.record.kept_masks], "prefill_flops": flops[0] - vis,
               "decode_flops": sum(flops[1:]), "kv_peak": max(kv), "kv_mean": sum(kv) / len(kv), "seconds": seconds}
        if none is not None and none[i].get("tokens"):
            # Fed none's answer, a method that chose exactly those tokens walks its own path again: reuse it.
            same = gen.tokens == none[i]["tokens"]
            forced = gen.record if same else generate(model, ids, px, max_new_tokens, method,
                                                      force=none[i]["tokens"], text=text).record
            f_flops, f_kv = flops_per_step(forced), kv_bytes_per_step(forced)
            rec.update(forced_prefill_flops=f_flops[0] - vis, forced_decode_flops=sum(f_flops[1:]),
                       forced_kv_peak=max(f_kv), forced_kv_mean=sum(f_kv) / len(f_kv))
        if is_base:
            rec["tokens"] = gen.tokens  # what the other rows are forced with
        out.append(rec)
        if sink:
            sink(rec)
        if bar:
            bar.update(1)
    return out


def evaluate_rows(model, processor, prompts, rows: list[Row], max_new_tokens: int, bar=None, done=None,
                  sink=None, known=None) -> dict[str, list[dict]]:
    """Every row on every prompt. -> {row name: records in prompt order}. known: records of rows already
    run on these prompts (none's, a matched row's), reused, not run again."""
    records: dict[str, list[dict]] = dict(known or {})
    for i, row in enumerate(rows):  # rows[0] is method none: the base the others are forced with and measured against
        if row.name in records:
            continue
        matched = records[row.match] if row.match else None
        base = records[rows[0].name] if i else None
        records[row.name] = run_method(model, processor, prompts, row, max_new_tokens, matched, bar, done, sink, base,
                                       is_base=not i)
    return records


def evaluate_parallel(model, processor, items, rows, max_new_tokens: int, workers: int, bar, done=None,
                      sink=None, known=None) -> dict[str, list[dict]]:
    """evaluate_rows over `workers` forked processes, each taking every workers-th item (workers.py)."""
    known = known or {}
    if workers <= 1:
        return evaluate_rows(model, processor, items, rows, max_new_tokens, bar, done, sink, known)
    return run_forked(lambda w, counter, mine: evaluate_rows(model, processor, items[w::workers], rows, max_new_tokens,
                                                             counter, done, sink, mine), len(items), workers, bar, known)


def evaluate_all(model, processor, items, rows, max_new_tokens: int, workers: int, bar, done=None, sink=None):
    """Every row on every item, in two passes: a fixed-schedule control (Row.schedule_of) needs its DyRate
    row's mean kept counts over all the items first. -> (the rows, the schedules filled in; records)."""
    N = model.config.num_image_tokens
    records = evaluate_parallel(model, processor, items, [r for r in rows if not r.schedule_of], max_new_tokens,
                                workers, bar, done, sink)
    rows = list(rows)
    for i, r in enumerate(rows):
        if r.schedule_of:
            rows[i] = replace(r, method=replace(r.method, schedule=mean_schedule(records[r.schedule_of], N)))
            records = evaluate_parallel(model, processor, items, [rows[0], rows[i]], max_new_tokens, workers, bar, done,
                                        sink, known=records)
    return rows, records


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.weights is not None:
        args.weights = resolve_weights(args.weights)  # a folder, or a hub id found in the local cache
    if args.scenes is not None and not 1 <= args.scenes <= MAX_SCENES:
        raise UserError(f"--scenes {args.scenes}: give a positive number of held-out scenes, at most {MAX_SCENES}")
    if args.data is not None and not args.data.strip():
        raise UserError("--data is empty; give a JSONL file (or leave --data out to evaluate on the scenes)")
    if args.data and (args.scenes is not None or args.quick):
        raise UserError("--data replaces the scenes: leave out --scenes and --quick")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if not 1 <= args.workers <= (os.cpu_count() or 1):
        raise UserError(f"--workers {args.workers} must lie in 1..{os.cpu_count() or 1} (this machine's cores)")
    if args.bootstrap < 2:
        raise UserError(f"--bootstrap {args.bootstrap} must be at least 2")
    if args.no_control and not args.only_extra:
        raise UserError("--no-control works with --only-extra (the standard rows always include the control)")
    if args.plot is not None:
        check_folder(args.plot, "--plot")
    inputs = checkpoint_inputs(args.weights) + data_inputs(args.data)
    check_outputs([("--json", args.json), ("--results", args.results)], inputs)
    if args.plot:
        require_matplotlib()
    # Every line of the data file is checked (images opened), and every --extra spec, before the model loads.
    prompts = (read_items(args.data) if args.data else
               scene_items(args.scenes or (4 if args.quick else 300), args.split))
    captioned = {it.cluster for it in prompts if it.references}  # the images with reference captions
    if len(captioned) == 1:
        sys.stderr.write("note: CIDEr-D weighs each n-gram by how rare it is across the set's images (idf); with "
                         "one captioned image every weight is 0, so CIDEr-D is 0.000 for any answer, a copy of the "
                         "reference included. Add captions of more images to score by it.\n")
    cfg = read_config(args.weights)
    ctx = Context(args.weights, cfg.text_config.num_hidden_layers, cfg)
    rows = table_rows(ctx, args.extra, args.only_extra, args.no_control, args.quick)
    names = [r.name for r in rows]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two rows are both {dup!r}; leave out the --extra that repeats a standard row")
    done, sink = None, None
    data_name = (os.path.abspath(args.data) if args.data else
                 f"scenes:{args.scenes or (4 if args.quick else 300)}" + (":validation" if args.split != "test" else ""))
    if args.results:
        header = {"results_of": "dyrate_ref.tools.evaluate", "weights": os.path.abspath(args.weights),
                  "data": data_name, "max_new_tokens": args.max_new_tokens}
        results_file = Results(args.results, header)
        done, sink = results_file.done, results_file.append
        if done:
            print(f"{args.results}: {len(done)} records from an earlier run reused", flush=True)
    proc = Processor(args.weights, cfg)
    check_fits(prompts, proc, cfg.text_config.max_position_embeddings)
    note = vocabulary_note(prompts, proc)
    if note:
        sys.stderr.write(note + "\n")
    if not args.only_extra and not shipped_predictor_path(args.weights):  # every check passed: say it once, now
        sys.stderr.write(f"note: {args.weights} ships no dyrate_predictor.safetensors, so the table has no DyRate "
                         "predictor rows (train one with python -m dyrate_ref.tools.train_predictor, or add --extra "
                         "dyrate:predictor=FILE)\n")
    model = load_model(args.weights, config=cfg)
    reused = len(done or {})
    if reused < len(prompts) * len(rows):  # one generation timed, for the estimate said before the run
        t0 = time.perf_counter()
        generate(model, proc.input_ids(prompts[0].prompt), proc.pixel_values(prompts[0].picture()), args.max_new_tokens,
                 stop_ids=proc.stop_ids)
        sys.stderr.write(cost_line(len(rows), len(prompts), reused, time.perf_counter() - t0) + "\n")
    bar = Progress(len(prompts) * len(rows), "evaluating", " prompts")
    N, vision = model.config.num_image_tokens, vision_flops(model.config)
    rows, records = evaluate_all(model, proc, prompts, rows, args.max_new_tokens, args.workers, bar, done, sink)
    bar.close()
    base = records[rows[0].name]
    results = [(row, summarise(records[row.name], base, prompts, args.bootstrap)) for row in rows]
    comparison = main_comparison(results, records, prompts, **MAIN_COMPARISON)
    if comparison is not None or not args.data:
        print(comparison_text(comparison, declared=not args.data and args.split == "test") + "\n")
    print(table(results, N, vision, args.bootstrap))
    json_rows = [{"method": row.name, "family": row.family, **s,
                  **({"schedule": list(row.method.schedule)} if row.schedule_of else {})} for row, s in results]
    choices = validation_choices(json_rows, MATCHED) if args.split == "validation" and not args.data else None
    if choices:
        print("\nEach method's own best on the validation split (report.validation_choices: the cheapest row by LM "
              "FLOPs, then mean KV, on none's answer tokens, within the matched-accuracy bounds, over all of that "
              "method's rows, whatever their K and score):")
        for kind, chosen in choices.items():
            print(f"  {kind}: " + ("no row within the bounds" if chosen is None else
                                   f"{chosen['method']}: LM FLOPs {chosen['lm_flops_forced']:.3f}, mean KV "
                                   f"{chosen['kv_mean_forced']:.3f} of none's"))
    # Where DyRate cuts at the prefill, per picture: the declared comparison's DyRate row, else the validated
    # one, else the first (the shipped predictor at its own c).
    ours = [r for r in json_rows if r["family"] == MAIN_COMPARISON["ours"]]
    dyrate_row = ((comparison or {}).get(MAIN_COMPARISON["ours"]) or (choices or {}).get(MAIN_COMPARISON["ours"])
                  or (ours[0] if ours else None))
    step0 = None
    if dyrate_row and not args.data:
        step0 = step0_table(records[dyrate_row["method"]], prompts, N)
        print("\n" + step0_text(step0, dyrate_row["method"]))
    if not args.only_extra:  # what VTW's own calibration chose for these weights (the rows sweep K)
        vtw, origins = make_method(VTW, {}, ctx)
        chose = f"K={vtw.layer}" if origins["layer"].kind != "fallback" else "no layer"
        print(f"\nVTW's calibration for these weights: {chose} ({origins['layer'].text}); the VTW rows sweep K.")
    keys = [k for k in ("em", "vqa", "verdict", "f1", "cider") if k in results[0][1]][:3]
    scale = {k: 100 if k in PERCENT else 1 for k in keys}
    ylabels = {k: METRICS[k] + (" (held-out questions)" if not args.data and k == "em" else "") for k in keys}
    print("\n" + serving_table(results, records, N, cfg.text_config.num_hidden_layers))
    what = args.data if args.data else f"{len(prompts)} held-out scene prompts"
    swap = None
    if not args.data:  # does the model read the question? (demo/reading.py)
        swap = kind_swap(model, proc, max(10, min(100, len(prompts) // 5)))
        guess = random_shape_colour(prompts)
        print(f"\nkind-swap sensitivity (mean symmetric KL of the answer word when only the asked shape kind changes, "
              f"same picture): {swap:.3f} nats; 0 means the question's kind word is ignored, as it is by a model that "
              f"names a random shape of the scene (which would score {100 * guess:.1f} % on these colour questions)")
    if args.json:
        figures = {"data": data_name, "prompts": len(prompts), "weights": os.path.basename(os.path.normpath(args.weights)),
                   "rows": json_rows}
        if comparison is not None:
            figures["main_comparison"] = comparison
        if choices:
            figures["validation_choices"] = choices
        if step0:
            figures["step0"] = step0
        if swap is not None:
            figures["kind_swap_kl"] = swap
            figures["random_shape_colour"] = random_shape_colour(prompts)
        write_json(args.json, {**figures, "max_new_tokens": args.max_new_tokens, "extra": args.extra,
                               "only_extra": args.only_extra, "no_control": args.no_control,
                               "witnesses": witnesses(records, WITNESSES)})
    if args.plot:  # each figure drawn from the data it writes beside it (the Pareto points: the JSON's rows)
        os.makedirs(args.plot, exist_ok=True)
        plot_pareto(os.path.join(args.plot, "pareto.png"), pareto_points(json_rows, keys, scale, ylabels),
                    f"Accuracy against cost on {what}")
    if args.plot and not args.data:
        out = os.path.join(args.plot, "attention_over_generation")
        write_json(out + ".json", attention_over_generation(model, proc, prompts, witnesses=WITNESSES))
        with open(out + ".json", encoding="utf-8") as f:  # the picture is what the file says
            data = json.load(f)
        plot_layers(out + ".png", data, "Share of attention that each generated token gives to the image, per layer")
        means = torch.tensor(data["means"])
        first, last = means[:, :3].mean(1), means[:, -5:].mean(1)
        print(f"\nwrote {out}.png; attention mass on the image, first 3 answer tokens -> last 5 (positions with >= 5 answers), per layer: "
              + ", ".join(f"L{i} {a:.3f}->{b:.3f}" for i, (a, b) in enumerate(zip(first.tolist(), last.tolist()))))
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
