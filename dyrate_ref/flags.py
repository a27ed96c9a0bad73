"""The flags several commands share, declared and checked in one place: the checkpoint (--weights), the
device and dtype, and torch's CPU threads. Each command's own flags stay in the command."""

from __future__ import annotations

import os

from .errors import UserError

# The embedded demo model, the default of every command that reads weights (torch-free, so that --help
# and flag errors answer before torch loads).
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "dyrate-shapes")

# A tool's method spec (evaluate --extra): the registry's names (tools/baselines.REGISTRY; a test checks them).
SPEC_FORM = ("NAME[:setting=value...], NAME a method or baseline (none, fastv, vtw, dyrate, dyrate-schedule, mass, "
             "random), the settings its own, as generate.py's flags (e.g. fastv:layer=1:rate=0.75, "
             "dyrate-schedule:schedule=0.5,0.9, dyrate:predictor=FILE:confidence=0.6, random:layer=1:rate=0.75, "
             "mass:mass=0.8)")
DTYPE_HELP = "auto (float32 on the CPU, float16 on CUDA), float32, float16 or bfloat16"


def add_weights(p, default: str | None = None, required: bool = False, help: str = "llava-hf checkpoint directory"):
    p.add_argument("--weights", default=default, required=required, help=help)


def add_device(p, default: str = "cpu", help: str = "cpu (default) or cuda"):
    p.add_argument("--device", default=default, help=help)


def add_dtype(p, help: str = DTYPE_HELP):
    p.add_argument("--dtype", default="auto", help=help)


def add_threads(p, help: str = "torch CPU threads (default: torch's choice, one per core; on a busy machine 1 is faster)"):
    p.add_argument("--threads", type=int, default=None, help=help)


def apply_threads(threads: int | None):
    """--threads: checked against this machine's cores, then given to torch (None: torch's choice)."""
    if threads is None:
        return
    import torch
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise UserError(f"--threads {threads} must lie in 1..{cores} (this machine's cores)")
    torch.set_num_threads(threads)
