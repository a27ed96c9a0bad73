"""The attention score a method decides on (pruning.SCORES): which query rows each rule averages, on
hand-built attention; the loop's running accumulation against the teacher-forced step_scores the
training tools use; the question's rows against the tokenizer and against transformers' attention."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.oracle import forward_no_cache
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import DyRateSchedule, FastV, Method, query_scores, scored, visual_span
from dyrate_ref.tools.predictor_e2e import step_scores
from helpers import hf_config, make_checkpoint, noise_image


def hand_built(P=7, T=4, N=3, H=2):
    """Attention of a 2-head layer over a prompt of P rows (row 0 BOS, rows 1..3 the image, rows 4, 5 the
    question's text, row 6 the template's last token) and T-1 answer rows: every row's visual
    probabilities distinct, so that averaging the wrong rows gives other numbers."""
    S = P + T - 1
    probs = torch.zeros(1, H, S, S)
    g = torch.Generator().manual_seed(0)
    for s in range(4, S):  # only rows after the image see it (causal)
        probs[0, :, s, 1:4] = torch.rand(H, N, generator=g) / N
    return probs, (1, N), (4, 6), P, T


def test_each_rule_averages_its_rows_by_hand():
    probs, span, text, P, T = hand_built()
    per_head = probs[0, :, :, 1:4]  # [H, S, N]
    row = lambda s: per_head[:, s].mean(0)  # one query's scores, head-averaged: [N]
    rows = query_scores(probs, span)  # [S, N]
    assert torch.allclose(rows[5], row(5)) and torch.allclose(rows[-1], row(P + T - 2))
    got = {score: step_scores(rows, text, P, T, score) for score in ("last", "mean", "accumulated")}
    text_mean = (row(4) + row(5)) / 2  # the question's text only: not the image rows, not the template's row 6
    for t in range(T):
        own = row(P - 1 + t)  # step t's query: the prompt's last token, then answer token t-1
        acc = (row(4) + row(5) + sum((row(P + j) for j in range(t)), torch.zeros(3))) / (2 + t)
        assert torch.allclose(got["last"][t], own)
        assert torch.allclose(got["mean"][t], text_mean if t == 0 else own)
        assert torch.allclose(got["accumulated"][t], acc)
    # the three differ: a rule that averaged other rows would be caught
    assert (got["mean"][0] - got["last"][0]).abs().max() > 1e-3
    assert (got["accumulated"][2] - got["last"][2]).abs().max() > 1e-3
    assert (got["accumulated"][0] - rows[4:P].mean(0)).abs().max() > 1e-3  # the template row is left out
    # scored: the one switch the methods use
    last, acc = torch.ones(3), torch.zeros(3)
    assert [scored(s, t, last, acc).sum().item() for s in ("last", "mean", "accumulated") for t in (0, 2)] == \
        [3, 3, 0, 3, 0, 0]


@dataclass(frozen=True)
class Recording(Method):
    """A schedule that writes down the scores the loop hands it (a test's method: kept sets shrink)."""
    name: ClassVar[str] = "recording"
    layer: int
    seen: list
    score: str

    def choose(self, t, kept, scores):
        self.seen.append(scores.clone())
        return DyRateSchedule(self.layer, (0.25, 0.5), self.score).choose(t, kept, scores)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("scores"))
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4)))
    model = load_model(d)
    proc = Processor(d, model.config)
    return d, model, proc


@pytest.mark.parametrize("score", ["last", "mean", "accumulated"])
def test_loop_accumulates_what_step_scores_recomputes(tiny, score):
    """The loop keeps a running sum over the question's and the answer's queries while tokens leave the
    layers >= K; layers < K see everything, so one unpruned teacher-forced forward gives every step's
    scores (what train_predictor and predictor_e2e learn from): equal within fp32 rounding."""
    _, model, proc = tiny
    ids, px = proc.input_ids("What is shown in the picture here?"), proc.pixel_values(noise_image(48, 40, seed=3))
    text, K = proc.text_rows(ids), 2
    seen = []
    gen = generate(model, ids, px, 6, Recording(K, seen, score), text=text)
    _, probs = forward_no_cache(model, ids, px, gen.tokens, probs_of=(K - 1,))
    want = step_scores(query_scores(probs[K - 1], visual_span(ids, model.config.image_token_index)), text,
                       ids.numel(), len(gen.tokens), score)
    assert len(seen) == len(gen.tokens) >= 3
    assert torch.allclose(torch.stack(seen), want, atol=1e-6)


def test_text_rows_are_the_question(tiny):
    d, model, proc = tiny
    ids = proc.input_ids("What is shown here?")
    first, end = proc.text_rows(ids)
    assert proc.decode(ids[first:end].tolist()).lstrip(" ") == "What is shown here?"  # no newline from the template
    start, N = visual_span(ids, model.config.image_token_index)
    assert first > start + N - 1  # not the image, not the newline after it
    assert "ASSISTANT" in proc.decode(ids[end:].tolist())


def test_fastv_mean_equals_transformers_attention_over_the_question(tiny):
    """score=mean: layer K-1's attention averaged over heads and the question's text rows, the values
    against transformers' eager attention, and the set the loop keeps is their top R."""
    from transformers import LlavaForConditionalGeneration as HF
    d, model, proc = tiny
    hf = HF.from_pretrained(d, attn_implementation="eager").eval()
    ids, px = proc.input_ids("What is shown in the picture here?"), proc.pixel_values(noise_image(48, 40, seed=4))
    start, N = visual_span(ids, model.config.image_token_index)
    first, end = proc.text_rows(ids)
    with torch.no_grad():
        att = hf(input_ids=ids[None], pixel_values=px, output_attentions=True).attentions[1][0]  # [H, P, P]
    want = att[:, first:end, start:start + N].float().mean(dim=(0, 1))  # [N]
    rows = query_scores(att[None], (start, N))
    fastv = FastV(2, 0.5, "mean")
    got = fastv.scores(0, rows[-1], rows[first:end].mean(0))
    assert torch.allclose(got, want, atol=1e-6)
    everything_after = att[:, start + N:, start:start + N].float().mean(dim=(0, 1))  # the template too: another thing
    assert (got - everything_after).abs().max() > 1e-5
    kept = generate(model, ids, px, 1, fastv, text=(first, end)).record.kept_masks[0]
    assert set(kept.nonzero().squeeze(1).tolist()) == set(want.topk(int(kept.sum())).indices.tolist())


def test_fastv_refuses_accumulated():
    with pytest.raises(ValueError, match="accumulated"):
        FastV(2, 0.5, "accumulated")
    with pytest.raises(ValueError, match="score"):
        DyRateSchedule(2, (0.5,), "median")
