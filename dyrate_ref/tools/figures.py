"""Draw the README's and the tutorial's figures of the embedded model from data files written beside them.

    python -m dyrate_ref.tools.figures --out docs

On the tutorial's picture (weights/dyrate-shapes/examples, its third example) and prompt, "Describe the
image.": attention_mass.json / .png, layer K-1 = 1's attention mass on the image at every step of the
unpruned description (the tutorial's section 8), and kept_patches.json / .png, the patches DyRate's
fixed rising schedule (K = 2; 0.5, 0.6, ..., 0.9) keeps at steps 0, 2 and 4 (section 9). Each figure is
drawn from the JSON it writes, and tests/test_figures.py recomputes the JSON from the current weights,
so a figure cannot outlive its model.
"""

from __future__ import annotations

import json
import os

from ..commands import ArgumentParser, DEFAULT_WEIGHTS, UserError, command_main, summary

EXAMPLE = 2  # the tutorial's picture: examples.json's third entry
PROMPT = "Describe the image."
SCHEDULE = (0.5, 0.6, 0.7, 0.8, 0.9)
STEPS = (0, 2, 4)  # the kept-patch panels


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def figure_data(weights: str = DEFAULT_WEIGHTS) -> dict:
    """-> {"attention_mass": {...}, "kept_patches": {...}}: what the two figures plot, from `weights`."""
    from PIL import Image

    from ..generation import generate
    from ..loading import load_model
    from ..processing import Processor
    from ..pruning import DyRateSchedule, NoPruning
    model = load_model(weights)
    processor = Processor(weights, model.config)
    example = read_json(os.path.join(weights, "examples", "examples.json"))[EXAMPLE]
    pixels = processor.pixel_values(Image.open(os.path.join(weights, "examples", example["file"])))
    ids = processor.input_ids(PROMPT)
    none = generate(model, ids, pixels, 80, NoPruning(), stop_ids=processor.stop_ids)
    rising = generate(model, ids, pixels, 80, DyRateSchedule(2, SCHEDULE), stop_ids=processor.stop_ids)
    return {
        "attention_mass": {"file": example["file"], "prompt": PROMPT, "layer": NoPruning.layer - 1,
                           "tokens": none.tokens, "words": [processor.decode([t]) for t in none.tokens],
                           "mass": [round(float(m), 6) for m in none.record.visual_mass]},
        "kept_patches": {"file": example["file"], "prompt": PROMPT, "layer": 2, "schedule": list(SCHEDULE),
                         "tokens": rising.tokens, "words": [processor.decode([t]).strip() for t in rising.tokens],
                         "steps": list(STEPS), "N": model.config.num_image_tokens,
                         "kept": [rising.record.kept_masks[t].nonzero().squeeze(1).tolist() for t in STEPS]},
    }


def draw(out: str, weights: str = DEFAULT_WEIGHTS):
    """Each figure from its JSON in `out` (read back, so the picture is what the file says)."""
    import torch
    from PIL import Image

    from ..loading import read_config
    from ..plots import image_from_pixels
    from .charts import plot_kept_patches, plot_mass
    from ..processing import Processor
    mass = read_json(os.path.join(out, "attention_mass.json"))
    plot_mass(os.path.join(out, "attention_mass.png"), mass["mass"], mass["words"],
              f"Layer {mass['layer']}'s attention mass on the image while describing {mass['file']}", mass["layer"])
    kept = read_json(os.path.join(out, "kept_patches.json"))
    cfg = read_config(weights)
    processor = Processor(weights, cfg)
    base = image_from_pixels(processor.pixel_values(Image.open(os.path.join(weights, "examples", kept["file"]))),
                             processor.image.image_mean, processor.image.image_std)
    panels = []
    for t, indices in zip(kept["steps"], kept["kept"]):
        mask = torch.zeros(kept["N"], dtype=torch.bool)
        mask[indices] = True
        panels.append((f"step {t} (→ '{kept['words'][t]}'): {len(indices)}/{kept['N']} kept", mask))
    schedule = ", ".join(f"{r:g}" for r in kept["schedule"][:3])
    plot_kept_patches(os.path.join(out, "kept_patches.png"), base, panels,
                      cfg.vision_config.image_size // cfg.vision_config.patch_size,
                      cfg.vision_feature_select_strategy == "full",
                      f"DyRate K={kept['layer']}, fixed rising schedule {schedule}, ...: which patches layers "
                      f"≥ {kept['layer']} still see")


def run(argv=None) -> int:
    p = ArgumentParser(prog="python -m dyrate_ref.tools.figures", description=summary(__doc__))
    p.add_argument("--out", required=True, metavar="DIR", help="an existing folder (docs/ for the shipped figures)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is not a folder; give an existing folder (docs)")
    from ..files import check_outputs, checkpoint_inputs
    from .data import write_json
    from ..plots import require_matplotlib
    names = [f"{name}.{ext}" for name in ("attention_mass", "kept_patches") for ext in ("json", "png")]
    check_outputs([("--out", os.path.join(args.out, name)) for name in names],  # never over a file the run reads
                  checkpoint_inputs(DEFAULT_WEIGHTS) + [("the example picture", os.path.join(DEFAULT_WEIGHTS, "examples"))])
    require_matplotlib()
    for name, data in figure_data().items():
        write_json(os.path.join(args.out, f"{name}.json"), data)
    draw(args.out)
    print(f"wrote attention_mass and kept_patches (.json, .png) in {args.out}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
