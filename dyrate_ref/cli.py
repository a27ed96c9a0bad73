"""`python generate.py --image x.jpg --prompt "..."`: answer a question about a picture, streaming.

Every problem with the user's input becomes one line on stderr and exit status 2 (errors.UserError),
checked as early as possible: flags and paths before any weights are read, and no output file is
written unless the whole run succeeded.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from . import __version__
from .errors import ArgumentParser, UserError, command_main
from .generation import Sampling, generate
from .loading import DEFAULT_WEIGHTS, load_model, read_config, resolve_dtype, vtw_default_layer
from .plots import plot_run, require_matplotlib
from .predictor import load_predictor, shipped_predictor_path
from .processing import Processor, StreamingDecoder, open_image
from .pruning import DEFAULT_LAYER, DEFAULT_RATIO, METHODS, PruneSettings
from .trace import read_trace, trace_tensors, write_trace


def build_parser(prog: str = "generate.py") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Answer a question about an image with LLaVA-1.5, "
                      "optionally pruning visual tokens with FastV, VTW or DyRate.")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help='question; may contain one "<image>" to place the image')
    p.add_argument("--weights", help=f"llava-hf checkpoint directory (default: the embedded {DEFAULT_WEIGHTS})")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="float32, float16 or bfloat16 (auto: float32 on CPU, "
                                                   "float16 on CUDA)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (with --temperature > 0)")
    p.add_argument("--trace", metavar="FILE", help="write a safetensors trace of the run (see README)")
    p.add_argument("--force-tokens", metavar="TRACE",
                   help="feed the tokens of another trace (a backend's) instead of choosing them, recording this "
                        "model's own logits, kept sets and costs at every step: the oracle for `trace compare`")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core; on a busy machine 1 is "
                        "faster, README 'Using it')")
    g = p.add_argument_group("visual-token pruning")
    g.add_argument("--method", default="none", help="none (default), fastv, vtw or dyrate")
    g.add_argument("--layer", type=int, default=None,
                   help="pruning layer K, 1..L-1 (default: fastv 2; vtw the layer in the weights' "
                        "vtw_calibration.json, else L/2; dyrate the predictor's own layer, 2 with --rates)")
    g.add_argument("--ratio", type=float, default=None, help="FastV: fraction R of visual tokens to drop (default 0.5)")
    g.add_argument("--score", default=None, help="FastV: score with the 'last' prompt query (default) or the 'mean' "
                                                 "of the queries after the image")
    g.add_argument("--rates", default=None, help="DyRate: fixed schedule r0,r1,... instead of the predictor "
                                                 "(the last value repeats)")
    g.add_argument("--predictor", default=None, help="DyRate: predictor file (default: the one shipped with the weights)")
    g.add_argument("--plot", metavar="FILE.png", default=None, help="draw visual attention and kept patches per step")
    return p


def check_output_path(path: str, flag: str):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: folder {folder} is not writable")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but this machine has no CUDA device (or torch is a CPU build); "
                            "use --device cpu")
        return torch.device(name)
    raise UserError(f"unknown --device {name!r}; use auto, cpu or cuda")


def parse_prune_flags(args, num_layers: int | None = None):
    """Check the pruning flags against the method; -> PruneSettings (predictor still a path)."""
    m = args.method
    if m not in METHODS:
        raise UserError(f"unknown --method {m!r}; use one of {', '.join(METHODS)}")
    belongs = {"layer": ("fastv", "vtw", "dyrate"), "ratio": ("fastv",), "score": ("fastv",),
               "rates": ("dyrate",), "predictor": ("dyrate",)}
    for flag, methods in belongs.items():
        if getattr(args, flag) is not None and m not in methods:
            raise UserError(f"--{flag} does not apply to --method {m} (it belongs to {', '.join(methods)})")
    if args.ratio is not None and not (0.0 <= args.ratio <= 1.0):
        raise UserError(f"--ratio {args.ratio} is outside [0, 1]")
    if args.score is not None and args.score not in ("last", "mean"):
        raise UserError(f"--score {args.score!r} is not 'last' or 'mean'")
    if args.rates is not None and args.predictor is not None:
        raise UserError("--rates and --predictor both given; DyRate uses one or the other")
    rates = None
    if args.rates is not None:
        try:
            rates = tuple(float(r) for r in args.rates.split(","))
        except ValueError:
            raise UserError(f"--rates {args.rates!r} is not a comma-separated list of numbers") from None
        if not all(0.0 <= r <= 1.0 for r in rates):
            raise UserError(f"--rates {args.rates!r}: every rate must lie in [0, 1]")
    layer = DEFAULT_LAYER if args.layer is None else args.layer
    if num_layers is not None and m != "none" and not (1 <= layer <= num_layers - 1):
        raise UserError(f"--layer {layer} is outside 1..{num_layers - 1} (the model has {num_layers} layers)")
    return PruneSettings(method=m, layer=layer, ratio=DEFAULT_RATIO if args.ratio is None else args.ratio,
                         score=args.score or "last", rates=rates)


def settings_text(prune: PruneSettings, note: str = "") -> str:
    """The method and the settings it ran with, for the summary line."""
    if prune.method == "none":
        return "method none"
    if prune.method == "fastv":
        return f"method fastv K={prune.layer} R={prune.ratio} score={prune.score}"
    if prune.method == "vtw":
        return f"method vtw K={prune.layer}" + (f" ({note})" if note else "")
    if prune.rates is not None:
        return f"method dyrate K={prune.layer} rates {','.join(map(str, prune.rates))}"
    return f"method dyrate K={prune.layer} predictor {os.path.basename(prune.predictor.path)}"


STOP_TEXT = {"eos": "stopped at the end of the answer (EOS)", "max_new_tokens": "stopped at --max-new-tokens",
             "context": "stopped: the model's context is full",
             "forced": "fed every token of --force-tokens"}


def run(argv=None, prog: str = "generate.py") -> int:
    args = build_parser(prog).parse_args(argv)

    # 1. Everything that can be checked without reading weights. A flag that would have no effect, or
    # an input that cannot mean anything, is refused rather than ignored.
    if not args.prompt.replace("<image>", "").strip():
        raise UserError("--prompt is empty; ask a question about the image, e.g. --prompt \"Describe the image.\"")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} must be >= 0")
    if args.temperature == 0 and (args.top_p is not None or args.seed is not None):
        flag = "--top-p" if args.top_p is not None else "--seed"
        raise UserError(f"{flag} has no effect with greedy decoding; add --temperature T (> 0) to sample")
    top_p = 1.0 if args.top_p is None else args.top_p
    if not (0.0 < top_p <= 1.0):
        raise UserError(f"--top-p {args.top_p} must lie in (0, 1]")
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype if args.dtype != "auto" else
                          ("float16" if device.type == "cuda" else "float32"))
    for path, flag in ((args.trace, "--trace"), (args.plot, "--plot")):
        if path is not None:
            check_output_path(path, flag)
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot} must end in .png")
    if args.plot is not None:
        require_matplotlib()  # says how to install it, before any work
    parse_prune_flags(args)  # method-level checks before the slow part
    image = open_image(args.image)
    weights = args.weights
    if weights is None:
        if not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "config.json")):
            raise UserError("--weights DIR is required: no embedded default model is installed at "
                            f"{DEFAULT_WEIGHTS}")
        weights = DEFAULT_WEIGHTS
    cfg = read_config(weights)
    prune = parse_prune_flags(args, cfg.text_config.num_hidden_layers)
    processor = Processor(weights, cfg)
    input_ids = processor.input_ids(args.prompt)  # [P]
    context = cfg.text_config.max_position_embeddings
    if input_ids.numel() >= context:
        raise UserError(f"the prompt is {input_ids.numel()} tokens with the image, which does not fit the "
                        f"model's context of {context}; shorten it")
    max_new = min(args.max_new_tokens, context - input_ids.numel())
    force = None
    if args.force_tokens is not None:
        if args.temperature > 0:
            raise UserError("--force-tokens feeds the tokens of a trace; --temperature would have no effect")
        forced = read_trace(args.force_tokens)
        if not torch.equal(forced["input_ids"], input_ids):
            raise UserError(f"--force-tokens {args.force_tokens} was made from another prompt or image size "
                            "(its input_ids differ from this run's); give the same --prompt, --image and --weights")
        force = forced["tokens"].tolist()
        if len(force) > context - input_ids.numel():
            raise UserError(f"--force-tokens {args.force_tokens} has {len(force)} tokens, more than the context leaves")
        max_new = len(force)
    if prune.method == "dyrate" and prune.rates is None:
        path = args.predictor or shipped_predictor_path(weights)
        if path is None:
            raise UserError(f"--method dyrate needs --predictor FILE or --rates LIST: {weights} ships no "
                            "dyrate_predictor.safetensors")
        predictor = load_predictor(path, cfg, weights)
        if args.layer is not None and args.layer != predictor.layer:
            raise UserError(f"--layer {args.layer} differs from the predictor's K={predictor.layer}; "
                            "leave --layer out or train a predictor for that layer")
        prune = dataclasses.replace(prune, predictor=predictor, layer=predictor.layer)
    vtw_note = ""
    if prune.method == "vtw" and args.layer is None:
        K, vtw_note = vtw_default_layer(weights, cfg.text_config.num_hidden_layers)
        prune = dataclasses.replace(prune, layer=K)

    # 2. The slow part.
    model = load_model(weights, dtype=dtype, device=device, config=cfg)
    if prune.predictor is not None:
        prune.predictor.to(device)
    pixels = processor.pixel_values(image)  # [1, 3, H, W]
    decoder = StreamingDecoder(processor)

    def show(tid):
        sys.stdout.write(decoder.push(tid))
        sys.stdout.flush()

    t0 = time.time()
    gen = generate(model, input_ids, pixels, max_new, prune,
                   Sampling(args.temperature, top_p, args.seed), processor.stop_ids, on_token=show, force=force)
    sys.stdout.write("\n")
    sys.stdout.flush()
    dt = time.time() - t0
    N = gen.state.span[1]
    stop = gen.stop_reason
    if stop == "max_new_tokens" and max_new < args.max_new_tokens:
        stop = "context"  # the cap came from the context, not from the flag
    stop_text = STOP_TEXT[stop] + (f" ({context} tokens)" if stop == "context" else "")
    sys.stderr.write(f"[{len(gen.tokens)} tokens in {dt:.2f}s on {device.type}/{str(dtype).split('.')[-1]}; "
                     f"{settings_text(prune, vtw_note)}: {gen.state.keep.numel()}/{N} visual tokens kept at "
                     f"the end; {stop_text}]\n")

    # 3. Outputs, each written whole or not at all.
    meta = dict(weights=os.path.abspath(weights), dtype=str(dtype).split(".")[-1], device=device.type,
                prompt=args.prompt, method=prune.method, layer=prune.layer, ratio=prune.ratio, score=prune.score,
                rates="" if prune.rates is None else ",".join(map(str, prune.rates)),
                predictor="" if prune.predictor is None else prune.predictor.path,
                max_new_tokens=max_new, temperature=args.temperature, top_p=top_p, stop_reason=stop,
                seed="" if args.seed is None else args.seed,
                forced_from="" if force is None else os.path.abspath(args.force_tokens),
                dyrate_ref_version=__version__, torch_version=torch.__version__)
    if args.trace:
        write_trace(args.trace, trace_tensors(input_ids, pixels, gen.tokens, gen.record), meta)
    if args.plot:
        plot_run(args.plot, pixels, processor, gen, prune)
    return 0


def main(argv=None, prog: str = "generate.py"):
    command_main(lambda a: run(a, prog), argv)
