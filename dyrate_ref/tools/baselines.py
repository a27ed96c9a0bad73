"""Evaluation baselines, shaped like the methods of pruning.py but not methods a user runs: the core
knows nothing of them. `evaluate --extra` builds them from the same kind of spec (BASELINES extends the
registry there).

- attention mass: keep the fewest tokens that hold mass p of the step's attention to the image;
- random keep: a random subset of a given size (from a fixed rate, or matched to another row's kept
  counts step by step): does choosing by attention matter at all?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import settings
from ..commands import SPEC_FORM, UserError
from ..pruning import DEFAULT_LAYER, METHODS, Method, kept_count, top_k_sorted
from ..settings import layer_in_range, parse_fraction


@dataclass(frozen=True)
class AttentionMass(Method):
    """Keep the fewest tokens of keep_{t-1} that hold `mass` p of the step's attention to all N visual
    tokens; keep_{t-1} itself when even all of it holds less (what was dropped carried the rest)."""
    name: ClassVar[str] = "mass"
    layer: int = DEFAULT_LAYER
    mass: float = 0.9  # p: the share of the step's attention to the image to keep

    def choose(self, t, keep, scores):
        total = scores.sum()
        s = scores[keep].sort(descending=True).values  # [M]
        reach = (s.cumsum(0) >= self.mass * total).nonzero()
        if reach.numel() > 0:
            keep = top_k_sorted(keep, scores, int(reach[0]) + 1)
        return keep


def random_subset(keep: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k of keep (visual indices [M]) chosen at random with their own seeded generator, ascending."""
    if k >= keep.numel():
        return keep
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(keep.numel(), generator=g)[:k].to(keep.device)
    return keep[pick].sort().values


@dataclass(frozen=True)
class RandomKeep(Method):
    """Keep a random subset of keep_{t-1}: kept_count(N, rate) tokens from the prefill on, or, with
    `counts`, counts[t] at step t (the last repeating; another row's own counts, matched per item by the
    evaluation). Seeded per item and step, so a subset of the items draws what the whole set would."""
    name: ClassVar[str] = "random"
    layer: int = DEFAULT_LAYER
    rate: float | None = None  # R: the part of the visual tokens dropped at random
    counts: tuple[int, ...] | None = None  # set by the evaluation: another row's kept count at each step
    seed: int = 0  # set by the evaluation: the item's own

    def choose(self, t, keep, scores):
        n = scores.numel()
        k = kept_count(n, self.rate) if self.counts is None else self.counts[min(t, len(self.counts) - 1)]
        return random_subset(keep, k, self.seed * 100_003 + t)


BASELINES = {cls.name: cls for cls in (AttentionMass, RandomKeep)}
REGISTRY = {**METHODS, **BASELINES}  # what a tool's spec may name
# The baselines' settings a spec may give (random's counts and seed are set per item by the evaluation).
PARSE = {**settings.PARSE, "mass": parse_fraction}


def from_spec(spec: str, ctx, origin=None):
    """A method or baseline from a spec NAME[:setting=value...] (`evaluate --extra`, the tools' own
    lists), through the same parsers and defaults as generate.py's flags. -> (method, origins)."""
    name, *pairs = spec.split(":")
    if name not in REGISTRY or not all("=" in p for p in pairs):
        raise UserError(f"{origin.text if origin else repr(spec)}: use {SPEC_FORM}")
    origin = origin or settings.Origin("spec", spec)
    cls = REGISTRY[name]
    given = settings.parse_settings(cls, dict(p.split("=", 1) for p in pairs), REGISTRY, PARSE, where=f"{origin.text}: ")
    if cls is RandomKeep and "rate" not in given:
        raise UserError(f"random keep needs rate=R (the part of the visual tokens it drops), from {origin.text}")
    return settings.make_method(cls, given, ctx, origin)


def spec_layers(specs) -> list[int]:
    """The pruning layers that specs name (layer=K), for a range check before any is built."""
    return [int(pair.split("=", 1)[1]) for spec in specs for pair in spec.split(":")[1:] if pair.startswith("layer=")]


def check_layers(layers, num_layers: int, what: str, instead: str):
    """Every method of a fixed set (a tool's standard rows) prunes at a layer this decoder has: a K it
    lacks would run unpruned under a pruned method's name. `what` names the set, `instead` what to do."""
    bad = sorted({K for K in layers if not layer_in_range(K, num_layers)})
    if bad:
        raise UserError(f"{what} prune at layer K={', '.join(map(str, bad))}, which a {num_layers}-layer decoder does "
                        f"not have (K must lie in 1..{num_layers - 1}); {instead}")
