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
from dyrate_ref.predictor import CUTS, RatePredictor
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import Method, apply_cut, visual_span
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
    scores = e2e.step_scores(probs[K - 1], visual_span(ids, model.config.image_token_index), ids.numel(), len(tokens))
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
    pred.save(str(out), model.config, objective="e2e", lam=1.0)
    img = tmp_path / "x.png"
    items[0].picture().save(img)
    assert cli_run(["--weights", d, "--image", str(img), "--prompt", "Describe the image.", "--method", "dyrate",
                    "--predictor", str(out), "--max-new-tokens", "4", "--trace", str(tmp_path / "t.safetensors")]) == 0
