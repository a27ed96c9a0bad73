"""DyRate's predictor: features, labels, training, the file format and its refusals; VTW calibration."""

import math

import pytest
import torch
from PIL import Image

from dyrate_ref.errors import UserError
from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.predictor import FEATURES, RATE_GRID, load_predictor, predictor_features
from dyrate_ref.processing import Processor
from dyrate_ref.pruning import PruneSettings
from dyrate_ref.tools.calibrate_vtw import choose_layer, mean_kl_per_layer
from dyrate_ref.tools.data import Example
from dyrate_ref.tools.train_predictor import fit, label_examples
from helpers import hf_config, make_checkpoint, noise_image

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
        examples.append(Example(img, "Describe the image.", ANSWERS[i % 4]))
    return d, model, proc, examples


def test_features_by_hand():
    scores = torch.tensor([0.4, 0.1, 0.1, 0.0])  # 60% of the query's attention on visual tokens
    f = dict(zip(FEATURES, predictor_features(scores, torch.tensor([0, 1])).tolist()))
    assert f["visual_mass"] == pytest.approx(0.6)
    p = torch.tensor([4, 1, 1, 0]) / 6
    ent = -(p[:3] * p[:3].log()).sum() / math.log(4)
    assert f["entropy"] == pytest.approx(float(ent), abs=1e-6)
    assert f["top25_mass"] == pytest.approx(4 / 6) and f["top50_mass"] == pytest.approx(5 / 6)
    assert f["qmax"] == pytest.approx(math.log1p(4 * 4 / 6))
    assert f["kept_mass"] == pytest.approx(5 / 6)
    assert f["kept_fraction"] == pytest.approx(0.5)


def test_labels_respect_tau_and_training_loss_falls(setup):
    d, model, proc, examples = setup
    feats, labels, kept = label_examples(model, proc, examples, 2, 0.05, show_progress=False)
    assert feats.shape == (labels.numel(), len(FEATURES))
    pred, history = fit(feats, labels, 2, epochs=150, show_progress=False)
    assert history[-1] < 0.7 * history[0]


def test_smaller_tau_keeps_more_tokens(setup):
    """Predictors trained with tau=0.002 vs tau=0.5 on the same data; run through generate on the same
    prompts, the small-tau one must keep more visual tokens on average."""
    d, model, proc, examples = setup
    mean_kept = {}
    for tau in (0.002, 0.5):
        f, y, kept = label_examples(model, proc, examples, 2, tau, show_progress=False)
        pred, _ = fit(f, y, 2, epochs=200, show_progress=False)
        runs = [generate(model, proc.input_ids(ex.prompt), proc.pixel_values(ex.image), 12,
                         PruneSettings("dyrate", 2, predictor=pred)) for ex in examples[:4]]
        mean_kept[tau] = sum(float(torch.stack(r.record.keep).sum(1).float().mean()) for r in runs) / len(runs)
        assert y.min() >= 0 and y.max() < len(RATE_GRID)  # labels are grid indices
    assert mean_kept[0.002] > mean_kept[0.5]


def test_file_roundtrip_and_refusals(setup, tmp_path):
    d, model, proc, examples = setup
    f, y, _ = label_examples(model, proc, examples[:2], 2, 0.05, show_progress=False)
    pred, _ = fit(f, y, 2, hidden=8, epochs=20, show_progress=False)
    path = str(tmp_path / "p.safetensors")
    pred.save(path, model.config, trained_on="tiny", tau=0.05)
    back = load_predictor(path, model.config)
    assert back.layer == 2 and back.hidden == 8 and back.meta["tau"] == "0.05" and back.meta["trained_on"] == "tiny"
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


def test_vtw_calibration_rule(setup):
    d, model, proc, examples = setup
    kl = mean_kl_per_layer(model, proc, examples[:3], range(1, 4), max_new_tokens=6, show_progress=False)
    assert set(kl) == {1, 2, 3} and all(v >= 0 for v in kl.values())
    assert choose_layer(kl, max(kl.values()) + 1) == 1
    assert choose_layer(kl, -1.0) is None
    best = min(kl, key=kl.get)
    assert choose_layer(kl, kl[best]) <= best
    assert choose_layer({5: 0.01, 6: 0.002, 7: 0.001}, 0.003) == 6
