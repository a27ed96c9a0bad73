"""The end-to-end predictor route (tools/predictor_e2e.py) against the project's oracles: its relaxed,
teacher-forced forward with hard decisions is the cached, evicting decode loop; gradients reach the
predictor alone; a short run lowers its loss; a predictor it trains runs through --method dyrate."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from dyrate_ref.generation import generate
from dyrate_ref.oracle import recompute_logits, reference_answer
from dyrate_ref.loading import load_model
from dyrate_ref.tools.train_predictor import save_predictor
from dyrate_ref.predictor import CUTS, RatePredictor
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import Method, apply_cut, query_scores, visual_span
from dyrate_ref.tools import predictor_e2e as e2e
from dyrate_ref.tools.data import Item
from helpers import hf_config, make_checkpoint, noise_image

K = 2


@dataclass(frozen=True)
class FixedCuts(Method):
    """A method that makes the given cut (an index into CUTS) at each step: the decode loop's side of
    the comparison."""
    name: ClassVar[str] = "fixed-cuts"
    layer: int
    decisions: tuple[int, ...]

    def choose(self, t, keep, scores):
        return apply_cut(keep, scores, CUTS[self.decisions[t]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("e2e"))
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4)))
    model = load_model(d)
    proc = Processor(d, model.config)
    items = [Item.of(noise_image(40, 40, seed=i, sigma=80), "Describe the image.", id=f"x{i}") for i in range(3)]
    return d, model, proc, items


def answer(model, proc, item, T=7):
    ids, px = proc.input_ids(item.prompt), proc.pixel_values(item.picture())
    tokens, full, probs = reference_answer(model, ids, px, T, probs_of=(K - 1,))
    rows = query_scores(probs[K - 1], visual_span(ids, model.config.image_token_index))  # [S, N]
    scores = e2e.step_scores(rows, proc.text_rows(ids), ids.numel(), len(tokens), "last")
    return ids, px, tokens, full, scores


def test_hard_decisions_give_the_evicting_loops_logits_and_kept_sets(setup):
    """A fixed sequence of cuts: the relaxed forward (one teacher-forced pass, float key weights) gives
    the cached decode loop's logits and kept sets, fed the same tokens (float precision)."""
    _, model, proc, items = setup
    ids, px, tokens, _, scores = answer(model, proc, items[0])
    decisions = [1, 0, 2, 0, 1, 3, 4][:len(tokens)]
    pred = RatePredictor(K)
    W, _, keeps = e2e.relaxed_weights(pred, scores, 1.0, decisions)
    with torch.no_grad():
        relaxed = e2e.relaxed_logits(model, ids, px, tokens, W, K)
    run = generate(model, ids, px, len(tokens), FixedCuts(K, tuple(decisions)), force=tokens)
    assert [k.nonzero().squeeze(1).tolist() for k in run.record.kept_masks] == [k.tolist() for k in keeps]
    assert torch.allclose(relaxed, torch.stack(run.record.logits).float(), atol=1e-5, rtol=1e-5)
    assert int(W[-1].sum()) == len(keeps[-1]) < W.shape[1]  # the cuts did cut


def test_sampled_masks_at_low_temperature_are_the_hard_cuts(setup):
    """Sampled (straight-through) at a low temperature: every step's weights are exactly 0/1, the kept
    sets nested, and the forward equals the no-cache recompute oracle of the same kept sets."""
    _, model, proc, items = setup
    ids, px, tokens, _, scores = answer(model, proc, items[1])
    torch.manual_seed(3)
    pred = RatePredictor(K)
    torch.nn.init.normal_(pred.net.weight, std=3.0)  # decisive, so that several cuts happen
    W, _, keeps = e2e.relaxed_weights(pred, scores, 1e-3)
    assert set(W.unique().tolist()) <= {0.0, 1.0}
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(keeps, keeps[1:]))
    with torch.no_grad():
        relaxed = e2e.relaxed_logits(model, ids, px, tokens, W, K)
    oracle = recompute_logits(model, ids, px, tokens, W.bool(), K)
    assert torch.allclose(relaxed, oracle, atol=1e-5, rtol=1e-5)


def test_a_steps_weights_are_the_product_of_every_earlier_steps_masks(setup):
    """Eviction is irreversible: W_t = m_0 * ... * m_t (a step's own mask is 1 on tokens evicted before,
    so that its loss reaches the earlier cut), also with soft masks (hard=False)."""
    _, model, proc, items = setup
    *_, scores = answer(model, proc, items[2])
    torch.manual_seed(0)
    pred = RatePredictor(K)
    with torch.no_grad():  # mostly "keep all" (so the hard sets stay full) with some weight on every cut
        pred.net.weight.zero_()
        pred.net.bias.copy_(torch.tensor([4.0, 1.0, 0.0, -1.0, -4.0]))
    W, m, keeps = e2e.relaxed_weights(pred, scores, 2.0, hard=False)
    assert len(keeps[-1]) == W.shape[1]
    assert W.shape == m.shape and len(W) >= 3
    assert torch.allclose(W, torch.cumprod(m, dim=0))
    assert not torch.allclose(W[1:], m[1:])  # the soft masks do leave a trace of the earlier steps


def test_gradients_reach_the_predictor_and_not_the_model(setup):
    _, model, proc, items = setup
    e2e.freeze(model)
    pred = RatePredictor(K)
    torch.manual_seed(1)
    loss, kl, kept = e2e.loss_of(model, pred, answer(model, proc, items[0]), K, lam=0.5, tau=1.0)
    loss.backward()
    assert pred.net.weight.grad is not None and pred.net.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert 0 < float(kept) <= 1 and float(kl) >= 0


def test_a_short_run_lowers_the_loss_and_the_file_runs_through_dyrate(setup, tmp_path):
    """Four epochs on three answers with a price on what is kept: the loss falls, and the predictor
    returned is the best epoch's. The file it
    writes is read by --method dyrate unchanged (its own layer and confidence)."""
    from dyrate_ref.cli import run as cli_run
    d, model, proc, items = setup
    pred, log, history = e2e.train_e2e(model, proc, items, K, lam=1.0, epochs=4, lr=0.05, seed=0,
                                       max_new_tokens=6, show_progress=False)
    assert min(history[1:]) < history[0], log
    data = e2e.prepare(model, proc, items, K, 6, show_progress=False)
    assert e2e.greedy_loss(model, pred, data, K, 1.0)[0] == pytest.approx(min(history))  # the best epoch's predictor
    out = tmp_path / "p.safetensors"
    save_predictor(pred, str(out), model.config, objective="e2e", lam=1.0)
    img = tmp_path / "x.png"
    items[0].picture().save(img)
    cli_run(["--weights", d, "--image", str(img), "--prompt", "Describe the image.", "--method", "dyrate",
             "--predictor", str(out), "--max-new-tokens", "4", "--trace", str(tmp_path / "t.safetensors")])
    assert (tmp_path / "t.safetensors").is_file()


def test_the_objective_is_the_mean_kl_to_the_unpruned_answer_plus_lam_times_the_mean_kept_share(setup):
    """loss_of against an independent computation: the cached, evicting loop fed the unpruned answer with
    the same cuts gives each step's logits and kept set; the objective is mean_t KL(unpruned_t || pruned_t)
    (not the reverse, not a sum) plus lam x mean_t |kept_t| / N (a share, not a count). lam = 0.7 makes
    the two terms comparable, so each plausible misreading is off by far more than float error."""
    from dyrate_ref.tools.metrics import kl_divergence
    _, model, proc, items = setup
    one = answer(model, proc, items[1])
    ids, px, tokens, full, scores = one
    decisions = tuple([2, 0, 1, 0, 3, 0, 4][:len(tokens)])
    loss, kl, kept = e2e.loss_of(model, RatePredictor(K), one, K, 0.7, 1.0, list(decisions))
    run = generate(model, ids, px, len(tokens), FixedCuts(K, decisions), force=tokens)
    loop = torch.stack(run.record.logits)  # [T, V]
    N = scores.shape[1]
    want_kl = float(kl_divergence(full, loop).mean())
    want_kept = sum(int(m.sum()) for m in run.record.kept_masks) / (len(tokens) * N)
    assert abs(float(kl) - want_kl) < 1e-4 and abs(float(kept) - want_kept) < 1e-6
    assert abs(float(loss) - (want_kl + 0.7 * want_kept)) < 1e-4
    reverse = float(kl_divergence(loop, full).mean())
    assert abs(reverse - want_kl) > 1e-3 and want_kept > 0.05  # the readings differ by more than the tolerance


def test_the_temperature_is_annealed_from_start_to_end_geometrically():
    assert e2e.temperature(0, 12, 1.0, 0.3) == 1.0
    assert abs(e2e.temperature(11, 12, 1.0, 0.3) - 0.3) < 1e-12
    assert abs(e2e.temperature(1, 3, 1.0, 0.25) - 0.5) < 1e-12  # the geometric middle, not the arithmetic 0.625
    assert e2e.temperature(0, 1, 1.0, 0.3) == 1.0  # one epoch: the start's


def test_the_trainer_returns_the_epoch_with_the_lowest_loss_when_it_does_not_fall_monotonically(monkeypatch):
    """The deterministic loss after each epoch goes 0.6, 0.9, 0.7, 0.8 (before training: 1.0): the returned
    predictor is the one after the first epoch -- the lowest, not the last, and not the last one lower than
    the epoch before it (the third); the log says 0.6. The epochs' annealed temperatures are those
    train_e2e hands loss_of."""
    data = [(None, None, [1, 2], None, torch.rand(2, 9)), (None, None, [1], None, torch.rand(1, 9))]
    monkeypatch.setattr(e2e, "prepare", lambda *a, **k: data)
    taus, states = [], []

    def fake_loss(model, pred, one, K, lam, tau, decisions=None, sample=True):
        taus.append(tau)
        loss = (pred.net.weight ** 2).sum() + pred.net.bias.sum()  # moves the weights every step
        return loss, loss.detach(), loss.detach()
    losses = iter([1.0, 0.6, 0.9, 0.7, 0.8])

    def fake_greedy(model, pred, data, K, lam):
        states.append({k: v.clone() for k, v in pred.state_dict().items()})
        value = next(losses)
        return value, value, value
    monkeypatch.setattr(e2e, "loss_of", fake_loss)
    monkeypatch.setattr(e2e, "greedy_loss", fake_greedy)
    pred, log, history = e2e.train_e2e(torch.nn.Linear(1, 1), None, [None, None], K, 0.1, epochs=4,
                                       tau_start=1.0, tau_end=0.125, show_progress=False)
    assert history == [1.0, 0.6, 0.9, 0.7, 0.8]
    got = pred.state_dict()
    same = lambda i: all(torch.equal(got[k], states[i][k]) for k in got)  # noqa: E731
    assert same(1) and not same(3) and not same(4)  # after the first epoch, not the third nor the last
    assert "(0.6000)" in log[-1]
    assert [round(t, 6) for t in taus] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
