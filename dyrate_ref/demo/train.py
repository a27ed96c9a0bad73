"""Train the embedded demo model from scratch on generated scenes, with the project's own model code.

  python -m dyrate_ref.demo.train --out runs/my-demo [--recipe v5] [--seed 0] [--tower DIR] [--device cuda]

Writes a complete llava-hf directory: config.json, model.safetensors (transformers 5.x key layout),
tokenizer.json / tokenizer_config.json / special_tokens_map.json (a byte-level BPE trained here on the
scene vocabulary, <image> a special token), preprocessor_config.json and train_log.txt. Then calibrate
VTW and train the predictor (docs/embedded_model.md, "Reproducing the shipped files").

The run, in three parts (each in its own module):
- stage 1 (demo/tower.py): the vision tower alone learns to name, at every patch, the kind and colour
  of the object covering it and the 3x3 cell it lies in, then a fresh linear probe on the frozen tower
  logs what it sees. --tower DIR takes a trained tower instead (and skips this stage).
- stage 2 (demo/batches.py, the stages of demo/recipes.py): the projector and decoder learn on the
  recipe's task mixtures with the tower frozen, as LLaVA-1.5 freezes CLIP; the loss is on answer
  tokens only.
- the log (every --eval-every steps): held-out exact match per question kind (what greedy decoding
  would answer) and the kind-swap sensitivity (demo/reading.py: does the answer depend on the asked
  kind?), with the recipe's go/no-go checks.

float32 by default; --bf16 autocasts matmuls to bfloat16, which pays only on CPUs with AMX or
AVX512-BF16 and on GPUs. The run is fixed by the recipe and --seed (deterministic on one machine);
--minutes stops it early, stage 1 included. --out must be a new folder: the run writes into a hidden
folder beside it, named --out only when the run has finished, so an existing model (the shipped one
included) is never touched and an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import replace

from ..commands import (ArgumentParser, Progress, UserError, add_device, add_threads, apply_threads, command_main,
                        parse_first, summary)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.demo.train", description=summary(__doc__))
    p.add_argument("--out", required=True, help="a new folder to write the model into (e.g. runs/my-demo)")
    p.add_argument("--recipe", default="v5", choices=("v4", "v5"),  # recipes.RECIPES' names; v5 is recipes.SHIPPED
                   help="the training recipe (default v5, the shipped model's; demo/recipes.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and order (default 0)")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes (the whole run)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast: faster on CPUs with AMX or AVX512-BF16 and on GPUs, far slower without")
    add_threads(p)
    p.add_argument("--tower", default=None, metavar="DIR",
                   help="take the vision tower of a directory this script wrote (skips stage 1); the tokenizer, "
                        "projector and decoder start fresh")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="continue from a whole model this script wrote (skips stage 1; the log says so)")
    p.add_argument("--from-stage", default=None, metavar="NAME",
                   help="with --init: begin stage 2 at the recipe's stage NAME (e.g. v5's 'look' from the shipped v4)")
    add_device(p)
    p.add_argument("--eval-every", type=int, default=100,
                   help="log held-out per-kind exact match and the kind-swap sensitivity every N stage-2 steps "
                        "(0: never; default 100)")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import write_atomic
from .folders import check_new_folder, write_atomic_dir
from ..loading import checkpoint_key, config_from_dict, load_model, read_config, resolve_device
from ..model import LlavaForConditionalGeneration
from ..processing import PROMPT_TEMPLATE, Processor
from .batches import Batcher, grow, heldout_examples, heldout_exact, row_loss
from .bpe import save_tokenizer_files, train_bpe
from .reading import kind_swap_kl, kind_swap_pairs
from .recipes import CONFIG, PREPROCESSOR, RECIPES, Recipe
from .scenes import DESCRIBE_PROMPT, all_questions, questions, random_scene, scene_description
from .tower import init_weights, pretrain_vision, probe_tower

def save_weights(model: nn.Module, out_dir: str, dtype: torch.dtype = torch.float32):
    """model.safetensors in transformers 5.x's layout (what the demo ships), whole or not at all."""
    state = {checkpoint_key(n): p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}
    write_atomic(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def tokenizer_corpus(recipe: Recipe, seed: int = 123, scenes: int = 3000) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(scenes):
        s = random_scene(rng)
        texts.append(scene_description(s))
        for _, q, a in all_questions(s, rng):
            texts.append(PROMPT_TEMPLATE.format(prompt=q).replace("<image>", "") + " " + a)
    texts.append(PROMPT_TEMPLATE.format(prompt=DESCRIBE_PROMPT).replace("<image>", ""))
    return texts


def build_model(out_dir: str, recipe: Recipe, overrides: dict | None = None):
    """Tokenizer files, config.json and preprocessor_config.json; -> (tokenizer, LlavaConfig, raw config).
    overrides: {"vision_config": {...}, "text_config": {...}} merged into CONFIG (tests use a tiny one).
    The vocabulary (512: 256 bytes + merges) is large enough that every word of the prompts and answers
    is one token ("Describe", " color", " purple")."""
    tok = train_bpe(tokenizer_corpus(recipe), vocab_size=512)
    os.makedirs(out_dir, exist_ok=True)
    raw = json.loads(json.dumps(CONFIG))
    for part, values in (overrides or {}).items():
        raw[part].update(values)
    raw["image_token_index"] = tok.token_to_id("<image>")
    vocab = tok.get_vocab_size()
    raw["text_config"].update(vocab_size=vocab + (-vocab % 8), bos_token_id=tok.token_to_id("<s>"),
                              eos_token_id=tok.token_to_id("</s>"), pad_token_id=tok.token_to_id("<pad>"))
    raw["pad_token_id"] = tok.token_to_id("<pad>")
    save_tokenizer_files(tok, out_dir, raw["text_config"]["max_position_embeddings"])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)
    return tok, config_from_dict(raw), raw


def write_examples(out_dir: str, n: int = 4, seed: int = 424_242):
    """A few pictures to try, from a seed stream used neither by training nor by the evaluation, with
    their ground truth and the prompts the README and the tutorial use (each with its right answer) in
    examples/examples.json."""
    folder = os.path.join(out_dir, "examples")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        scene = random_scene(rng, 2 + i % 3, 2 + i % 3)
        name = f"scene{i + 1}.png"
        scene.draw().save(os.path.join(folder, name))
        asked = questions(scene, random.Random(seed + 1 + i))  # its own stream: the scenes stay as they were
        prompts = [{"prompt": DESCRIBE_PROMPT, "kind": "describe", "answer": scene_description(scene)}]
        prompts += [{"prompt": q, "kind": kind, "answer": a} for kind, q, a in asked]
        records.append({"file": name, "description": scene_description(scene), "prompts": prompts,
                        "shapes": [[s.color, s.kind, s.position] for s in scene.shapes]})
    with open(os.path.join(folder, "examples.json"), "w") as f:
        json.dump(records, f, indent=2)


def _log(log, line: str):
    if log is not None:
        log.write(line + "\n")
        log.flush()


def go_no_go(recipe: Recipe, stage_name: str, step: int, acc: dict) -> str | None:
    """The recipe's early signals (Recipe.gates) at stage-2 step `step` (counted from 1), given the
    held-out figures `acc`. -> a "go" / "NO-GO" line for the log, or None where no window is open."""
    within = step - recipe.start_of(stage_name)
    steps = next(s.steps for s in recipe.stages if s.name == stage_name)
    lines = []
    for gate in recipe.gates:
        if gate.stage != stage_name or within < (steps if gate.after is None else gate.after):
            continue
        ok = all(acc.get(m, 0) > f if gate.strict else acc.get(m, 0) >= f for m, f in gate.floors)
        op = ">" if gate.strict else ">="
        figures = ", ".join(f"{m} {acc.get(m, 0):.2f} {op} {f:g}" for m, f in gate.floors)
        lines.append(f"go/no-go {gate.what or f'at {stage_name} step {within}'}: {'go' if ok else 'NO-GO'} ({figures})")
    return "; ".join(lines) or None


def new_model(out_dir: str, recipe: Recipe, seed: int, overrides, tower: str | None, init: str | None, device, log):
    """-> (model, config, whether stage 1 is still to run)."""
    os.makedirs(out_dir, exist_ok=True)
    if init:
        cfg = read_config(init)
        if os.path.abspath(init) != os.path.abspath(out_dir):
            for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json"):
                with open(os.path.join(init, name), "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
                    dst.write(src.read())
        model = load_model(init, device=device)
        for p in model.parameters():
            p.requires_grad_(True)
        _log(log, f"# init from {init}: stage 1 skipped")
        return model, cfg, False
    _, cfg, _ = build_model(out_dir, recipe, overrides)
    first = recipe.stages[0].layers  # a recipe may start shallower and grow (Stage.layers)
    start_cfg = cfg if first is None else replace(cfg, text_config=replace(cfg.text_config, num_hidden_layers=first))
    model = LlavaForConditionalGeneration(start_cfg)
    init_weights(model, seed)
    if tower:
        source = load_model(tower, device="cpu")
        model.vision_tower.load_state_dict(source.vision_tower.state_dict())
        del source
        _log(log, f"# vision tower from {tower}: stage 1 skipped; fresh tokenizer, projector and decoder")
    return model.to(device), cfg, not tower


def optimizer(model, recipe: Recipe, previous=None):
    """AdamW over the trainable weights, without weight decay (v2's decay held the text embeddings at
    their initial scale while the visual tokens grew). After the decoder grows, the weights it had keep
    their Adam moments (`previous`). -> (optimizer, its parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr(0), betas=(0.9, 0.98), weight_decay=0.0)
    if previous is not None:
        for p in params:
            if p in previous.state:
                opt.state[p] = previous.state[p]
    return opt, params


def train(out_dir: str, recipe: Recipe, seed: int = 0, minutes: float | None = None, bf16: bool = False, log=None,
          overrides: dict | None = None, show_progress: bool = True, tower: str | None = None,
          init: str | None = None, device: str = "cpu", eval_every: int = 0, eval_scenes: int = 40,
          swap_scenes: int = 30, steps: int | None = None, from_stage: str | None = None):
    """Stage 1 (unless `tower` or `init` gives a trained tower), the tower probe, then the recipe's
    stage 2. steps: stop stage 2 after this many steps (tests; default: the recipe's). from_stage: with
    `init`, begin stage 2 at this stage (the init model has been through the ones before it). -> (model,
    per-step losses, seconds)."""
    torch.manual_seed(seed)
    t0 = time.time()
    model, cfg, fresh_tower = new_model(out_dir, recipe, seed, overrides, tower, init, device, log)
    write_examples(out_dir)
    model.train()
    if fresh_tower and recipe.vision_steps:
        pretrain_vision(model, recipe.vision_steps, 64, 2e-3, seed, bf16, show_progress, log, device,
                        deadline=None if minutes is None else t0 + minutes * 60)
        acc = probe_tower(model, device=device)
        _log(log, f"probe held-out occupied-cell accuracy: kind {acc['kind']:.4f} color {acc['color']:.4f}")
        if show_progress:
            sys.stderr.write(f"tower probe (held-out, occupied cells): kind {acc['kind']:.4f}, color {acc['color']:.4f}\n")
    processor = Processor(out_dir, cfg)
    batcher = Batcher(processor, recipe, seed + (1000 if init else 0))
    heldout = heldout_examples(processor, eval_scenes, recipe.look) if eval_every else []
    swaps = kind_swap_pairs(swap_scenes) if eval_every else []
    for p in model.vision_tower.parameters():  # frozen, as LLaVA-1.5 freezes CLIP; no backward through it
        p.requires_grad_(False)
    opt, params = optimizer(model, recipe)
    first = recipe.start_of(from_stage) if from_stage else 0
    if from_stage:
        _log(log, f"# stage 2 begins at stage {from_stage!r} (step {first}): the init model has had the stages before it")
    total = recipe.steps if steps is None else min(first + steps, recipe.steps)
    bar = Progress(total - first, "stage 2", " steps", after_s=0.0 if show_progress else float("inf"))
    history, smooth = [], None
    for step in range(first, total):
        stage, within = recipe.stage_at(step)
        if within == 0 or step == first:
            _log(log, f"# stage {stage.name!r} from step {step}: {stage}")
            depth = stage.layers or cfg.text_config.num_hidden_layers
            if depth > len(model.model.layers):
                _log(log, f"# the decoder grows from {len(model.model.layers)} to {depth} layers")
                grow(model, depth, seed)
                opt, params = optimizer(model, recipe, opt)
        for g in opt.param_groups:
            g["lr"] = recipe.lr(step)
        px, rows = batcher.batch(stage)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = row_loss(model, px, rows, recipe, processor.eos_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        smooth = history[-1] if smooth is None else 0.98 * smooth + 0.02 * history[-1]
        bar.update(1, f"{stage.name} loss {smooth:.4f} lr {recipe.lr(step):.2e}")
        if step % 50 == 0:
            _log(log, f"{step} {time.time() - t0:.1f} {smooth:.5f}")
        stage_ends = within == stage.steps - 1
        if eval_every and (step % eval_every == eval_every - 1 or step == total - 1 or stage_ends):
            model.eval()
            acc = heldout_exact(model, heldout, processor)
            acc["kind_swap_kl"] = kind_swap_kl(model, processor, swaps, device)
            model.train()
            _log(log, f"heldout {step + 1} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "kind_swap_kl")
                 + f" kind_swap_kl {acc['kind_swap_kl']:.2e}")
            signal = go_no_go(recipe, stage.name, step + 1, acc)
            if signal:
                _log(log, f"# {signal}")
                if show_progress:
                    sys.stderr.write(f"\n{signal}\n")
        if minutes is not None and time.time() - t0 > minutes * 60:
            sys.stderr.write(f"\nstopping at step {step + 1}: --minutes {minutes} reached\n")
            _log(log, f"# stopped at step {step + 1}: --minutes {minutes} reached")
            break
        if step % 500 == 499:
            save_weights(model, out_dir)  # a usable checkpoint even if the run is cut short
    bar.close()
    save_weights(model, out_dir)
    secs = time.time() - t0
    _log(log, f"# {len(history)} stage-2 steps; {secs / 60:.1f} min in all")
    return model, history, secs


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    recipe = RECIPES[args.recipe]
    resolve_device(args.device, auto=False)
    if not args.out.strip():
        raise UserError("--out is empty; give the folder to write the model into")
    check_new_folder(args.out, "--out")  # an existing model (the shipped one) is never written into
    if args.minutes is not None and not args.minutes > 0:
        raise UserError("--minutes must be a positive number")
    if args.eval_every < 0:
        raise UserError("--eval-every must be 0 (never) or a positive number of steps")
    if args.from_stage and not args.init:
        raise UserError("--from-stage needs --init: the stages before it must have trained the model it starts from")
    if args.from_stage and args.from_stage not in [st.name for st in recipe.stages]:
        raise UserError(f"--from-stage {args.from_stage!r} is not a stage of recipe {recipe.name} "
                        f"({', '.join(st.name for st in recipe.stages)})")
    if args.init and args.tower:
        raise UserError("--init and --tower exclude each other: --init continues a whole model, --tower starts a new "
                        "decoder on a trained tower")
    for flag, d in (("--init", args.init), ("--tower", args.tower)):
        if d:
            read_config(d, flag)  # a missing or broken directory is refused before any work
    apply_threads(args.threads)
    done = {}

    def write(folder):
        with open(os.path.join(folder, "train_log.txt"), "w") as log:
            log.write(f"# python -m dyrate_ref.demo.train {' '.join(sys.argv[1:] if argv is None else argv)}\n"
                      f"# recipe {recipe.name}: {recipe.description}\n"
                      f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}\n"
                      "# step seconds smoothed_loss | heldout step kind exact-match ... kind_swap_kl\n")
            _, done["history"], done["secs"] = train(folder, recipe, args.seed, args.minutes, bf16=args.bf16, log=log,
                                                     tower=args.tower, init=args.init, device=args.device,
                                                     eval_every=args.eval_every, from_stage=args.from_stage)
    write_atomic_dir(args.out, write)
    history, secs = done["history"], done["secs"]
    print(f"{len(history)} steps in {secs / 60:.1f} min; final smoothed loss "
          f"{sum(history[-50:]) / len(history[-50:]):.4f}; wrote {args.out}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
