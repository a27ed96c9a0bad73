"""DyRate's rate predictor: features of step t's visual-attention distribution -> a rate on a grid.

The paper (arXiv 2501.14204) says only that a lightweight predictor reads the attention distribution and
picks the compression rate for each step. Everything in this file is dyrate_ref's reconstruction: the
feature list, the model (a linear layer by default, optionally a small MLP), argmax decoding, and the
file format. Training is in train_predictor.py.

File: safetensors with the layer weights and a metadata header:
  format        "dyrate_ref-predictor-1"
  layer         K, the pruning layer whose input attention (layer K-1) the features read
  rate_grid     JSON list of rates, one per output logit
  features      JSON list of feature names, in input order
  hidden        0 for linear, else the MLP's hidden width
  model         fingerprint of the config.json it was trained on (the file is refused for other models)
  trained_on    the weights directory's name; training settings (tau, seed, examples, epochs, lr)
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .files import write_atomic

FORMAT = "dyrate_ref-predictor-1"
RATE_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
SHIPPED_NAME = "dyrate_predictor.safetensors"
FEATURES = (
    "visual_mass",  # share of the query's attention that goes to visual tokens at all
    "entropy",  # entropy of the visual distribution / log N: 1 = spread evenly, 0 = one token
    "top5_mass", "top10_mass", "top25_mass", "top50_mass",  # share of visual attention on the top p% tokens
    "q50", "q90", "q99", "qmax",  # log(1 + N * quantile of the normalised scores): 0.69 = uniform
    "kept_mass",  # share of visual attention that falls on tokens still kept
    "kept_fraction",  # |keep_{t-1}| / N
)


def predictor_features(scores: torch.Tensor, prev_keep: torch.Tensor) -> torch.Tensor:
    """scores [N] (layer K-1 attention of step t's query over all N visual tokens, head-averaged),
    prev_keep [M] -> features [F] fp32, in the order of FEATURES."""
    N = scores.numel()
    mass = scores.sum()
    p = scores / mass.clamp_min(1e-12)  # [N], sums to 1
    entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(N) if N > 1 else p.new_zeros(())
    sorted_p = p.sort(descending=True).values  # [N]
    cum = sorted_p.cumsum(0)  # [N]
    top = [cum[max(1, math.ceil(f * N)) - 1] for f in (0.05, 0.10, 0.25, 0.50)]
    q = [(N * sorted_p[min(N - 1, int((1 - f) * N))]).log1p() for f in (0.5, 0.9, 0.99)]
    qmax = (N * sorted_p[0]).log1p()
    kept_mass = p[prev_keep].sum()
    kept_fraction = torch.tensor(prev_keep.numel() / N, device=scores.device)
    return torch.stack([mass, entropy, *top, *q, qmax, kept_mass, kept_fraction]).float()  # [F]


def model_fingerprint(cfg) -> str:
    """Which model a predictor belongs to: a hash of the architecture (not of the weights, which would
    mean reading them all)."""
    return hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]


class RatePredictor(nn.Module):
    def __init__(self, layer: int, rate_grid=None, hidden: int = 0, meta: dict | None = None):
        super().__init__()
        self.layer = layer
        self.rate_grid = tuple(rate_grid or RATE_GRID)
        self.hidden = hidden
        self.meta = dict(meta or {})
        self.path = ""
        F, R = len(FEATURES), len(self.rate_grid)
        self.net = nn.Linear(F, R) if hidden == 0 else nn.Sequential(nn.Linear(F, hidden), nn.ReLU(), nn.Linear(hidden, R))
        # Features have different scales (masses in [0, 1], log-quantiles up to ~log N): standardised with
        # the training set's statistics, stored with the weights.
        self.register_buffer("mean", torch.zeros(F))
        self.register_buffer("std", torch.ones(F))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [..., F] -> logits over the rate grid [..., R]."""
        return self.net((feats - self.mean) / self.std)

    @torch.no_grad()
    def rate(self, feats: torch.Tensor) -> float:
        """The rate for one step: argmax over the grid (a host sync: the keep size depends on it)."""
        i = int(self.forward(feats.to(self.mean.device)).argmax())
        return self.rate_grid[i]

    def save(self, path: str, cfg, **settings):
        meta = {"format": FORMAT, "layer": str(self.layer), "rate_grid": json.dumps(list(self.rate_grid)),
                "features": json.dumps(list(FEATURES)), "hidden": str(self.hidden), "model": model_fingerprint(cfg),
                **{k: str(v) for k, v in {**self.meta, **settings}.items()}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def shipped_predictor_path(weights_dir: str) -> str | None:
    p = os.path.join(weights_dir, SHIPPED_NAME)
    return p if os.path.isfile(p) else None


def load_predictor(path: str, cfg, weights_dir: str = "") -> RatePredictor:
    """Read a predictor file and check that it fits this model; every problem is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"predictor file {path} does not exist")
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"predictor file {path} is not a readable safetensors file ({e}); retrain or re-copy it") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a dyrate_ref predictor (format {meta.get('format')!r})")
    try:
        layer, hidden = int(meta["layer"]), int(meta["hidden"])
        grid, names = json.loads(meta["rate_grid"]), json.loads(meta["features"])
    except (KeyError, ValueError) as e:
        raise UserError(f"predictor {path} has a damaged header ({e}); retrain it") from None
    if tuple(names) != FEATURES:
        raise UserError(f"predictor {path} was trained on other features ({len(names)}); retrain it with this version")
    L = cfg.text_config.num_hidden_layers
    if meta.get("model") != model_fingerprint(cfg):
        raise UserError(f"predictor {path} was trained for another model ({meta.get('trained_on', '?')}), not "
                        f"{weights_dir or 'these weights'}; train one with python -m dyrate_ref.train_predictor")
    if not 1 <= layer <= L - 1:
        raise UserError(f"predictor {path} prunes from layer {layer}, outside 1..{L - 1} for this model")
    pred = RatePredictor(layer, grid, hidden, {k: v for k, v in meta.items()})
    try:
        pred.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"predictor {path} does not match its own header ({str(e).splitlines()[0]}); retrain it") from None
    pred.path = os.path.abspath(path)
    return pred.eval()
