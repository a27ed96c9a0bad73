"""The premise test (tools/premise.py) against a brute-force loop over (s, f) computed another way: the
cached, evicting decode loop fed the unpruned answer (not the masked no-cache recompute the tool uses),
and free decoding compared token by token."""

import json
import math

import pytest
import torch

from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.demo.batches import answer_ids
from dyrate_ref.processing import Processor
from dyrate_ref.tools import premise
from helpers import hf_config, make_checkpoint, noise_image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("premise"))
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4, num_key_value_heads=2)))
    model = load_model(d)
    return d, model, Processor(d, model.config)


def test_cut_costs_equal_a_brute_force_loop(setup, tmp_path):
    from dyrate_ref.tools.data import Item
    d, model, proc = setup
    noise_image(40, 40, seed=5).save(tmp_path / "x.png")
    item = Item("x", "What is it?", "answer", 0, "x", answer="nothing", image_path=str(tmp_path / "x.png"))
    steps, fractions = (0, 2, 5), (0.5, 0.25, 0.0)
    records = premise.cut_costs(model, proc, item, 2, steps, fractions, max_new_tokens=8)
    ids, px = proc.input_ids(item.prompt), proc.pixel_values(item.picture())
    base = generate(model, ids, px, 8, stop_ids=proc.stop_ids)
    T, full = len(base.tokens), torch.stack(base.record.logits).double()
    N = model.config.num_image_tokens
    assert {(r["choice"], r["step"], r["fraction"]) for r in records} == \
        {(c, s, f) for c in ("step", "prefill") for s in steps for f in fractions if s < T}
    for r in records:
        s, f = r["step"], r["fraction"]
        chosen = None
        if r["choice"] == "prefill":  # the prefill's choice: what a cut at step 0 keeps, through the cached loop
            at0 = generate(model, ids, px, T, premise.CutAt(2, 0, f), force=base.tokens).record.kept_masks[0]
            chosen = tuple(at0.nonzero().squeeze(1).tolist())
        forced = generate(model, ids, px, T, premise.CutAt(2, s, f, chosen), force=base.tokens)  # cached, evicting
        cut = torch.stack(forced.record.logits).double()
        lp, lq = full[s:].log_softmax(-1), cut[s:].log_softmax(-1)
        assert r["kl"] == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).clamp_min(0).mean()), abs=1e-5)
        assert r["top1"] == pytest.approx(float((cut[s:].argmax(-1) == torch.tensor(base.tokens[s:])).double().mean()))
        free = generate(model, ids, px, 8, premise.CutAt(2, s, f, chosen), stop_ids=proc.stop_ids)
        assert r["same_answer"] == float(free.tokens == base.tokens)
        kept = [int(k.sum()) for k in forced.record.kept_masks]
        assert kept == [N] * s + [N - math.floor((1 - f) * N + 0.5 + 1e-9)] * (T - s)  # f·N kept, rounded half up
        if r["choice"] == "prefill" and s > 0:
            assert forced.record.kept_masks[s].nonzero().squeeze(1).tolist() == list(chosen)
    # the cut costs something: keeping nothing from step 0 moves the distribution
    assert next(r for r in records if r["step"] == 0 and r["fraction"] == 0.0)["kl"] > 1e-3
    # at step 0 the two choices are the same query's: the same figures
    for r in (r for r in records if r["step"] == 0 and r["choice"] == "prefill"):
        twin = next(q for q in records if q["choice"] == "step" and q["step"] == 0 and q["fraction"] == r["fraction"])
        assert (r["kl"], r["same_answer"]) == (twin["kl"], twin["same_answer"])
    # a later query keeps other tokens: somewhere the two choices' kept sets differ (else the variant is moot)
    sets = {c: generate(model, ids, px, T, premise.CutAt(2, 2, 0.25, None if c == "step" else tuple(
        generate(model, ids, px, T, premise.CutAt(2, 0, 0.25), force=base.tokens).record.kept_masks[0]
        .nonzero().squeeze(1).tolist())), force=base.tokens).record.kept_masks[2] for c in ("step", "prefill")}
    assert not torch.equal(sets["step"], sets["prefill"])


def test_the_look_end_is_the_step_that_begins_the_reasoning_part(setup):
    """look_end on answers tokenised from text: the step of the token " So" after the description."""
    from dyrate_ref.demo.scenes import look_answer, random_scene
    import random
    from dyrate_ref.loading import DEFAULT_WEIGHTS
    from dyrate_ref.processing import Processor as P
    proc = P(DEFAULT_WEIGHTS, load_model(DEFAULT_WEIGHTS).config)
    scene = random_scene(random.Random(3), 3, 3)
    s0 = scene.shapes[0]
    answer = look_answer(scene, s0.color, s0.kind)
    tokens = answer_ids(proc, answer)
    t = premise.look_end(proc, tokens)
    assert proc.decode(tokens[:t]).rstrip().endswith(".") and proc.decode(tokens[t:]).strip().startswith("So ")
    assert proc.decode(tokens[:t]).strip() == answer.split(" So ")[0]
    assert premise.look_end(proc, answer_ids(proc, "There are two shapes.")) is None


def test_the_summary_groups_by_choice_and_clusters_its_error():
    recs = [{"kind": "look", "cluster": c, "choice": "step", "step": premise.AFTER_LOOK, "fraction": 0.0, "kl": 0.0,
             "top1": 1.0, "same_answer": v, "score": v, "base_score": 1.0} for c, v in (("a", 1.0), ("a", 0.0), ("b", 1.0))]
    rows = premise.summarise_cuts(recs)
    assert [(r["kind"], r["step"]) for r in rows] == [("look", premise.AFTER_LOOK)]  # not pooled into "all"
    mean = 2 / 3
    # clustered by picture: deviations summed per cluster (a: 1/3 - 2/3 = -1/3, b: 1/3); G/(G-1) = 2
    se = (2 * ((-1 / 3) ** 2 + (1 / 3) ** 2)) ** 0.5 / 3
    assert rows[0]["same_answer"] == pytest.approx(mean) and rows[0]["same_answer_se"] == pytest.approx(se)


def test_the_command_writes_its_table_and_refuses_bad_grids(setup, tmp_path, capsys):
    d, _, _ = setup
    data = tmp_path / "d.jsonl"
    noise_image(40, 40, seed=6).save(tmp_path / "a.png")
    data.write_text(json.dumps({"image": "a.png", "prompt": "What is it?", "answer": "nothing"}) + "\n")
    out = tmp_path / "p.json"
    assert premise.run(["--weights", d, "--data", str(data), "--layer", "2", "--steps", "0,1", "--fractions", "0.5",
                        "--max-new-tokens", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kind"], r["choice"], r["step"], r["fraction"]) for r in rows} >= {
        ("all", "step", 0, 0.5), ("answer", "prefill", 0, 0.5)}
    assert "| all | step s's query | 0 | 0.5 |" in capsys.readouterr().out
    from dyrate_ref.commands import UserError
    for bad in (["--steps", "0,x"], ["--fractions", "1.5"], ["--layer", "4"], ["--scenes", "0"], ["--choice", "last"]):
        with pytest.raises(UserError):
            premise.run(["--weights", d, "--data", str(data), *bad] if bad[0] != "--scenes" else ["--weights", d, *bad])
