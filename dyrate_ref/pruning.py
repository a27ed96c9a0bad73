"""FastV, VTW and DyRate: each method is a value. The decode loop (generation.py) asks it once per step.

Shared semantics (docs/pruning.md says the same):
- N visual tokens; their span is found from the <image> ids in input_ids. Pruning layer K, 1 <= K <= L-1.
  Layers < K always see every token.
- Step t is the forward pass whose output is token t; step 0 is the prefill, whose query is the last
  prompt token. The method chooses keep_t, a subset of {0..N-1} (visual indices, ascending). In layers
  >= K the step's query attends only to kept visual tokens; evicted ones are removed from the KV cache
  of layers >= K and never come back, so keep_t ⊆ keep_{t-1}. In the prefill every prompt position in
  layers >= K sees only keep_0.
- Scores: layer K-1's attention probabilities of step t's query over the visual tokens, averaged over
  heads. Position ids keep their original values after eviction.
- Words, one per concept: "keep" is the kept visual indices [M]; the trace's `visual_keep` is the same
  set as a bool mask [N] (keep_mask). The "rate" r_t = 1 - |keep_t| / N is the part of the N visual
  tokens dropped by step t (what the paper calls the compression rate; FastV's R is a rate too); the
  "kept fraction" is 1 - r_t; "mass" is attention probability summed over tokens (the step's attention
  mass on the image, on the kept tokens). The decode loop computes it from keep_t, once
  (generation.step); a method's settings may name a target rate (FastV's R, a DyRate schedule), but the
  recorded rate is always the part actually dropped, after rounding and nesting.

A method is one small frozen dataclass holding exactly its own settings. Its fields are its settings:
the CLI turns them into flags (--layer, --rate, ...), `evaluate --extra NAME:field=value:...` and the
trace's metadata are built from them, and `describe` says what ran. Each has

    choose(t, keep, scores) -> keep_t                 the decision of step t
    scores(probs, span, t, last) -> [N]               what it decides on (default: `last`, the step's
                                                      last query's scores, which the loop computes once)
    resolve(given, context) -> (method, origins)  defaults filled in once, each value's origin named

METHODS maps names to classes; nothing outside it dispatches on a method's name. Adding a method is a
class and a registry line (docs/pruning.md, "Adding a method").

From the DyRate paper (arXiv 2501.14204, abstract and first page, all we have): the compression rate
grows during generation and is chosen per step by a lightweight predictor that reads the attention
distribution. Everything finer -- the features, the actions, the keep rules below, the training labels
-- is dyrate_ref's reconstruction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from .errors import UserError
from .predictor import RatePredictor, load_predictor, predictor_features, shipped_predictor_path

DEFAULT_LAYER = 2  # K = 2, FastV's recommended setting for LLaVA-1.5
# VTW's withdrawal layer chosen for a checkpoint, kept beside its weights
# (python -m dyrate_ref.tools.calibrate_vtw --out DIR/vtw_calibration.json).
VTW_CALIBRATION = "vtw_calibration.json"


# ----------------------------------------------------------------------------------------------------
# Shared pieces: where the image is, what a step's attention says about it, how many tokens to keep.


def visual_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, N) of the one contiguous run of <image> ids in input_ids [P]."""
    where = (input_ids == image_token_id).nonzero().squeeze(1)  # [N]
    assert where.numel() > 0, "no <image> tokens in the input"
    start, n = int(where[0]), where.numel()
    assert int(where[-1]) == start + n - 1, "<image> tokens are not contiguous"
    return start, n


def visual_scores(attn_probs: torch.Tensor, span: tuple[int, int], query: str = "last") -> torch.Tensor:
    """Importance of each visual token: attention probabilities [1, H, T, S] of one layer (whose keys are
    the full sequence, slot == position) -> [N] fp32, averaged over heads and over the chosen queries.

    query "last": the step's last query (FastV's public code; the only query of a decode step).
    query "mean": every prompt query after the image (the text part of the prompt); prefill only. FastV's
    paper averages over all tokens; averaging over the text after the image is dyrate_ref's variant.
    """
    start, n = span
    p = attn_probs[0, :, :, start:start + n].float()  # [H, T, N]
    rows = p[:, -1:] if query == "last" else p[:, start + n:]  # [H, 1, N] or [H, T_after, N]
    return rows.mean(dim=(0, 1))  # [N]


def kept_count(n: int, rate: float) -> int:
    """How many of n tokens remain when a part `rate` of them is dropped: n - round(rate·n), the dropped
    count rounded half up. The one rounding rule of every method (FastV's R, DyRate's schedule and its
    predictor's cuts). round(·, 6) first: 0.7·10 is 7.000000000000001 in floating point."""
    return n - math.floor(round(rate * n, 6) + 0.5)


def top_k_sorted(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring of `candidates` (visual indices [M]), returned in ascending index order."""
    if k >= candidates.numel():
        return candidates
    best = scores[candidates].topk(k).indices  # [k]
    return candidates[best].sort().values  # [k]


def cut(keep: torch.Tensor, scores: torch.Tensor, part: float) -> torch.Tensor:
    """Drop `part` of the still-kept tokens keep [M] (a cut): keep the best kept_count(M, part) of them by
    score (nested: a subset of keep). DyRate's predictor acts through this, and its labels are made
    with it (tools/train_predictor.py)."""
    return top_k_sorted(keep, scores, kept_count(keep.numel(), part))


def keep_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Kept visual indices [M] -> the same set as a bool mask [N] (the trace's visual_keep row)."""
    mask = torch.zeros(n, dtype=torch.bool, device=keep.device)
    mask[keep] = True
    return mask


def layer_in_range(K, num_layers: int) -> bool:
    """The one range rule of a pruning layer: a whole number 1 <= K <= L-1 (layer 0 has no attention to
    read before it; at K = L nothing would be pruned)."""
    return not isinstance(K, bool) and isinstance(K, int) and 1 <= K <= num_layers - 1


def check_layer(K, num_layers: int, what: str) -> int:
    """layer_in_range, or a UserError; `what` names where K came from, for the message."""
    if not layer_in_range(K, num_layers):
        raise UserError(f"{what} {K} is outside 1..{num_layers - 1} (the model has {num_layers} layers)")
    return K


def check_layers(methods, num_layers: int, what: str, instead: str):
    """Every method of a fixed set (a tool's standard rows) prunes at a layer this decoder has: a K it
    lacks would run unpruned under a pruned method's name. `what` names the set, `instead` what to do."""
    bad = sorted({m.layer for m in methods if not layer_in_range(m.layer, num_layers)})
    if bad:
        raise UserError(f"{what} prune at layer K={', '.join(map(str, bad))}, which a {num_layers}-layer decoder does "
                        f"not have (K must lie in 1..{num_layers - 1}); {instead}")


# ----------------------------------------------------------------------------------------------------
# Settings: field metadata, parsing from text, resolution against a checkpoint.


PER_ITEM = ("seed", "counts")  # what the evaluation can set per item: the item's own seed, a matched row's kept counts


def setting(default, parse, help: str, short: str, input_file: bool = False, per_item: str | None = None,
            aliases: tuple[str, ...] = ()):
    """A method's setting: a dataclass field that also says how to read it from text (a CLI flag or an
    --extra spec), what it means and its short name in the summary line. input_file: its value names a
    file the run reads (the commands then protect it from every output, and the summary names it by
    its base name). per_item: the evaluation sets it for each item ("seed": the item's seed, "counts":
    the kept counts another row had on that item), whatever a spec says. aliases: older names still
    accepted as flags and in specs (FastV's rate was once `ratio`)."""
    assert per_item in (None,) + PER_ITEM, per_item
    return field(default=default, metadata={"parse": parse, "help": help, "short": short, "aliases": aliases,
                                            "input_file": input_file, "per_item": per_item})


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("is not a whole number") from None


def parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("is outside [0, 1]")
    return value


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise ValueError("is not a comma-separated list of numbers") from None
    if not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError("has a rate outside [0, 1]")
    return rates


def parse_score(text: str) -> str:
    if text not in ("last", "mean"):
        raise ValueError("is not 'last' or 'mean'")
    return text


LAYER_HELP = "pruning layer K, 1..L-1"


@dataclass(frozen=True)
class Context:
    """What resolving a method may read: the checkpoint's directory and its decoder depth, and the
    config (a predictor checks it was trained for this model)."""
    weights_dir: str
    num_layers: int
    config: object = None


def setting_text(value) -> str:
    """A setting's value as text: what the trace's metadata records (a file-valued setting: its path)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Origin:
    """Where a resolved setting's value came from. kind: "flag" (generate.py's flag), "spec" (an
    `evaluate --extra` spec, named in `text`), "default", "file" (a file beside the weights or the
    predictor file, named in `text`) or "fallback" (a rule used because no file gave a value; `text`
    says why). str() is what the summary line and the trace's `<setting>_from` say."""
    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


FLAG, DEFAULT = Origin("flag", "flag"), Origin("default", "default")


def given_label(name: str, origin: Origin) -> str:
    """How a message names a setting: its flag when it came from one, else the setting and its origin."""
    return f"--{name.replace('_', '-')}" if origin.kind == "flag" else f"{name} (from {origin})"


class Method:
    """What every method shares. Subclasses are frozen dataclasses whose fields are their settings.

    Every method has a pruning layer K, `layer` (a setting, or for NoPruning a constant: the layer whose
    attention the loop records): the decode loop splits the decoder there."""
    name: ClassVar[str]
    layer: int

    def scores(self, probs: torch.Tensor, span: tuple[int, int], t: int, last: torch.Tensor) -> torch.Tensor:
        """What step t decides on. probs: layer K-1's attention [1, H, T, S]; last: the step's last
        query's scores over the visual tokens (visual_scores(probs, span, "last")), which the loop has
        already computed for the trace. Default: `last`. -> [N]."""
        return last

    def choose(self, t: int, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """keep_{t-1} [M] and step t's scores [N] -> keep_t, a subset of keep (ascending)."""
        raise NotImplementedError

    @classmethod
    def resolve(cls, given: dict, ctx: Context, given_as: Origin = FLAG):
        """Fill in what was not given, once: -> (method, {field: Origin of its value})."""
        values = {f.name: given.get(f.name, f.default) for f in fields(cls)}
        origins = {f.name: given_as if f.name in given else DEFAULT for f in fields(cls)}
        return cls._checked(values, origins, ctx)

    @classmethod
    def _checked(cls, values: dict, origins: dict, ctx: Context):
        if "layer" in values:
            check_layer(values["layer"], ctx.num_layers, given_label("layer", origins["layer"]))
        return cls(**values), origins

    def describe(self, origins: dict | None = None) -> str:
        """One line for the summary: the method, its settings, and where each came from."""
        def shown(f):
            text = setting_text(getattr(self, f.name))
            return (os.path.basename(text) or f.name) if f.metadata["input_file"] else text
        parts = [f"{f.metadata['short']}={shown(f)}" for f in fields(self) if getattr(self, f.name) is not None]
        text = " ".join([f"method {self.name}"] + parts)
        if origins:
            by_origin: dict[str, list[str]] = {}
            for f in fields(self):
                if getattr(self, f.name) is not None and f.name in origins:
                    by_origin.setdefault(str(origins[f.name]), []).append(f.metadata["short"])
            text += " (" + "; ".join(f"{', '.join(v)}: {k}" for k, v in by_origin.items()) + ")"
        return text

    def to(self, device):
        """Move what the method computes with (a predictor) to the model's device; most hold nothing."""
        return self

    def metadata(self, origins: dict | None = None) -> dict:
        """The trace's record of the method: its name and only the settings it has, each with its origin."""
        meta = {"method": self.name}
        for f in fields(self):
            meta[f.name] = setting_text(getattr(self, f.name))
            if origins and f.name in origins:
                meta[f.name + "_from"] = str(origins[f.name])
        return meta


# ----------------------------------------------------------------------------------------------------
# The methods.


@dataclass(frozen=True)
class NoPruning(Method):
    """Keep every visual token. The loop still splits the decoder at `layer` (not a setting) and records
    that layer's attention to the image, which the plots draw."""
    name: ClassVar[str] = "none"
    layer: ClassVar[int] = DEFAULT_LAYER

    def choose(self, t, keep, scores):
        return keep


@dataclass(frozen=True)
class FastV(Method):
    """FastV (Chen et al., 2024): at the prefill, keep the visual tokens layer K-1 attends to most,
    kept_count(N, R) of them, for the whole answer."""
    name: ClassVar[str] = "fastv"
    layer: int = setting(DEFAULT_LAYER, parse_int, LAYER_HELP + " (default 2, FastV's setting for LLaVA-1.5)", "K")
    rate: float = setting(0.5, parse_fraction, "rate R: the part of the visual tokens dropped at the prefill "
                          "(default 0.5)", "R", aliases=("ratio",))
    score: str = setting("last", parse_score, "score by the prompt's 'last' query (default) or the 'mean' of the "
                         "queries after the image", "score")

    def scores(self, probs, span, t, last):
        return visual_scores(probs, span, "mean") if t == 0 and self.score == "mean" else last

    def choose(self, t, keep, scores):
        if t > 0:
            return keep
        n = scores.numel()
        return top_k_sorted(torch.arange(n, device=scores.device), scores, kept_count(n, self.rate))


def vtw_calibrated_layer(weights_dir: str, num_layers: int) -> tuple[int | None, str]:
    """The layer calibrate_vtw chose for these weights (their vtw_calibration.json) and what the file
    said: -> (K or None, why). A file that cannot be read is a UserError."""
    path = os.path.join(weights_dir, VTW_CALIBRATION)
    if not os.path.isfile(path):
        return None, f"no {VTW_CALIBRATION}"
    try:
        with open(path) as f:
            K = json.load(f).get("layer")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is not a readable VTW calibration ({e}); recalibrate or pass --layer") from None
    if K is None:
        return None, f"{VTW_CALIBRATION} found no layer within its eta"
    if not layer_in_range(K, num_layers):
        return None, f"{VTW_CALIBRATION} holds layer {K!r}, outside 1..{num_layers - 1}"
    return K, VTW_CALIBRATION


@dataclass(frozen=True)
class VTW(Method):
    """VTW (Lin et al., 2024): withdraw every visual token from layer K on."""
    name: ClassVar[str] = "vtw"
    layer: int = setting(None, parse_int, LAYER_HELP + " (default: the weights' vtw_calibration.json, else L/2)", "K")

    def choose(self, t, keep, scores):
        return torch.empty(0, dtype=torch.long, device=scores.device)

    @classmethod
    def resolve(cls, given, ctx, given_as=FLAG):
        if "layer" in given:
            return cls._checked({"layer": given["layer"]}, {"layer": given_as}, ctx)
        K, why = vtw_calibrated_layer(ctx.weights_dir, ctx.num_layers)
        if K is None:
            return cls._checked({"layer": ctx.num_layers // 2}, {"layer": Origin("fallback", f"L/2, {why}")}, ctx)
        return cls._checked({"layer": K}, {"layer": Origin("file", why)}, ctx)


@dataclass(frozen=True)
class DyRate(Method):
    """DyRate (arXiv 2501.14204): the rate grows during the answer, step by step. With `rates`, a fixed
    schedule (r_t = rates[t], the last value repeating; kept_count(N, r_t) of keep_{t-1}'s best); without,
    the predictor reads step t's attention and picks the step's cut, the part of what is still kept to drop
    (predictor.py), decoding at `confidence`. Either way the survivors are the highest-scoring tokens of
    keep_{t-1}, so the kept sets are nested. (Keep rules: our reconstruction.)"""
    name: ClassVar[str] = "dyrate"
    layer: int = setting(DEFAULT_LAYER, parse_int, LAYER_HELP + " (default: the predictor's own layer; 2 with --rates)", "K")
    rates: tuple[float, ...] | None = setting(None, parse_rates, "fixed schedule r0,r1,... instead of the predictor "
                                              "(the last value repeats)", "rates")
    predictor: RatePredictor | None = setting(None, str, "predictor file (default: the one shipped with the weights)",
                                              "predictor", input_file=True)
    confidence: float | None = setting(None, parse_fraction, "the predictor's decoding confidence (default: its "
                                       "own; closer to 1 keeps more)", "c")

    def to(self, device):
        if self.predictor is not None:
            self.predictor.to(device)
        return self

    def choose(self, t, keep, scores):
        if self.rates is not None:
            rate = self.rates[min(t, len(self.rates) - 1)]
            return top_k_sorted(keep, scores, min(keep.numel(), kept_count(scores.numel(), rate)))
        part = self.predictor.cut(predictor_features(scores, keep, t), self.confidence)
        return cut(keep, scores, part)

    @classmethod
    def resolve(cls, given, ctx, given_as=FLAG):
        values = {f.name: given.get(f.name) for f in fields(cls)}
        origins = {k: given_as for k in given}
        if values["rates"] is not None:
            if values["predictor"] is not None or values["confidence"] is not None:
                other = "predictor" if values["predictor"] is not None else "confidence"
                raise UserError(f"{given_label('rates', given_as)} and {given_label(other, given_as)} both given; "
                                "DyRate uses a fixed schedule or the predictor")
            if values["layer"] is None:
                values["layer"], origins["layer"] = DEFAULT_LAYER, DEFAULT
            return cls._checked(values, origins, ctx)
        pred = values["predictor"]
        if not isinstance(pred, RatePredictor):
            path = pred or shipped_predictor_path(ctx.weights_dir)
            if path is None:
                raise UserError(f"method dyrate needs {given_label('predictor', given_as)} FILE or "
                                f"{given_label('rates', given_as)} LIST: {ctx.weights_dir} ships no "
                                "dyrate_predictor.safetensors")
            origins["predictor"] = origins.get("predictor", Origin("file", "shipped with the weights"))
            pred = load_predictor(path, ctx.config, ctx.weights_dir)
        values["predictor"] = pred
        where = f"predictor file {os.path.basename(pred.path) or 'predictor'}"
        check_layer(pred.layer, ctx.num_layers, f"{where} prunes from layer")
        if values["layer"] is not None and values["layer"] != pred.layer:
            label = given_label("layer", given_as)
            raise UserError(f"{label} {values['layer']} differs from the predictor's K={pred.layer}; "
                            f"leave {label.split(' ')[0]} out or train a predictor for that layer")
        values["layer"], origins["layer"] = pred.layer, origins.get("layer", Origin("file", "predictor file"))
        if values["confidence"] is None:
            values["confidence"], origins["confidence"] = pred.confidence, Origin("file", "predictor file")
        return cls._checked(values, origins, ctx)


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NoPruning, FastV, VTW, DyRate)}


def parse_settings(cls, texts: dict[str, str], registry: dict | None = None, where: str = "--") -> dict:
    """{field: text} -> {field: value} through each field's parser; a field the method does not have, or
    a value its parser refuses, is a UserError naming the flag (where="--") or the spec field."""
    registry = METHODS if registry is None else registry
    own = {f.name: f for f in fields(cls)}
    own_aliases = {a: f.name for f in fields(cls) for a in f.metadata["aliases"]}
    out = {}
    for name, text in texts.items():
        name = own_aliases.get(name, name)
        flag = f"{where}{name.replace('_', '-')}" if where == "--" else f"{where}{name}"
        if name not in own:
            owners = [m for m, c in registry.items() if name in {f.name for f in fields(c)}]
            belongs = f" (it belongs to {', '.join(owners)})" if owners else ""
            raise UserError(f"{flag} does not apply to --method {cls.name}{belongs}")
        try:
            out[name] = own[name].metadata["parse"](text)
        except ValueError as e:
            raise UserError(f"{flag} {text!r} {e}") from None
    return out


def method_class(name: str, registry: dict | None = None) -> type[Method]:
    registry = METHODS if registry is None else registry
    if name not in registry:
        raise UserError(f"unknown --method {name!r}; use one of {', '.join(registry)}")
    return registry[name]


def setting_fields(registry: dict | None = None) -> dict:
    """Every setting any method of the registry has: {field name: [(method name, field)]}, in
    registry order. The CLI makes one flag of each."""
    out: dict[str, list] = {}
    for name, cls in (METHODS if registry is None else registry).items():
        for f in fields(cls):
            out.setdefault(f.name, []).append((name, f))
    return out


def input_file_settings(registry: dict | None = None) -> list[str]:
    """The settings, of any method of the registry, whose values name files a run reads."""
    return [name for name, owners in setting_fields(registry).items() if any(f.metadata["input_file"] for _, f in owners)]
