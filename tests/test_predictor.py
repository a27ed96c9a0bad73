"""DyRate's predictor (predictor.py, tools/train_predictor.py): features, labels, training, the file
format and its refusals, and the trainer as a user runs it (a caption-only data file, the rollout
confidence, the trained predictor's score taken by generate.py); VTW calibration (tools/calibrate_vtw.py),
the command too; replacing the files shipped beside the weights is said."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dyrate_ref.commands import UserError
from dyrate_ref.generation import generate
from dyrate_ref.loading import DEFAULT_WEIGHTS, load_model, load_predictor
from dyrate_ref.tools.train_predictor import save_predictor
from dyrate_ref.predictor import CUTS, FEATURES, RatePredictor, predictor_features
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import DyRate, apply_cut, visual_span
from dyrate_ref.tools.baselines import AttentionMass, random_subset
from dyrate_ref.tools.calibrate_vtw import choose_layer, mean_kl_per_layer
from dyrate_ref.demo.batches import answer_ids
from dyrate_ref.tools.data import Item
from dyrate_ref.tools.train_predictor import fit, label_example, train_imitation
from helpers import generate_run, hf_config, make_checkpoint, noise_image, python_run

ANSWERS = ["The triangle is red and the circle is blue.", "There are three shapes: a square, a star and a circle.",
           "Yes.", "A green square at the top left."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pred"))
    make_checkpoint(d, hf_config(text=dict(num_hidden_layers=4)))
    model = load_model(d)
    proc = Processor(d, model.config)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(8):
        color = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        img = Image.new("RGB", (40, 40), color)
        img.paste(noise_image(16, 16, seed=i, sigma=80), (i * 3, 20 - i))
        examples.append(Item.of(img, "Describe the image.", ANSWERS[i % 4], f"ex{i}"))
    return d, model, proc, examples


def test_features_by_hand():
    scores = torch.tensor([0.4, 0.1, 0.1, 0.0])  # 60% of the query's attention on visual tokens
    f = dict(zip(FEATURES, predictor_features(scores, torch.tensor([0, 1]), 3).tolist()))
    assert f["visual_mass"] == pytest.approx(0.6)
    p = torch.tensor([4, 1, 1, 0]) / 6
    ent = -(p[:3] * p[:3].log()).sum() / math.log(4)
    assert f["entropy"] == pytest.approx(float(ent), abs=1e-6)
    assert f["top25_mass"] == pytest.approx(4 / 6) and f["top50_mass"] == pytest.approx(5 / 6)
    assert f["qmax"] == pytest.approx(math.log1p(4 * 4 / 6))
    assert f["kept_mass"] == pytest.approx(5 / 6)
    assert f["kept_fraction"] == pytest.approx(0.5)
    assert f["is_prefill"] == 0.0 and f["log_step"] == pytest.approx(math.log(4))
    assert dict(zip(FEATURES, predictor_features(scores, torch.arange(4), 0).tolist()))["is_prefill"] == 1.0


def test_cuts_are_nested_and_never_grow():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.rand(n, generator=g)
        prev = torch.randperm(n, generator=g)[:int(torch.randint(0, n + 1, (1,), generator=g))].sort().values
        sizes = []
        for frac in CUTS:
            keep = apply_cut(prev, scores, frac)
            assert set(keep.tolist()) <= set(prev.tolist()) and keep.tolist() == sorted(keep.tolist())
            if keep.numel():  # the survivors are the best-scoring of prev
                assert scores[keep].min() >= scores[prev].topk(keep.numel()).values.min()
            sizes.append(keep.numel())
        assert sizes == sorted(sizes, reverse=True) and sizes[0] == prev.numel() and sizes[-1] == 0


def test_decoding_errs_towards_keeping():
    pred = RatePredictor(2)
    logits = torch.tensor([[0.1, 0.1, 0.1, 0.3, 0.4]]).log()  # P(label >= a) = 1, .9, .8, .7, .4
    want = {0.5: 3, 0.7: 3, 0.75: 2, 0.85: 1, 0.95: 0, 0.3: 4}
    for c, a in want.items():
        assert int(pred.decide(logits, c)) == a, c


class Scripted(RatePredictor):
    """Stands in for a K = 2 predictor: the cuts to make at steps 0, 1, ... (then hold)."""

    def __init__(self, actions):
        super().__init__(2)
        self.actions = list(actions)
        self.t = 0

    def choose_cut(self, feats, confidence=None):
        a = self.actions[self.t] if self.t < len(self.actions) else 0
        self.t += 1
        return CUTS[a]


def test_labels_equal_a_brute_force_search_with_free_decoding(setup):
    """margin 0: the label of step t is the largest cut after which greedy decoding -- the cached,
    evicting loop, not the masked forward the labeller uses -- still gives the unpruned answer."""
    d, model, proc, examples = setup
    checked = 0
    for ex in examples[:3]:
        ids, px = proc.input_ids(ex.prompt), proc.pixel_values(ex.picture())
        answer = generate(model, ids, px, 5, stop_ids=proc.stop_ids).tokens
        _, labels, kept = label_example(model, ids, px, answer, 2, margin=0.0)
        for t in range(len(answer)):
            before = model.config.num_image_tokens if t == 0 else int(kept[t - 1])
            ok = [0]  # holding is the label when no cut keeps the answer, or nothing is left to cut
            for a in range(1, len(CUTS)):
                g = generate(model, ids, px, len(answer), DyRate(2, Scripted(
                    labels[:t].tolist() + [a]), 0.5), stop_ids=proc.stop_ids)
                if g.tokens == answer and int(g.record.kept_masks[t].sum()) < before:
                    ok.append(a)
            assert int(labels[t]) == max(ok), (t, labels.tolist(), ok)
            checked += 1
    assert checked >= 6


def test_training_loss_falls_and_a_stricter_margin_keeps_more(setup):
    """Predictors trained with margin 0 vs 4 nats on the same prompts; run through generate, the strict
    one keeps more visual tokens on average, and so does a more confident decoding of either."""
    d, model, proc, examples = setup
    mean_kept = {}
    for margin in (0.0, 4.0):
        pred, f, y, log = train_imitation(model, proc, examples, 2, margin, rounds=2, epochs=200, max_new_tokens=6,
                                show_progress=False)
        assert f.shape == (y.numel(), len(FEATURES)) and y.min() >= 0 and y.max() < len(CUTS)
        assert len(log) == 2
        for c in (0.5, 0.9):
            runs = [generate(model, proc.input_ids(ex.prompt), proc.pixel_values(ex.picture()), 6,
                             DyRate(2, pred, c)) for ex in examples]
            mean_kept[margin, c] = sum(float(torch.stack(r.record.kept_masks).sum(1).float().mean()) for r in runs) / len(runs)
    _, history = fit(f, y, 2, epochs=150, show_progress=False)
    assert history[-1] < 0.7 * history[0]
    assert mean_kept[4.0, 0.5] > mean_kept[0.0, 0.5], mean_kept
    assert mean_kept[0.0, 0.9] >= mean_kept[0.0, 0.5] and mean_kept[4.0, 0.9] >= mean_kept[4.0, 0.5], mean_kept


def test_file_roundtrip_and_refusals(setup, tmp_path):
    d, model, proc, examples = setup
    f = torch.randn(20, len(FEATURES), generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % len(CUTS)
    pred, _ = fit(f, y, 2, hidden=8, epochs=20, confidence=0.8, show_progress=False)
    path = str(tmp_path / "p.safetensors")
    save_predictor(pred, path, model.config, trained_on="tiny", margin=0.5)
    back = load_predictor(path, model.config)
    assert back.layer == 2 and back.hidden == 8 and back.meta["margin"] == "0.5" and back.meta["trained_on"] == "tiny"
    assert back.confidence == 0.8 and back.cuts == CUTS
    assert torch.equal(back(f), pred(f))
    # for another model
    other = tmp_path / "other"
    make_checkpoint(str(other), hf_config(text=dict(num_hidden_layers=3)))
    with pytest.raises(UserError, match="another model"):
        load_predictor(path, load_model(str(other)).config)
    # corrupt, missing
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable"):
        load_predictor(str(bad), model.config)
    with pytest.raises(UserError, match="does not exist"):
        load_predictor(str(tmp_path / "nope.safetensors"), model.config)


def test_mass_and_random_baselines_keep_what_they_promise():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = 30
        scores = torch.rand(n, generator=g) ** 4
        prev = torch.randperm(n, generator=g)[:20].sort().values
        for share in (0.3, 0.6, 0.9):
            keep = AttentionMass(mass=share).choose(0, prev, scores)
            ranked = scores[prev].sort(descending=True).values
            k = next((i + 1 for i in range(prev.numel()) if ranked[:i + 1].sum() >= share * scores.sum()), None)
            if k is None:
                assert keep.tolist() == prev.tolist()
            else:
                assert keep.numel() == k and set(keep.tolist()) <= set(prev.tolist())
                assert scores[keep].sum() >= share * scores.sum() - 1e-6
        r = random_subset(prev, 7, 3)
        assert r.numel() == 7 and set(r.tolist()) <= set(prev.tolist()) and r.tolist() == sorted(r.tolist())
        assert torch.equal(r, random_subset(prev, 7, 3))
        assert random_subset(prev, 25, 3).tolist() == prev.tolist()
    picks = {tuple(random_subset(torch.arange(30), 5, s).tolist()) for s in range(10)}
    assert len(picks) > 5  # different seeds, different subsets


def test_vtw_calibration_rule(setup):
    d, model, proc, examples = setup
    kl = mean_kl_per_layer(model, proc, examples[:3], range(1, 4), max_new_tokens=6, show_progress=False)
    assert set(kl) == {1, 2, 3} and all(v >= 0 for v in kl.values())
    assert choose_layer(kl, max(kl.values()) + 1) == 1
    assert choose_layer(kl, -1.0) is None
    best = min(kl, key=kl.get)
    assert choose_layer(kl, kl[best]) <= best
    assert choose_layer({5: 0.01, 6: 0.002, 7: 0.001}, 0.003) == 6


# ----------------------------------------------------------------------------------------------------
# FastV's mean score: tests/test_scores.py


# ----------------------------------------------------------------------------------------------------
# The predictor


@pytest.mark.parametrize("N, tops, quantiles", [
    (20, (1, 2, 5, 10), (10, 2, 0)),  # (1 - 0.9)·20 is 1.9999999999999996 in floating point: still index 2
    (22, (2, 3, 6, 11), (11, 2, 0)),  # 0.05·22 = 1.1: the top 5 % share counts ceil(1.1) = 2 tokens
])
def test_predictor_features_by_hand(N, tops, quantiles):
    """N distinct scores 1..N: every feature by hand, on sizes that tell a quantile's ends apart and
    where p·N is not a whole number. The top-p share counts ceil(p·N) tokens; the f-quantile of the
    normalised scores is the floor((1-f)·N)-th largest (0-based)."""
    from dyrate_ref.predictor import FEATURES, predictor_features
    total = N * (N + 1) / 2
    scores = torch.tensor([float(i + 1) for i in range(N)]) / (2 * total)  # visual mass 0.5
    keep = torch.tensor([0, 5, N - 1])
    f = dict(zip(FEATURES, predictor_features(scores, keep, 7).tolist()))
    p = [(i + 1) / total for i in range(N)]
    desc = sorted(p, reverse=True)
    assert f["visual_mass"] == pytest.approx(0.5)
    assert f["entropy"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(N), rel=1e-5)
    for name, k in zip(("top5_mass", "top10_mass", "top25_mass", "top50_mass"), tops):
        assert f[name] == pytest.approx(sum(desc[:k]), rel=1e-5), name
    for name, i in zip(("q50", "q90", "q99"), quantiles):
        assert f[name] == pytest.approx(math.log1p(N * desc[i]), rel=1e-5), name
    assert f["qmax"] == pytest.approx(math.log1p(N * desc[0]), rel=1e-5)
    assert f["kept_mass"] == pytest.approx(p[0] + p[5] + p[N - 1], rel=1e-5)
    assert f["kept_fraction"] == pytest.approx(3 / N)
    assert f["is_prefill"] == 0.0 and f["log_step"] == pytest.approx(math.log(8))


@pytest.mark.parametrize("kind", ["describe", "look"])
def test_shipped_predictor_decisions_recomputed_by_hand(kind):
    """On scene 3, every step's cut of the shipped predictor, recomputed from its file with plain
    arithmetic (standardise, the linear layer, P(label >= a) >= confidence), equals what generate did:
    on the model's own description, and on a constructed look-then-reason trajectory (the scene's true
    description, then "So the star is green.", teacher-forced). The scores are the predictor's own rule's
    (its file's `score`), over the question's rows. What the shipped predictor does with them, as
    docs/evaluation.md says: it cuts at the prefill, where the FLOPs are."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    from dyrate_ref.predictor import CUTS, predictor_features
    from dyrate_ref.pruning import DyRate, kept_count, query_scores
    from dyrate_ref.tools.predictor_e2e import step_scores
    from dyrate_ref.settings import Context, make_method
    from dyrate_ref.oracle import forward_no_cache
    model = load_model(DEFAULT_WEIGHTS)
    proc = Processor(DEFAULT_WEIGHTS, model.config)
    method, _ = make_method(DyRate, {}, Context(DEFAULT_WEIGHTS, 8, model.config))
    path = method.predictor.path
    w = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    c, K = float(meta["confidence"]), int(meta["layer"])
    img = Image.open(f"{DEFAULT_WEIGHTS}/examples/scene3.png")
    if kind == "describe":
        ids, px = proc.input_ids("Describe the image."), proc.pixel_values(img)
        gen = generate(model, ids, px, 40, method, stop_ids=proc.stop_ids, text=proc.text_rows(ids))
    else:
        examples = json.load(open(f"{DEFAULT_WEIGHTS}/examples/examples.json"))
        truth = next(e["description"] for e in examples if e["file"] == "scene3.png")
        assert "a green star" in truth  # so the answer below is the true one
        answer = answer_ids(proc, truth + " So the star is green.")
        ids, px = proc.input_ids("What color is the star? Look first."), proc.pixel_values(img)
        gen = generate(model, ids, px, len(answer), method, force=answer, text=proc.text_rows(ids))
    kept = [int(k.sum()) for k in gen.record.kept_masks]
    # Layers < K are never pruned: the no-cache forward gives every step's scores.
    _, probs = forward_no_cache(model, ids, px, gen.tokens, probs_of=(K - 1,))
    P, span = ids.numel(), visual_span(ids, model.config.image_token_index)
    prev = torch.arange(span[1])
    every = step_scores(query_scores(probs[K - 1], span), proc.text_rows(ids), P, len(gen.tokens), meta.get("score", "last"))
    for t in range(len(gen.tokens)):
        scores = every[t]  # [N]
        x = (predictor_features(scores, prev, t) - w["mean"]) / w["std"]
        logits = w["net.weight"] @ x + w["net.bias"]
        p = logits.softmax(0).tolist()
        a = max(i for i in range(len(CUTS)) if sum(p[i:]) >= c - 1e-6)
        m = kept_count(prev.numel(), CUTS[a])
        assert kept[t] == m, (t, kept, a)
        order = sorted(prev.tolist(), key=lambda i: -float(scores[i]))
        prev = torch.tensor(sorted(order[:m]), dtype=torch.long)
    assert kept[0] < span[1], kept


def test_trainer_reports_and_writes_a_loadable_predictor(pruning_env):
    root, w, img, pred, *_ = pruning_env
    r = generate_run(w, img, "--method", "dyrate", "--predictor", pred, "--trace", str(root / "dy.safetensors"))
    assert r.returncode == 0, r.stderr
    t = load_file(str(root / "dy.safetensors"))
    assert set(t) == {"input_ids", "pixel_values", "tokens", "logits", "kept_masks", "rates", "flops", "kv_bytes"}
    T = t["tokens"].numel()
    assert t["rates"].shape == (T,) and t["flops"].dtype == torch.float64 and t["kv_bytes"].dtype == torch.int64
    # the predictor's rate is the compression relative to N: 1 - |keep_t| / N, which only grows
    keep = t["kept_masks"]
    assert torch.allclose(t["rates"], 1 - keep.sum(1).float() / keep.shape[1])
    assert all(bool((keep[i + 1] <= keep[i]).all()) for i in range(T - 1))  # nested


def test_a_predictor_trained_on_a_score_decides_on_it(pruning_env):
    """train_predictor --score accumulated: the file says so; generate.py's DyRate takes the score from it
    (the trace says where from) and refuses another. (That the loop and the trainer compute the same
    scores: tests/test_scores.py.)"""
    root, w, img, pred, _, _, data = pruning_env
    acc = str(root / "acc.safetensors")
    r = python_run("-m", "dyrate_ref.tools.train_predictor", "--weights", w, "--data", data, "--out", acc,
                   "--epochs", "30", "--max-new-tokens", "4", "--score", "accumulated")
    assert r.returncode == 0, r.stderr
    assert safe_open(acc, "pt").metadata()["score"] == "accumulated"
    assert safe_open(pred, "pt").metadata()["score"] == "last"
    r = generate_run(w, img, "--method", "dyrate", "--predictor", acc, "--trace", str(root / "acc_trace.safetensors"))
    assert r.returncode == 0, r.stderr
    meta = safe_open(str(root / "acc_trace.safetensors"), "pt").metadata()
    assert (meta["score"], meta["score_from"]) == ("accumulated", "predictor file")
    ids = load_file(str(root / "acc_trace.safetensors"))["input_ids"]  # the rows a backend averages over, recorded
    first, end = map(int, meta["text_rows"].split(","))
    from dyrate_ref.processing import Processor
    from dyrate_ref.loading import read_config
    assert Processor(w, read_config(w)).decode(ids[first:end].tolist()).strip() == "Describe it."
    r = generate_run(w, img, "--method", "dyrate", "--predictor", acc, "--score", "last")
    assert r.returncode == 2 and "differs from the predictor's score (accumulated)" in r.stderr


def test_calibrate_vtw_command(pruning_env):
    root, w, img, pred, other_pred, corrupt, data = pruning_env
    out = str(root / "vtw.json")
    r = python_run("-m", "dyrate_ref.tools.calibrate_vtw", "--weights", w, "--data", data, "--min-layer", "1",
                   "--eta", "100", "--max-new-tokens", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["layer"] == 1 and set(res["mean_kl"]) == {"1", "2", "3"}
    bad = python_run("-m", "dyrate_ref.tools.calibrate_vtw", "--weights", w, "--data", data, "--min-layer", "5")
    assert bad.returncode == 2 and "outside 1..3" in bad.stderr


def test_a_caption_only_file_trains_a_predictor(tmp_path, four_layer_checkpoint):
    """train_predictor labels the model's own answers: a data file of captions (no "answer") is enough,
    as docs/your_data.md tells COCO users."""
    for i in range(3):
        noise_image(32, 32, seed=10 + i).save(tmp_path / f"{i}.png")
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "Describe the image.",
                                        "references": [f"a picture number {i}"]}) + "\n" for i in range(3)))
    out = tmp_path / "p.safetensors"
    r = python_run("-m", "dyrate_ref.tools.train_predictor", "--weights", four_layer_checkpoint, "--data", str(data),
                   "--layer", "2", "--rounds", "1", "--epochs", "3", "--max-new-tokens", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_the_rollout_confidence_trains_and_the_confidence_is_stored(tmp_path, four_layer_checkpoint):
    """--rollout-confidence is what the DAgger round decodes at, --confidence what the file stores: a
    predictor trained at rollout 0.55 and stored at 0.95 has the very tensors of one trained and stored
    at 0.55, and a different header confidence; trained at 0.95 its second round sees other states."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    for i in range(4):
        noise_image(32, 32, seed=30 + i).save(tmp_path / f"{i}.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "Describe the image.", "references": ["x"]}) + "\n"
                            for i in range(4)))

    def trained(name, *flags):
        out = tmp_path / name
        r = python_run("-m", "dyrate_ref.tools.train_predictor", "--weights", four_layer_checkpoint, "--data", str(data),
                       "--layer", "2", "--rounds", "2", "--epochs", "20", "--max-new-tokens", "6", "--margin", "0",
                       "--out", str(out), *flags)
        assert r.returncode == 0, r.stderr
        with safe_open(str(out), "pt") as f:
            return load_file(str(out)), f.metadata()
    a, meta_a = trained("a.safetensors", "--confidence", "0.95", "--rollout-confidence", "0.55")
    b, meta_b = trained("b.safetensors", "--confidence", "0.55")
    c, _ = trained("c.safetensors", "--confidence", "0.95")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (meta_a["confidence"], meta_a["rollout_confidence"], meta_b["confidence"]) == ("0.95", "0.55", "0.55")
    assert not all(torch.equal(a[k], c[k]) for k in a), "the rollout confidence changed nothing here: pick other data"


def test_replacing_the_files_shipped_with_the_weights_is_said(tmp_path, four_layer_checkpoint):
    """train_predictor and calibrate_vtw writing over the predictor or calibration beside the weights:
    allowed (that is how they are made), and said; writing them the first time says nothing."""
    import shutil
    w = tmp_path / "w"
    shutil.copytree(four_layer_checkpoint, w)
    for i in range(2):
        noise_image(32, 32, seed=50 + i).save(tmp_path / f"{i}.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": "Describe it.", "answer": "x"}) + "\n"
                            for i in range(2)))
    runs = {"dyrate_predictor.safetensors": ["dyrate_ref.tools.train_predictor", "--layer", "2", "--rounds", "1",
                                             "--epochs", "2", "--max-new-tokens", "3"],
            "vtw_calibration.json": ["dyrate_ref.tools.calibrate_vtw", "--min-layer", "1", "--max-new-tokens", "3"]}
    for name, cmd in runs.items():
        said = []
        for _ in range(2):
            r = python_run("-m", *cmd, "--weights", str(w), "--data", str(data), "--out", str(w / name))
            assert r.returncode == 0, r.stderr
            said.append("replaced the" in r.stdout and "shipped with" in r.stdout)
        assert said == [False, True], (name, said)
