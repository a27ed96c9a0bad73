"""The trace file: one safetensors file per run, the oracle a faster backend is checked against.

Tensors (T generated tokens, P prompt tokens, N visual tokens, V vocabulary, k top entries):
  input_ids      int64   [P]          the prompt, <image> expanded                          required
  tokens         int64   [T]          generated ids, EOS included if produced               required
  logits         float32 [T, V]       row t: the logits token t was chosen from             or the top-k pair
  topk_ids       int64   [T, k]       row t: the k most likely ids at step t, best first    (serving engines)
  topk_logprobs  float32 [T, k]       their log-probabilities                               (serving engines)
  kept_masks     bool    [T, N]       row t: kept_t, the visual tokens layers >= K attend to at step t
  rates          float32 [T]          r_t = 1 - |kept_t| / N, the share of the visual tokens dropped by step t
  pixel_values   float32 [1, 3, H, W] the preprocessed image
  flops          float64 [T]          matmul FLOPs of step t (step 0 includes vision tower and projector)
  kv_bytes       int64   [T]          bytes held by the KV cache after step t
generate.py writes all but the top-k pair; a backend needs only input_ids, tokens and either logits or
topk_ids + topk_logprobs; kept_masks and rates when it prunes. Metadata (strings): weights, dtype,
device, prompt, text_rows ("first,end": the question's rows in input_ids, which the "mean" and
"accumulated" scores average over), method and its settings (layer, rate, score, predictor, confidence, schedule: those it
has, each with <setting>_from, where its value came from), max_new_tokens, temperature, top_p, seed,
stop_reason, forced_from, dyrate_ref_version, torch_version, format.

`python -m dyrate_ref.tools.trace compare` checks a backend's trace against the oracle's (tools/trace.py).
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .commands import UserError
from .cost import flops_per_step, kv_bytes_per_step
from .files import check_input_file, write_atomic

FORMAT = "dyrate_ref-trace-2"  # version 1, still read, called kept_masks `visual_keep`
REQUIRED = ("input_ids", "tokens")


def trace_tensors(input_ids, pixel_values, tokens, record) -> dict[str, torch.Tensor]:
    return {
        "input_ids": input_ids.detach().to("cpu", torch.int64),
        "pixel_values": pixel_values.detach().to("cpu", torch.float32).contiguous(),
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "logits": torch.stack(record.logits).to("cpu", torch.float32),
        "kept_masks": torch.stack(record.kept_masks).cpu(),
        "rates": torch.tensor(record.rates, dtype=torch.float32),
        "flops": torch.tensor(flops_per_step(record), dtype=torch.float64),
        "kv_bytes": torch.tensor(kv_bytes_per_step(record), dtype=torch.int64),
    }


def write_trace(path: str, tensors: dict[str, torch.Tensor], metadata: dict):
    """Write the trace whole or not at all (files.write_atomic), with its JSON header's keys sorted,
    so that two identical runs give byte-identical files."""
    meta = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}

    def write(tmp):
        save_file(tensors, tmp, metadata=meta)
        sort_header(tmp)
    write_atomic(path, write)


def sort_header(path: str):
    """Rewrite a safetensors file's header with sorted keys, in place. The library stores metadata in a
    hash map whose order changes from process to process; the sorted header has the same length (the
    same keys and values, reordered), so the tensor bytes after it do not move."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header = {k: (dict(sorted(v.items())) if isinstance(v, dict) else v) for k, v in sorted(header.items())}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(text) <= n, "a sorted header is never longer than the original"
        f.seek(8)
        f.write(text + b" " * (n - len(text)))  # the format pads headers with spaces


def read_trace(path: str, flag: str = "trace") -> dict[str, torch.Tensor]:
    """A trace's tensors; a file that is not a readable trace is a UserError naming what is wrong (and
    the flag or argument that gave it)."""
    check_input_file(path, flag, "a trace file (.safetensors)")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is not a readable trace ({e}); give a trace file that generate.py or "
                        "from-openai wrote") from None
    missing = [k for k in REQUIRED if k not in tensors]
    if missing:
        what = "a dyrate_ref trace" if meta.get("format") == FORMAT else "a trace (no dyrate_ref trace header)"
        raise UserError(f"{path} is not {what}: it has no {missing[0]!r} tensor")
    T = tensors["tokens"].numel()
    if ("topk_ids" in tensors) != ("topk_logprobs" in tensors):
        raise UserError(f"{path}: topk_ids and topk_logprobs come together; it has only one of them")
    if "visual_keep" in tensors and meta.get("format") != FORMAT:  # a version-1 trace, or a backend's written to it
        tensors["kept_masks"] = tensors.pop("visual_keep")
    for name in ("logits", "topk_ids", "topk_logprobs", "kept_masks", "rates"):
        if name in tensors and tensors[name].shape[0] != T:
            raise UserError(f"{path}: {name} has {tensors[name].shape[0]} rows for {T} tokens; one row per token")
    if "topk_ids" in tensors and tensors["topk_ids"].shape != tensors["topk_logprobs"].shape:
        raise UserError(f"{path}: topk_ids and topk_logprobs have different shapes")
    return tensors
