"""How a method is made from text: generate.py's flags, or a tool's spec NAME[:setting=value...].

Each setting's text is parsed (PARSE), the defaults that live in files beside the weights are read --
VTW's layer from vtw_calibration.json, DyRate's predictor (and with it K and c) from
dyrate_predictor.safetensors -- and every value keeps its origin (flag, spec, default, file), which the
summary line and the trace's metadata show. A method's settings are its dataclass fields (pruning.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, fields

from .commands import UserError
from .loading import load_predictor, shipped_predictor_path
from .predictor import RatePredictor
from .pruning import DEFAULT_LAYER, SCORES, DyRate, DyRateSchedule, VTW

# ----------------------------------------------------------------------------------------------------
# Parsers: text -> value, or ValueError saying what is wrong (parse_settings names the flag).


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


def parse_schedule(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise ValueError("is not a comma-separated list of numbers") from None
    if not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError("has a rate outside [0, 1]")
    return rates


def parse_score(text: str) -> str:
    if text not in SCORES:
        raise ValueError(f"is not one of {', '.join(SCORES)}")
    return text


# Every setting of pruning.METHODS: its parser and its short name in the summary line.
PARSE = {"layer": parse_int, "rate": parse_fraction, "score": parse_score, "predictor": str,
         "confidence": parse_fraction, "schedule": parse_schedule}
SHORT = {"layer": "K", "rate": "R", "score": "score", "predictor": "predictor", "confidence": "c",
         "schedule": "schedule"}
# Names settings had before; given, they are refused with the name to use.
RENAMED = {"ratio": "rate", "rates": "schedule"}


# ----------------------------------------------------------------------------------------------------
# The pruning layer's one range rule.


def layer_in_range(K, num_layers: int) -> bool:
    """A whole number 1 <= K <= L-1 (layer 0 has no attention to read before it; at K = L nothing would
    be pruned)."""
    return not isinstance(K, bool) and isinstance(K, int) and 1 <= K <= num_layers - 1


def check_layer(K, num_layers: int, what: str) -> int:
    """layer_in_range, or a UserError; `what` names where K came from, for the message."""
    if not layer_in_range(K, num_layers):
        raise UserError(f"{what} {K} is outside 1..{num_layers - 1} (the model has {num_layers} layers)")
    return K


# ----------------------------------------------------------------------------------------------------
# Making the method: defaults filled in once, each value's origin named.


@dataclass(frozen=True)
class Context:
    """What making a method may read: the checkpoint's directory, its decoder depth and its config (a
    predictor checks it was trained for this model)."""
    weights_dir: str
    num_layers: int
    config: object = None


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from. kind: "flag", "spec" (named in `text`), "default", "file" (a
    file beside the weights or the predictor file, named in `text`) or "fallback" (a rule used because
    no file gave a value; `text` says why). `text` is what the summary line and the trace say."""
    kind: str
    text: str


FLAG, DEFAULT = Origin("flag", "flag"), Origin("default", "default")


def given_label(name: str, origin: Origin) -> str:
    """How a message names a setting: its flag when it came from one, else the setting and its origin."""
    return f"--{name.replace('_', '-')}" if origin.kind == "flag" else f"{name} (from {origin.text})"


def parse_settings(cls, texts: dict[str, str], registry: dict, parse: dict = PARSE, where: str = "--") -> dict:
    """{setting: text} -> {setting: value} through each setting's parser; a renamed setting, one the
    method does not have, or a value its parser refuses, is a UserError naming the flag (where="--") or
    the spec."""
    own = {f.name for f in fields(cls)}
    out = {}
    for name, text in texts.items():
        flag = f"{where}{name.replace('_', '-')}" if where == "--" else f"{where}{name}"
        if name in RENAMED:
            new = f"--{RENAMED[name]}" if where == "--" else RENAMED[name]
            raise UserError(f"{flag} is now {new}; give {new} {text}" if where == "--" else
                            f"{flag} is now {new}; write {new}={text}")
        if name in own and name not in parse:
            raise UserError(f"{flag} is set per item by the tool that runs the method, not given")
        if name not in own:
            owners = [m for m, c in registry.items() if name in {f.name for f in fields(c)}]
            belongs = f" (it belongs to {', '.join(owners)})" if owners else ""
            raise UserError(f"{flag} does not apply to --method {cls.name}{belongs}")
        try:
            out[name] = parse[name](text)
        except ValueError as e:
            raise UserError(f"{flag} {text!r} {e}") from None
    return out


def make_method(cls, given: dict, ctx: Context, given_as: Origin = FLAG):
    """The method of class `cls` from the parsed settings `given`, each default filled in once:
    -> (method, {setting: Origin of its value}). DyRate reads its predictor file (the flag's, else the
    one shipped with the weights), which fixes K and c unless given; VTW's K comes from the flag, else the
    weights' vtw_calibration.json, else L/2; every other default is the dataclass's."""
    values, origins = dict(given), {name: given_as for name in given}
    if cls is DyRate:
        path = values.get("predictor") or shipped_predictor_path(ctx.weights_dir)
        if path is None:
            raise UserError(f"method dyrate needs {given_label('predictor', given_as)} FILE: {ctx.weights_dir} ships no "
                            "dyrate_predictor.safetensors (or run --method dyrate-schedule --schedule LIST)")
        origins.setdefault("predictor", Origin("file", "shipped with the weights"))
        values["predictor"] = pred = load_predictor(path, ctx.config, ctx.weights_dir)
        check_layer(pred.layer, ctx.num_layers, f"predictor file {os.path.basename(path)} prunes from layer")
        if values.setdefault("layer", pred.layer) != pred.layer:
            label = given_label("layer", given_as)
            raise UserError(f"{label} {values['layer']} differs from the predictor's K={pred.layer}; "
                            f"leave {label.split(' ')[0]} out or train a predictor for that layer")
        origins.setdefault("layer", Origin("file", "predictor file"))
        if "confidence" not in values:
            values["confidence"], origins["confidence"] = pred.confidence, Origin("file", "predictor file")
        if values.setdefault("score", pred.score) != pred.score:
            label = given_label("score", given_as)
            raise UserError(f"{label} {values['score']} differs from the predictor's score ({pred.score}), which its "
                            f"features were trained on; leave {label.split(' ')[0]} out or train a predictor with it")
        origins.setdefault("score", Origin("file", "predictor file"))
    elif cls is VTW and "layer" not in values:
        K, why = vtw_calibrated_layer(ctx.weights_dir, ctx.num_layers)
        values["layer"], origins["layer"] = ((ctx.num_layers // 2, Origin("fallback", f"L/2, {why}")) if K is None
                                             else (K, Origin("file", why)))
    elif cls is DyRateSchedule:
        if "schedule" not in values:
            raise UserError(f"method dyrate-schedule needs {given_label('schedule', given_as)} r0,r1,... (the rate "
                            "dropped by each step, the last repeating)")
        if "layer" not in values:
            values["layer"], origins["layer"] = DEFAULT_LAYER, DEFAULT
    for f in fields(cls):
        if f.name not in values and f.default is not MISSING:
            values[f.name], origins[f.name] = f.default, DEFAULT
    if "layer" in values:
        check_layer(values["layer"], ctx.num_layers, given_label("layer", origins["layer"]))
    try:
        return cls(**values), origins
    except ValueError as e:  # a combination no single parser sees (fastv's score=accumulated)
        raise UserError(f"method {cls.name}: {e}") from None


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


# ----------------------------------------------------------------------------------------------------
# Describing: the summary line and the trace's metadata.


def setting_text(value) -> str:
    """A setting's value as text: what the trace's metadata records (a predictor: its file's path)."""
    if isinstance(value, RatePredictor):
        return value.path
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def describe(method, origins: dict | None = None, short: dict = SHORT) -> str:
    """One line for the summary: the method, its settings, and where each came from."""
    def shown(name):
        text = setting_text(getattr(method, name))
        return (os.path.basename(text) or name) if name == "predictor" else text
    names = [f.name for f in fields(method) if getattr(method, f.name) is not None]
    text = " ".join([f"method {method.name}"] + [f"{short.get(n, n)}={shown(n)}" for n in names])
    if origins:
        by_origin: dict[str, list[str]] = {}
        for n in names:
            if n in origins:
                by_origin.setdefault(origins[n].text, []).append(short.get(n, n))
        text += " (" + "; ".join(f"{', '.join(v)}: {k}" for k, v in by_origin.items()) + ")"
    return text


def metadata(method, origins: dict | None = None) -> dict:
    """The trace's record of the method: its name and only the settings it has, each with its origin."""
    meta = {"method": method.name}
    for f in fields(method):
        meta[f.name] = setting_text(getattr(method, f.name))
        if origins and f.name in origins:
            meta[f.name + "_from"] = origins[f.name].text
    return meta
