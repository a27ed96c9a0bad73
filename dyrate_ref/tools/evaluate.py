"""Accuracy against cost for every method, on held-out generated scenes.

  python -m dyrate_ref.tools.evaluate [--weights DIR] [--quick] [--scenes N] [--plot DIR] [--json FILE]
  python -m dyrate_ref.tools.evaluate --data FILE.jsonl [--results OUT.jsonl] [--weights DIR] ...

One row per method and setting (standard_rows()): none and a control with every picture blanked (the
model must answer from the image, not the text); FastV (K=2, R=0.5, 0.75, 0.9; K=1, R=0.5, 0.75);
random keep of 25 % of the tokens at K=1 (does choosing by attention matter?); VTW at the weights'
calibrated layer; DyRate with the shipped predictor at its own decoding confidence and a sweep; random
keep at the predictor's own kept counts; DyRate with a fixed rising schedule at K=2 and K=1; the
attention-mass rule (keep the fewest tokens holding a share p of the step's visual attention).
--split validation runs them on scenes disjoint from the reported test split, to choose settings on.

Accuracy table: exact match overall and per question kind, description object-F1 ((colour, shape,
position) triples) and CIDEr-D, each method's paired difference from none with its standard error
clustered by picture (the questions about one scene are not independent), and how often the answer is
exactly none's. Costs are counted twice: on each method's own answers, and on none's answer tokens fed
to the method (a method whose answers collapse would otherwise look cheap). The kind-swap sensitivity
(demo/reading.py: does the model read the question?) follows the table.

Cost table, relative to none: kept visual tokens, language-model FLOPs
(FastV's way of counting: decoder matmuls over every step, split into prefill and decode; the vision
tower + projector is the same for every method and stated once), KV-cache bytes (peak and mean over the
answer's steps) and wall-clock.

--plot DIR writes pareto.png (QA accuracy against LM FLOPs and against mean KV bytes, every row a point,
±1 SE) and attention_over_generation.png (the share of attention each generated token gives to the
image, per decoder layer, over the held-out descriptions: the observation DyRate builds on).

Your own data: --data FILE.jsonl (the format is in tools/data.py: image, prompt, and references and/or
answer per line) runs the same rows on the file's items and scores captions by CIDEr-D (its difference
from none with a paired-bootstrap standard error over the items) and answers by exact match and, where the line has the
human `answers`, VQA soft accuracy (tools/metrics.py). --results FILE.jsonl keeps every item's output
as a JSON line as soon as it is made; run the same command again after an interruption and it
continues where it stopped. `python -m dyrate_ref.demo.export` writes held-out scenes as such a file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
import zlib
from dataclasses import dataclass, field, fields, replace

import torch
from PIL import Image

from ..cost import depth_matched_layer, serving_schedule, vision_flops
from ..demo.reading import kind_swap_kl, kind_swap_pairs
from ..demo.scenes import TEST_SEED, VALIDATION_SEED, Scene, eval_set, object_f1
from ..errors import ArgumentParser, UserError, command_main
from ..files import check_folder, check_outputs, write_json
from ..generation import forward_no_cache, generate
from ..loading import DEFAULT_WEIGHTS, load_model, read_config, weight_inputs
from ..model import TextConfig
from ..plots import plot_layers, plot_pareto, require_matplotlib
from ..predictor import shipped_predictor_path
from ..processing import Processor, open_image
from ..progress import Progress
from ..pruning import (METHODS, VTW, Context, DyRate, FastV, Method, NoPruning, Origin, method_class, parse_settings,
                       visual_span)
from .baselines import BASELINES, AttentionMass, RandomKeep
from .data import read_items
from .metrics import CiderD, bootstrap_cider_difference, caption_words, exact_match, vqa_accuracy

RISING = (0.5, 0.6, 0.7, 0.8, 0.9)
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)  # DyRate decoding confidences drawn as the predictor's curve


def registry() -> dict:
    """What --extra can build: the methods (pruning.METHODS) and the evaluation baselines."""
    return {**METHODS, **BASELINES}


@dataclass(frozen=True)
class Row:
    name: str
    family: str  # one marker per family in the Pareto plot
    method: Method
    blank: bool = False  # the control: every picture replaced by its empty background
    match: str | None = None  # keep as many tokens at each step as this row did (a method with `counts`)


def standard_rows(weights_dir: str, cfg, quick: bool = False) -> list[Row]:
    """The standard table: none and its blank-image control; FastV at several R; VTW at its calibrated
    layer; DyRate with the shipped predictor (its own confidence and a sweep) and a fixed rising
    schedule; the attention-mass rule; random keep at the shipped predictor's counts."""
    ctx = Context(weights_dir, cfg.text_config.num_hidden_layers, cfg)
    rows = [Row("none", "none", NoPruning()), Row("none, image blanked (control)", "control", NoPruning(), blank=True)]
    rows += [Row(f"FastV K=2 R={R}", "FastV K=2", FastV(2, R)) for R in ((0.5,) if quick else (0.5, 0.75, 0.9))]
    if not quick:  # layer 0's attention (K = 1) against layer 1's, and against random tokens at the same count
        rows += [Row(f"FastV K=1 R={R}", "FastV K=1", FastV(1, R)) for R in (0.5, 0.75)]
        rows.append(Row("random keep K=1 R=0.75", "random (fixed count)", RandomKeep(1, ratio=0.75)))
    vtw, origins = VTW.resolve({}, ctx)
    where = "calibrated" if origins["layer"].kind == "file" else "L/2"
    rows.append(Row(f"VTW K={vtw.layer} ({where})", "VTW", vtw))
    if shipped_predictor_path(weights_dir):
        dyrate, _ = DyRate.resolve({}, ctx)
        main_name = f"DyRate K={dyrate.layer} predictor (c={dyrate.confidence:g})"
        rows.append(Row(main_name, "DyRate predictor", dyrate))
        for c in () if quick else SWEEP:
            if abs(c - dyrate.confidence) > 1e-9:
                rows.append(Row(f"DyRate K={dyrate.layer} predictor (c={c:g})", "DyRate predictor",
                                replace(dyrate, confidence=c)))
        rows.append(Row(f"random keep, counts of {main_name}", "random (matched counts)", RandomKeep(dyrate.layer),
                        match=main_name))
    rows.append(Row(f"DyRate K=2 rising {','.join(map(str, RISING))}", "DyRate fixed schedule", DyRate(2, rates=RISING)))
    if not quick:  # the same schedule where this model's attention picks the shapes (layer 0's, K = 1)
        rows.append(Row(f"DyRate K=1 rising {','.join(map(str, RISING))}", "DyRate fixed schedule",
                        DyRate(1, rates=RISING)))
    rows += [Row(f"attention mass K=2 p={p}", "attention mass", AttentionMass(2, p))
             for p in ((0.8,) if quick else (0.5, 0.8, 0.95))]
    return rows


EXTRA_HELP = ("NAME[:setting=value...], NAME a method or baseline (none, fastv, vtw, dyrate, mass, random, ...), the "
              "settings its own, as generate.py's flags (e.g. fastv:layer=1:ratio=0.75, dyrate:rates=0.5,0.9, "
              "dyrate:predictor=FILE:confidence=0.6, random:layer=1:ratio=0.75, mass:share=0.8)")


def parse_extra(spec: str, ctx: Context) -> Row:
    """An --extra row: NAME[:setting=value...], built by the same classes, parsers and resolution as
    generate.py's flags (a setting the method does not have is refused the same way)."""
    name, *pairs = spec.split(":")
    known = registry()
    if name not in known or not all("=" in p for p in pairs):
        raise UserError(f"--extra {spec!r}: use {EXTRA_HELP}")
    cls = method_class(name, known)
    texts = dict(p.split("=", 1) for p in pairs)
    method, _ = cls.resolve(parse_settings(cls, texts, known, where=f"--extra {spec}: "), ctx,
                            given_as=Origin("spec", f"--extra {spec}"))
    label = method.describe().removeprefix("method ")
    return Row(label, f"{name} (--extra)", method)


@dataclass(frozen=True)
class Prompt:
    """One evaluation item, from the scene world or from a data file: the prompt and what it is scored
    against. Scene items carry their scene (drawn on demand; object-F1 and the blank control read it)."""
    id: str  # unique within the set: the key of the results file
    text: str
    kind: str  # scenes: a QUESTION_KINDS entry or "describe"; files: "caption" or "answer"
    seed: int  # seeds a random baseline per item, so a subset of the items draws what the whole set would
    cluster: str  # items that share a picture: standard errors are clustered by it
    references: tuple[str, ...] = ()  # captions: CIDEr-D
    answer: str | None = None  # exact match
    answers: tuple[str, ...] = ()  # VQA accuracy
    image_path: str | None = None  # files
    scene: Scene | None = field(default=None, compare=False)  # scenes

    def picture(self, blank: bool = False) -> Image.Image:
        """The image; blank: the control's image without content (the scene's empty background, or a
        grey picture of the file image's size)."""
        if self.scene is None:
            img = open_image(self.image_path)
            return Image.new("RGB", img.size, (128, 128, 128)) if blank else img
        return (replace(self.scene, shapes=()) if blank else self.scene).draw()

    def scores(self, text: str) -> dict:
        """What can be scored from this answer alone (CIDEr-D needs the whole set: see summarise)."""
        out = {}
        if self.answer is not None:
            out["em"] = exact_match(text, self.answer)
        if self.answers:
            out["vqa"] = vqa_accuracy(text, list(self.answers))
        if self.scene is not None and self.kind == "describe":
            out["f1"] = object_f1(text, self.scene)
        return out


def scene_prompts(n_scenes: int, split: str = "test") -> list[Prompt]:
    """The held-out scene world as evaluation items: questions scored by exact match, descriptions by
    object-F1 (and CIDEr-D against the ground-truth description), clustered by scene. split "test": the
    scenes every reported table uses; "validation": a disjoint set, for choosing settings first."""
    out = []
    for it in eval_set(n_scenes, TEST_SEED if split == "test" else VALIDATION_SEED):
        gold = dict(references=(it.answer,)) if it.kind == "describe" else dict(answer=it.answer)
        out.append(Prompt(f"scene{it.scene.seed}:{it.kind}", it.question, it.kind, it.scene.seed % 1_000_003,
                          f"scene{it.scene.seed}", scene=it.scene, **gold))
    return out


def file_prompts(items) -> list[Prompt]:
    """A data file's items (tools/data.py), clustered by image."""
    return [Prompt(it.id, it.prompt, "caption" if it.references else "answer", zlib.crc32(it.id.encode()),
                   it.image_path, references=it.references, answer=it.answer, answers=it.answers,
                   image_path=it.image_path) for it in items]


class Results:
    """--results FILE.jsonl: a header line naming what was evaluated, then one JSON line per (method, item)
    written as soon as it is made. Opening an existing file reuses its records (resume); a file written
    for other weights, data or settings is refused rather than mixed. Each line is one write() on an
    O_APPEND descriptor, which a local Linux file system places whole at the end, so the lines of forked
    workers do not mix; a line cut by an interruption is dropped on resume."""

    def __init__(self, path: str, header: dict):
        self.done: dict[tuple[str, str], dict] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            *lines, cut = data.split(b"\n")  # `cut`: what follows the last newline, a line an interruption cut
            n = 1
            try:
                first = json.loads(lines[0]) if lines else None
                if not isinstance(first, dict) or first.get("results_of") != header["results_of"]:
                    raise UserError(f"--results {path} is not a results file of this command; give another file")
                for key, value in header.items():
                    if first.get(key) != value:
                        raise UserError(f"--results {path} was written with {key} {first.get(key)!r}, not {value!r}; "
                                        "give another file or remove it to start over")
                for n, line in enumerate(lines[1:], 2):
                    rec = json.loads(line)
                    self.done[(rec["method"], rec["id"])] = rec
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise UserError(f"--results {path}, line {n} is not a record of this command; "
                                "give another file or remove it to start over") from None
            if cut:
                os.truncate(path, len(data) - len(cut))
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
            self.append(header)

    def append(self, rec: dict):
        os.write(self.fd, (json.dumps(rec) + "\n").encode())


def item_method(row: Row, prompt: Prompt, matched: dict | None) -> Method:
    """The row's method for one item: each setting its class marks per_item is set here -- "seed" to
    the item's seed, "counts" to the matched row's kept counts on the same item."""
    per_item = {"seed": prompt.seed, "counts": None if matched is None else tuple(matched["kept"])}
    changes = {f.name: per_item[f.metadata["per_item"]] for f in fields(row.method)
               if f.metadata["per_item"] and per_item[f.metadata["per_item"]] is not None}
    return replace(row.method, **changes) if changes else row.method


def run_method(model, processor, prompts: list[Prompt], row: Row, max_new_tokens: int, matched=None, bar=None,
               done=None, sink=None, none=None, is_base=False) -> list[dict]:
    """One record per prompt: the answer, its scores, kept counts per step, FLOPs of the prefill and of
    the decode steps (language model only), KV bytes, seconds. With `none` (method none's records, same
    prompts), the costs are also counted on none's answer, fed to this method (forced_*): a method whose
    answers collapse to a few tokens does not look cheap for that. Records already in `done` are reused;
    new ones are also handed to `sink` (the results file)."""
    vis = vision_flops(model.config)
    out = []
    for i, p in enumerate(prompts):
        if done and (row.name, p.id) in done:
            out.append(done[(row.name, p.id)])
            if bar:
                bar.update(1)
            continue
        ids, px = processor.input_ids(p.text), processor.pixel_values(p.picture(row.blank))
        method = item_method(row, p, matched[i] if matched is not None else None)
        t0 = time.perf_counter()
        gen = generate(model, ids, px, max_new_tokens, method, stop_ids=processor.stop_ids)
        seconds = time.perf_counter() - t0
        text = processor.decode(gen.tokens)
        flops, kv = gen.record.flops, gen.record.kv_bytes
        rec = {"method": row.name, "id": p.id, "kind": p.kind, "answer": text, **p.scores(text),
               "kept": [int(k.sum()) for k in gen.record.keep], "prefill_flops": flops[0] - vis,
               "decode_flops": sum(flops[1:]), "kv_peak": max(kv), "kv_mean": sum(kv) / len(kv), "seconds": seconds}
        if none is not None and none[i].get("tokens"):
            forced = generate(model, ids, px, max_new_tokens, method, force=none[i]["tokens"]).record
            f_flops, f_kv = forced.flops, forced.kv_bytes
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
                  sink=None) -> dict[str, list[dict]]:
    """Every row on every prompt. -> {row name: records in prompt order}."""
    records: dict[str, list[dict]] = {}
    for i, row in enumerate(rows):  # rows[0] is method none: the base the others are forced with and measured against
        matched = records[row.match] if row.match else None
        base = records[rows[0].name] if i else None
        records[row.name] = run_method(model, processor, prompts, row, max_new_tokens, matched, bar, done, sink, base,
                                       is_base=not i)
    return records


class _Counter:
    """A progress bar's update() for a worker process: counts into a shared integer."""

    def __init__(self, value):
        self.value = value

    def update(self, n=1):
        with self.value.get_lock():
            self.value.value += n


def evaluate_parallel(model, processor, items, rows, max_new_tokens: int, workers: int, bar, done=None,
                      sink=None) -> dict[str, list[dict]]:
    """evaluate_rows over `workers` forked processes, one thread each, each taking every workers-th item;
    the records are put back in item order. (Fork shares the loaded model; nothing is pickled but the
    records.)"""
    if workers <= 1:
        return evaluate_rows(model, processor, items, rows, max_new_tokens, bar, done, sink)
    ctx = multiprocessing.get_context("fork")
    count, results = ctx.Value("i", 0), ctx.Queue()

    def work(w):
        torch.set_num_threads(1)
        results.put((w, evaluate_rows(model, processor, items[w::workers], rows, max_new_tokens, _Counter(count),
                                             done, sink)))

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
        bar.update(count.value - shown)
        shown = count.value
    for p in procs:
        p.join()
    merged = {}
    for row in rows:
        merged[row.name] = [None] * len(items)
        for w, recs in shards.items():
            merged[row.name][w::workers] = recs[row.name]
    return merged


def paired(a: list[float], b: list[float], clusters: list[str] | None = None) -> tuple[float, float]:
    """Mean of b - a over the same items under two methods, and its standard error, clustered: items
    that share a picture (several questions about one scene) are not independent, so the deviations are
    summed within each cluster first (the cluster-robust SE; with one item per cluster it is the usual
    paired SE)."""
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else 0.0), 0.0
    clusters = clusters or [str(i) for i in range(n)]
    ids = {c: j for j, c in enumerate(dict.fromkeys(clusters))}
    G = len(ids)
    if G < 2:
        return float(d.mean()), 0.0
    sums = torch.zeros(G, dtype=torch.float64).index_add_(0, torch.tensor([ids[c] for c in clusters]), d - d.mean())
    return float(d.mean()), float((G / (G - 1) * sums.pow(2).sum()).sqrt() / n)


def costs(records: list[dict], base: list[dict]) -> dict:
    """Mean kept visual tokens, and costs relative to `base` (none): LM FLOPs (total, prefill, decode),
    KV bytes (peak, mean over the answer's steps), wall-clock."""
    total = lambda recs, key: sum(r[key] for r in recs)  # noqa: E731
    lm = total(records, "prefill_flops") + total(records, "decode_flops")
    lm_base = total(base, "prefill_flops") + total(base, "decode_flops")
    forced = {}
    if all("forced_kv_mean" in r for r in records) and "tokens" in base[0]:
        f_lm = total(records, "forced_prefill_flops") + total(records, "forced_decode_flops")
        forced = {"lm_flops_forced": f_lm / lm_base, "kv_mean_forced": total(records, "forced_kv_mean") / total(base, "kv_mean"),
                  "kv_peak_forced": total(records, "forced_kv_peak") / total(base, "kv_peak")}
    elif records is base:
        forced = {"lm_flops_forced": 1.0, "kv_mean_forced": 1.0, "kv_peak_forced": 1.0}
    return {**forced, "kept": sum(sum(r["kept"]) for r in records) / sum(len(r["kept"]) for r in records),
            "lm_flops": lm / lm_base,
            "prefill_flops": total(records, "prefill_flops") / total(base, "prefill_flops"),
            "decode_flops": total(records, "decode_flops") / max(1, total(base, "decode_flops")),
            "kv_peak": total(records, "kv_peak") / total(base, "kv_peak"),
            "kv_mean": total(records, "kv_mean") / total(base, "kv_mean"),
            "seconds": total(records, "seconds") / total(base, "seconds"),
            "lm_flops_per_prompt": lm / len(records),
            "agree": sum(r["answer"] == b["answer"] for r, b in zip(records, base)) / len(records)}


METRICS = {"em": "exact match %", "vqa": "VQA accuracy %", "f1": "describe object-F1", "cider": "CIDEr-D"}
PERCENT = {"em", "vqa"}


def summarise(records: list[dict], base: list[dict], prompts: list[Prompt], bootstrap: int = 200) -> dict:
    """Every score the items allow -- exact match overall and per kind, VQA accuracy, object-F1, CIDEr-D
    (idf from the references; its difference from `base` by a paired bootstrap) -- each with its paired,
    scene-clustered difference from `base` (none), agreement with base's answers, and costs."""
    s = {}
    kinds = sorted({p.kind for p in prompts if p.answer is not None})
    groups = [("em", None)] + ([("em", k) for k in kinds] if len(kinds) > 1 else []) + [("vqa", None), ("f1", None)]
    for key, kind in groups:
        idx = [i for i, r in enumerate(records) if key in r and (kind is None or prompts[i].kind == kind)]
        if not idx:
            continue
        name = key if kind is None else f"{key}_{kind}"
        mine, theirs = [records[i][key] for i in idx], [base[i][key] for i in idx]
        s[name], s[name + "_n"] = sum(mine) / len(mine), len(mine)
        s[name + "_delta"], s[name + "_se"] = paired(theirs, mine, [prompts[i].cluster for i in idx])
    caps = [i for i, p in enumerate(prompts) if p.references]
    if caps:
        refs = [[caption_words(r) for r in prompts[i].references] for i in caps]
        mine, theirs = ([caption_words(recs[i]["answer"]) for i in caps] for recs in (records, base))
        s["cider"] = CiderD(refs).corpus(mine)[0]
        s["cider_n"] = len(caps)
        s["cider_delta"], s["cider_se"] = bootstrap_cider_difference(refs, theirs, mine, reps=bootstrap)
    return {**s, **costs(records, base)}


def fmt(s: dict, key: str, scale: float = 100, digits: int = 1) -> str:
    return f"{scale * s[key]:.{digits}f}"


def cost_table(results: list[tuple[Row, dict]], N: int, vision: int) -> str:
    base = results[0][1]
    cost = [f"| method | kept visual tokens (of {N}) | LM FLOPs | prefill FLOPs | decode FLOPs | peak KV | mean KV "
            "| LM FLOPs on none's answers | mean KV on none's answers | wall-clock |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, s in results:
        fl, kv = (f"{s['lm_flops_forced']:.3f}", f"{s['kv_mean_forced']:.3f}") if "lm_flops_forced" in s else ("", "")
        cost.append(f"| {row.name} | {s['kept']:.1f} | {s['lm_flops']:.3f} | {s['prefill_flops']:.3f} | "
                    f"{s['decode_flops']:.3f} | {s['kv_peak']:.3f} | {s['kv_mean']:.3f} | {fl} | {kv} | {s['seconds']:.3f} |")
    note = (f"\nCosts are relative to none: language-model matmul FLOPs (none: {base['lm_flops_per_prompt'] / 1e6:.1f} "
            f"MFLOPs per prompt on average; the vision tower and projector add {vision / 1e6:.1f} MFLOPs per image for "
            "every method), KV-cache bytes (peak, and mean over the answer's steps) and wall-clock on this machine, "
            "each counted on the method's own answers; the two columns 'on none's answers' count them on none's "
            "answer tokens fed to the method, so that a method whose answers collapse does not look cheap. "
            "Δ: paired difference from none over the same items, ± one standard error; a difference within two "
            "standard errors is not a difference.")
    return "\n".join(cost) + note


def table(results: list[tuple[Row, dict]], N: int, vision: int, bootstrap: int) -> str:
    """Accuracy (each score the items allow, with its paired difference from none) and cost."""
    base = results[0][1]
    cols = [k for k in ("em", "vqa", "f1", "cider") if k in base]
    kinds = [k[3:] for k in base if k.startswith("em_") and not k.endswith(("_n", "_delta", "_se"))]
    head = ("| method | " + " | ".join(f"{METRICS[k]} | Δ vs none (±SE)" for k in cols)
            + "".join(f" | {k} %" for k in kinds) + " | same answer as none % |")
    acc = [head, "|" + "---|" * (head.count("|") - 1)]

    def cell(s, k):
        scale, digits = (100, 1) if k in PERCENT else (1, 3)
        return f"{scale * s[k]:.{digits}f} | {scale * s[k + '_delta']:+.{digits}f} ± {scale * s[k + '_se']:.{digits}f}"
    for row, s in results:
        acc.append(f"| {row.name} | " + " | ".join(cell(s, k) for k in cols)
                   + "".join(f" | {100 * s['em_' + k]:.1f}" for k in kinds) + f" | {fmt(s, 'agree')} |")
    counts = ", ".join(f"{base[k + '_n']} items scored by {METRICS[k].replace(' %', '')}" for k in cols)
    notes = ("Standard errors are clustered by picture (several questions about one image are not independent)."
             + (f" CIDEr-D's: a paired bootstrap over the caption items ({bootstrap} resamples, the idf the whole "
                "set's)." if "cider" in cols else ""))
    return f"{counts}. {notes}\n\n" + "\n".join(acc) + "\n\n" + cost_table(results, N, vision)


# LLaVA-1.5-7B at float16 on an 80 GB GPU, for the serving arithmetic (cost.serving): 7.06 B parameters,
# 576 visual tokens in a prompt of ~616, a 64-token answer.
SERVE_7B = dict(N=576, P=616, T=64, weight_bytes=7.06e9 * 2, gpu_bytes=80e9)


def kept_schedule(records: list[dict], N: int) -> list[float]:
    """The mean kept share of the N visual tokens at each answer step, over the items that reach it."""
    T = max(len(r["kept"]) for r in records)
    return [sum(r["kept"][t] for r in records if len(r["kept"]) > t) / N / sum(len(r["kept"]) > t for r in records)
            for t in range(T)]


def serving_table(results: list[tuple[Row, dict]], records: dict, N: int, L: int) -> str:
    """What each method would buy a server at LLaVA-1.5-7B's shapes: an analytic model (cost.serving_schedule)
    fed with the kept share each method reached here at every answer step, K mapped by depth."""
    tc, c = TextConfig(), SERVE_7B  # TextConfig's defaults are Llama-7B's shapes
    L7 = tc.num_hidden_layers
    lines = ["| method | K here → on 7B | kept share at steps 0 / 4 / 16 (measured here) | bytes read per decode step "
             "vs none, batch 1 | batch 8 | batch 64 | KV share of those bytes at batch 64 | largest batch in 80 GB |",
             "|---|---|---|---|---|---|---|---|"]
    base = {B: serving_schedule(tc, depth_matched_layer(2, L, L7), c["N"], c["P"], [1.0], c["T"], c["weight_bytes"],
                                c["gpu_bytes"], B) for B in (1, 8, 64)}
    for row, s in results:
        if row.blank:
            continue
        K7 = depth_matched_layer(row.method.layer, L, L7)
        sched = kept_schedule(records[row.name], N)
        got = {B: serving_schedule(tc, K7, c["N"], c["P"], sched, c["T"], c["weight_bytes"], c["gpu_bytes"], B)
               for B in (1, 8, 64)}
        at = " / ".join(f"{sched[min(t, len(sched) - 1)]:.2f}" for t in (0, 4, 16))
        lines.append(f"| {row.name} | {row.method.layer} → {K7} | {at} | " + " | ".join(
            f"{got[B]['bytes_per_step'] / base[B]['bytes_per_step']:.3f}" for B in (1, 8, 64))
            + f" | {got[64]['kv_share']:.2f} | {got[64]['max_batch']} |")
    return (f"Analytic serving model (not measured): LLaVA-1.5-7B in float16 on an 80 GB GPU, 576 visual tokens in "
            f"a 616-token prompt, a {c['T']}-token answer; each method's kept share at every answer step as measured "
            f"above (the last measured step's share repeats to the end); K mapped by depth (K of this model's {L} "
            f"layers -> the same share of 7B's {L7}); bytes per step averaged over the answer, the largest batch "
            "from the cache's peak.\n\n" + "\n".join(lines))


def pareto_points(results: list[tuple[Row, dict]], key: str = "em", ylabel: str = "exact match % (held-out questions)",
                  scale: float = 100) -> list[dict]:
    points = []
    for row, s in results:
        if row.blank:
            continue
        for panel, x in (("LM FLOPs relative to none", s["lm_flops"]), ("mean KV-cache bytes relative to none", s["kv_mean"])):
            points.append({"panel": panel, "method": row.family, "label": row.name, "x": x, "y": scale * s[key],
                           "yerr": scale * s[key + "_se"], "ylabel": ylabel})
    return points


@torch.no_grad()
def attention_over_generation(model, processor, prompts, max_items: int = 40, min_count: int = 5):
    """Share of attention from generated token t to the visual tokens, per layer, over the model's own
    unpruned descriptions (teacher-forced, one no-cache forward each). -> means, standard errors [L, T]
    and counts [T], for the positions at least min_count answers reach."""
    L = model.config.text_config.num_hidden_layers
    per_answer = []  # [L, T_i] each
    for p in [i for i in prompts if i.kind == "describe"][:max_items]:
        ids, px = processor.input_ids(p.text), processor.pixel_values(p.picture())
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
                   help=f"add a row (repeatable): {EXTRA_HELP}")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, one thread each, sharing the items (default 1; 2 on a 2-core machine halves the time)")
    p.add_argument("--only-extra", action="store_true", help="skip the standard rows except none and the control")
    p.add_argument("--no-control", action="store_true", help="with --only-extra: skip the blank-image control too")
    args = p.parse_args(argv)
    if args.scenes is not None and args.scenes < 1:
        raise UserError(f"--scenes {args.scenes}: give a positive number of held-out scenes")
    if args.data and (args.scenes is not None or args.quick):
        raise UserError("--data replaces the scenes: leave out --scenes and --quick")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.bootstrap < 2:
        raise UserError(f"--bootstrap {args.bootstrap} must be at least 2")
    if args.no_control and not args.only_extra:
        raise UserError("--no-control works with --only-extra (the standard rows always include the control)")
    if args.plot:
        check_folder(args.plot, "--plot")
    inputs = [("a file the --weights folder reads", f) for f in weight_inputs(args.weights)] + [("the --data file", args.data)]
    check_outputs([("--json", args.json), ("--results", args.results)], inputs)
    if args.plot:
        require_matplotlib()
    # Every line of the data file is checked (images opened), and every --extra spec, before the model loads.
    prompts = (file_prompts(read_items(args.data)) if args.data else
               scene_prompts(args.scenes or (4 if args.quick else 300), args.split))
    cfg = read_config(args.weights)
    ctx = Context(args.weights, cfg.text_config.num_hidden_layers, cfg)
    extra = [parse_extra(spec, ctx) for spec in args.extra]
    if args.only_extra:
        rows = [Row("none", "none", NoPruning())] + ([] if args.no_control else
                                                      [Row("none, image blanked (control)", "control", NoPruning(),
                                                           blank=True)])
    else:
        rows = standard_rows(args.weights, cfg, args.quick)
    rows += extra
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
    model = load_model(args.weights, config=cfg)
    proc = Processor(args.weights, model.config)
    bar = Progress(len(prompts) * len(rows), "evaluating", " prompts")
    records = evaluate_parallel(model, proc, prompts, rows, args.max_new_tokens, args.workers, bar, done, sink)
    bar.close()
    base = records[rows[0].name]
    N, vision = model.config.num_image_tokens, vision_flops(model.config)
    results = [(row, summarise(records[row.name], base, prompts, args.bootstrap)) for row in rows]
    print(table(results, N, vision, args.bootstrap))
    key = next(k for k in ("em", "vqa", "f1", "cider") if k in results[0][1])
    scale = 100 if key in PERCENT else 1
    ylabel = METRICS[key] + (" (held-out questions)" if not args.data and key == "em" else "")
    print("\n" + serving_table(results, records, N, cfg.text_config.num_hidden_layers))
    what = args.data if args.data else f"{len(prompts)} held-out scene prompts"
    swap = None
    if not args.data:  # does the model read the question? (demo/reading.py)
        swap = kind_swap_kl(model, proc, kind_swap_pairs(max(10, min(100, len(prompts) // 5))))
        print(f"\nkind-swap sensitivity (mean symmetric KL of the first answer token when only the asked shape kind "
              f"changes, same picture): {swap:.3f} nats; 0 means the question's kind word is ignored")
    if args.json:
        figures = {"data": data_name, "prompts": len(prompts), "weights": os.path.basename(os.path.normpath(args.weights)),
                   "rows": [{"method": row.name, "family": row.family, **s} for row, s in results]}
        if swap is not None:
            figures["kind_swap_kl"] = swap
        write_json(args.json, figures)
    if args.plot:
        plot_pareto(os.path.join(args.plot, "pareto.png"), pareto_points(results, key, ylabel, scale),
                    f"{ylabel.split(' (')[0]} against cost on {what}")
    if args.plot and not args.data:
        means, sems, counts = attention_over_generation(model, proc, prompts)
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
