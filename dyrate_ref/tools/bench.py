"""Benchmarks: figures and ratios printed, never asserted on time.

  python -m dyrate_ref.tools.bench                 speed: dyrate_ref vs HF eager and HF sdpa (needs transformers)
  python -m dyrate_ref.tools.bench --prune         pruning methods: time, FLOPs and KV bytes relative to none
  python -m dyrate_ref.tools.bench loading --weights DIR [--dtype D]   peak RSS while loading, vs checkpoint size
  python -m dyrate_ref.tools.bench overhead        a pruning method's decode step against method none on the
                                                   same cache: what the per-step selection costs when nothing
                                                   is evicted
  python -m dyrate_ref.tools.bench threads [--weights DIR]   generate.py on one thread, on all, and on its
                                                   default, with the cores free and with other work holding
                                                   them (default: the embedded model)

Random weights with LLaVA-1.5-7B's structure scaled down to fit a 2-core CPU (576 visual tokens kept: the
image is 336 px in 14 px patches, as in LLaVA-1.5). --shape 7b uses the real 7B shapes (a GPU's job).
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

from ..commands import (ArgumentParser, DEFAULT_WEIGHTS, UserError, add_device, add_dtype, add_threads, add_weights,
                        apply_threads, command_main, parse_first, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.bench", description=summary(__doc__))
    p.add_argument("what", nargs="?", default="speed", choices=["speed", "loading", "overhead", "threads"],
                   help="speed (default): time per phase; loading: peak memory while loading; overhead: a pruned "
                        "decode step against method none on the same cache; threads: generate.py's thread count, "
                        "idle and busy")
    add_weights(p, help="checkpoint directory (default: a random one with --shape)")
    p.add_argument("--shape", default="small", choices=("7b", "small", "tiny"),  # SHAPES' names
                   help="random checkpoint's shapes: tiny, small (default; 576 visual tokens) or 7b")
    add_device(p)
    add_dtype(p)
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode steps timed (default 32; threads: the tokens generate.py writes, default 16)")
    p.add_argument("--repeats", type=int, default=None,
                   help="round-robin repeats; the best is kept (default 3; overhead: 5, its differences are small)")
    p.add_argument("--prune", action="store_true", help="compare pruning methods instead of HF")
    add_threads(p)
    p.add_argument("--json", default=None, metavar="FILE", help="threads: also write the timings as JSON")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="memory bandwidth in GB/s for the floor (default: from the CUDA device, if it says)")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch
from safetensors.torch import save_file

from ..cost import flops_per_step, kv_bytes_per_step, vision_flops
from ..files import check_outputs, checkpoint_inputs
from ..generation import Record, decode_one_token, generate, prefill
from ..loading import (DTYPES, checkpoint_key, config_from_dict, load_model, read_config, resolve_device, resolve_dtype,
                       resolve_weights, shipped_predictor_path, weight_files)
from ..model import LlavaForConditionalGeneration
from ..pruning import NoPruning
from ..settings import Context
from .baselines import check_layers, from_spec, spec_layers
from .data import write_json

SHAPES = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           vocab_size=32064, max_position_embeddings=256)),  # 3 layers: the methods' K = 2 fits
    # vision: CLIP ViT-L/14-336 is 1024 wide, 24 layers, 16 heads; text: Llama-7B is 4096, 32, 32, 11008.
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                              image_size=336, patch_size=14),
                  text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            vocab_size=32064, max_position_embeddings=4096)),
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32064, max_position_embeddings=4096)),
}


def write_random_checkpoint(out_dir: str, shape: str, dtype=torch.float32, seed: int = 0) -> dict:
    """A llava-hf directory (transformers 5.x layout) with random weights, written tensor by tensor
    from our own model's parameter list. Returns the config dict."""
    s = SHAPES[shape]
    raw = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
           "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
           "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", **s["vision"]},
           "text_config": {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **s["text"]}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config_from_dict(raw))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        key = checkpoint_key(name)
        if p.dim() >= 2:
            t = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
        else:
            t = (1.0 if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight") else 0.0) \
                + 0.02 * torch.randn(p.shape, generator=g)
        state[key] = t.to(dtype)
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    return raw


# ----------------------------------------------------------------------------------------------------
# Loading memory


def peak_rss() -> int:
    """Peak resident set of this process in bytes: /proc's VmHWM (getrusage's ru_maxrss would carry the
    parent's peak across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loading_memory(weights_dir: str, dtype_name: str) -> dict:
    """Peak RSS added by load_model and one read of every parameter, measured in this (fresh) process.
    The read counts: safetensors maps the file and its pages become resident only when a forward first
    touches them, so load_model alone would look almost free.

    torch initialises lazily the first time a model is built (~75 MB here, the same for any model size),
    so a tiny checkpoint is loaded first and the ratio counts what grows with the checkpoint; the raw
    figure, one-time cost included, is returned too.
    """
    start = peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(tmp, "tiny")
        load_model(tmp)
    cfg = read_config(weights_dir)
    size = sum(os.path.getsize(p) for p in weight_files(weights_dir))
    before = peak_rss()
    t0 = time.time()
    model = load_model(weights_dir, DTYPES[dtype_name], "cpu", cfg)
    dt = time.time() - t0
    with torch.no_grad():
        for p in model.parameters():
            p.sum()  # every page of every weight resident, as the first forward makes it
    peak = peak_rss()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(checkpoint_bytes=size, param_bytes=params, peak_added=peak - before, ratio=(peak - before) / size,
                raw_added=peak - start, raw_ratio=(peak - start) / size, seconds=dt)


# ----------------------------------------------------------------------------------------------------
# Speed


def time_all(fns: dict, repeats: int) -> dict:
    """Best-of-`repeats` wall-clock seconds for each fn, run round-robin (a, b, c, a, b, c, ...) so
    that a slow patch of a shared machine hits every candidate alike; the minimum is the least
    disturbed run. One warm-up each first."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench_methods(weights_dir: str, cfg) -> list[tuple[str, object, bool]]:
    """The methods the benchmarks time, as specs: (label, method, whether the per-step overhead benchmark
    times it -- it drops nothing after the prefill and leaves visual tokens to choose from)."""
    L = cfg.text_config.num_hidden_layers
    specs = [("none", "none", False), ("fastv R=0.5", "fastv:layer=2:rate=0.5", True),
             ("fastv R=0.75", "fastv:layer=2:rate=0.75", True), ("fastv R=0.9", "fastv:layer=2:rate=0.9", True),
             ("vtw K=L/2", f"vtw:layer={L // 2}", False), ("dyrate constant rate 0.5", "dyrate-schedule:layer=2:schedule=0.5", True),
             ("dyrate rising", "dyrate-schedule:layer=2:schedule=0.0,0.25,0.5,0.75,0.9", False)]
    check_layers(spec_layers(s for _, s, _ in specs), L, "the benchmarked methods",
                 "give a checkpoint with at least 3 decoder layers")
    ctx = Context(weights_dir, L, cfg)
    rows = [(label, from_spec(spec, ctx)[0], overhead) for label, spec, overhead in specs]
    if shipped_predictor_path(weights_dir):
        pred, _ = from_spec("dyrate", ctx)
        rows.append((f"dyrate K={pred.layer} predictor (features + decision each step; may cut)", pred, True))
    return rows


def bench_prompt(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmarks' prompt: BOS, 5 text ids, the N image placeholders, 35 more text ids, drawn from this
    vocabulary (never the image id, which would break the image span), and random pixels.
    -> input_ids [P], pixel_values [1, 3, H, W]."""
    N, V, image = cfg.num_image_tokens, cfg.text_config.vocab_size, cfg.image_token_index
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, min(31000, V), (40,), generator=g)
    text = torch.where(text == image, torch.full_like(text, 3), text)
    ids = torch.cat([torch.tensor([1]), text[:5], torch.full((N,), image), text[5:]])  # [P]
    px = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return ids, px


def speed(weights_dir: str, device: str, dtype: torch.dtype, new_tokens: int, repeats: int, prune_rows=False):
    model = load_model(weights_dir, dtype, device)
    cfg = model.config
    ids, px = bench_prompt(cfg)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []

    def ours(method, n):
        def f():
            generate(model, ids, px, max_new_tokens=n, method=method)
            sync()
        return f

    def theirs(hf, n):
        am = torch.ones_like(ids)[None].to(device)

        def f():
            with torch.no_grad():
                hf.generate(input_ids=ids[None].to(device), pixel_values=px.to(device, dtype), attention_mask=am,
                            max_new_tokens=n, min_new_tokens=n, do_sample=False)
            sync()
        return f

    methods = [(name, m) for name, m, _ in bench_methods(weights_dir, cfg)]
    if not prune_rows:
        methods = methods[:1]
    fns = {}
    for name, method in methods:
        fns[(name, "pre")] = ours(method, 1)
        fns[(name, "tot")] = ours(method, new_tokens + 1)
    hf_models = {}
    if not prune_rows:
        try:
            from transformers import LlavaForConditionalGeneration as HF
        except ImportError:
            HF = None
            print("(transformers not installed: HF rows skipped)")
        for impl in ("eager", "sdpa") if HF else ():
            hf_models[impl] = HF.from_pretrained(weights_dir, attn_implementation=impl, dtype=dtype).to(device).eval()
            fns[(f"HF {impl}", "pre")] = theirs(hf_models[impl], 1)
            fns[(f"HF {impl}", "tot")] = theirs(hf_models[impl], new_tokens + 1)
    t = time_all(fns, repeats)
    for name, method in methods:
        pre, tot = t[(name, "pre")], t[(name, "tot")]
        gen = generate(model, ids, px, max_new_tokens=new_tokens + 1, method=method)
        fl, kv = flops_per_step(gen.record), kv_bytes_per_step(gen.record)
        # A decode step reads every text weight once and the whole KV cache once: on a CPU, and on a GPU at
        # batch 1, that traffic rather than FLOPs sets its time.
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                           if n.startswith("model.layers") or n.startswith("lm_head") or n == "model.norm.weight")
        decode_bytes = new_tokens * weight_bytes + sum(kv[:-1])
        rows.append(dict(name=f"dyrate_ref {name}", decode_bytes=decode_bytes, prefill_ms=pre * 1e3, decode_ms=(tot - pre) / new_tokens * 1e3,
                         flops=sum(fl), kv_peak=max(kv_bytes_per_step(gen.record)), prefill_flops=fl[0] - vision_flops(cfg),
                         decode_flops=sum(fl[1:]), lm_flops=sum(fl) - vision_flops(cfg)))
    for impl in hf_models:
        pre, tot = t[(f"HF {impl}", "pre")], t[(f"HF {impl}", "tot")]
        rows.append(dict(name=f"HF {impl}", prefill_ms=pre * 1e3, decode_ms=(tot - pre) / new_tokens * 1e3))
    return rows, cfg


def step_overhead(weights_dir: str, device: str, dtype: torch.dtype, steps: int, repeats: int) -> list[dict]:
    """Per decode step: each method, from its own pruned prefill, against method none fed the very same
    cache (a copy of the state after that prefill: k visual tokens in layers >= K). The methods here
    evict nothing after the prefill (FastV never does; DyRate at a constant rate keeps its count), so any
    difference is the per-step cost of choosing: scores, method.choose, the no-op drop check, host syncs.
    Runs interleaved, best of `repeats`."""
    model = load_model(weights_dir, dtype, device)
    cfg = model.config
    ids, px = bench_prompt(cfg)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    methods = [(name, m) for name, m, overhead in bench_methods(weights_dir, cfg) if overhead]
    token = torch.tensor(7, device=model.lm_head.weight.device)
    rows = []
    for name, method in methods:
        rec = Record(cfg, model.lm_head.weight.element_size())
        _, state = prefill(model, ids, px, method, rec)
        k = state.kept.numel()
        variants = {"method": method, "none, same cache": NoPruning()}
        best = {v: float("inf") for v in variants}
        kept_after = None
        for r in range(repeats + 1):  # the first round warms up
            for v, pr in variants.items():
                st, log = copy.deepcopy(state), Record(cfg, rec.element_size)  # the state's K: the method's layout
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    decode_one_token(model, token, st, pr, log)
                sync()
                if r:
                    best[v] = min(best[v], (time.perf_counter() - t0) / steps)
                if v == "method":
                    kept_after = st.kept.numel()
        rows.append(dict(name=name, k=k, kept_after=kept_after, method_ms=best["method"] * 1e3,
                         none_ms=best["none, same cache"] * 1e3,
                         syncs={v: host_syncs(model, state, pr, token, steps) for v, pr in variants.items()}))
    return rows


def host_syncs(model: LlavaForConditionalGeneration, state, method, token: torch.Tensor, steps: int) -> float | None:
    """Host syncs per decode step of `method` from a copy of `state`: the calls torch's CUDA sync debug
    mode warns about (a read of a device value, a data-dependent shape, a blocking copy), counted over
    `steps` steps of decode_one_token (the loop's own read of the sampled id comes on top: one per step).
    None on the CPU, where there is nothing to wait for."""
    if model.lm_head.weight.device.type != "cuda":
        return None
    st, log = copy.deepcopy(state), Record(model.config, model.lm_head.weight.element_size())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                decode_one_token(model, token, st, method, log)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


BUSY = "import torch\nx = torch.randn(1500, 1500)\nwhile True:\n    x @ x\n"  # one core's worth of other work


def thread_timings(weights: str, image: str, repeats: int, new_tokens: int) -> list[dict]:
    """generate.py (`python -m dyrate_ref`, greedy, `new_tokens` tokens) with --threads 1, with --threads
    set to torch's choice (one per core) and without --threads (its default), first with the cores free,
    then with one busy process per core beside it; the variants interleaved, each run a fresh process.
    -> rows {"method": "<load> threads <variant>", "seconds": best generation time (the time the command
    prints), "wall": best wall time of the whole command, "all": every generation time}."""
    cores = torch.get_num_threads()
    variants = {"1": ["--threads", "1"], str(cores): ["--threads", str(cores)], "default": []}
    rows = []
    for load in ("idle", "busy"):
        others = [subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"})
                  for _ in range(cores if load == "busy" else 0)]
        try:
            time.sleep(2 if others else 0)
            got = {v: [] for v in variants}
            for rep in range(repeats):
                for v in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                    cmd = [sys.executable, "-m", "dyrate_ref", "--weights", weights, "--image", image, "--prompt",
                           "Describe the image.", "--max-new-tokens", str(new_tokens), *variants[v]]
                    t0 = time.perf_counter()
                    r = subprocess.run(cmd, capture_output=True, text=True,
                                       env={k: x for k, x in os.environ.items() if k != "OMP_NUM_THREADS"})
                    wall = time.perf_counter() - t0
                    if r.returncode != 0:
                        raise UserError(f"generate.py failed on --weights {weights}: {r.stderr.strip().splitlines()[-1:]}")
                    got[v].append((float(r.stderr.split(" tokens in ")[1].split("s ")[0]), wall))
        finally:
            for o in others:
                o.kill()
                o.wait()
        rows += [{"method": f"{load} threads {v}", "seconds": min(g for g, _ in t), "wall": min(w for _, w in t),
                  "all": [g for g, _ in t]} for v, t in got.items()]
    return rows


def device_bandwidth(device: str) -> float | None:
    """Peak memory bandwidth in bytes/s from the CUDA device's properties (2 transfers per clock x bus
    width), or None where torch does not say."""
    if not device.startswith("cuda"):
        return None
    props = torch.cuda.get_device_properties(torch.device(device))
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.weights is not None:
        args.weights = resolve_weights(args.weights)  # a folder, or a hub id found in the local cache
    apply_threads(args.threads)
    if args.repeats is None:
        args.repeats = 5 if args.what == "overhead" else 3
    if args.new_tokens is None:
        args.new_tokens = 16 if args.what == "threads" else 32
    if args.new_tokens < 1 or args.repeats < 1:
        raise UserError("--new-tokens and --repeats must be at least 1")
    if args.json is not None and args.what != "threads":
        raise UserError("--json writes the `threads` timings; the other benchmarks print theirs")
    if args.what == "threads":
        if args.prune or args.threads is not None:
            raise UserError("`threads` times generate.py's own thread choices; leave out --prune and --threads")
        weights = args.weights or DEFAULT_WEIGHTS
        read_config(weights)
        image = os.path.join(DEFAULT_WEIGHTS, "examples", "scene1.png")
        check_outputs([("--json", args.json)], checkpoint_inputs(weights) + [("the picture it describes", image)])
        rows = thread_timings(weights, image, args.repeats, args.new_tokens)
        size = sum(map(os.path.getsize, weight_files(weights)))
        print(f"\ngenerate.py on {weights} ({size / 1e6:.1f} MB of weights), {args.new_tokens} tokens, "
              f"best of {args.repeats} interleaved runs; busy: one process per core beside it\n")
        print("| cores | --threads | generation s (best) | whole command s (best) | every run's generation s |")
        print("|---|---|---|---|---|")
        for r in rows:
            load, _, variant = r["method"].split(" ")
            print(f"| {load} | {variant} | {r['seconds']:.2f} | {r['wall']:.2f} | {', '.join(f'{x:.2f}' for x in r['all'])} |")
        if args.json:
            write_json(args.json, {"weights": os.path.abspath(weights), "weight_bytes": size, "repeats": args.repeats,
                                   "rows": rows})
        return 0
    if args.what == "loading" and args.prune:
        raise UserError("--prune has no effect with `loading` (it measures memory while loading); leave it out")
    if args.what == "overhead" and args.prune:
        raise UserError("--prune has no effect with `overhead` (it always times the pruning methods); leave it out")
    if args.shape == "7b" and args.weights is None and resolve_device(args.device, auto=False).type == "cpu":
        raise UserError("--shape 7b writes and runs a 7-billion-parameter checkpoint (14 GB in float16): a GPU's "
                        "job; add --device cuda, or use the default scaled-down shape on the CPU")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        raise UserError(f"--bandwidth {args.bandwidth} must be a positive number of GB/s")
    resolve_device(args.device, auto=False)
    if args.weights is not None:
        read_config(args.weights)  # a missing or broken directory is refused before any work
    dtype_name = str(resolve_dtype(args.dtype, args.device)).split(".")[-1]

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            weights = os.path.join(tmp, "random")
            print(f"writing a random checkpoint with the {args.shape!r} shapes ...", file=sys.stderr)
            write_random_checkpoint(weights, args.shape, DTYPES[dtype_name])
        if args.what == "loading":
            if args.weights is None:  # writing the checkpoint raised this process's peak: measure in a fresh one
                cmd = [sys.executable, "-m", "dyrate_ref.tools.bench", "loading", "--weights", weights, "--dtype", dtype_name]
                return subprocess.run(cmd).returncode
            r = loading_memory(weights, dtype_name)
            print(f"checkpoint {r['checkpoint_bytes'] / 1e6:.0f} MB, parameters {r['param_bytes'] / 1e6:.0f} MB, "
                  f"peak RSS added while loading {r['peak_added'] / 1e6:.0f} MB, "
                  f"ratio {r['ratio']:.3f} (limit 1.2), {r['seconds']:.2f}s; with torch's one-time "
                  f"initialisation included: {r['raw_added'] / 1e6:.0f} MB, ratio {r['raw_ratio']:.3f}")
            return 0
        if args.what == "overhead":
            rows = step_overhead(weights, args.device, DTYPES[dtype_name], args.new_tokens, args.repeats)
            print(f"\n{args.new_tokens} decode steps per run, best of {args.repeats} interleaved runs, "
                  f"{args.device}/{dtype_name}, {torch.get_num_threads()} threads\n")
            print("| method | visual tokens kept in layers >= K | ms per decode step | method none on the same cache "
                  "| ratio | host syncs per step (method / none; CUDA only) |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                kept = f"{r['k']}" + (f" -> {r['kept_after']}" if r["kept_after"] != r["k"] else "")
                syncs = " / ".join("n/a" if n is None else f"{n:.2f}" for n in r["syncs"].values())
                print(f"| {r['name']} | {kept} | {r['method_ms']:.3f} | {r['none_ms']:.3f} "
                      f"| {r['method_ms'] / r['none_ms']:.3f} | {syncs} |")
            return 0
        rows, cfg = speed(weights, args.device, DTYPES[dtype_name], args.new_tokens, args.repeats, args.prune)
    vc, tc = cfg.vision_config, cfg.text_config
    print(f"\nshapes: vision {vc.num_hidden_layers}x{vc.hidden_size} ({cfg.num_image_tokens} visual tokens), "
          f"text {tc.num_hidden_layers}x{tc.hidden_size} heads {tc.num_attention_heads} mlp {tc.intermediate_size} "
          f"vocab {tc.vocab_size}; device {args.device}, {dtype_name}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} decode steps, best of {args.repeats} round-robin\n")
    base = rows[0]
    if args.prune:
        print("| method | prefill ms | prefill time vs none | prefill LM FLOPs vs none | decode ms/token "
              "| decode time vs none | decode FLOPs vs none | LM FLOPs vs none (run) | peak KV vs none |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['prefill_ms']:.1f} | {r['prefill_ms'] / base['prefill_ms']:.3f} "
                  f"| {r['prefill_flops'] / base['prefill_flops']:.3f} | {r['decode_ms']:.2f} "
                  f"| {r['decode_ms'] / base['decode_ms']:.3f} | {r['decode_flops'] / base['decode_flops']:.3f} "
                  f"| {r['lm_flops'] / base['lm_flops']:.3f} | {r['kv_peak'] / base['kv_peak']:.3f} |")
        print("\nDoes wall-clock track FLOPs? (time saved / FLOPs saved; 1.00 = perfectly, goal within 20 %)")
        for r in rows[1:]:
            parts = []
            for phase, t, f, what in (("prefill", "prefill_ms", "prefill_flops", "FLOPs"),
                                      ("decode", "decode_ms", "decode_flops", "FLOPs"),
                                      ("decode", "decode_ms", "decode_bytes", "bytes read")):
                fs = 1 - r[f] / base[f]
                ts = 1 - r[t] / base[t]
                parts.append(f"{phase}: {ts:.1%} time saved for {fs:.1%} {what} saved"
                             + (f" -> {ts / fs:.2f}" if fs > 0.01 else " (nothing to track)"))
            print(f"- {r['name']}: " + "; ".join(parts))
        return 0
    bw = args.bandwidth * 1e9 if args.bandwidth else device_bandwidth(args.device)
    if bw:
        floor = base["decode_bytes"] / args.new_tokens / bw * 1e3
        print(f"memory-bandwidth floor for one decode step: {base['decode_bytes'] / args.new_tokens / 1e6:.0f} MB "
              f"(weights + KV cache) / {bw / 1e9:.0f} GB/s = {floor:.3f} ms; dyrate_ref is at "
              f"{base['decode_ms'] / floor:.2f}x the floor\n")
    print("| implementation | prefill ms | decode ms/token | its decode time / dyrate_ref's |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['decode_ms'] / base['decode_ms']:.2f} |")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
