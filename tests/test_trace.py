"""trace.py: the trace generate.py writes, against independent computations (its metadata, rates, kept
sets against transformers' own attention, FLOPs and KV bytes by arithmetic written out here, not cost.py),
and a trace written whole or not at all."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dyrate_ref.trace import FORMAT
from helpers import hf_config, make_checkpoint, noise_image, tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, K, C, I, H, HKV, V_EXTRA = 4, 2, 48, 96, 4, 2, 6


def cli(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(REPO, "generate.py"), *args], capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    w = root / "weights"
    make_checkpoint(str(w), hf_config(text=dict(num_hidden_layers=L, num_key_value_heads=HKV, max_position_embeddings=256)))
    img = root / "img.png"
    noise_image(48, 40, seed=3).save(img)
    return root, str(w), str(img)


def test_fastv_trace_values_against_independent_computations(files):
    from transformers import LlavaForConditionalGeneration
    root, w, img = files
    trace = root / "fastv.st"
    # FastV's defaults, K = 2 and R = 0.5, not given: the metadata must name what was used, not the flags.
    r = cli("--image", img, "--prompt", "What is it?", "--weights", w, "--max-new-tokens", "5", "--trace", str(trace),
            "--method", "fastv")
    assert r.returncode == 0, r.stderr
    t = load_file(str(trace))
    with safe_open(str(trace), "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["method"], meta["layer"], meta["rate"], meta["prompt"], meta["max_new_tokens"]) == \
        (FORMAT, "fastv", str(K), "0.5", "What is it?", "5")
    ids, T = t["input_ids"], t["tokens"].numel()
    P = ids.numel()
    image_id = tokenizer().token_to_id("<image>")
    where = (ids == image_id).nonzero().squeeze(1)
    start, N = int(where[0]), where.numel()
    E = N - round(0.5 * N)  # evicted by FastV R = 0.5

    # Rates and kept sets: layer K-1's attention of the last prompt query (transformers, eager), averaged
    # over heads; the top N - E visual tokens, kept unchanged at every step.
    hf = LlavaForConditionalGeneration.from_pretrained(w, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(input_ids=ids[None], pixel_values=t["pixel_values"], output_attentions=True)
    scores = out.attentions[K - 1][0, :, -1, start:start + N].mean(0)  # [N]
    want = torch.zeros(N, dtype=torch.bool)
    want[scores.topk(N - E).indices] = True
    assert t["kept_masks"].shape == (T, N)
    assert all(torch.equal(row, want) for row in t["kept_masks"])
    assert t["rates"].tolist() == [E / N] * T  # the share dropped: 1 - |keep| / N

    # FLOPs, 2·m·n·k per matmul: step 0 = vision tower + projector + K layers over P tokens + L-K layers
    # over P-E tokens + the LM head on one row; decode step s = one query over P+s keys below K, P-E+s above.
    vc = hf.config.vision_config
    Vocab = hf.config.text_config.vocab_size
    D = C // H
    patches = (vc.image_size // vc.patch_size) ** 2
    Tv, Cv, Iv = patches + 1, vc.hidden_size, vc.intermediate_size
    vision = (2 * patches * Cv * 3 * vc.patch_size ** 2  # patch embedding convolution
              + 2 * (2 * Tv * Cv * Cv * 4 + 2 * 2 * Tv * Tv * Cv + 2 * 2 * Tv * Cv * Iv)  # layers 0..1 (feature layer -2 of 3)
              + 2 * N * Cv * C + 2 * N * C * C)  # projector

    def layer(rows, keys):
        return 2 * rows * C * (2 * H * D + 2 * HKV * D) + 2 * 2 * H * rows * keys * D + 3 * 2 * rows * C * I

    head = 2 * C * Vocab
    want_flops = [vision + K * layer(P, P) + (L - K) * layer(P - E, P - E) + head]
    want_flops += [K * layer(1, P + s) + (L - K) * layer(1, P - E + s) + head for s in range(1, T)]
    assert t["flops"].tolist() == want_flops
    # KV bytes after step s: P + s slots below K, P - E + s above; keys and values, float32.
    assert t["kv_bytes"].tolist() == [2 * (K * (P + s) + (L - K) * (P - E + s)) * HKV * D * 4 for s in range(T)]


def test_a_failure_while_writing_leaves_no_partial_file_and_the_old_one_untouched(tmp_path, monkeypatch):
    import dyrate_ref.trace as trace_module
    target = tmp_path / "t.safetensors"
    target.write_bytes(b"the user's file")

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a trace")
        raise OSError("disk full")
    monkeypatch.setattr(trace_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trace_module.write_trace(str(target), {"tokens": torch.zeros(2, dtype=torch.long)}, {"prompt": "x"})
    assert target.read_bytes() == b"the user's file"
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]
