"""FastV, VTW and DyRate: each method is a value. The decode loop (generation.py) asks it once per step.

Shared semantics (docs/pruning.md says the same):
- N visual tokens; their span is found from the <image> ids in input_ids. Pruning layer K, 1 <= K <= L-1.
  Layers < K always see every token.
- Step t is the forward pass whose output is token t; step 0 is the prefill, whose query is the last
  prompt token. The method chooses keep_t, a subset of {0..N-1}. In layers >= K the step's query attends
  only to kept visual tokens; evicted ones are removed from the KV cache of layers >= K and never come
  back, so keep_t ⊆ keep_{t-1}. In the prefill every prompt position in layers >= K sees only keep_0.
- Scores: layer K-1's attention probabilities of step t's query over the visual tokens, averaged over
  heads. Position ids keep their original values after eviction.

One word per quantity, in code, trace and docs:
- keep: the kept visual indices [M], ascending; a keep mask is the same set as a bool [N] (the trace's
  `visual_keep` rows);
- rate: always a share of the N visual tokens: r_t = 1 - |keep_t| / N is the part dropped by step t (the
  paper's compression rate; FastV's R and a DyRate schedule are target rates). The decode loop records
  it from keep_t, once, so it is what was dropped after rounding and nesting; kept fraction = 1 - r_t;
- cut: the share of the still-kept tokens keep_{t-1} that one step drops (DyRate's predictor chooses a
  cut per step: 0, 1/4, 1/2, 3/4 or all of what is left);
- mass: attention probability summed over tokens (a step's attention mass on the image).

A method is one small frozen dataclass whose fields are its settings (settings.py turns them into
flags, `evaluate --extra` specs and trace metadata), with

    choose(t, keep, scores) -> keep_t       the decision of step t
    scores(probs, span, t, last) -> [N]     what it decides on (default: `last`, the step's last query's
                                            scores, which the loop computes once)

METHODS maps names to classes; nothing outside it dispatches on a method's name. Adding a method is a
class and a registry line (docs/pruning.md, "Adding a method").

From the DyRate paper (arXiv 2501.14204, abstract and first page, all we have): the compression rate
grows during generation and is chosen per step by a lightweight predictor that reads the attention
distribution. Everything finer -- the features, the cuts, the keep rules below, the training labels --
is dyrate_ref's reconstruction.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .errors import UserError
from .predictor import RatePredictor, load_predictor, predictor_features, shipped_predictor_path
from .settings import (DEFAULT, LAYER_HELP, Origin, check_layer, checked, describe, given_label, layer_in_range,
                       parse_fraction, parse_int, parse_rates, parse_score, setting)

DEFAULT_LAYER = 2  # K = 2, FastV's recommended setting for LLaVA-1.5


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
    """Importance of each visual token: attention probabilities [1, H, T, S] of one layer whose slot s
    holds position s (a layer below K: nothing evicted) -> [N] fp32, averaged over heads and queries.

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


def apply_cut(keep: torch.Tensor, scores: torch.Tensor, cut: float) -> torch.Tensor:
    """Drop the share `cut` of the still-kept tokens keep [M]: keep the best kept_count(M, cut) of them
    by score (nested: a subset of keep). DyRate's predictor acts through this, and its labels are made
    with it (tools/train_predictor.py)."""
    return top_k_sorted(keep, scores, kept_count(keep.numel(), cut))


def keep_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Kept visual indices [M] -> the same set as a bool mask [N] (the trace's visual_keep row)."""
    mask = torch.zeros(n, dtype=torch.bool, device=keep.device)
    mask[keep] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# The methods.


class Method:
    """What every method shares (DyRate, the method this project is named for, comes first below). Subclasses are frozen dataclasses whose fields are their settings.
    Every method has a pruning layer K, `layer` (a setting, or for NoPruning a constant: the layer whose
    attention the loop records): the decode loop splits the decoder there."""
    name: ClassVar[str]
    layer: int

    def scores(self, probs: torch.Tensor, span: tuple[int, int], t: int, last: torch.Tensor) -> torch.Tensor:
        """What step t decides on. probs: layer K-1's attention [1, H, T, S]; last: the step's last
        query's scores over the visual tokens (visual_scores(probs, span, "last")). -> [N]."""
        return last

    def choose(self, t: int, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """keep_{t-1} [M] and step t's scores [N] -> keep_t, a subset of keep (ascending)."""
        raise NotImplementedError

    def to(self, device):
        """Move what the method computes with (a predictor) to the model's device; most hold nothing."""
        return self

    def label(self, weights_dir: str = "") -> str:
        """The method's name in a table (the same for a method given by flags or by an --extra spec):
        its summary line, unless the class says it shorter. weights_dir: where a shipped file lies."""
        return describe(self).removeprefix("method ")

    def family(self) -> str | None:
        """Which curve of a Pareto figure the method belongs to (None: the tool names it)."""
        return None


@dataclass(frozen=True)
class DyRate(Method):
    """DyRate (arXiv 2501.14204): the rate grows during the answer, step by step. With `rates`, a fixed
    schedule (r_t = rates[t], the last value repeating; kept_count(N, r_t) of keep_{t-1}'s best); without,
    the predictor reads step t's attention and chooses the step's cut, the share of what is still kept to
    drop (predictor.py), decoding at `confidence`. Either way the survivors are the highest-scoring tokens
    of keep_{t-1}, so the kept sets are nested. (Keep rules: our reconstruction.)"""
    name: ClassVar[str] = "dyrate"
    layer: int = setting(DEFAULT_LAYER, parse_int, LAYER_HELP + " (default: the predictor's own layer; 2 with --rates)", "K")
    rates: tuple[float, ...] | None = setting(None, parse_rates, "fixed schedule r0,r1,... instead of the predictor "
                                              "(the last value repeats)", "rates")
    predictor: RatePredictor | None = setting(None, str, "predictor file (default: the one shipped with the weights)",
                                              "predictor", input_file=True)
    confidence: float | None = setting(None, parse_fraction, "the predictor's decoding confidence (default: its "
                                       "own; closer to 1 keeps more)", "c")

    def choose(self, t, keep, scores):
        if self.rates is not None:
            rate = self.rates[min(t, len(self.rates) - 1)]
            return top_k_sorted(keep, scores, min(keep.numel(), kept_count(scores.numel(), rate)))
        cut = self.predictor.choose_cut(predictor_features(scores, keep, t), self.confidence)
        return apply_cut(keep, scores, cut)

    def to(self, device):
        if self.predictor is not None:
            self.predictor.to(device)
        return self

    @classmethod
    def defaults(cls, given, ctx, given_as):
        """A schedule (K: the flag or 2) or a predictor (the flag's file or the shipped one; K and c its own
        unless given, and a different K is refused)."""
        values = {f.name: given.get(f.name) for f in fields(cls)}
        origins = {k: given_as for k in given}
        if values["rates"] is not None:
            if values["predictor"] is not None or values["confidence"] is not None:
                other = "predictor" if values["predictor"] is not None else "confidence"
                raise UserError(f"{given_label('rates', given_as)} and {given_label(other, given_as)} both given; "
                                "DyRate uses a fixed schedule or the predictor")
            if values["layer"] is None:
                values["layer"], origins["layer"] = DEFAULT_LAYER, DEFAULT
            return checked(cls, values, origins, ctx)
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
        return checked(cls, values, origins, ctx)

    def label(self, weights_dir=""):
        if self.rates is not None:
            rising = all(a <= b for a, b in zip(self.rates, self.rates[1:]))
            return f"DyRate K={self.layer} {'rising' if rising else 'schedule'} {','.join(f'{r:g}' for r in self.rates)}"
        path, shipped = str(self.predictor), shipped_predictor_path(weights_dir)
        own = shipped is not None and os.path.realpath(path) == os.path.realpath(shipped)
        return f"DyRate K={self.layer} predictor (c={self.confidence:g})" + ("" if own else f" {os.path.basename(path)}")

    def family(self):
        return "DyRate fixed schedule" if self.rates is not None else "DyRate predictor"


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

    def label(self, weights_dir=""):
        return f"FastV K={self.layer} R={self.rate:g}" + ("" if self.score == "last" else f" score={self.score}")

    def family(self):
        return f"FastV K={self.layer}"


@dataclass(frozen=True)
class VTW(Method):
    """VTW (Lin et al., 2024): withdraw every visual token from layer K on."""
    name: ClassVar[str] = "vtw"
    layer: int = setting(None, parse_int, LAYER_HELP + " (default: the weights' vtw_calibration.json, else L/2)", "K")

    def choose(self, t, keep, scores):
        return torch.empty(0, dtype=torch.long, device=scores.device)

    @classmethod
    def defaults(cls, given, ctx, given_as):
        """K from the flag, else from the weights' calibration file, else L/2 (the origin says why)."""
        if "layer" in given:
            return checked(cls, {"layer": given["layer"]}, {"layer": given_as}, ctx)
        K, why = vtw_calibrated_layer(ctx.weights_dir, ctx.num_layers)
        if K is None:
            return checked(cls, {"layer": ctx.num_layers // 2}, {"layer": Origin("fallback", f"L/2, {why}")}, ctx)
        return checked(cls, {"layer": K}, {"layer": Origin("file", why)}, ctx)

    def label(self, weights_dir=""):
        return f"VTW K={self.layer}"

    def family(self):
        return "VTW"


@dataclass(frozen=True)
class NoPruning(Method):
    """Keep every visual token. The loop still splits the decoder at `layer` (not a setting) and records
    that layer's attention to the image, which the plots draw."""
    name: ClassVar[str] = "none"
    layer: ClassVar[int] = DEFAULT_LAYER

    def choose(self, t, keep, scores):
        return keep

    def label(self, weights_dir=""):
        return "none"

    def family(self):
        return "none"


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NoPruning, FastV, VTW, DyRate)}


# VTW's withdrawal layer chosen for a checkpoint, kept beside its weights
# (python -m dyrate_ref.tools.calibrate_vtw --out DIR/vtw_calibration.json).
VTW_CALIBRATION = "vtw_calibration.json"


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
