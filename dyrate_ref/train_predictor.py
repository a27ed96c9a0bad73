"""Train DyRate's rate predictor on a frozen VLM.

  python -m dyrate_ref.train_predictor --weights DIR --data FILE.jsonl|scenes:N --out FILE [--tau 0.05]

Labels (dyrate_ref's reconstruction; the paper does not give its recipe): on (image, prompt, answer)
examples under teacher forcing, at each step t the label is the largest grid rate r whose pruned
next-token distribution stays close to the unpruned model's:

    KL(P_full || P_pruned(keep_{t-1}, r)) <= tau

where P_pruned keeps the highest-scoring ceil((1-r)N) tokens of the kept set so far (DyRate's keep
rule) and P_full is the model without any pruning. When no rate that prunes further stays within tau,
the label is "hold": the largest rate that leaves keep_{t-1} as it is. The labelled trajectory then
continues with the chosen keep set, exactly as inference would. The predictor is trained by
cross-entropy on these labels; the VLM is never updated.

tau is the one knob: smaller tau -> lower rates -> more visual tokens kept, closer to the unpruned answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .generation import State, decode_lower, decode_upper, prefill_lower, prefill_upper
from .loading import Progress, load_model
from .model import LlavaForConditionalGeneration
from .predictor import RatePredictor, predictor_features
from .processing import Processor, open_image
from .pruning import RATE_GRID, dyrate_keep, visual_scores


@dataclass
class Example:
    image: object  # PIL image
    prompt: str
    answer: str


def _fork(state: State) -> State:
    return State(state.cache.fork(), state.span, state.keep, state.next_pos, state.K, state.step)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P || Q) from logits [V], in nats."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())


@torch.no_grad()
def label_example(model: LlavaForConditionalGeneration, input_ids, pixels, answer: list[int], K: int, tau: float,
                  grid=RATE_GRID, max_new_tokens: int | None = None):
    """-> (features [T, F], label indices into grid [T], kept counts [T]) for one teacher-forced answer."""
    T = len(answer)
    horizon = max_new_tokens or T
    P = input_ids.numel()
    device = model.lm_head.weight.device
    seq = torch.cat([input_ids.to(device), torch.tensor(answer[:-1], dtype=torch.long, device=device)])
    full = model(seq[None], pixels.to(device))[0, P - 1:].float()  # [T, V]: the unpruned model, every step
    order = sorted(range(len(grid)), key=lambda i: -grid[i])  # largest rate first
    feats, labels, kept = [], [], []
    x, pos, state, probs = prefill_lower(model, input_ids, pixels, K)
    for t in range(T):
        if t > 0:
            state.step = t
            x, pos, probs = decode_lower(model, torch.tensor(answer[t - 1], device=device), state)
        scores = visual_scores(probs, state.span, "last")  # [N]
        feats.append(predictor_features(scores, state.keep, t, horizon))
        tried = {}  # keep size -> (trial state, KL)
        chosen = None
        hold = None  # largest rate that leaves the kept set unchanged
        for i in order:
            cand = dyrate_keep(state.keep, scores, grid[i])
            if cand.numel() == state.keep.numel() and hold is None:
                hold = i
            if cand.numel() not in tried:
                trial = _fork(state)
                upper = prefill_upper if t == 0 else decode_upper
                logits = upper(model, x, pos, trial, cand)
                tried[cand.numel()] = (trial, kl(full[t], logits))
            if chosen is None and tried[cand.numel()][1] <= tau:
                chosen = i
        label = chosen if chosen is not None else hold
        trial, _ = tried[dyrate_keep(state.keep, scores, grid[label]).numel()]
        state = trial
        if t > 0:
            state.next_pos += 1
        labels.append(label)
        kept.append(state.keep.numel())
    return torch.stack(feats), torch.tensor(labels), torch.tensor(kept)


def fit(feats: torch.Tensor, labels: torch.Tensor, K: int, grid=RATE_GRID, hidden: int = 0, epochs: int = 300,
        lr: float = 0.05, seed: int = 0, show_progress: bool = True):
    """Cross-entropy on the labels, full batch, Adam. -> (RatePredictor, loss per epoch)."""
    torch.manual_seed(seed)
    pred = RatePredictor(K, grid, hidden)
    pred.mean.copy_(feats.mean(0))
    pred.std.copy_(feats.std(0).clamp_min(1e-3) if feats.shape[0] > 1 else torch.ones(feats.shape[1]))
    opt = torch.optim.Adam(pred.net.parameters(), lr=lr)
    history = []
    bar = Progress(epochs, "training predictor", " epochs") if show_progress else None
    for _ in range(epochs):
        loss = F.cross_entropy(pred(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        if bar:
            bar.update(1, f"loss {history[-1]:.4f}")
    if bar:
        bar.close()
    return pred.eval(), history


def label_examples(model, processor: Processor, examples, K: int, tau: float, grid=RATE_GRID,
                   max_new_tokens: int = 64, show_progress: bool = True):
    bar = Progress(len(examples), "labelling steps", " examples") if show_progress else None
    feats, labels, kept = [], [], []
    for ex in examples:
        ids = processor.input_ids(ex.prompt)
        px = processor.pixel_values(ex.image)
        answer = processor.answer_ids(ex.answer)[:max_new_tokens]
        f, y, k = label_example(model, ids, px, answer, K, tau, grid, max_new_tokens)
        feats.append(f)
        labels.append(y)
        kept.append(k)
        if bar:
            bar.update(1, f"mean label rate {torch.tensor([grid[i] for i in torch.cat(labels)]).mean():.2f}")
    if bar:
        bar.close()
    return torch.cat(feats), torch.cat(labels), torch.cat(kept)


def read_examples(spec: str, processor_seed: int = 0) -> list[Example]:
    """--data: a JSONL file of {"image", "prompt", "answer"} (image paths relative to the file), or
    scenes:N for N generated scenes (the embedded demo's training distribution)."""
    if spec.startswith("scenes:"):
        from .scenes import training_examples
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--data {spec!r}: write scenes:N with N a number") from None
        return [Example(img, q, a) for img, q, a in training_examples(n, seed=processor_seed + 7919)]
    if not os.path.isfile(spec):
        raise UserError(f"--data {spec} does not exist; give a JSONL file or scenes:N")
    out = []
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(Example(open_image(os.path.join(base, d["image"])), d["prompt"], d["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{spec}:{n}: expected {{\"image\", \"prompt\", \"answer\"}} ({e})") from None
    if not out:
        raise UserError(f"--data {spec} has no examples")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dyrate_ref.train_predictor", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="JSONL of {image, prompt, answer}, or scenes:N")
    p.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    p.add_argument("--tau", type=float, default=0.05, help="KL budget per step in nats (default 0.05)")
    p.add_argument("--layer", type=int, default=2, help="pruning layer K (default 2)")
    p.add_argument("--hidden", type=int, default=0, help="0: linear (default); >0: MLP hidden width")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    try:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise UserError(f"--out {args.out}: folder {out_dir} does not exist")
        if args.tau < 0:
            raise UserError("--tau must be >= 0")
        model = load_model(args.weights)
        L = model.config.text_config.num_hidden_layers
        if not 1 <= args.layer <= L - 1:
            raise UserError(f"--layer {args.layer} is outside 1..{L - 1}")
        proc = Processor(args.weights, model.config)
        examples = read_examples(args.data, args.seed)
        torch.manual_seed(args.seed)
        feats, labels, kept = label_examples(model, proc, examples, args.layer, args.tau,
                                             max_new_tokens=args.max_new_tokens)
        pred, history = fit(feats, labels, args.layer, hidden=args.hidden, epochs=args.epochs, lr=args.lr, seed=args.seed)
        acc = float((pred(feats).argmax(-1) == labels).float().mean())
        pred.save(args.out, model.config, trained_on=os.path.basename(os.path.normpath(args.weights)), tau=args.tau,
                  seed=args.seed, examples=len(examples), steps=len(labels), epochs=args.epochs, lr=args.lr,
                  data=args.data)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    mean_rate = torch.tensor([RATE_GRID[i] for i in labels]).mean()
    N = model.config.num_image_tokens
    print(f"{len(labels)} steps from {len(examples)} examples; mean label rate {mean_rate:.3f}, mean kept "
          f"{kept.float().mean():.1f}/{N}; loss {history[0]:.3f} -> {history[-1]:.3f}; train accuracy {acc:.3f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
