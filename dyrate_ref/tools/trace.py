"""Check a backend's trace against the oracle's (dyrate_ref/trace.py says what a trace holds).

    python -m dyrate_ref.tools.trace compare ORACLE BACKEND [--dtype float32|float16|bfloat16] [--json]
    python -m dyrate_ref.tools.trace from-openai RESPONSE.json [--input-ids-from TRACE] --out BACKEND.safetensors

`compare` lines the two traces up step by step and checks, with limits chosen by the backend's dtype
(LIMITS below): max |Δlogit| (|Δlog-prob| over the backend's top-k when it has only those), KL(oracle ‖
backend) of the next-token distributions (full logits on both sides), top-1 agreement, top-k overlap,
kept-set IoU and rates. Logits are comparable only while both sides were fed the same tokens: run the
oracle with `generate.py ... --force-tokens BACKEND` to line up the whole answer. Exit status: 0 same,
1 different, 2 a file that cannot be read as a trace.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass

from ..commands import ArgumentParser, UserError, command_main, parse_first, summary


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.trace", description=summary(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)
    c = sub.add_parser("compare", help="compare an oracle trace with a backend's; exit 0 same, 1 different, 2 unreadable",
                       description="Line two traces up step by step (the oracle's, from generate.py --trace, "
                                   "ideally with --force-tokens B, and the backend's) and check logits, KL, top-1 and "
                                   "top-k agreement, kept sets and rates within limits chosen by the backend's "
                                   "dtype; exit 0 same, 1 different, 2 a file that cannot be read as a trace.")
    c.add_argument("a", help="the oracle's trace (generate.py --trace, ideally with --force-tokens B)")
    c.add_argument("b", help="the backend's trace")
    c.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32",  # LIMITS' keys
                   help="the backend's precision: picks the limits (default float32)")
    c.add_argument("--atol", type=float, help="override the max |Δlogit| limit")
    c.add_argument("--max-kl", type=float, help="override the per-step KL limit (nats)")
    c.add_argument("--top-k", type=int, default=5, help="k of the top-k overlap (default 5, at most the trace's k)")
    c.add_argument("--json", action="store_true", help="print the report as JSON (per step and overall)")
    o = sub.add_parser("from-openai", help="an OpenAI-compatible response with logprobs -> a partial trace")
    o.add_argument("response", help="the JSON the server returned")
    o.add_argument("--input-ids-from", metavar="TRACE",
                   help="a trace of the same prompt (the oracle's) to take input_ids from; not needed when the JSON "
                        "has prompt_token_ids")
    o.add_argument("--out", required=True, help="the trace to write")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch
from safetensors import safe_open

from ..files import check_input_file, check_outputs
from ..trace import read_trace, write_trace
from .metrics import kl_divergence

# The header's keys that describe the run (trace.py's docstring lists them); the others are the method's.
RUN_KEYS = {"weights", "dtype", "device", "prompt", "text_rows", "max_new_tokens", "temperature", "top_p", "stop_reason", "seed",
            "forced_from", "dyrate_ref_version", "torch_version", "format"}


def trace_metadata(path: str) -> dict[str, str]:
    """The header a trace was written with (generate.py: the method and its settings, the weights, ...)."""
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def method_difference(ma: dict, mb: dict) -> str | None:
    """A note when both traces name their pruning method and the methods or their settings differ: a
    DIFFERENT verdict then says that two computations differ, not that a backend is wrong."""
    if "method" not in ma or "method" not in mb:
        return None
    keys = ["method"] + sorted({k for k in {**ma, **mb} if k not in RUN_KEYS and k != "method" and not k.endswith("_from")})
    diff = [f"{k} {ma.get(k, '(none)')} vs {mb.get(k, '(none)')}" for k in keys if ma.get(k) != mb.get(k)]
    if not diff:
        return None
    return ("the two runs' methods differ (" + ", ".join(diff) + "): differences below may be the methods', not the "
            "backend's; run both with the same method and settings")


@dataclass(frozen=True)
class Limits:
    """What still counts as the same computation. atol: max |Δlogit| (|Δlog-prob| against top-k traces);
    max_kl / mean_kl: KL(oracle ‖ backend) in nats, per step / over the steps; min_top1: share of steps
    whose most likely token agrees; min_topk: mean overlap of the k most likely tokens; min_iou: mean
    kept-set IoU over the steps."""
    atol: float
    max_kl: float
    mean_kl: float
    min_top1: float
    min_topk: float
    min_iou: float


# float32: the same formulas in a different summation order (tests/test_parity.py: <= 1e-4 against
# transformers). float16 / bfloat16: transformers' own float32-vs-low-precision gap on the same checkpoint,
# teacher-forced over 60 tokens on the tests' tiny checkpoints, measured 0.010 / 0.12 max |Δlogit|,
# 5e-6 / 5e-4 max KL, 2e-6 / 2e-4 mean KL, top-1 0.98 / 0.97, top-5 overlap 0.997 / 0.97. The limits
# leave 3x or more room (tests/test_backend.py measures the gap again and checks it stays within a third of
# each limit, half for the top-1/top-k shares). A 7B model's gap may be larger: measure transformers' own
# on your checkpoint (float32 vs your dtype, teacher-forced) and pass --atol / --max-kl.
LIMITS = {
    "float32": Limits(atol=1e-4, max_kl=1e-6, mean_kl=1e-7, min_top1=1.0, min_topk=1.0, min_iou=1.0),
    "float16": Limits(atol=0.1, max_kl=1e-4, mean_kl=2e-5, min_top1=0.9, min_topk=0.9, min_iou=0.9),
    "bfloat16": Limits(atol=1.0, max_kl=1e-2, mean_kl=2e-3, min_top1=0.9, min_topk=0.9, min_iou=0.9),
}


@dataclass
class Report:
    same: bool
    steps: list[dict]  # per compared step: tokens, and each metric that could be computed
    checks: dict  # name -> {"value", "limit", "ok"}
    not_checked: list[str]
    notes: list[str]
    first_bad_step: int | None
    first_bad_reason: str | None


def _rows(t: dict, upto: int) -> dict:
    """The first `upto` rows of what a trace says about the next-token distribution: full logits (as
    float32) or the top-k pair; {} when it has neither."""
    if "logits" in t:
        return {"logits": t["logits"][:upto].float()}
    if "topk_ids" in t:
        return {"topk_ids": t["topk_ids"][:upto], "topk_logprobs": t["topk_logprobs"][:upto].float()}
    return {}


def _topk(r: dict, k: int):
    """-> (ids [T, k] best first, log-probs [T, k]) from full logits or a top-k pair."""
    if "logits" in r:
        vals, ids = r["logits"].log_softmax(-1).topk(k, dim=-1)
        return ids, vals
    order = r["topk_logprobs"].argsort(dim=-1, descending=True)[:, :k]
    return r["topk_ids"].gather(1, order), r["topk_logprobs"].gather(1, order)


def _logprob_gap(ra: dict, rb: dict, t: int) -> float:
    """Step t: max |Δlog-prob| over the ids a top-k side reports (both top-k: the ids both report)."""
    def table(r):
        if "logits" in r:
            return None
        return {int(i): float(v) for i, v in zip(r["topk_ids"][t], r["topk_logprobs"][t])}
    ta, tb = table(ra), table(rb)
    if ta is None or tb is None:
        full, top = (ra, tb) if ta is None else (rb, ta)
        lp = full["logits"][t].log_softmax(-1)
        return max(abs(float(lp[i]) - v) for i, v in top.items())
    common = set(ta) & set(tb)
    return max(abs(ta[i] - tb[i]) for i in common) if common else float("inf")


def _check(label: str, value: float, limit: float, at_least: bool = False) -> dict:
    return {"label": label, "value": value, "limit": limit, "ok": value >= limit if at_least else value <= limit}


def compare(a: dict, b: dict, limits: Limits, k: int = 5) -> Report:
    """a: the oracle's trace, b: the backend's. Uses what both have; says what it could not check."""
    checks, not_checked, notes = {}, [], []
    ta, tb = a["tokens"], b["tokens"]
    n = min(ta.numel(), tb.numel())
    mismatch = (ta[:n] != tb[:n]).nonzero().squeeze(1)
    first = int(mismatch[0]) if mismatch.numel() else None
    tokens_ok = first is None and ta.numel() == tb.numel()
    checks["tokens"] = {"value": f"{n - (0 if first is None else n - first)} of {max(ta.numel(), tb.numel())} equal",
                        "limit": "all", "ok": tokens_ok}
    if not tokens_ok:
        where = f"from step {first}" if first is not None else f"in length ({ta.numel()} vs {tb.numel()})"
        notes.append(f"tokens differ {where}: logits after that step were computed on different histories and are "
                     "not compared; rerun the oracle with generate.py --force-tokens BACKEND_TRACE to compare them all")
    upto = n if first is None else first + 1  # row `first` is still comparable: same history, different choice
    same_prompt = torch.equal(a["input_ids"], b["input_ids"])
    checks["input_ids"] = {"value": "equal" if same_prompt else "differ", "limit": "equal", "ok": same_prompt}
    steps = [{"step": t, "token_oracle": int(ta[t]), "token_backend": int(tb[t])} for t in range(upto)]
    if not same_prompt:
        notes.append("the prompts differ (input_ids): nothing else is comparable")
        upto, steps = 0, []
    if "pixel_values" in a and "pixel_values" in b:  # input_ids alone cannot tell two pictures apart
        same_image = a["pixel_values"].shape == b["pixel_values"].shape and torch.allclose(
            a["pixel_values"].float(), b["pixel_values"].float(), rtol=1e-2, atol=2e-2)  # bfloat16 backends pass
        checks["pixel_values"] = {"value": "equal" if same_image else "differ", "limit": "equal", "ok": same_image}
        if not same_image:
            notes.append("the two traces were made from different images (pixel_values differ): give both runs the "
                         "same --image")

    bad: dict[int, list[str]] = {}  # step -> what is wrong there
    ra, rb = _rows(a, upto), _rows(b, upto)
    vocab = {r["logits"].shape[1] for r in (ra, rb) if "logits" in r}
    if upto and not (ra and rb):
        not_checked.append("logits: " + ("the oracle" if not ra else "the backend") + " has neither logits nor top-k")
    elif upto and len(vocab) > 1:
        checks["vocabulary"] = {"value": " vs ".join(str(r["logits"].shape[1]) for r in (ra, rb)), "limit": "equal",
                                 "ok": False}
    elif upto:
        kk = min([k] + [r["topk_ids"].shape[1] for r in (ra, rb) if "topk_ids" in r]
                 + [r["logits"].shape[1] for r in (ra, rb) if "logits" in r])  # never more than the vocabulary
        if kk < k:
            notes.append(f"--top-k {k}: the top-k overlap is over the top {kk}, all that "
                         + ("the vocabulary" if all("logits" in r for r in (ra, rb)) else "a top-k trace") + " holds")
        if "logits" in ra and "logits" in rb:
            delta = (ra["logits"] - rb["logits"]).abs().amax(-1)  # [upto]
            label = "max |Δlogit|"
            # clamped at 0: rounding leaves a few -1e-16 where the two distributions are equal
            kl = kl_divergence(ra["logits"], rb["logits"], torch.float64).clamp_min(0.0)  # [upto]
            for t in range(upto):
                steps[t]["kl"] = float(kl[t])
                if kl[t] > limits.max_kl:
                    bad.setdefault(t, []).append(f"KL {float(kl[t]):.3g} > {limits.max_kl:g}")
            checks["max_kl"] = _check("max KL(oracle ‖ backend) per step", float(kl.max()), limits.max_kl)
            checks["mean_kl"] = _check("mean KL", float(kl.mean()), limits.mean_kl)
        else:
            # Log-probabilities (shift-free, unlike raw logits) at the ids the top-k side reports.
            delta = torch.tensor([_logprob_gap(ra, rb, t) for t in range(upto)])
            label = "max |Δlog-prob| over the reported top-k"
            not_checked.append("KL: one side has only top-k log-probabilities (the full distributions are needed)")
        ids_a, ids_b = _topk(ra, kk)[0], _topk(rb, kk)[0]  # [upto, kk] each, best first
        top1 = ids_a[:, 0] == ids_b[:, 0]
        overlap = torch.tensor([len(set(ids_a[t].tolist()) & set(ids_b[t].tolist())) / kk for t in range(upto)])
        for t in range(upto):
            steps[t].update(delta=float(delta[t]), top1=bool(top1[t]), topk_overlap=float(overlap[t]))
            if delta[t] > limits.atol:
                bad.setdefault(t, []).append(f"{label} {float(delta[t]):.3g} > {limits.atol:g}")
            if limits.min_top1 >= 1.0 and not top1[t]:
                bad.setdefault(t, []).append("the most likely token differs")
        checks["max_delta"] = _check(label, float(delta.max()), limits.atol)
        checks["top1"] = _check("top-1 agreement", float(top1.float().mean()), limits.min_top1, at_least=True)
        checks["topk_overlap"] = _check(f"top-{kk} overlap", float(overlap.mean()), limits.min_topk, at_least=True)

    if upto and "kept_masks" in a and "kept_masks" in b:
        ka, kb = a["kept_masks"][:upto].bool(), b["kept_masks"][:upto].bool()
        if ka.shape != kb.shape:
            checks["kept_masks"] = {"value": f"shapes {tuple(ka.shape)} vs {tuple(kb.shape)}", "limit": "equal", "ok": False}
        else:
            inter, union = (ka & kb).sum(1).float(), (ka | kb).sum(1).float()
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))  # both empty: same
            for t in range(upto):
                steps[t].update(kept_oracle=int(ka[t].sum()), kept_backend=int(kb[t].sum()), keep_iou=float(iou[t]))
                if limits.min_iou >= 1.0 and iou[t] < 1.0:
                    bad.setdefault(t, []).append(f"kept sets differ (IoU {float(iou[t]):.3f}; {int(ka[t].sum())} vs "
                                      f"{int(kb[t].sum())} kept, {int((ka[t] ^ kb[t]).sum())} tokens differ)")
            checks["keep_iou"] = _check("kept-set IoU (mean over steps)", float(iou.mean()), limits.min_iou, at_least=True)
    elif upto and ("kept_masks" in a) != ("kept_masks" in b):
        not_checked.append("kept sets: only " + ("the oracle" if "kept_masks" in a else "the backend") + " has kept_masks")
    if upto and "rates" in a and "rates" in b:
        d = (a["rates"][:upto].float() - b["rates"][:upto].float()).abs()
        for t in range(upto):
            steps[t]["rate_delta"] = float(d[t])
            if d[t] > 1e-6:
                bad.setdefault(t, []).append(f"rates differ ({float(a['rates'][t]):g} vs {float(b['rates'][t]):g})")
        checks["rates"] = _check("max |Δrate|", float(d.max()), 1e-6)
    elif upto and ("rates" in a) != ("rates" in b):
        not_checked.append("rates: only " + ("the oracle" if "rates" in a else "the backend") + " has them")

    if first is not None:
        bad.setdefault(first, []).append("the chosen token differs")
    same = all(c["ok"] for c in checks.values()) and not bad  # checks["tokens"] covers a length mismatch
    first_bad = min(bad) if bad else None
    return Report(same, steps, checks, not_checked, notes, first_bad, "; ".join(bad[first_bad]) if bad else None)


def report_text(r: Report, dtype: str, limits: Limits) -> str:
    lines = [f"limits ({dtype}): " + ", ".join(f"{k} {v:g}" for k, v in asdict(limits).items())]
    for name, c in r.checks.items():
        value = c["value"] if isinstance(c["value"], str) else f"{c['value']:.4g}"
        limit = c["limit"] if isinstance(c["limit"], str) else f"{c['limit']:g}"
        lines.append(f"{'ok  ' if c['ok'] else 'FAIL'} {c.get('label', name)}: {value} (limit {limit})")
    lines += [f"not checked: {x}" for x in r.not_checked]
    lines += [f"note: {x}" for x in r.notes]
    if r.first_bad_step is not None:
        lines.append(f"first bad step: {r.first_bad_step} ({r.first_bad_reason})")
    lines.append(f"{len(r.steps)} steps compared")
    lines.append("SAME" if r.same else "DIFFERENT")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# A serving engine's answer as a trace


_ID = re.compile(r"^token_id:(\d+)$")


def _token_id(text, where: str) -> int:
    m = _ID.match(str(text))
    if not m:
        raise UserError(f"{where}: token {text!r} is text, not an id; ask the server for ids "
                        '(vLLM: "return_tokens_as_token_ids": true) so that they can be compared exactly')
    return int(m.group(1))


def _logprob(value, where: str) -> float:
    """A log-probability from the JSON: a finite number <= 0 (a tiny positive rounding error allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 1e-6:
        raise UserError(f"{where}: logprob {value!r} is not a log-probability (a finite number <= 0)")
    return float(value)


def _field(entry, key: str, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise UserError(f"{where}: no {key!r}; the response is not an OpenAI-compatible logprobs entry")
    return entry[key]


def openai_trace(response: dict, input_ids: torch.Tensor, path: str) -> dict[str, torch.Tensor]:
    """An OpenAI-compatible chat or completions response with logprobs -> a partial trace: input_ids,
    tokens, topk_ids, topk_logprobs (the chosen token's own log-prob is kept in the top-k set: the engine
    reports it separately when it falls outside)."""
    try:
        choice = response["choices"][0]
        lp = choice["logprobs"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{path}: no choices[0].logprobs; request logprobs (and top_logprobs) from the server") from None
    tokens, tops = [], []
    if isinstance(lp, dict) and "content" in lp:  # chat completions
        for i, entry in enumerate(lp["content"] or []):
            where = f"{path}: choices[0].logprobs.content[{i}]"
            tokens.append(_token_id(_field(entry, "token", where), where))
            tops.append({_token_id(_field(e, "token", where), where): _logprob(_field(e, "logprob", where), where)
                         for e in entry.get("top_logprobs") or []})
            tops[-1].setdefault(tokens[-1], _logprob(_field(entry, "logprob", where), where))
    elif isinstance(lp, dict) and "tokens" in lp:  # completions
        listed = _field(lp, "token_logprobs", f"{path}: choices[0].logprobs")
        if not isinstance(lp["tokens"], list) or not isinstance(listed, list) or len(listed) != len(lp["tokens"]):
            raise UserError(f"{path}: choices[0].logprobs.tokens and token_logprobs are not lists of one length")
        for i, (tok, tlp) in enumerate(zip(lp["tokens"], listed)):
            where = f"{path}: choices[0].logprobs.tokens[{i}]"
            tokens.append(_token_id(tok, where))
            top = (lp.get("top_logprobs") or [None] * len(lp["tokens"]))[i] or {}
            if not isinstance(top, dict):
                raise UserError(f"{where}: top_logprobs[{i}] is not an object of token -> logprob")
            tops.append({_token_id(t, where): _logprob(v, where) for t, v in top.items()})
            tops[-1].setdefault(tokens[-1], _logprob(tlp, where))
    else:
        raise UserError(f"{path}: choices[0].logprobs has neither 'content' (chat) nor 'tokens' (completions)")
    if not tokens:
        raise UserError(f"{path}: the response has no generated tokens")
    k = min(len(t) for t in tops)
    ids = torch.zeros(len(tokens), k, dtype=torch.int64)
    vals = torch.zeros(len(tokens), k, dtype=torch.float32)
    for t, top in enumerate(tops):
        best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        ids[t] = torch.tensor([i for i, _ in best])
        vals[t] = torch.tensor([v for _, v in best])
    return {"input_ids": input_ids.to(torch.int64), "tokens": torch.tensor(tokens, dtype=torch.int64),
            "topk_ids": ids, "topk_logprobs": vals}


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd == "from-openai":
        check_input_file(args.response, "RESPONSE", "the JSON file the server returned")
        check_outputs([("--out", args.out)], [("the response", args.response)] + (
            [("the --input-ids-from trace", args.input_ids_from)] if args.input_ids_from else []))
        try:
            with open(args.response, encoding="utf-8") as f:
                response = json.load(f)
        except OSError as e:
            raise UserError(f"RESPONSE {args.response} cannot be read ({e.strerror}); check its permissions") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"RESPONSE {args.response} is not JSON text ({e}); give the JSON the server returned") from None
        prompt_ids = response.get("prompt_token_ids") if isinstance(response, dict) else None
        if prompt_ids is not None and not (isinstance(prompt_ids, list) and prompt_ids and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in prompt_ids)):
            raise UserError(f"{args.response}: prompt_token_ids is not a list of token ids; fix the response or "
                            "remove the field to take input_ids from --input-ids-from")
        if not prompt_ids and not args.input_ids_from:
            raise UserError(f"{args.response} has no prompt_token_ids; add --input-ids-from TRACE (the oracle's trace "
                            "of the same prompt) to take the input_ids from")
        input_ids = (torch.tensor(prompt_ids, dtype=torch.int64) if prompt_ids
                     else read_trace(args.input_ids_from, "--input-ids-from")["input_ids"])
        tensors = openai_trace(response, input_ids, args.response)
        write_trace(args.out, tensors, {"source": os.path.basename(args.response)})
        print(f"wrote {args.out}: {tensors['tokens'].numel()} tokens, top-{tensors['topk_ids'].shape[1]} log-probs")
        return 0
    for flag, value in (("--atol", args.atol), ("--max-kl", args.max_kl)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} {value} must be a finite number >= 0")
    if os.path.exists(args.a) and os.path.exists(args.b) and os.path.samefile(args.a, args.b):
        raise UserError(f"{args.a} and {args.b} are the same file: comparing a trace with itself checks nothing; "
                        "give the oracle's trace and the backend's")
    limits = LIMITS[args.dtype]
    if args.atol is not None or args.max_kl is not None:
        limits = Limits(**{**asdict(limits), **({"atol": args.atol} if args.atol is not None else {}),
                           **({"max_kl": args.max_kl} if args.max_kl is not None else {})})
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k} must be at least 1")
    r = compare(read_trace(args.a, "ORACLE"), read_trace(args.b, "BACKEND"), limits, args.top_k)
    differ = method_difference(trace_metadata(args.a), trace_metadata(args.b))
    if differ:
        r.notes.append(differ)
    if args.json:
        print(json.dumps({"same": r.same, "dtype": args.dtype, "limits": asdict(limits), "checks": r.checks,
                          "not_checked": r.not_checked, "notes": r.notes, "first_bad_step": r.first_bad_step,
                          "first_bad_reason": r.first_bad_reason, "steps": r.steps}, indent=1))
    else:
        print(report_text(r, args.dtype, limits))
    return 0 if r.same else 1


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
