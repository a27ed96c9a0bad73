"""`python generate.py --image x.jpg --prompt "..."`: answer a question about a picture, streaming.

Every problem with the user's input becomes one line on stderr and exit status 2 (commands.UserError),
checked as early as possible: flags and paths before any weights are read, and no output file is
written unless the whole run succeeded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# Only what parsing the flags needs is imported here: --help and a flag error answer before torch loads.
from .commands import DEFAULT_WEIGHTS, DTYPE_HELP, ArgumentParser, UserError, apply_threads, exits

# generate.py's one thread rule: without --threads, weights under this many bytes run on one CPU thread
# (measured on the embedded model, README 'Using it': more threads gain nothing there and lose much on a
# busy machine); larger ones keep torch's default, one thread per core.
SMALL_MODEL = 100_000_000


def build_parser(prog: str = "generate.py") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Answer a question about an image with LLaVA-1.5, "
                      "optionally pruning visual tokens with FastV, VTW or DyRate.")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help='question; may contain one "<image>" to place the image')
    p.add_argument("--weights", help=f"llava-hf checkpoint directory (default: the embedded {DEFAULT_WEIGHTS})")
    p.add_argument("--max-new-tokens", type=int, default=None, help="stop after this many tokens (default 128)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (with --temperature > 0)")
    p.add_argument("--trace", metavar="FILE", help="write a safetensors trace of the run (see README)")
    p.add_argument("--force-tokens", metavar="TRACE",
                   help="feed the tokens of another trace (a backend's) instead of choosing them, recording this "
                        "model's own logits, kept sets and costs at every step: the oracle for `trace compare`")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 for weights under "
                   "100 MB, like the embedded model's, where more threads gain nothing; torch's default, one per core, "
                   "for larger ones)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw visual attention and kept patches per step")
    g = p.add_argument_group("visual-token pruning (each setting applies to the methods its help names)")
    g.add_argument("--method", default="none",
                   help="none (default), fastv, vtw, dyrate (the predictor) or dyrate-schedule (a fixed schedule)")
    g.add_argument("--layer", metavar="K", help="fastv, vtw, dyrate, dyrate-schedule: pruning layer K, 1..L-1 "
                   "(default: fastv and dyrate-schedule 2, FastV's setting for LLaVA-1.5; vtw the weights' "
                   "vtw_calibration.json, else L/2; dyrate the predictor's own)")
    g.add_argument("--rate", metavar="R", help="fastv: the part of the visual tokens dropped at the prefill, "
                   "in [0, 1] (default 0.5)")
    g.add_argument("--score", help="fastv, dyrate-schedule: rank the visual tokens by the step's 'last' query "
                   "(default), the 'mean' of the question's text queries at the prefill, or (dyrate-schedule) the "
                   "'accumulated' mean of those and the answer's queries so far; dyrate: the predictor's own")
    g.add_argument("--predictor", metavar="FILE", help="dyrate: predictor file (default: the one shipped with the "
                   "weights, dyrate_predictor.safetensors)")
    g.add_argument("--confidence", metavar="C", help="dyrate: the predictor's decoding confidence in [0, 1] "
                   "(default: the predictor file's; closer to 1 keeps more)")
    g.add_argument("--schedule", metavar="R0,R1,...", help="dyrate-schedule: the rate dropped by each step, in "
                   "[0, 1], the last repeating (e.g. 0,0.5,0.9)")
    for old in ("--ratio", "--rates"):  # renamed (--rate, --schedule): refused with the new name, not shown
        g.add_argument(old, dest=old[2:], help=argparse.SUPPRESS)
    return p


METHOD_FLAGS = ("layer", "rate", "score", "predictor", "confidence", "schedule", "ratio", "rates")


STOP_TEXT = {"eos": "stopped at the end of the answer (EOS)", "max_new_tokens": "stopped at --max-new-tokens",
             "context": "stopped: the model's context is full", "forced": "fed every token of --force-tokens"}


def run(argv=None, prog: str = "generate.py"):
    """The command, from its flags (argv; None: sys.argv) to the streamed answer, the summary line and
    the outputs. generate.py runs it inside commands.exits(), as main() does."""
    args = build_parser(prog).parse_args(argv)
    import torch

    from . import __version__
    from .files import check_outputs, checkpoint_inputs
    from .generation import Sampling, generate
    from .loading import load_model, read_config, resolve_device, resolve_dtype, resolve_weights, weight_files
    from .plots import plot_run, require_matplotlib
    from .processing import Processor, StreamingDecoder, open_image
    from .pruning import METHODS
    from .settings import Context, describe, make_method, metadata, parse_settings
    from .trace import read_trace, trace_tensors, write_trace

    # 1. Everything that can be checked without reading weights. A flag that would have no effect, or
    # an input that cannot mean anything, is refused rather than ignored.
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise UserError("--prompt is not valid UTF-8 text; pass the question as UTF-8") from None
    if not args.prompt.replace("<image>", "").strip():
        raise UserError("--prompt is empty; ask a question about the image, e.g. --prompt \"Describe the image.\"")
    if args.force_tokens is not None and args.max_new_tokens is not None:
        raise UserError("--max-new-tokens has no effect with --force-tokens (the trace's tokens are all fed); "
                        "leave one out")
    max_new_tokens = 128 if args.max_new_tokens is None else args.max_new_tokens
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    apply_threads(args.threads)
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed {args.seed} must lie in 0..2^63-1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature} must be a finite number >= 0")
    if args.temperature == 0 and (args.top_p is not None or args.seed is not None):
        flag = "--top-p" if args.top_p is not None else "--seed"
        raise UserError(f"{flag} has no effect with greedy decoding; add --temperature T (> 0) to sample")
    top_p = 1.0 if args.top_p is None else args.top_p
    if not (0.0 < top_p <= 1.0):
        raise UserError(f"--top-p {args.top_p} must lie in (0, 1]")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    weights = None if args.weights is None else resolve_weights(args.weights)
    if weights is None:
        if not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "config.json")):
            raise UserError("--weights DIR is required: no embedded default model is installed at "
                            f"{DEFAULT_WEIGHTS}")
        weights = DEFAULT_WEIGHTS
    check_outputs([("--trace", args.trace), ("--plot", args.plot)],
                  [("the --image", args.image), *checkpoint_inputs(weights), ("the --force-tokens trace", args.force_tokens)]
                  + [("the --predictor file", args.predictor)])
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot} must end in .png")
        require_matplotlib()  # says how to install it, before any work
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; use one of {', '.join(METHODS)}")
    cls = METHODS[args.method]  # its flags parsed now; the files it reads come after the cheap checks
    given = parse_settings(cls, {n: getattr(args, n) for n in METHOD_FLAGS if getattr(args, n) is not None}, METHODS)
    image = open_image(args.image)
    cfg = read_config(weights)
    if args.threads is None and device.type == "cpu" and (
            sum(map(os.path.getsize, weight_files(weights))) < SMALL_MODEL):
        torch.set_num_threads(1)  # the thread rule: see SMALL_MODEL
    processor = Processor(weights, cfg)
    input_ids = processor.input_ids(args.prompt)  # [P]
    unknown = processor.unknown_characters(args.prompt)
    if unknown:
        sys.stderr.write(f"note: {len(unknown)} character(s) of the prompt are not in the model's vocabulary "
                         f"({''.join(unknown[:10])}); it never saw them in training, so the answer may ignore them\n")
    context = cfg.text_config.max_position_embeddings
    if input_ids.numel() >= context:
        raise UserError(f"the prompt is {input_ids.numel()} tokens with the image, which does not fit the "
                        f"model's context of {context}; shorten it")
    max_new = min(max_new_tokens, context - input_ids.numel())
    force = None
    if args.force_tokens is not None:
        if args.temperature > 0:
            raise UserError("--force-tokens feeds the tokens of a trace; --temperature would have no effect")
        forced = read_trace(args.force_tokens, "--force-tokens")
        if not torch.equal(forced["input_ids"], input_ids):
            raise UserError(f"--force-tokens {args.force_tokens} was made from another prompt or image size "
                            "(its input_ids differ from this run's); give the same --prompt, --image and --weights")
        force = forced["tokens"].tolist()
        if len(force) > context - input_ids.numel():
            raise UserError(f"--force-tokens {args.force_tokens} has {len(force)} tokens, more than the context leaves")
        max_new = len(force)
    # The method's settings, resolved once: defaults from the files beside the weights, one range check.
    method, origins = make_method(cls, given, Context(weights, cfg.text_config.num_hidden_layers, cfg))

    # 2. The slow part.
    model = load_model(weights, dtype=dtype, device=device, config=cfg)
    pixels = processor.pixel_values(image)  # [1, 3, H, W]
    decoder = StreamingDecoder(processor)

    def show(tid):
        sys.stdout.write(decoder.push(tid))
        sys.stdout.flush()

    t0 = time.time()
    text = processor.text_rows(input_ids)  # the question's rows: the "mean" and "accumulated" scores' queries
    gen = generate(model, input_ids, pixels, max_new, method, Sampling(args.temperature, top_p, args.seed),
                   processor.stop_ids, on_token=show, force=force, text=text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    dt = time.time() - t0
    N = gen.state.span[1]
    stop = gen.stop_reason
    if stop == "max_new_tokens" and max_new < max_new_tokens:
        stop = "context"  # the cap came from the context, not from the flag
    stop_text = STOP_TEXT[stop] + (f" ({context} tokens)" if stop == "context" else "")
    sys.stderr.write(f"[{len(gen.tokens)} tokens in {dt:.2f}s on {device.type}/{str(dtype).split('.')[-1]}; "
                     f"{describe(method, origins)}: {gen.state.kept.numel()}/{N} visual tokens kept at "
                     f"the end; {stop_text}]\n")

    # 3. Outputs, each written whole or not at all.
    meta = dict(weights=os.path.abspath(weights), dtype=str(dtype).split(".")[-1], device=device.type,
                prompt=args.prompt, text_rows=f"{text[0]},{text[1]}", **metadata(method, origins), max_new_tokens=max_new, temperature=args.temperature, top_p=top_p, stop_reason=stop,
                seed="" if args.seed is None else args.seed,
                forced_from="" if force is None else os.path.abspath(args.force_tokens),
                dyrate_ref_version=__version__, torch_version=torch.__version__)
    if args.trace:
        write_trace(args.trace, trace_tensors(input_ids, pixels, gen.tokens, gen.record), meta)
    if args.plot:
        plot_run(args.plot, pixels, processor, gen, method)


def main(argv=None, prog: str = "generate.py"):
    """generate.py's two lines as a function (python -m dyrate_ref, the tests)."""
    with exits():
        run(argv, prog)
