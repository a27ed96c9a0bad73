"""What generate.py promises beyond its answer, each against an independent computation: the trace's
metadata, rates, kept sets (transformers' own attention), FLOPs and KV bytes (arithmetic written out here,
not cost.py); the answer streamed through a pipe as it is generated, whole characters only; and every
checkpoint key layout, single or sharded, loading to transformers' logits without scikit-image."""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dyrate_ref.generation import generate
from dyrate_ref.loading import load_model
from dyrate_ref.processing import Processor, StreamingDecoder
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


def test_the_answer_streams_through_a_pipe_as_it_is_generated(files):
    """The first text reaches a pipe long before the process ends, in many pieces, each valid UTF-8:
    an answer buffered until the end arrives in one piece. The answer is forced (--force-tokens) to the
    tokens of a text full of multi-byte characters, split across tokens by this byte-level vocabulary,
    so the precondition holds by construction, not by what a random model happens to say."""
    from dyrate_ref.trace import write_trace
    root, w, img = files
    proc = Processor(w, load_model(w).config)
    text = "東京 café über ñandú 日本語 " * 12
    tokens = proc.tokenizer.encode(text, add_special_tokens=False).ids[:200]
    assert any("\ufffd" in proc.decode([i]) for i in tokens)  # characters really are split across tokens
    forced = root / "forced.st"
    write_trace(str(forced), {"input_ids": proc.input_ids("Hi"), "tokens": torch.tensor(tokens)}, {})
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "generate.py"), "--image", img, "--prompt", "Hi",
                          "--weights", w, "--force-tokens", str(forced), "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pieces = []  # (arrival time, bytes)
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        pieces.append((time.perf_counter(), chunk))
    end = time.perf_counter()
    err = p.stderr.read().decode()
    assert p.wait() == 0, err
    assert f"{len(tokens)} tokens" in err, err
    print(f"{len(pieces)} pieces over {end - pieces[0][0]:.3f} s")
    assert len(pieces) >= 10, f"{len(pieces)} pieces: the answer did not stream"
    assert end - pieces[0][0] > 0.05  # the first piece came well before the end
    for _, chunk in pieces:
        chunk.decode("utf-8")  # strict: a piece ending inside a character would raise
    assert b"".join(c for _, c in pieces).decode("utf-8").strip() == proc.decode(tokens).strip()


def test_streaming_decoder_holds_back_half_a_character():
    """Multi-byte characters arrive whole: fed the tokens of '東京 café' one at a time, every push returns
    whole characters, and together they are the text."""
    from tokenizers import Tokenizer

    class Proc:  # the one method StreamingDecoder uses
        def __init__(self, tok: Tokenizer):
            self.tok = tok

        def decode(self, ids):
            return self.tok.decode(ids)
    tok = tokenizer()
    text = " 東京 café naïve"
    ids = tok.encode(text).ids
    dec = StreamingDecoder(Proc(tok))
    outs = [dec.push(i) for i in ids]
    assert "".join(outs) == tok.decode(ids)
    assert all("\ufffd" not in o for o in outs)
    # The byte-level tokenizer does split these characters: some pushes return nothing.
    assert sum(o == "" for o in outs) >= 1


@pytest.mark.parametrize("layout, shards", [("a", 1), ("a", 2), ("b", 1), ("b", 3), ("c", 1), ("c", 2)])
def test_every_layout_loads_to_transformers_logits(tmp_path, layout, shards):
    """Public hub layout (a), transformers 4.5x (b) and 5.x (c), single file or shards, on a seeded noise
    picture (no scikit-image). Tolerance 1e-4: float32, same formulas, different summation order."""
    cfg = hf_config(text=dict(num_key_value_heads=2))
    hf = make_checkpoint(str(tmp_path), cfg, layout=layout, shards=shards)
    model = load_model(str(tmp_path))
    proc = Processor(str(tmp_path), model.config)
    ids = proc.input_ids("Describe the image.")
    px = proc.pixel_values(noise_image(45, 37, seed=7))
    gen = generate(model, ids, px, max_new_tokens=3, stop_ids=())
    full = torch.cat([ids, torch.tensor(gen.tokens[:-1])])[None]
    with torch.no_grad():
        want = hf.eval()(input_ids=full, pixel_values=px).logits[0, ids.numel() - 1:]  # [3, V]
    got = torch.stack(gen.record.logits)
    assert (want - got).abs().max().item() <= 1e-4


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
