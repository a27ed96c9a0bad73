"""Train DyRate's rate predictor on a frozen VLM.

  python -m dyrate_ref.tools.train_predictor --weights DIR --data FILE.jsonl|scenes:N --out FILE [--tau 0.05]

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

import os

import torch
import torch.nn.functional as F

from ..errors import ArgumentParser, UserError, command_main
from ..generation import forward_no_cache, recompute_logits
from ..loading import load_model
from ..model import LlavaForConditionalGeneration
from ..predictor import RATE_GRID, RatePredictor, predictor_features
from ..processing import Processor
from ..progress import Progress
from ..pruning import dyrate_keep, kl, visual_scores, visual_span
from .data import read_examples


@torch.no_grad()
def label_example(model: LlavaForConditionalGeneration, input_ids, pixels, answer: list[int], K: int, tau: float,
                  grid=RATE_GRID):
    """-> (features [T, F], label indices into grid [T], kept counts [T]) for one teacher-forced answer.

    The label of step t is the largest rate whose keep set, held from step t to the end of the answer,
    keeps every one of those steps within KL <= tau of the unpruned model. Looking ahead matters: the
    kept sets only shrink, so a rate judged on step t alone would drop, at a token that needs no image
    ("There"), the tokens a later word ("four") needs. The pruned logits of all remaining steps come
    from one masked no-cache forward (generation.recompute_logits), and the largest feasible rate is
    found by bisection over the grid (assuming more pruning never lowers the KL, which holds closely).
    """
    T, P = len(answer), input_ids.numel()
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, model.config.image_token_index)
    N = span[1]
    # Layers < K are never pruned, so one unpruned pass gives every step's layer K-1 scores and the
    # unpruned logits.
    full, probs = forward_no_cache(model, input_ids, pixels, answer, probs_of=(K - 1,))  # [T, V]
    probs = probs[K - 1]  # [1, H, P+T-1, P+T-1]

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
        feats.append(predictor_features(scores, prev))
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
        f, y, k = label_example(model, ids, px, answer, K, tau, grid)
        feats.append(f)
        labels.append(y)
        kept.append(k)
        if bar:
            bar.update(1, f"mean label rate {torch.tensor([grid[i] for i in torch.cat(labels)]).mean():.2f}")
    if bar:
        bar.close()
    return torch.cat(feats), torch.cat(labels), torch.cat(kept)


def run(argv=None) -> int:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.train_predictor", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="llava-hf checkpoint directory")
    p.add_argument("--data", required=True, help="JSONL of {image, prompt, answer}, or scenes:N")
    p.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    p.add_argument("--tau", type=float, default=0.05, help="KL budget per step in nats (default 0.05)")
    p.add_argument("--layer", type=int, default=2, help="pruning layer K (default 2)")
    p.add_argument("--hidden", type=int, default=0, help="0: linear (default); >0: MLP hidden width")
    p.add_argument("--epochs", type=int, default=300, help="full-batch Adam epochs (default 300)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the fit (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer tokens labelled per example (default 64)")
    args = p.parse_args(argv)
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
    mean_rate = torch.tensor([RATE_GRID[i] for i in labels]).mean()
    N = model.config.num_image_tokens
    print(f"{len(labels)} steps from {len(examples)} examples; mean label rate {mean_rate:.3f}, mean kept "
          f"{kept.float().mean():.1f}/{N}; loss {history[0]:.3f} -> {history[-1]:.3f}; train accuracy {acc:.3f}; "
          f"wrote {args.out}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
