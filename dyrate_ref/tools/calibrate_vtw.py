"""Choose VTW's withdrawal layer K the way VTW does: the first layer (from --min-layer on) whose mean
KL(P_withdrawn || P_full) over generated tokens stays within eta.

  python -m dyrate_ref.tools.calibrate_vtw --weights DIR --eta 0.003 [--min-layer 5] [--data FILE.jsonl|scenes:N]

For each calibration example the unpruned model answers greedily; then, for each candidate K, the same
answer is teacher-forced through the model with every visual token withdrawn from layer K on, and the
per-token KL to the unpruned distribution is averaged over all generated tokens of all examples.
"""

from __future__ import annotations

import math
import os

from ..commands import (ArgumentParser, DEFAULT_WEIGHTS, Progress, UserError, add_threads, add_weights, apply_threads,
                        command_main, parse_first, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.calibrate_vtw", description=summary(__doc__))
    add_weights(p, DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    add_threads(p)
    p.add_argument("--eta", type=float, default=0.003, help="mean KL budget in nats (VTW's default 0.003)")
    p.add_argument("--min-layer", type=int, default=5, help="first candidate K (VTW's default 5)")
    p.add_argument("--data", default="scenes:32", help="JSONL of {image, prompt, answer} or scenes:N (default scenes:32)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest unpruned answer used (default 48)")
    p.add_argument("--out", help="also write the result as JSON here")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch

from ..files import check_outputs, checkpoint_inputs
from ..loading import load_model, read_config, resolve_weights, weight_inputs
from ..oracle import eviction_masks, forward_no_cache, reference_answer
from ..processing import Processor
from ..settings import VTW_CALIBRATION, check_layer
from .data import data_inputs, read_examples, write_json
from .metrics import kl_divergence

def mean_kl_per_layer(model, processor: Processor, examples, layers, max_new_tokens: int = 48,
                      show_progress: bool = True) -> dict[int, float]:
    """-> {K: mean over generated tokens of KL(P_withdrawn(K) || P_full)} in nats."""
    totals = {K: 0.0 for K in layers}
    count = 0
    bar = Progress(len(examples), "calibrating VTW", " examples") if show_progress else None
    for ex in examples:
        ids, px = processor.input_ids(ex.prompt), processor.pixel_values(ex.picture())
        tokens, logits_full, _ = reference_answer(model, ids, px, max_new_tokens, processor.stop_ids)  # [T, V]
        none_kept = torch.zeros(len(tokens), model.config.num_image_tokens, dtype=torch.bool)  # [T, N]
        for K in layers:  # withdrawn from layer K on: no query of layers >= K sees a visual token
            masks = eviction_masks(ids, model.config.image_token_index, none_kept, K, len(model.model.layers))
            logits_w, _ = forward_no_cache(model, ids, px, tokens, masks)  # [T, V]
            totals[K] += float(kl_divergence(logits_w, logits_full).sum())
        count += len(tokens)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return {K: totals[K] / max(count, 1) for K in layers}


def choose_layer(kls: dict[int, float], eta: float) -> int | None:
    for K in sorted(kls):
        if kls[K] <= eta:
            return K
    return None


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.weights is not None:
        args.weights = resolve_weights(args.weights)  # a folder, or a hub id found in the local cache
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UserError(f"--eta {args.eta} must be a KL budget >= 0 nats")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    cfg = read_config(args.weights)
    L = cfg.text_config.num_hidden_layers
    check_layer(args.min_layer, L, "--min-layer")
    # vtw_calibration.json beside the weights is the usual place: an output there is fine, but never
    # one of the weights' own files.
    check_outputs([("--out", args.out)], checkpoint_inputs(args.weights, weight_inputs(args.weights)) + data_inputs(args.data))
    examples = read_examples(args.data)
    model = load_model(args.weights, config=cfg)
    proc = Processor(args.weights, model.config)
    kls = mean_kl_per_layer(model, proc, examples, range(args.min_layer, L), args.max_new_tokens)
    K = choose_layer(kls, args.eta)
    for k, v in kls.items():
        print(f"K={k:2d}  mean KL {v:.5f}{'  <= eta' if v <= args.eta else ''}")
    print(f"VTW layer: {K}" if K is not None else f"no layer in {args.min_layer}..{L - 1} meets eta={args.eta}")
    if args.out:
        result = {"layer": K, "eta": args.eta, "min_layer": args.min_layer, "data": args.data,
                  "mean_kl": {str(k): v for k, v in kls.items()}}
        shipped = os.path.join(args.weights, VTW_CALIBRATION)
        replaces = os.path.isfile(shipped) and os.path.realpath(args.out) == os.path.realpath(shipped)
        write_json(args.out, result)
        if replaces:  # said, not refused: this is how the shipped file is made (docs/embedded_model.md)
            print(f"note: {args.out} replaced the VTW calibration shipped with {args.weights}; --method vtw now "
                  "uses this one (git checkout restores the shipped file)")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
