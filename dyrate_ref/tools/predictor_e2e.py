"""DyRate's predictor trained end to end: a differentiable cut, the language model's own loss and a cost
penalty (train_predictor --objective e2e). The route later work attributes to the paper (a discrete
choice learnt through a Gumbel-softmax / straight-through surrogate); the paper's own text, which we do
not have, may differ. Everything here is dyrate_ref's reconstruction. The imitation route (labels from
an answer-preservation oracle, then DAgger) is in train_predictor.py, beside it.

One answer, teacher-forced on the unpruned model's own greedy answer, is one forward for all its steps:

  for t = 0 .. T-1:
    features_t   = predictor_features(scores_t, keep_{t-1}, t)     scores_t: layer K-1's attention of step
                                                                   t's query (layers < K never evict, so
                                                                   it is the unpruned run's)
    y_t    [U]   = straight-through Gumbel-softmax of the predictor's logits (a hard one-hot sample
                   forward, the soft sample's gradient backward)
    m_t    [N]   = sum_a y_t[a] * mask of cut a                   cut a's nested top-k set of keep_{t-1};
                                                                   1 on the tokens evicted earlier
    W_t    [N]   = W_{t-1} * m_t                                  eviction is irreversible, and the loss
                                                                   of step t reaches every earlier cut
    keep_t       = the sampled cut's kept set                      (hard: what the features read next)

  In layers >= K every query of step t (prompt rows belong to step 0) weighs the visual keys by W_t: the
  attention's float mask (model.LlamaAttention), log W_t added to the scores. With hard W it is exactly
  the evicting decode loop's attention (tests/test_predictor_e2e.py checks it against the cached loop).

  loss = mean_t KL(unpruned_t || relaxed_t) + lam * mean_t |W_t| / N

The VLM is frozen: gradients reach the predictor's weights only. Inference is unchanged (features ->
class -> cut, decoded at a confidence): a predictor trained here is read by --method dyrate like any.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..oracle import forward_no_cache, reference_answer, step_of_rows
from ..predictor import CUTS, RatePredictor, predictor_features
from ..commands import Progress
from ..pruning import apply_cut, kept_mask, query_scores, scored, visual_span
from .metrics import kl_divergence


def step_scores(rows: torch.Tensor, text: tuple[int, int], P: int, T: int, score: str) -> torch.Tensor:
    """The same scores for every step of an answer at once, from one unpruned forward of the prompt and
    its T answer tokens (the training tools): rows [S, N] are query_scores of that forward, row s the
    query at position s; step t's own query is row P-1+t. -> [T, N], row t = what the loop's step t sees
    (pruning.scored under the rule `score`)."""
    first, end = text
    own = rows[P - 1:P - 1 + T]  # [T, N]
    seen = rows[first:end].sum(0) + torch.cat([rows.new_zeros(1, rows.shape[1]), rows[P:P - 1 + T]]).cumsum(0)
    accumulated = seen / (end - first + torch.arange(T, device=rows.device)[:, None])  # [T, N]
    return torch.stack([scored(score, t, own[t], accumulated[t]) for t in range(T)])  # [T, N]


def candidates(keep: torch.Tensor, scores: torch.Tensor, N: int, cuts=CUTS) -> torch.Tensor:
    """Step t's own mask under every cut, float [U, N]: 1 on the tokens the cut keeps of keep [M] (nested:
    apply_cut), 0 on those it drops, and 1 on the tokens evicted before: their 0 is an earlier step's
    factor of W, so a later step's loss still reaches the decision that evicted them."""
    gone = ~kept_mask(keep, N)  # [N]
    return torch.stack([kept_mask(apply_cut(keep, scores, c), N) | gone for c in cuts]).float()  # [U, N]


def relaxed_weights(pred: RatePredictor, scores: torch.Tensor, tau: float, decisions: list[int] | None = None,
                    hard: bool = True, sample: bool = True):
    """Every step's visual-key weights W [T, N] (differentiable in the predictor's weights), each step's
    own mask m [T, N] and the hard kept sets [keep_t]. decisions: fixed cut indices per step (one-hot y_t;
    the tests' sequence) instead of sampling; hard=False: the soft sample forward too (the tests');
    sample=False: the predictor's most likely cut, no noise (the training log's deterministic loss)."""
    T, N = scores.shape
    keep = torch.arange(N, device=scores.device)  # keep_{-1}: everything
    W = torch.ones(N, device=scores.device)
    weights, masks, keeps = [], [], []
    for t in range(T):
        logits = pred(predictor_features(scores[t], keep, t))  # [U]
        if decisions is None and sample:
            y = F.gumbel_softmax(logits, tau=tau, hard=hard)  # [U]: one-hot forward, soft gradient
        else:
            a = int(logits.argmax()) if decisions is None else decisions[t]
            y = F.one_hot(torch.tensor(a), len(pred.cuts)).float().to(scores.device)
        cand = candidates(keep, scores[t], N, pred.cuts)  # [U, N]
        m = y @ cand  # [N]: step t's own mask
        W = W * m  # [N]: times every earlier step's
        keep = apply_cut(keep, scores[t], pred.cuts[int(y.argmax())])  # [M_t]: the sampled cut's set
        weights.append(W)
        masks.append(m)
        keeps.append(keep)
    return torch.stack(weights), torch.stack(masks), keeps  # [T, N], [T, N], T x [M_t]


def key_weights(input_ids: torch.Tensor, image_token_id: int, W: torch.Tensor) -> torch.Tensor:
    """W [T, N] -> the key weights [S, S] of layers >= K: 1 everywhere but the visual keys, which a query of
    step t weighs by W_t (oracle.step_of_rows says which step a row belongs to). Causality is the
    attention's own default."""
    start, N = visual_span(input_ids, image_token_id)
    P, T = input_ids.numel(), W.shape[0]
    S = P + T - 1
    ones = torch.ones(S, device=W.device)
    return torch.cat([ones[:, None].expand(S, start), W[step_of_rows(P, T, W.device)],
                      ones[:, None].expand(S, S - start - N)], dim=1)


def relaxed_logits(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, tokens: list[int], W: torch.Tensor,
                   K: int) -> torch.Tensor:
    """The teacher-forced answer's logits [T, V] with layers >= K weighing the visual keys by W [T, N]:
    the oracle's forward, with gradients to W (the model's weights are frozen)."""
    weight = key_weights(input_ids, model.config.image_token_index, W.to(model.lm_head.weight.device))  # [S, S]
    L = model.config.text_config.num_hidden_layers
    return forward_no_cache(model, input_ids, pixel_values, tokens, key_weights={i: weight for i in range(K, L)})[0]


def prepare(model, processor, examples, K: int, max_new_tokens: int, show_progress: bool = True, score: str = "last"):
    """Per example: (input_ids, pixels, the unpruned greedy answer, its logits [T, V], scores [T, N] under
    the rule `score`, step t's row what the loop's step t sees: step_scores)."""
    out = []
    bar = Progress(len(examples), "unpruned answers", " examples") if show_progress else None
    for ex in examples:
        ids, px = processor.input_ids(ex.prompt), processor.pixel_values(ex.picture())
        tokens, full, probs = reference_answer(model, ids, px, max_new_tokens, processor.stop_ids, probs_of=(K - 1,))
        span = visual_span(ids, model.config.image_token_index)
        rows = query_scores(probs[K - 1].cpu(), span)  # [S, N]
        out.append((ids, px, tokens, full, step_scores(rows, processor.text_rows(ids), ids.numel(), len(tokens), score)))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return out


def loss_of(model, pred: RatePredictor, prepared_one, K: int, lam: float, tau: float, decisions=None,
            sample: bool = True):
    """One answer's loss: mean_t KL(unpruned_t || relaxed_t) + lam * mean_t |W_t| / N. -> (loss, KL, kept)."""
    ids, px, tokens, full, scores = prepared_one
    W, _, _ = relaxed_weights(pred, scores, tau, decisions, sample=sample)  # [T, N]
    logits = relaxed_logits(model, ids, px, tokens, W, K)  # [T, V]
    kl = kl_divergence(full, logits).mean()
    kept = W.mean()
    return kl + lam * kept, kl.detach(), kept.detach()


@torch.no_grad()
def greedy_loss(model, pred: RatePredictor, data, K: int, lam: float) -> tuple[float, float, float]:
    """The mean loss, KL and kept share over the answers with the predictor's most likely cut at every
    step (no sampling noise): what the training log follows. -> (loss, KL, kept)."""
    out = [loss_of(model, pred, one, K, lam, 1.0, sample=False) for one in data]
    return tuple(sum(float(x[i]) for x in out) / len(out) for i in range(3))


def freeze(model):
    """The VLM's weights take no gradient: the loss trains the predictor alone."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def temperature(epoch: int, epochs: int, start: float, end: float) -> float:
    """The Gumbel-softmax temperature, annealed geometrically from start (epoch 0) to end (the last)."""
    return start * (end / start) ** (epoch / max(1, epochs - 1))


KEEP_PRIOR = 2.0  # the initial logit of "cut nothing" over the others (a reconstruction choice, tested)


def train_e2e(model, processor, examples, K: int, lam: float, epochs: int = 12, lr: float = 0.01, seed: int = 0,
              tau_start: float = 1.0, tau_end: float = 0.3, confidence: float = 0.5, max_new_tokens: int = 64,
              show_progress: bool = True, score: str = "last"):
    """Adam on the predictor alone, one answer per step, `epochs` passes over the examples; the epoch whose
    predictor has the lowest deterministic loss (greedy_loss) on the training answers is kept. -> (predictor,
    log lines, that loss before training and after each epoch)."""
    freeze(model)
    data = prepare(model, processor, examples, K, max_new_tokens, show_progress, score)
    torch.manual_seed(seed)
    pred = RatePredictor(K, CUTS, 0, confidence, score=score)
    feats = torch.stack([predictor_features(s[t], torch.arange(s.shape[1]), t) for *_, s in data
                         for t in range(s.shape[0])])  # the unpruned path's features: the standardisation
    pred.mean.copy_(feats.mean(0))
    pred.std.copy_(feats.std(0).clamp_min(1e-3) if feats.shape[0] > 1 else torch.ones(feats.shape[1]))
    with torch.no_grad():  # start from keeping everything: each cut is what the price on kept tokens must buy
        pred.net.bias[0] += KEEP_PRIOR
    opt = torch.optim.Adam(pred.net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    before = greedy_loss(model, pred, data, K, lam)
    log = [f"before training: loss {before[0]:.4f} (KL {before[1]:.4f} nats, kept {before[2]:.3f} of N), most likely cuts"]
    history, best = [before[0]], {k: v.clone() for k, v in pred.state_dict().items()}
    bar = Progress(epochs * len(data), "training end to end", " answers") if show_progress else None
    for epoch in range(epochs):
        tau = temperature(epoch, epochs, tau_start, tau_end)
        total = kls = kepts = 0.0
        for i in torch.randperm(len(data), generator=gen).tolist():
            loss, kl, kept = loss_of(model, pred, data[i], K, lam, tau)
            opt.zero_grad()
            loss.backward()
            # A cut that removes most of a query's attention mass renormalises by a small sum: gradients of
            # 1e5 next to ones of 1. Clipped, so that one answer does not decide the step.
            torch.nn.utils.clip_grad_norm_(pred.net.parameters(), 1.0)
            opt.step()
            total, kls, kepts = total + loss.item(), kls + kl.item(), kepts + kept.item()
            if bar:
                bar.update(1, f"loss {loss.item():.3f}")
        n, after = len(data), greedy_loss(model, pred, data, K, lam)
        if after[0] < min(history):  # the sampled gradient is noisy: keep the best epoch's predictor
            best = {k: v.clone() for k, v in pred.state_dict().items()}
        history.append(after[0])
        log.append(f"epoch {epoch}: tau {tau:.3f}, sampled loss {total / n:.4f} (KL {kls / n:.4f}, kept {kepts / n:.3f}); "
                   f"most likely cuts: loss {after[0]:.4f} (KL {after[1]:.4f} nats, kept {after[2]:.3f} of N)")
    if bar:
        bar.close()
    pred.load_state_dict(best)
    log.append(f"kept the predictor of the epoch with the lowest loss at its most likely cuts ({min(history):.4f})")
    return pred.eval(), log, history

