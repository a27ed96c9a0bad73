"""The trace file: one safetensors file per run, the oracle a faster backend is checked against.

Tensors (T generated tokens, P prompt tokens, N visual tokens, V vocabulary):
  input_ids     int64   [P]          the prompt, <image> expanded
  pixel_values  float32 [1, 3, H, W] the preprocessed image
  tokens        int64   [T]          generated ids, EOS included if produced
  logits        float32 [T, V]       row t: the logits token t was chosen from
  visual_keep   bool    [T, N]       row t: keep_t, the visual tokens layers >= K attend to at step t
  rates         float32 [T]          the method's compression rate at step t
  flops         float64 [T]          matmul FLOPs of step t (step 0 includes vision tower and projector)
  kv_bytes      int64   [T]          bytes held by the KV cache after step t
Metadata (strings): weights, dtype, device, prompt, method, layer, ratio, score, rates, predictor,
max_new_tokens, temperature, top_p, seed, dyrate_ref_version, torch_version, format.

`python -m dyrate_ref.trace compare A B [--atol X]` prints how two traces differ. Exit status: 0 same,
1 different, 2 a file that cannot be read as a trace.
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError, command_main
from .files import write_atomic

FORMAT = "dyrate_ref-trace-1"
REQUIRED = ("input_ids", "tokens")


def trace_tensors(input_ids, pixel_values, tokens, record) -> dict[str, torch.Tensor]:
    return {
        "input_ids": input_ids.detach().to("cpu", torch.int64),
        "pixel_values": pixel_values.detach().to("cpu", torch.float32).contiguous(),
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "logits": torch.stack(record.logits).to("cpu", torch.float32),
        "visual_keep": torch.stack(record.keep).cpu(),
        "rates": torch.tensor(record.rates, dtype=torch.float32),
        "flops": torch.tensor(record.flops, dtype=torch.float64),
        "kv_bytes": torch.tensor(record.kv_bytes, dtype=torch.int64),
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


def read_trace(path: str) -> dict[str, torch.Tensor]:
    """A trace's tensors; a file that is not a readable trace is a UserError naming what is wrong."""
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a trace: {e}") from None
    missing = [k for k in REQUIRED if k not in tensors]
    if missing:
        what = "a dyrate_ref trace" if meta.get("format") == FORMAT else "a trace (no dyrate_ref trace header)"
        raise UserError(f"{path} is not {what}: it has no {missing[0]!r} tensor")
    return tensors


def compare(a: dict, b: dict, atol: float) -> tuple[bool, list[str]]:
    """-> (equal, lines describing the differences)."""
    lines, same = [], True
    ta, tb = a["tokens"], b["tokens"]
    n = min(ta.numel(), tb.numel())
    mismatch = (ta[:n] != tb[:n]).nonzero().squeeze(1)
    first = int(mismatch[0]) if mismatch.numel() else None
    if ta.numel() != tb.numel() or first is not None:
        same = False
        lines.append(f"tokens: {ta.numel()} vs {tb.numel()} generated, {mismatch.numel()} of the first {n} differ"
                     + (f", first at step {first}" if first is not None else ""))
    else:
        lines.append(f"tokens: all {n} equal")
    # Logits are comparable only while both runs were fed the same tokens: up to the first mismatch.
    upto = n if first is None else first + 1
    for name in ("input_ids",):
        if not torch.equal(a[name], b[name]):
            same = False
            lines.append(f"{name}: differ")
    if "logits" in a and "logits" in b and upto > 0:
        if a["logits"].shape[1] != b["logits"].shape[1]:
            same = False
            lines.append(f"logits: vocabularies differ ({a['logits'].shape[1]} vs {b['logits'].shape[1]})")
        else:
            d = (a["logits"][:upto] - b["logits"][:upto]).abs().max().item()
            ok = d <= atol
            same &= ok
            lines.append(f"logits: max |Δlogit| {d:.3g} over {upto} steps ({'<=' if ok else '>'} atol {atol:g})")
    if "visual_keep" in a and "visual_keep" in b:
        ka, kb = a["visual_keep"][:upto], b["visual_keep"][:upto]
        if ka.shape != kb.shape:
            same = False
            lines.append(f"visual_keep: shapes differ {tuple(ka.shape)} vs {tuple(kb.shape)}")
        else:
            rows = (ka != kb).any(dim=1).nonzero().squeeze(1)
            if rows.numel():
                same = False
                t = int(rows[0])
                lines.append(f"visual_keep: differs at {rows.numel()} steps, first at step {t} "
                             f"({int(ka[t].sum())} vs {int(kb[t].sum())} kept, "
                             f"{int((ka[t] ^ kb[t]).sum())} tokens differ)")
            else:
                lines.append("visual_keep: equal")
    return same, lines


def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dyrate_ref.trace", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="compare two trace files; exit 0 same, 1 different, 2 unreadable")
    c.add_argument("a", help="the first trace (for example the oracle's)")
    c.add_argument("b", help="the second trace (for example your backend's)")
    c.add_argument("--atol", type=float, default=1e-4, help="largest |Δlogit| still counted equal (default 1e-4)")
    args = p.parse_args(argv)
    same, lines = compare(read_trace(args.a), read_trace(args.b), args.atol)
    print("\n".join(lines))
    print("SAME" if same else "DIFFERENT")
    return 0 if same else 1


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
