"""Train DyRate's rate predictor on a frozen VLM, on its own greedy answers and its own trajectories.

  python -m dyrate_ref.tools.train_predictor --weights DIR --data FILE.jsonl|scenes:N --out FILE
      [--margin 1.0] [--rounds 2] [--confidence 0.7] [--rollout-confidence C] [--heldout scenes:M]
  python -m dyrate_ref.tools.train_predictor --objective e2e --lam 0.1 --weights DIR --data ... --out FILE

Two routes, both dyrate_ref's reconstructions: imitation (the default, below) and --objective e2e (the
language model's own loss through a relaxed cut, tools/predictor_e2e.py: the route later work attributes
to the paper). Their predictors are the same kind of file, read by --method dyrate alike.

Imitation labels (the paper does not give its recipe), in one sentence:

    the label of step t is the largest cut -- drop 0, 25, 50, 75 or 100 % of the visual tokens still
    kept -- after which, holding that kept set to the end, every token of the model's own unpruned
    greedy answer is still the top choice, by at least min(margin, its unpruned lead) nats.

So a labelled cut never changes the answer (with margin 0 it keeps exactly the greedy answer; a larger
margin asks for head room and keeps more). Checking a cut needs the pruned logits of every remaining
step, which one masked no-cache forward gives (generation.recompute_logits); cuts are tried from the
largest down and the first that passes is the label ("hold" if none does). Layers < K are never pruned,
so the scores, and hence the features, of every step come from one unpruned forward.

Rounds: round 0 labels the states the labels themselves lead to (the oracle's trajectory); each later
round rolls the current predictor out on the same examples, labels the states *it* reaches (where its
own mistakes put it), adds them, and refits (DAgger). The rollouts decode at --rollout-confidence (by
default --confidence, the one stored as the file's default): the two differ when the stored default
is chosen afterwards, on the validation split, for a predictor trained with another. The predictor is fit by cross-entropy; decoding
errs towards keeping through its confidence (predictor.py). Label accuracy is reported on held-out
examples, and `--heldout` also reports the oracle-label policy's kept fraction.
"""

from __future__ import annotations

import json
import math
import os
import time

from ..commands import (ArgumentParser, DEFAULT_WEIGHTS, Progress, UserError, add_threads, add_weights, apply_threads,
                        command_main, parse_first, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.train_predictor", description=summary(__doc__))
    add_weights(p, DEFAULT_WEIGHTS, help="checkpoint directory (default: the embedded demo model)")
    add_threads(p)
    p.add_argument("--data", required=True, help="JSONL of {image, prompt, answer}, or scenes:N (only the images and "
                                                 "prompts are used: labels come from the model's own answers)")
    p.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    p.add_argument("--objective", default="imitation", choices=("imitation", "e2e"),
                   help="imitation (default): labels from the answer-preservation oracle, then DAgger; e2e: the "
                        "language model's KL plus --lam times the kept share, through a relaxed cut "
                        "(tools/predictor_e2e.py)")
    p.add_argument("--lam", type=float, default=0.1,
                   help="e2e: weight of the mean kept share in the loss, in nats (larger prunes more; default 0.1)")
    p.add_argument("--tau", default="1.0,0.3", metavar="START,END",
                   help="e2e: Gumbel-softmax temperature, annealed geometrically over the epochs (default 1.0,0.3)")
    p.add_argument("--margin", type=float, default=1.0,
                   help="nats of lead every answer token must keep (capped at its unpruned lead; default 1.0)")
    p.add_argument("--rounds", type=int, default=2, help="1 = oracle trajectories only; each more round adds the "
                                                         "predictor's own (default 2)")
    p.add_argument("--confidence", type=float, default=0.7,
                   help="decoding confidence stored as the file's default, in [0, 1]; closer to 1 keeps more (default 0.7)")
    p.add_argument("--rollout-confidence", type=float, default=None,
                   help="confidence the DAgger rounds decode at (default: --confidence)")
    p.add_argument("--layer", type=int, default=2, help="pruning layer K (default 2)")
    p.add_argument("--score", default="last", choices=("last", "mean", "accumulated"),
                   help="the attention score the predictor reads and cuts by: the step's 'last' query (default), "
                        "the question's 'mean' at the prefill, or the 'accumulated' mean of the question's and the "
                        "answer's queries so far; stored in the file")
    p.add_argument("--hidden", type=int, default=0, help="0: linear (default); >0: MLP hidden width")
    p.add_argument("--epochs", type=int, default=None,
                   help="imitation: full-batch Adam epochs (default 300); e2e: passes over the answers (default 12)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.05; e2e 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the fit (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy answer labelled (default 64)")
    p.add_argument("--heldout", default=None, help="held-out examples for label accuracy (JSONL or scenes:N)")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..files import check_outputs, checkpoint_inputs, write_atomic
from ..generation import generate
from ..loading import (PREDICTOR_FORMAT, load_model, model_fingerprint, read_config, resolve_weights,
                       shipped_predictor_path, weight_inputs)
from ..model import LlavaForConditionalGeneration
from ..oracle import forward_no_cache, recompute_logits
from ..predictor import CUTS, FEATURES, RatePredictor, predictor_features
from ..processing import Processor
from ..pruning import apply_cut, kept_mask, query_scores, visual_span
from ..settings import check_layer
from .data import data_inputs, read_examples
from .predictor_e2e import step_scores, train_e2e

def save_predictor(pred: RatePredictor, path: str, cfg, **settings):
    """Write a predictor file (the header loading.py describes; load_predictor reads it), whole or not at
    all: its settings, what it was trained with (`settings`, its `meta`), and the fingerprint of the model
    it belongs to."""
    meta = {**{k: str(v) for k, v in {**pred.meta, **settings}.items()},  # what it was trained with ...
            "format": PREDICTOR_FORMAT, "layer": str(pred.layer), "cuts": json.dumps(list(pred.cuts)),  # ... and
            "features": json.dumps(list(FEATURES)), "hidden": str(pred.hidden),  # what it is now, which wins
            "confidence": str(pred.confidence), "score": pred.score, "model": model_fingerprint(cfg)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in pred.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def answer_kept(logits: torch.Tensor, answer: list[int], lead: torch.Tensor, margin: float) -> bool:
    """Is every answer token still the top choice of logits [T', V], by at least min(margin, lead)?
    lead [T']: the unpruned model's lead of the answer token over the runner-up."""
    idx = torch.tensor(answer, device=logits.device)
    chosen = logits.gather(1, idx[:, None])[:, 0]  # [T']
    other = logits.scatter(1, idx[:, None], float("-inf")).amax(1)  # [T']
    need = torch.clamp(lead, max=margin).clamp_min(0.0)
    return bool((chosen - other > need - 1e-6).all() & (logits.argmax(1) == idx).all())


@torch.no_grad()
def label_example(model: LlavaForConditionalGeneration, input_ids, pixels, answer: list[int], K: int,
                  margin: float, policy: RatePredictor | None = None, text: tuple[int, int] | None = None,
                  score: str = "last"):
    """-> (features [T, F], labels [T] (indices into CUTS), kept counts [T] on the followed path).

    The path follows the labels (policy None: the oracle) or the policy's own decisions, which is how
    later rounds see the states the predictor itself reaches. text: the question's rows
    (Processor.text_rows; None: every row after the image); score: the rule the features and cuts read
    (pruning.SCORES), the same the loop's step computes."""
    T, N = len(answer), model.config.num_image_tokens
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    span = visual_span(input_ids, model.config.image_token_index)
    full, probs = forward_no_cache(model, input_ids, pixels, answer, probs_of=(K - 1,))  # [T, V]
    P = input_ids.numel()
    scores_of = step_scores(query_scores(probs[K - 1], span), text or (sum(span), P), P, T, score)  # [T, N]
    top2 = full.topk(2, dim=1).values  # [T, 2]
    lead = top2[:, 0] - top2[:, 1]  # [T]

    feats, labels, kept, rows = [], [], [], []
    prev = torch.arange(N, device=device)

    for t in range(T):
        scores = scores_of[t]  # [N]
        f = predictor_features(scores, prev, t)
        label = 0
        for a in range(len(CUTS) - 1, 0, -1):  # largest cut first
            cand = apply_cut(prev, scores, CUTS[a])
            if cand.numel() == prev.numel():
                continue  # cuts nothing more than holding
            pruned = recompute_logits(model, input_ids, pixels, answer, torch.stack(rows + [kept_mask(cand, N)] * (T - t)), K)
            if answer_kept(pruned[t:], answer[t:], lead[t:], margin):
                label = a
                break
        choice = label if policy is None else int(policy.decide(policy(f)))
        prev = apply_cut(prev, scores, CUTS[choice])
        rows.append(kept_mask(prev, N))
        feats.append(f)
        labels.append(label)
        kept.append(prev.numel())
    return torch.stack(feats), torch.tensor(labels), torch.tensor(kept)


def greedy_answers(model, processor: Processor, examples, max_new_tokens: int):
    """The model's own unpruned greedy answer to each example: [(input_ids, pixels, tokens)]."""
    out = []
    for ex in examples:
        ids, px = processor.input_ids(ex.prompt), processor.pixel_values(ex.picture())
        text = processor.text_rows(ids)
        out.append((ids, px, generate(model, ids, px, max_new_tokens, stop_ids=processor.stop_ids).tokens, text))
    return out


def label_all(model, answered, K: int, margin: float, policy=None, show_progress: bool = True, what: str = "",
              score: str = "last"):
    bar = Progress(len(answered), f"labelling steps{what}", " examples") if show_progress else None
    feats, labels, kept = [], [], []
    for ids, px, tokens, text in answered:
        f, y, k = label_example(model, ids, px, tokens, K, margin, policy, text, score)
        feats.append(f)
        labels.append(y)
        kept.append(k)
        if bar:
            bar.update(1, f"mean label cut {torch.tensor([CUTS[i] for i in torch.cat(labels)]).mean():.2f}")
    if bar:
        bar.close()
    return torch.cat(feats), torch.cat(labels), torch.cat(kept)


def fit(feats: torch.Tensor, labels: torch.Tensor, K: int, hidden: int = 0, epochs: int = 300, lr: float = 0.05,
        seed: int = 0, confidence: float = 0.5, show_progress: bool = True, score: str = "last"):
    """Cross-entropy on the labels, full batch, Adam. -> (RatePredictor, loss per epoch)."""
    torch.manual_seed(seed)
    pred = RatePredictor(K, CUTS, hidden, confidence, score=score)
    pred.mean.copy_(feats.mean(0))
    pred.std.copy_(feats.std(0).clamp_min(1e-3) if feats.shape[0] > 1 else torch.ones(feats.shape[1]))
    opt = torch.optim.Adam(pred.net.parameters(), lr=lr)
    history = []
    bar = Progress(epochs, "fitting predictor", " epochs") if show_progress else None
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


def train_imitation(model, processor, examples, K: int, margin: float, rounds: int = 2, hidden: int = 0, epochs: int = 300,
          lr: float = 0.05, seed: int = 0, confidence: float = 0.5, max_new_tokens: int = 64, show_progress=True,
          score: str = "last"):
    """Round 0 on the oracle's trajectories, then `rounds - 1` rounds on the predictor's own.
    -> (predictor, features, labels, per-round log lines)."""
    answered = greedy_answers(model, processor, examples, max_new_tokens)
    feats, labels, _ = label_all(model, answered, K, margin, None, show_progress, " (round 0, oracle path)", score)
    pred, history = fit(feats, labels, K, hidden, epochs, lr, seed, confidence, show_progress, score)
    log = [f"round 0: {labels.numel()} steps, loss {history[0]:.3f} -> {history[-1]:.3f}"]
    for r in range(1, rounds):
        f, y, k = label_all(model, answered, K, margin, pred, show_progress, f" (round {r}, predictor's path)", score)
        feats, labels = torch.cat([feats, f]), torch.cat([labels, y])
        pred, history = fit(feats, labels, K, hidden, epochs, lr, seed, confidence, show_progress, score)
        log.append(f"round {r}: +{y.numel()} steps on the predictor's own path (mean kept {k.float().mean():.1f}), "
                   f"loss {history[0]:.3f} -> {history[-1]:.3f}")
    return pred, feats, labels, log


def label_accuracy(pred: RatePredictor, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    """Exact label accuracy (argmax), and how often the decoded cut is larger than the label (an
    over-prune, the costly error) or smaller (an under-prune, a little wasted compute)."""
    with torch.no_grad():
        logits = pred(feats)
        decided = pred.decide(logits)
    return {"argmax_accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "decided_equal": float((decided == labels).float().mean()),
            "over_prune": float((decided > labels).float().mean()),
            "under_prune": float((decided < labels).float().mean())}


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.weights is not None:
        args.weights = resolve_weights(args.weights)  # a folder, or a hub id found in the local cache
    if not (math.isfinite(args.margin) and args.margin >= 0):
        raise UserError(f"--margin {args.margin} must be a number >= 0")
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds} must be at least 1")
    if not 0.0 <= args.confidence <= 1.0:
        raise UserError(f"--confidence {args.confidence} must lie in [0, 1]")
    rollout = args.confidence if args.rollout_confidence is None else args.rollout_confidence
    if not 0.0 <= rollout <= 1.0:
        raise UserError(f"--rollout-confidence {rollout} must lie in [0, 1]")
    e2e = args.objective == "e2e"
    args.epochs = (12 if e2e else 300) if args.epochs is None else args.epochs
    args.lr = (0.01 if e2e else 0.05) if args.lr is None else args.lr
    if not (math.isfinite(args.lam) and args.lam >= 0):
        raise UserError(f"--lam {args.lam} must be a number >= 0")
    try:
        tau_start, tau_end = (float(v) for v in args.tau.split(","))
    except ValueError:
        raise UserError(f"--tau {args.tau!r}: give START,END, two temperatures, e.g. 1.0,0.1") from None
    if not (tau_start > 0 and tau_end > 0 and math.isfinite(tau_start) and math.isfinite(tau_end)):
        raise UserError(f"--tau {args.tau!r}: both temperatures must be positive numbers")
    if args.hidden < 0 or args.epochs < 1 or args.max_new_tokens < 1:
        raise UserError("--hidden must be >= 0, --epochs and --max-new-tokens at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr {args.lr} must be a number > 0")
    cfg = read_config(args.weights)
    check_layer(args.layer, cfg.text_config.num_hidden_layers, "--layer")
    check_outputs([("--out", args.out)], checkpoint_inputs(args.weights, weight_inputs(args.weights))
                  + data_inputs(args.data) + data_inputs(args.heldout, "--heldout"))
    shipped = shipped_predictor_path(args.weights)
    replaces = shipped is not None and os.path.realpath(args.out) == os.path.realpath(shipped)
    examples = read_examples(args.data, args.seed)
    heldout = read_examples(args.heldout, args.seed + 1, "--heldout") if args.heldout else []
    if not args.out.endswith(".safetensors"):  # --method dyrate --predictor reads safetensors files only
        raise UserError(f"--out {args.out}: a predictor file is safetensors; name it FILE.safetensors")
    model = load_model(args.weights, config=cfg)
    proc = Processor(args.weights, model.config)
    if e2e:
        if args.hidden:
            raise UserError("--hidden works with the imitation objective; the e2e predictor is linear")
        t0 = time.perf_counter()
        pred, log, _ = train_e2e(model, proc, examples, args.layer, args.lam, args.epochs, args.lr, args.seed, tau_start,
                                 tau_end, args.confidence, args.max_new_tokens, score=args.score)
        minutes = (time.perf_counter() - t0) / 60
        for line in log:
            print(line)
        save_predictor(pred, args.out, model.config, trained_on=os.path.basename(os.path.normpath(args.weights)), objective="e2e",
                  lam=args.lam, tau=args.tau, epochs=args.epochs, lr=args.lr, seed=args.seed, examples=len(examples),
                  data=args.data, minutes=round(minutes, 2))
        print(f"trained end to end on {len(examples)} examples in {minutes:.1f} min; wrote {args.out}")
        if replaces:
            print(f"note: {args.out} replaced the predictor shipped with {args.weights}; generate.py --method dyrate "
                  "now uses this one (git checkout restores the shipped file)")
        return 0
    pred, feats, labels, log = train_imitation(model, proc, examples, args.layer, args.margin, args.rounds, args.hidden,
                                     args.epochs, args.lr, args.seed, rollout, args.max_new_tokens, score=args.score)
    pred.confidence = args.confidence  # the stored default (what the held-out figures below decode at)
    for line in log:
        print(line)
    acc = label_accuracy(pred, feats, labels)
    print("training label accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    settings = dict(objective="imitation", margin=args.margin, rounds=args.rounds, seed=args.seed, examples=len(examples), steps=len(labels),
                    epochs=args.epochs, lr=args.lr, data=args.data, rollout_confidence=rollout)
    if heldout:
        answered = greedy_answers(model, proc, heldout, args.max_new_tokens)
        f, y, k_oracle = label_all(model, answered, args.layer, args.margin, None, True, " (held out)", args.score)
        h = label_accuracy(pred, f, y)
        print(f"held-out label accuracy ({len(heldout)} examples, {y.numel()} steps on the oracle path): "
              + ", ".join(f"{k} {v:.3f}" for k, v in h.items()))
        N = model.config.num_image_tokens
        print(f"oracle-label policy (upper bound) keeps {k_oracle.float().mean():.1f}/{N} visual tokens per step "
              f"on the held-out examples, every greedy answer unchanged")
        settings.update(heldout=args.heldout, heldout_accuracy=round(h["argmax_accuracy"], 4),
                        heldout_over_prune=round(h["over_prune"], 4))
    save_predictor(pred, args.out, model.config, trained_on=os.path.basename(os.path.normpath(args.weights)), **settings)
    mean_cut = torch.tensor([CUTS[i] for i in labels]).mean()
    print(f"{len(labels)} steps from {len(examples)} examples; mean label cut {mean_cut:.3f}; "
          f"{len(FEATURES)} features; wrote {args.out}")
    if replaces:  # said, not refused: this is how the shipped file is made (docs/embedded_model.md)
        print(f"note: {args.out} replaced the predictor shipped with {args.weights}; generate.py --method dyrate "
              "now uses this one (git checkout restores the shipped file)")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
