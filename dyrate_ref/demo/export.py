"""Write held-out scenes as an evaluation file of the format tools/evaluate.py --data reads, so that the
path researchers use on real data (captions scored by CIDEr-D, answers by exact match) runs on the demo
model too:

  python -m dyrate_ref.demo.export --out DIR [--scenes N]
  python -m dyrate_ref.tools.evaluate --data DIR/data.jsonl --results DIR/results.jsonl

DIR (new) gets data.jsonl and images/: per scene one PNG, one line per question ("answer": the ground
truth) and one description line ("references": the ground-truth description). The scenes are those of
the evaluation's scene world (eval_set), in the same order.
"""

from __future__ import annotations

import json
import os

from ..commands import ArgumentParser, Progress, UserError, command_main, parse_first, summary


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m dyrate_ref.demo.export", description=summary(__doc__))
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder: DIR/data.jsonl and DIR/images/")
    p.add_argument("--scenes", type=int, default=300, help="held-out scenes (default 300, as the evaluation)")
    return p


parse_first(build_parser, __name__)  # run as a command: --help and flag errors answer before torch loads

from .folders import check_new_folder, write_atomic_dir
from .scenes import eval_set

def export(out: str, n_scenes: int):
    items = eval_set(n_scenes)

    def write(tmp):
        os.mkdir(os.path.join(tmp, "images"))
        lines, drawn = [], set()
        bar = Progress(len(items), "exporting", " prompts")
        for it in items:
            image = f"images/scene{it.scene.seed}.png"
            if image not in drawn:
                it.scene.draw().save(os.path.join(tmp, image))
                drawn.add(image)
            line = {"id": f"scene{it.scene.seed}:{it.kind}", "image": image, "prompt": it.question}
            line.update({"references": [it.answer]} if it.kind == "describe" else {"answer": it.answer})
            lines.append(json.dumps(line))
            bar.update(1)
        bar.close()
        with open(os.path.join(tmp, "data.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    write_atomic_dir(out, write)


def run(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.scenes < 1:
        raise UserError(f"--scenes {args.scenes}: give a positive number of scenes")
    check_new_folder(args.out, "--out")
    export(args.out, args.scenes)
    print(f"wrote {os.path.join(args.out, 'data.jsonl')}")
    return 0


def main(argv=None):
    command_main(run, argv)


if __name__ == "__main__":
    main()
