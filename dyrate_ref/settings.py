"""Method settings: how a method's fields become flags, `evaluate --extra` specs and trace metadata.

pruning.py holds the methods; this module holds everything around their settings that a reader of the
method does not need: declaring a setting (`setting`), parsing it from text, resolving it once against
a checkpoint with the origin of every value (`resolve`), and describing the result (`describe`,
`metadata`). A method declares its settings in its own class, as dataclass fields made with `setting`;
the CLI and the tools build everything else from those fields and a registry (pruning.METHODS, or a
tool's own registry that adds baselines), which they pass in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from .errors import UserError

# What the evaluation may set per item: the item's own seed, or the kept counts a matched row had on it.
PER_ITEM = ("seed", "counts")


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


# ----------------------------------------------------------------------------------------------------
# The pruning layer's one range rule.


def layer_in_range(K, num_layers: int) -> bool:
    """The one range rule of a pruning layer: a whole number 1 <= K <= L-1 (layer 0 has no attention to
    read before it; at K = L nothing would be pruned)."""
    return not isinstance(K, bool) and isinstance(K, int) and 1 <= K <= num_layers - 1


def check_layer(K, num_layers: int, what: str) -> int:
    """layer_in_range, or a UserError; `what` names where K came from, for the message."""
    if not layer_in_range(K, num_layers):
        raise UserError(f"{what} {K} is outside 1..{num_layers - 1} (the model has {num_layers} layers)")
    return K


def check_layers(layers, num_layers: int, what: str, instead: str):
    """Every method of a fixed set (a tool's standard rows) prunes at a layer this decoder has: a K it
    lacks would run unpruned under a pruned method's name. `what` names the set, `instead` what to do."""
    bad = sorted({K for K in layers if not layer_in_range(K, num_layers)})
    if bad:
        raise UserError(f"{what} prune at layer K={', '.join(map(str, bad))}, which a {num_layers}-layer decoder does "
                        f"not have (K must lie in 1..{num_layers - 1}); {instead}")


# ----------------------------------------------------------------------------------------------------
# Resolving: defaults filled in once, each value's origin named.


@dataclass(frozen=True)
class Context:
    """What resolving a method may read: the checkpoint's directory and its decoder depth, and the
    config (a predictor checks it was trained for this model)."""
    weights_dir: str
    num_layers: int
    config: object = None


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


def checked(cls, values: dict, origins: dict, ctx: Context):
    """The method built from resolved values, its layer range-checked. -> (method, origins)."""
    if "layer" in values:
        check_layer(values["layer"], ctx.num_layers, given_label("layer", origins["layer"]))
    return cls(**values), origins


def resolve(cls, given: dict, ctx: Context, given_as: Origin = FLAG):
    """Fill in what was not given, once: -> (method, {field: Origin of its value}). A method whose
    defaults come from elsewhere than its fields (VTW's calibration file, DyRate's predictor file)
    has its own `defaults` classmethod, which this calls instead."""
    if hasattr(cls, "defaults"):
        return cls.defaults(given, ctx, given_as)
    values = {f.name: given.get(f.name, f.default) for f in fields(cls)}
    origins = {f.name: given_as if f.name in given else DEFAULT for f in fields(cls)}
    return checked(cls, values, origins, ctx)


# ----------------------------------------------------------------------------------------------------
# Describing: the summary line and the trace's metadata.


def setting_text(value) -> str:
    """A setting's value as text: what the trace's metadata records (a file-valued setting: its path)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def describe(method, origins: dict | None = None) -> str:
    """One line for the summary: the method, its settings, and where each came from."""
    def shown(f):
        text = setting_text(getattr(method, f.name))
        return (os.path.basename(text) or f.name) if f.metadata["input_file"] else text
    parts = [f"{f.metadata['short']}={shown(f)}" for f in fields(method) if getattr(method, f.name) is not None]
    text = " ".join([f"method {method.name}"] + parts)
    if origins:
        by_origin: dict[str, list[str]] = {}
        for f in fields(method):
            if getattr(method, f.name) is not None and f.name in origins:
                by_origin.setdefault(str(origins[f.name]), []).append(f.metadata["short"])
        text += " (" + "; ".join(f"{', '.join(v)}: {k}" for k, v in by_origin.items()) + ")"
    return text


def metadata(method, origins: dict | None = None) -> dict:
    """The trace's record of the method: its name and only the settings it has, each with its origin."""
    meta = {"method": method.name}
    for f in fields(method):
        meta[f.name] = setting_text(getattr(method, f.name))
        if origins and f.name in origins:
            meta[f.name + "_from"] = str(origins[f.name])
    return meta


# ----------------------------------------------------------------------------------------------------
# The registry's settings: what the CLI makes flags of and what a spec may name.


def parse_settings(cls, texts: dict[str, str], registry: dict, where: str = "--") -> dict:
    """{field: text} -> {field: value} through each field's parser; a field the method does not have, or
    a value its parser refuses, is a UserError naming the flag (where="--") or the spec field."""
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


def method_class(name: str, registry: dict):
    if name not in registry:
        raise UserError(f"unknown --method {name!r}; use one of {', '.join(registry)}")
    return registry[name]


def setting_fields(registry: dict) -> dict:
    """Every setting any method of the registry has: {field name: [(method name, field)]}, in
    registry order. The CLI makes one flag of each."""
    out: dict[str, list] = {}
    for name, cls in registry.items():
        for f in fields(cls):
            out.setdefault(f.name, []).append((name, f))
    return out


def input_file_settings(registry: dict) -> list[str]:
    """The settings, of any method of the registry, whose values name files a run reads."""
    return [name for name, owners in setting_fields(registry).items() if any(f.metadata["input_file"] for _, f in owners)]


def build(spec: str, registry: dict, ctx: Context, given_as: Origin | None = None):
    """A method from a spec, NAME[:setting=value...] (`evaluate --extra`, the tools' own lists), through
    the same parsers and resolution as generate.py's flags. -> (method, origins). An unknown name or a
    malformed pair is a UserError that shows the form."""
    name, *pairs = spec.split(":")
    if name not in registry or not all("=" in p for p in pairs):
        raise UserError(f"{spec!r} is not NAME[:setting=value...] with NAME one of {', '.join(registry)}")
    cls = registry[name]
    texts = dict(p.split("=", 1) for p in pairs)
    where = f"{given_as}: " if given_as else f"{spec}: "
    return resolve(cls, parse_settings(cls, texts, registry, where=where), ctx,
                   given_as=given_as or Origin("spec", spec))


def spec_layers(specs) -> list[int]:
    """The pruning layers that specs name (layer=K), for a range check before any is built."""
    return [int(pair.split("=", 1)[1]) for spec in specs for pair in spec.split(":")[1:] if pair.startswith("layer=")]
