"""Every command answers --help and a flag error before importing torch (commands.parse_first), and the
flag values written out for that (choices, the spec form) are the registries' own."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["dyrate_ref", "dyrate_ref.tools.trace", "dyrate_ref.tools.evaluate", "dyrate_ref.tools.premise",
            "dyrate_ref.tools.bench", "dyrate_ref.tools.calibrate_vtw", "dyrate_ref.tools.train_predictor",
            "dyrate_ref.tools.figures", "dyrate_ref.tools.attention_location", "dyrate_ref.demo.train",
            "dyrate_ref.demo.export"]


def imported(args) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run a command under -X importtime; -> (the run, the top-level names of every module it imported)."""
    r = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    names = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", r.stderr, re.M)}
    return r, names


@pytest.mark.parametrize("command", COMMANDS)
def test_help_and_a_flag_error_come_before_torch(command):
    r, names = imported(["-m", command, "--help"])
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-500:]
    assert "dyrate_ref" in names and "torch" not in names, sorted(names)
    r, names = imported(["-m", command, "--no-such-flag"])
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), errors
    assert "torch" not in names


def test_generate_py_help_too():
    r, names = imported(["generate.py", "--help"])
    assert r.returncode == 0 and "--schedule" in r.stdout and "torch" not in names


def test_the_import_check_sees_torch_where_it_is_imported():
    """The check above can fail: a run that needs the model imports torch, and the parse shows it."""
    _, names = imported(["-c", "import dyrate_ref.model"])
    assert "torch" in names


def test_the_written_out_choices_are_the_registries():
    from dyrate_ref.demo import recipes, train
    from dyrate_ref.commands import SPEC_FORM
    from dyrate_ref.tools import baselines, bench
    from dyrate_ref.tools import trace
    choices = lambda parser, flag: tuple(parser._option_string_actions[flag].choices)  # noqa: E731
    assert choices(train.build_parser(), "--recipe") == tuple(sorted(recipes.RECIPES))
    assert train.build_parser().get_default("recipe") == recipes.SHIPPED
    assert choices(bench.build_parser(), "--shape") == tuple(sorted(bench.SHAPES))
    compare = trace.build_parser()._subparsers._group_actions[0].choices["compare"]
    assert choices(compare, "--dtype") == tuple(sorted(trace.LIMITS)) and compare.description
    named = re.search(r"NAME a method or baseline \(([^)]*)\)", SPEC_FORM).group(1).split(", ")
    assert named == list(baselines.REGISTRY)
