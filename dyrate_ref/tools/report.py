"""The evaluation's figures from its records: paired differences with standard errors clustered by
picture, costs relative to none, the accuracy, cost and serving tables, the Pareto points. Pure
arithmetic on lists of records (one dict per item and method, as tools/evaluate.py makes them), so each
figure can be checked by hand on a toy set (tests/test_report.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import os

from .serving import depth_matched_layer, serving_schedule
from ..model import TextConfig
from ..loading import shipped_predictor_path
from ..pruning import VTW, DyRate, DyRateSchedule, FastV, Method, NoPruning
from ..settings import describe
from .baselines import AttentionMass, RandomKeep
from .data import WORLD, Item
from .metrics import CiderD, bootstrap_cider_difference, caption_words


@dataclass(frozen=True)
class Row:
    """One row of the tables: a method (or baseline) under a name, its Pareto family, and whether it runs
    on blanked pictures (the control) or follows another row's kept counts."""
    name: str
    family: str  # one marker per family in the Pareto plot
    method: Method
    blank: bool = False  # the control: every picture replaced by its empty background
    match: str | None = None  # keep as many tokens at each step as this row did (a method with `counts`)
    schedule_of: str | None = None  # a DyRate schedule: at each step the mean share that row kept there, over all items


def label(method: Method, weights_dir: str = "") -> str:
    """A method's name in a table: the same whether a standard row or an --extra spec made it, so a spec
    repeating a standard row is found, not run twice. weights_dir: where a shipped predictor lies."""
    m = method
    if isinstance(m, NoPruning):
        return "none"
    if isinstance(m, FastV):
        return f"FastV K={m.layer} R={m.rate:g}" + ("" if m.score == "last" else f" score={m.score}")
    if isinstance(m, VTW):
        return f"VTW K={m.layer}"
    if isinstance(m, DyRate):
        shipped = shipped_predictor_path(weights_dir)
        own = shipped is not None and os.path.realpath(m.predictor.path) == os.path.realpath(shipped)
        return f"DyRate K={m.layer} predictor (c={m.confidence:g})" + ("" if own else f" {os.path.basename(m.predictor.path)}")
    if isinstance(m, DyRateSchedule):
        rising = all(a <= b for a, b in zip(m.schedule, m.schedule[1:]))
        return f"DyRate K={m.layer} {'rising' if rising else 'schedule'} {','.join(f'{r:g}' for r in m.schedule)}"
    if isinstance(m, AttentionMass):
        return f"attention mass K={m.layer} p={m.mass:g}"
    if isinstance(m, RandomKeep) and m.rate is not None:
        return f"random keep K={m.layer} R={m.rate:g}"
    return describe(m).removeprefix("method ")


def family(method: Method) -> str | None:
    """Which curve of a Pareto figure a method belongs to (None: the caller names it)."""
    families = {NoPruning: "none", VTW: "VTW", DyRate: "DyRate predictor", DyRateSchedule: "DyRate fixed schedule",
                AttentionMass: "attention mass", RandomKeep: "random (fixed count)"}
    if isinstance(method, FastV):
        return f"FastV K={method.layer}" + ("" if method.score == "last" else f" score={method.score}")
    return families.get(type(method))


def cost_line(rows: int, items: int, reused: int, seconds: float) -> str:
    """What an evaluation is about to cost, said before it starts: rows x items generations (less the
    records reused from --results), and each pruned row's run on none's answer where its own differs (up
    to as many again); the time from one generation measured on this machine."""
    runs = max(0, rows * items - reused)
    span = lambda s: f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"  # noqa: E731
    return (f"{rows} rows x {items} items: {runs} generations" + (f" ({reused} reused from --results)" if reused else "")
            + f", and up to {runs} more on none's answers: about {span(runs * seconds)} to {span(2 * runs * seconds)} "
            f"at {seconds:.2f} s a generation (one measured here). Fewer rows: --only-extra --extra SPEC")


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


def clustered_mean(values: list[float], clusters: list[str] | None = None) -> tuple[float, float]:
    """The mean of one set of values and its standard error clustered as `paired`'s is."""
    return paired([0.0] * len(values), values, clusters)


def first_rise(kept: list[int]) -> int | None:
    """The first answer step whose rate is above the prefill's (fewer visual tokens kept than at step 0),
    or None: the step at which a method first cuts after the prefill."""
    return next((t for t in range(1, len(kept)) if kept[t] < kept[0]), None)


def rises(records: list[dict]) -> dict:
    """The share of answers in which the rate rose after the prefill, and the mean step of the first rise
    over those answers (None if none rose): does a method's rate grow during generation, and when?"""
    steps = [t for t in (first_rise(r["kept"]) for r in records) if t is not None]
    return {"rose": len(steps) / len(records), "first_rise": sum(steps) / len(steps) if steps else None}


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
    return {**forced, **rises(records),
            "kept": sum(sum(r["kept"]) for r in records) / sum(len(r["kept"]) for r in records),
            "lm_flops": lm / lm_base,
            "prefill_flops": total(records, "prefill_flops") / total(base, "prefill_flops"),
            "decode_flops": total(records, "decode_flops") / max(1, total(base, "decode_flops")),
            "kv_peak": total(records, "kv_peak") / total(base, "kv_peak"),
            "kv_mean": total(records, "kv_mean") / total(base, "kv_mean"),
            "seconds": total(records, "seconds") / total(base, "seconds"),
            "lm_flops_per_prompt": lm / len(records),
            "agree": sum(r["answer"] == b["answer"] for r, b in zip(records, base)) / len(records)}


METRICS = {"em": "exact match %", "verdict": "look-then-reason verdict %", "vqa": "VQA accuracy %",
           "f1": "describe object-F1", "cider": "CIDEr-D"}
PERCENT = {"em", "verdict", "vqa"}


def summarise(records: list[dict], base: list[dict], items: list[Item], bootstrap: int = 200) -> dict:
    """Every score the items allow -- exact match overall and per kind, VQA accuracy, object-F1, CIDEr-D
    (idf from the references; its difference from `base` by a paired bootstrap) -- each with its paired,
    scene-clustered difference from `base` (none), agreement with base's answers, and costs."""
    s = {}
    kinds = sorted({it.kind for it, r in zip(items, base) if "em" in r})
    groups = [("em", None)] + ([("em", k) for k in kinds] if len(kinds) > 1 else []) + \
        [("verdict", None), ("vqa", None), ("f1", None)]
    for key, kind in groups:
        idx = [i for i, r in enumerate(records) if key in r and (kind is None or items[i].kind == kind)]
        if not idx:
            continue
        name = key if kind is None else f"{key}_{kind}"
        mine, theirs = [records[i][key] for i in idx], [base[i][key] for i in idx]
        s[name], s[name + "_n"] = sum(mine) / len(mine), len(mine)
        s[name + "_delta"], s[name + "_se"] = paired(theirs, mine, [items[i].cluster for i in idx])
    caps = [i for i, it in enumerate(items) if it.references]
    if caps:
        refs = [[caption_words(r) for r in items[i].references] for i in caps]
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
            "| LM FLOPs on none's answers | mean KV on none's answers | rate rose after the prefill % (mean first step) "
            "| wall-clock |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, s in results:
        fl, kv = (f"{s['lm_flops_forced']:.3f}", f"{s['kv_mean_forced']:.3f}") if "lm_flops_forced" in s else ("", "")
        rise = f"{100 * s['rose']:.1f}" + (f" ({s['first_rise']:.1f})" if s["first_rise"] is not None else "")
        cost.append(f"| {row.name} | {s['kept']:.1f} | {s['lm_flops']:.3f} | {s['prefill_flops']:.3f} | "
                    f"{s['decode_flops']:.3f} | {s['kv_peak']:.3f} | {s['kv_mean']:.3f} | {fl} | {kv} | {rise} "
                    f"| {s['seconds']:.3f} |")
    note = (f"\nCosts are relative to none: language-model matmul FLOPs (none: {base['lm_flops_per_prompt'] / 1e6:.1f} "
            f"MFLOPs per prompt on average; the vision tower and projector add {vision / 1e6:.1f} MFLOPs per image for "
            "every method), KV-cache bytes (peak, and mean over the answer's steps) and wall-clock on this machine, "
            "each counted on the method's own answers; the two columns 'on none's answers' count them on none's "
            "answer tokens fed to the method, so that a method whose answers collapse does not look cheap; 'rate rose' "
            "is the share of answers in which fewer visual tokens were kept at some later step than at the prefill, "
            "and the mean step of that first rise. Wall-clock is this machine's, on a shared CPU (±25 % between runs): "
            "compare methods by FLOPs and bytes. "
            "Δ: paired difference from none over the same items, ± one standard error; a difference within two "
            "standard errors is not a difference.")
    return "\n".join(cost) + note


def table(results: list[tuple[Row, dict]], N: int, vision: int, bootstrap: int) -> str:
    """Accuracy (each score the items allow, with its paired difference from none) and cost."""
    base = results[0][1]
    cols = [k for k in ("em", "verdict", "vqa", "f1", "cider") if k in base]
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


def within(s: dict, bounds: dict) -> bool:
    """Matched accuracy: each score in bounds that the summary has is at most its bound below none's
    (em 0.01 = one point of exact match)."""
    return all(s[k + "_delta"] >= -bound - 1e-12 for k, bound in bounds.items() if k + "_delta" in s)


def cheapest(rows: list[dict], bounds: dict) -> dict | None:
    """Of summary rows (dicts with the costs on none's answer tokens), the cheapest by LM FLOPs on none's
    answers, then by mean KV bytes on them, among those within the bounds; None if none is."""
    ok = [r for r in rows if within(r, bounds)]
    return min(ok, key=lambda r: (r["lm_flops_forced"], r["kv_mean_forced"]), default=None)


def validation_choice(rows: list[dict], bounds: dict) -> dict | None:
    """The rule that picks a setting on the validation split (evaluate --split validation --json): of the
    rows (the JSON's, none first), the cheapest within the matched-accuracy bounds. None when no row but
    none qualifies."""
    return cheapest(rows[1:], bounds)


def method_kind(family_name: str) -> str:
    """The method a Pareto family belongs to: FastV's families are one per K and score, the others one."""
    return "FastV" if family_name.startswith("FastV") else family_name


def validation_choices(rows: list[dict], bounds: dict) -> dict:
    """Each method's own best on the validation split, by validation_choice's rule applied to that
    method's rows alone, whatever their K and score: FastV over K x score x R, DyRate's predictor over K x
    score x route x c, VTW over K -- not one K for all. -> {method kind: its row, or None}."""
    kinds = dict.fromkeys(method_kind(r["family"]) for r in rows[1:])
    return {k: cheapest([r for r in rows[1:] if method_kind(r["family"]) == k], bounds) for k in kinds}


def step0_table(records: list[dict], items: list[Item], N: int) -> dict:
    """Where DyRate cuts at the prefill: the mean kept count at step 0 (and after the last step) of one
    row's records, by the picture's number of shapes and by question kind (scene items; items without a
    scene are left out). -> {"by_shapes": {n: {...}}, "by_kind": {kind: {...}}, "N": N}, each
    {"items", "kept0", "kept_last", "cut0": the share of items cut at step 0}."""
    groups: dict[str, dict] = {"by_shapes": {}, "by_kind": {}}
    for r, it in zip(records, items):
        if it.scene is None:
            continue
        for table_name, key in (("by_shapes", WORLD.shape_count(it.scene)), ("by_kind", it.kind)):
            groups[table_name].setdefault(key, []).append(r["kept"])
    out = {"N": N}
    for table_name, by in groups.items():
        out[table_name] = {k: {"items": len(v), "kept0": sum(x[0] for x in v) / len(v),
                               "kept_last": sum(x[-1] for x in v) / len(v),
                               "cut0": sum(x[0] < N for x in v) / len(v)} for k, v in sorted(by.items())}
    return out


def step0_text(t: dict, name: str) -> str:
    """step0_table as two small tables."""
    lines = [f"Step-0 kept visual tokens (of {t['N']}) of {name}, by the picture's number of shapes and by question kind:"]
    for table_name, head in (("by_shapes", "shapes"), ("by_kind", "question kind")):
        lines += ["", f"| {head} | items | kept at step 0 | items cut at step 0 % | kept at the last step |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['items']} | {v['kept0']:.1f} | {100 * v['cut0']:.1f} | {v['kept_last']:.1f} |"
                  for k, v in t[table_name].items()]
    return "\n".join(lines)


COSTS = {"lm_flops": ("forced_prefill_flops", "forced_decode_flops"), "kv_mean": ("forced_kv_mean",)}


def main_comparison(results: list[tuple[Row, dict]], records: dict, items: list[Item], ours: str, theirs: dict,
                    bounds: dict) -> dict | None:
    """The comparison declared before the test run: family `ours` against each family in `theirs` ({family:
    {cost: target ratio}}; "{K}" in a family is ours' pruning layer) at matched accuracy (`within` bounds).
    Each side's row is its cheapest within the bounds (`cheapest`: costs counted on none's answer tokens,
    so both sides pay for the same tokens). Each cost is compared by its ratio and by the paired per-item
    difference relative to none's mean, with its picture-clustered SE; a target is met when the ratio is at
    most the target and ours is cheaper beyond 2 SE. -> None without forced costs (data files without
    none's tokens)."""
    rows = [(row, s) for row, s in results if not row.blank]
    if any("lm_flops_forced" not in s for _, s in rows):
        return None
    base = records[results[0][0].name]
    idx = [i for i, r in enumerate(base) if "tokens" in r]
    clusters = [items[i].cluster for i in idx]
    per_item = lambda recs, cost: [sum(recs[i][k] for k in COSTS[cost]) for i in idx]  # noqa: E731
    none_mean = {cost: sum(sum(base[i][k.removeprefix("forced_")] for k in COSTS[cost]) for i in idx) / len(idx)
                 for cost in COSTS}

    def candidates(family: str) -> list[dict]:
        return [{"method": row.name, "layer": row.method.layer, **s} for row, s in rows if row.family == family]

    mine = cheapest(candidates(ours), bounds)
    out = {"ours": ours, "bounds": bounds, "items": len(idx), ours: mine, "against": {}, "rows": len(candidates(ours))}
    for pattern, targets in theirs.items():  # a family that names its own K (FastV K=2 ...) is taken at that K;
        family = pattern.format(K=mine["layer"] if mine else "?")  # "{K}" and the others at ours' layer
        same_k = mine is not None and ("{K}" in pattern or "K=" not in pattern)
        theirs_row = cheapest([c for c in candidates(family) if not same_k or c["layer"] == mine["layer"]], bounds)
        side = {"family": family, "row": theirs_row, "targets": targets, "costs": {}}
        if mine and theirs_row:
            for cost in COSTS:
                a = [x / none_mean[cost] for x in per_item(records[theirs_row["method"]], cost)]
                b = [x / none_mean[cost] for x in per_item(records[mine["method"]], cost)]
                d, se = paired(a, b, clusters)
                ratio = mine[cost + "_forced"] / theirs_row[cost + "_forced"]
                side["costs"][cost] = {"ratio": ratio, "difference": d, "se": se, "target": targets.get(cost),
                                       "met": None if cost not in targets else bool(ratio <= targets[cost] and d < -2 * se)}
            side["target_met"] = all(c["met"] for c in side["costs"].values() if c["met"] is not None)
        out["against"][family] = side
    # Which tokens: each of ours' rows against random ones at its own counts, item by item (whether or not
    # the row is within the bounds: the question is the choice of tokens, not the cost).
    out["random"] = {r["method"]: better_than(records[r["method"]], records[f"random keep, counts of {r['method']}"], items)
                     for r in candidates(ours) if f"random keep, counts of {r['method']}" in records}
    return out


def better_than(records: list[dict], control: list[dict], items: list[Item], keys=("em", "f1", "verdict")) -> dict:
    """Does a method's choice of tokens beat a control's at the same counts (random keep at its counts)?
    Per score: the paired, picture-clustered difference method - control over the items that have it,
    and whether it lies beyond 2 SE. -> {key: {"difference", "se", "items", "better"}}."""
    out = {}
    for key in keys:
        idx = [i for i, r in enumerate(records) if key in r]
        if idx:
            d, se = paired([control[i][key] for i in idx], [records[i][key] for i in idx], [items[i].cluster for i in idx])
            out[key] = {"difference": d, "se": se, "items": len(idx), "better": bool(d > 2 * se)}
    return out


def comparison_text(c: dict | None, declared: bool = True) -> str:
    """The comparison, in words, printed before the tables; `declared`: the one declared before the test
    run (the scene world's test split), not the same rule applied to a user's data."""
    if c is None:
        return "Main comparison: no costs counted on none's answers here (a data file's items); nothing to compare."
    if not c["rows"]:
        return f"Main comparison: this run has no {c['ours']} rows; nothing to compare."
    names = {"em": "exact match", "f1": "describe object-F1", "verdict": "look-then-reason verdict"}
    bound = ", ".join(f"{names.get(k, k)} within {100 * v:g} points" if k != "f1" else f"{names[k]} within {v:g}"
                      for k, v in c["bounds"].items())
    lines = [f"Main comparison{' (declared before the test run)' if declared else ''}: at matched accuracy ({bound} of none's), "
             f"{c['ours']}'s cheapest row against each opponent's cheapest, by LM FLOPs and mean KV bytes "
             f"counted on none's answer tokens ({c['items']} items)."]
    row = c[c["ours"]]
    lines.append(f"  {c['ours']}: " + ("no row within the bounds" if row is None else
                 f"{row['method']}: LM FLOPs {row['lm_flops_forced']:.3f}, mean KV {row['kv_mean_forced']:.3f} of none's"))
    for family, side in c["against"].items():
        r = side["row"]
        lines.append(f"  {family}: " + ("no row within the bounds" if r is None else
                     f"{r['method']}: LM FLOPs {r['lm_flops_forced']:.3f}, mean KV {r['kv_mean_forced']:.3f} of none's"))
        for cost, x in side["costs"].items():
            what = {"lm_flops": "LM FLOPs", "kv_mean": "mean KV"}[cost]
            target = ("" if x["target"] is None else f"; target <= {x['target']:g}x, beyond 2 SE: "
                      + ("met" if x["met"] else "not met"))
            lines.append(f"    {c['ours']}'s {what} is {x['ratio']:.3f}x; paired difference {x['difference']:+.3f} "
                         f"± {x['se']:.3f} of none's{target}")
    for name, scores in c.get("random", {}).items():
        lines.append(f"  which tokens: {name} minus random keep at its own counts, paired (target: better beyond 2 SE "
                     "on at least one): " + "; ".join(
                         f"{names.get(k, k)} {x['difference']:+.3f} ± {x['se']:.3f} ({'better' if x['better'] else 'not better'})"
                         for k, x in scores.items()))
    return "\n".join(lines)


# LLaVA-1.5-7B at float16 on an 80 GB GPU, for the serving arithmetic (tools/serving.py): 7.06 B parameters,
# 576 visual tokens in a prompt of ~616, a 64-token answer.
SERVE_7B = dict(N=576, P=616, T=64, weight_bytes=7.06e9 * 2, gpu_bytes=80e9)


def kept_schedule(records: list[dict], N: int, min_answers: int = 5) -> list[float]:
    """The mean kept fraction of the N visual tokens at each answer step, over the items that reach it,
    for the steps that at least min_answers answers reach (all of them, with fewer answers in all): a
    step only one or two long answers reach says nothing about a batch, and its value would repeat to
    the end of the serving model's answer and set the peak."""
    need = min(min_answers, len(records))
    T = max(t + 1 for t in range(max(len(r["kept"]) for r in records)) if sum(len(r["kept"]) > t for r in records) >= need)
    return [sum(r["kept"][t] for r in records if len(r["kept"]) > t) / N / sum(len(r["kept"]) > t for r in records)
            for t in range(T)]


def mean_schedule(records: list[dict], N: int) -> tuple[float, ...]:
    """The fixed schedule with another row's mean kept counts: rate r_t = 1 - (mean kept at step t) / N,
    for the steps kept_schedule measures (the last repeating). DyRate at this schedule keeps on average
    what the adaptive row kept at each step, the same for every picture: the adaptivity control."""
    return tuple(round(1 - f, 6) for f in kept_schedule(records, N))


def serving_table(results: list[tuple[Row, dict]], records: dict, N: int, L: int) -> str:
    """What each method would buy a server at LLaVA-1.5-7B's shapes: an analytic model (serving.serving_schedule)
    fed with the kept fraction each method reached here at every answer step, K mapped by depth."""
    tc, c = TextConfig(), SERVE_7B  # TextConfig's defaults are Llama-7B's shapes
    L7 = tc.num_hidden_layers
    lines = ["| method | K here → on 7B | kept fraction at steps 0 / 4 / 16 (measured here) | bytes read per decode step "
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
            f"a 616-token prompt, a {c['T']}-token answer; each method's kept fraction at every answer step as measured "
            f"above (the last measured step's fraction repeats to the end); K mapped by depth (K of this model's {L} "
            f"layers -> the same part of 7B's {L7}); bytes per step averaged over the answer, the largest batch "
            "from the cache's peak.\n\n" + "\n".join(lines))


def pareto_points(rows: list[dict], keys: list[str], scale: dict, ylabels: dict) -> list[dict]:
    """The Pareto figure's points, from the JSON's rows: for each accuracy key (a row of panels) and each
    cost (a column: LM FLOPs and mean KV bytes, counted on none's answer tokens), every row but the
    control, under its family (one line per family), with ±2 clustered standard errors."""
    points = []
    for key in keys:
        for s in rows:
            if s["family"] == "control" or key not in s:
                continue
            for panel, x in (("LM FLOPs relative to none (on none's answer tokens)", s.get("lm_flops_forced", s["lm_flops"])),
                             ("mean KV-cache bytes relative to none (on none's answer tokens)",
                              s.get("kv_mean_forced", s["kv_mean"]))):
                points.append({"panel": panel, "method": s["family"], "label": s["method"], "x": x,
                               "y": scale[key] * s[key], "yerr": 2 * scale[key] * s[key + "_se"], "ylabel": ylabels[key]})
    return points


def witnesses(records: dict[str, list[dict]], n: int) -> dict[str, list[dict]]:
    """Every row's records of the first n items, kept in the evaluation's JSON beside the aggregates so
    that a test can recompute them from the current weights (tests/test_figures.py): the figures drawn from
    the JSON cannot outlive their model. Wall-clock is left out (not a property of the weights)."""
    return {name: [{k: v for k, v in r.items() if k != "seconds"} for r in rs[:n]] for name, rs in records.items()}
