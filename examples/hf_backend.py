"""A worked example of checking a backend against dyrate_ref: Hugging Face transformers'
LlavaForConditionalGeneration plays "the backend under test".

It decodes greedily, unpruned or with FastV or a fixed-schedule DyRate whose kept sets it computes from
its own attention, and applies them through per-layer attention masks (no KV-cache eviction: each step
recomputes the whole sequence, which is slow and simple). Then it writes a trace in dyrate_ref's format
with only what a backend has to produce: input_ids, tokens, logits (or, with --topk, top-k log-probs as
a serving engine returns them), kept_masks and rates.

    python examples/hf_backend.py [--weights DIR] --image IMG --prompt TEXT --out backend.safetensors \\
        [--method none|fastv|dyrate-schedule] [--layer 2] [--rate 0.5] [--schedule 0.3,0.5,0.7] [--max-new-tokens 128] \\
        [--topk K] [--image-offset 1]
    python generate.py --weights DIR --image IMG --prompt TEXT --method fastv \\
        --force-tokens backend.safetensors --trace oracle.safetensors
    python -m dyrate_ref.tools.trace compare oracle.safetensors backend.safetensors

--image-offset 1 is a deliberate bug: the kept set is chosen right, but the masks that apply it in
layers >= K are placed one position too late (the off-by-one of a hard-coded image offset, as in
FastV's public code), so the backend computes with the wrong patches while reporting the right ones.
The comparison names the first step it breaks (by its logits: its kept sets look correct).

The prompt and the pixels come from dyrate_ref's processor, so that only the model is under test
(tests/test_parity.py checks that transformers' LlavaProcessor gives the same input_ids and pixels).
The pruning rules are written out again here, from the README's definitions, as a backend builder would.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dyrate_ref.commands import ArgumentParser, UserError, command_main, summary  # noqa: E402  (exit 2 and one line on bad input)
from dyrate_ref.files import check_outputs, checkpoint_inputs  # noqa: E402  (never overwrite an input)
from dyrate_ref.loading import DEFAULT_WEIGHTS, read_config  # noqa: E402
from dyrate_ref.processing import Processor, open_image  # noqa: E402
from dyrate_ref.trace import write_trace  # noqa: E402  (atomic, the usual file mode)


def keep_for_step(method: str, t: int, prev: list[int], scores: torch.Tensor, rate: float, schedule) -> list[int]:
    """How many to keep, the oracle's one rule: N - round(r·N), the dropped count rounded half up.
    FastV: at step 0 that many of the visual tokens by score, then unchanged. DyRate with a fixed
    schedule: |keep_t| = min(|keep_{t-1}|, N - round(r_t·N)), the best-scoring of keep_{t-1}."""
    N = scores.numel()
    if method == "none":
        return prev
    if method == "fastv":
        if t > 0:
            return prev
        k = N - math.floor(rate * N + 0.5 + 1e-9)
        return sorted(scores.topk(k).indices.tolist())
    r_t = schedule[min(t, len(schedule) - 1)]
    k = min(len(prev), N - math.floor(r_t * N + 0.5 + 1e-9))
    best = scores[prev].topk(k).indices.tolist()
    return sorted(prev[i] for i in best)


@torch.no_grad()
def run_backend(weights: str, image, prompt: str, method: str = "none", layer: int = 2, rate: float = 0.5,
                schedule=(0.3, 0.5, 0.7), max_new_tokens: int = 128, image_offset: int = 0, dtype=torch.float32):
    """-> dict of trace tensors (input_ids, tokens, logits [T, V] float32, kept_masks, rates)."""
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a backend's own loading bar would only clutter the example's output
    hf = LlavaForConditionalGeneration.from_pretrained(weights, attn_implementation="eager", dtype=dtype).eval()
    proc = Processor(weights, read_config(weights))
    ids = proc.input_ids(prompt)  # [P]
    pixels = proc.pixel_values(image).to(dtype)  # [1, 3, H, W]
    cfg = hf.config
    where = (ids == cfg.image_token_id).nonzero().squeeze(1)
    start, N = int(where[0]), where.numel()
    masked = start + image_offset  # where the masks put the image: start, unless the deliberate bug shifts it
    lm = hf.model.language_model
    L, P = len(lm.layers), ids.numel()
    K = layer if method != "none" else L
    feats = torch.cat(list(hf.model.get_image_features(pixel_values=pixels).pooler_output))  # [N, C]
    eos = set(proc.stop_ids)

    tokens, logits_rows, keeps, rate_list = [], [], [], []
    keep = list(range(N))
    for t in range(max_new_tokens):
        seq = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])  # [S]
        S = seq.numel()
        x = hf.get_input_embeddings()(seq[None])  # [1, S, C]
        x = x.masked_scatter((seq == cfg.image_token_id)[None, :, None].expand_as(x), feats.to(x.dtype))
        pos = torch.arange(S)[None]  # [1, S]
        rope = lm.rotary_emb(x, pos)
        causal = torch.ones(S, S, dtype=torch.bool).tril()  # [S, S]
        add = lambda allowed: torch.zeros(S, S, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)[None, None]  # noqa: E731
        for i in range(min(K, L)):
            if i < K - 1:
                x = lm.layers[i](x, attention_mask=add(causal), position_embeddings=rope)
                continue
            # Layer K-1 by hand, to read its attention probabilities: the step's query over the image.
            lay = lm.layers[i]
            a, w = lay.self_attn(lay.input_layernorm(x), position_embeddings=rope, attention_mask=add(causal))
            x = x + a
            x = x + lay.mlp(lay.post_attention_layernorm(x))
            scores = w[0, :, -1, start:start + N].float().mean(0)  # [N]
        if K < L:
            keep = keep_for_step(method, t, keep, scores, rate, schedule)
            keeps.append(keep)
            rate_list.append(1 - len(keep) / N)  # what a trace records: the part of the N actually dropped
            # Layers >= K: a query of step s (prompt rows: step 0) sees a visual token only if keep_s has it.
            kept_by_step = torch.zeros(t + 1, N, dtype=torch.bool)  # [steps so far, N]
            for s, kept in enumerate(keeps):
                kept_by_step[s, kept] = True
            step_of_row = torch.clamp(torch.arange(S) - (P - 1), min=0)  # [S]
            sees = torch.ones(S, S, dtype=torch.bool)
            sees[:, masked:masked + N] = kept_by_step[step_of_row][:, :S - masked]  # [S, N]
            for i in range(K, L):
                x = lm.layers[i](x, attention_mask=add(causal & sees), position_embeddings=rope)
        else:
            keeps.append(keep)
            rate_list.append(0.0)
        logits = hf.lm_head(lm.norm(x[:, -1]))[0].float()  # [V]
        logits_rows.append(logits)
        tokens.append(int(logits.argmax()))
        if tokens[-1] in eos:
            break
    kept_masks = torch.zeros(len(tokens), N, dtype=torch.bool)
    for t, kept in enumerate(keeps):
        kept_masks[t, kept] = True
    return {"input_ids": ids, "tokens": torch.tensor(tokens), "logits": torch.stack(logits_rows),
            "kept_masks": kept_masks, "rates": torch.tensor(rate_list, dtype=torch.float32),
            "pixel_values": pixels.float()}


def to_topk(trace: dict, k: int) -> dict:
    """What a serving engine returns instead of full logits: the k best ids and their log-probs."""
    lp = trace["logits"].log_softmax(-1)
    vals, ids = lp.topk(k, dim=-1)
    out = {n: v for n, v in trace.items() if n != "logits"}
    out.update(topk_ids=ids, topk_logprobs=vals)
    return out


def run(argv=None) -> int:
    p = ArgumentParser(prog="python examples/hf_backend.py", description=summary(__doc__))
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="llava-hf checkpoint directory (default: the embedded model)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--out", required=True, help="the backend's trace to write (safetensors)")
    p.add_argument("--method", default="none", choices=("none", "fastv", "dyrate-schedule"), help="pruning (default none)")
    p.add_argument("--layer", type=int, default=None, help="pruning layer K, 1..L-1 (default 2)")
    p.add_argument("--rate", type=float, default=None,
                   help="FastV: rate R, the part of the visual tokens dropped (default 0.5)")
    p.add_argument("--schedule", default=None, help="dyrate-schedule: the rate dropped by each step r0,r1,... "
                   "(default 0.3,0.5,0.7)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128, as generate.py)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="the backend's precision (default float32)")
    p.add_argument("--topk", type=int, default=None, help="write top-k log-probs instead of full logits")
    p.add_argument("--image-offset", type=int, default=0,
                   help="a deliberate bug: shift the masks' visual span by this many positions (default 0)")
    args = p.parse_args(argv)
    # A setting of a method that does not run would be silently ignored: refuse it, naming the method it needs.
    owners = {"layer": "fastv or dyrate-schedule", "rate": "fastv", "schedule": "dyrate-schedule"}
    for name, needs in owners.items():
        if getattr(args, name) is not None and args.method not in needs.split(" or "):
            raise UserError(f"--{name} is a setting of --method {needs}, which this run does not use "
                            f"(--method {args.method}); add --method {needs.split(' or ')[0]} or leave --{name} out")
    args.layer = 2 if args.layer is None else args.layer
    args.rate = 0.5 if args.rate is None else args.rate
    args.schedule = "0.3,0.5,0.7" if args.schedule is None else args.schedule
    image = open_image(args.image)  # a missing, unreadable or folder image: one line, exit 2, before --out's check
    cfg = read_config(args.weights)
    check_outputs([("--out", args.out)], [("the --image", args.image), *checkpoint_inputs(args.weights)])
    L = cfg.text_config.num_hidden_layers
    if args.method != "none" and not 1 <= args.layer <= L - 1:
        raise UserError(f"--layer {args.layer} is outside 1..{L - 1} (the model has {L} layers)")
    try:
        schedule = tuple(float(r) for r in args.schedule.split(","))
    except ValueError:
        raise UserError(f"--schedule {args.schedule!r} is not a comma-separated list of numbers") from None
    if not 0.0 <= args.rate <= 1.0 or not all(0.0 <= r <= 1.0 for r in schedule):
        raise UserError("--rate and every rate of --schedule must lie in [0, 1]")
    if args.max_new_tokens < 1 or (args.topk is not None and not 1 <= args.topk <= cfg.text_config.vocab_size):
        raise UserError(f"--max-new-tokens must be at least 1 and --topk in 1..{cfg.text_config.vocab_size}")
    trace = run_backend(args.weights, image, args.prompt, args.method, args.layer, args.rate, schedule,
                        args.max_new_tokens, args.image_offset, getattr(torch, args.dtype))
    if args.topk:
        trace = to_topk(trace, args.topk)
    write_trace(args.out, {n: v.contiguous() for n, v in trace.items()}, {"source": "examples/hf_backend.py"})
    print(f"wrote {args.out}: {trace['tokens'].numel()} tokens, method {args.method}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
