"""Train DyRate's rate predictor on a frozen VLM.

  python -m dyrate_ref.train_predictor --weights DIR --data FILE.jsonl|scenes:N --out FILE [--tau 0.05]

Labels (dyrate_ref's reconstruction; the paper does not give its recipe): on (image, prompt, answer)
examples under teacher forcing, at each step t the label is the largest grid rate r whose pruned
next-token distributions stay close to the unpruned model's, at step t and at every later step of the
answer while that keep set is held:

    max_{s >= t} KL(P_full,s || P_pruned,s(keep_{t-1}, r)) <= tau

where the pruned set keeps the highest-scoring ceil((1-r)N) tokens of the kept set so far (DyRate's
keep rule) and P_full is the model without any pruning. When no rate that prunes further stays within
tau, the label is "hold": the largest rate that leaves keep_{t-1} as it is. The labelled trajectory then
continues with the chosen keep set, exactly as inference would. (A first version judged step t alone;
on descriptions it labelled "prune everything" at the first word, which needs no image, and every
later content word then lost it: kept sets only shrink, so the label has to look ahead.) The predictor is trained by
cross-entropy on these labels; the VLM is never updated.

tau is the one knob: smaller tau -> lower rates -> more visual tokens kept, closer to the unpruned answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .generation import recompute_logits
from .loading import Progress, load_model
from .model import LlavaForConditionalGeneration
from .predictor import RatePredictor, predictor_features
from .processing import Processor, open_image
from .pruning import RATE_GRID, dyrate_keep, visual_scores, visual_span


@dataclass
class Example:
    image: object  # PIL image
    prompt: str
    answer: str


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) from logits [..., V], in nats, per row."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def label_example(model: LlavaForConditionalGeneration, input_ids, pixels, answer: list[int], K: int, tau: float,
                  grid=RATE_GRID, max_new_tokens: int | None = None):
    """-> (features [T, F], label indices into grid [T], kept counts [T]) for one teacher-forced answer.

    The label of step t is the largest rate whose keep set, held from step t to the end of the answer,
    keeps every one of those steps within KL <= tau of the unpruned model. Looking ahead matters: the
    kept sets only shrink, so a rate judged on step t alone would drop, at a token that needs no image
    ("There"), the tokens a later word ("four") needs. The pruned logits of all remaining steps come
    from one masked no-cache forward (generation.recompute_logits), and the largest feasible rate is
    found by bisection over the grid (assuming more pruning never lowers the KL, which holds closely).
    """
    T, P = len(answer), input_ids.numel()
    horizon = max_new_tokens or T
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, model.config.image_token_index)
    N = span[1]
    seq = torch.cat([input_ids, torch.tensor(answer[:-1], dtype=torch.long, device=device)])  # [P+T-1]
    x = model.embed(seq[None], model.image_features(pixels.to(device)))  # [1, P+T-1, C]
    pos = torch.arange(seq.numel(), device=device)
    # Layers < K are never pruned, so one unpruned pass gives every step's layer K-1 scores ...
    h, probs = model.run_layers(x, pos, None, range(0, K), probs_of=K - 1)  # probs [1, H, P+T-1, P+T-1]
    # ... and the rest of it the unpruned logits.
    h, _ = model.run_layers(h, pos, None, range(K, model.config.text_config.num_hidden_layers))
    full = model.logits(h[0, P - 1:]).float()  # [T, V]

    def worst_kl(t, keep_rows, cand):
        mask = torch.zeros(N, dtype=torch.bool, device=device)
        mask[cand] = True
        rows = torch.stack(keep_rows + [mask] * (T - t))  # [T, N]
        pruned = recompute_logits(model, input_ids, pixels, answer, rows, K)  # [T, V]
        return float(kl(full[t:], pruned[t:]).max())

    feats, labels, kept, keep_rows = [], [], [], []
    prev = torch.arange(N, device=device)
    for t in range(T):
        scores = visual_scores(probs[:, :, : P + t], span, "last")  # query row P-1+t: [N]
        feats.append(predictor_features(scores, prev, t, horizon))
        by_rate = sorted(range(len(grid)), key=lambda i: -grid[i])  # most pruning first
        cands = [dyrate_keep(prev, scores, grid[i]) for i in by_rate]
        hold = next(j for j, c in enumerate(cands) if c.numel() == prev.numel())  # prunes nothing more
        lo, hi = 0, hold  # bisection for the first (most pruning) feasible candidate in [lo, hold]
        if worst_kl(t, keep_rows, cands[hold]) > tau:
            lo = hold
        while lo < hi:
            mid = (lo + hi) // 2
            if worst_kl(t, keep_rows, cands[mid]) <= tau:
                hi = mid
            else:
                lo = mid + 1
        choice = lo
        prev = cands[choice]
        mask = torch.zeros(N, dtype=torch.bool, device=device)
        mask[prev] = True
        keep_rows.append(mask)
        labels.append(by_rate[choice])
        kept.append(prev.numel())
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
