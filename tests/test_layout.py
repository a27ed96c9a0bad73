"""The package's architecture, read from the source with `ast`, so that it stays as the README draws it:

    core (dyrate_ref/*.py)      model <- loading, processing, cost <- generation <- cli; pruning <- predictor
    dyrate_ref/demo/            the scene world, its tokenizer and the training recipe
    dyrate_ref/tools/           evaluation, benchmarks, calibration, predictor training

Rules: model imports nothing of the package; pruning and its predictor never need the model; nothing
but `python -m dyrate_ref` imports the CLI; the core imports neither demo/ nor tools/; no command of
demo/ or tools/ imports another command; no import circle; every command exits through the one
UserError wrapper; shared pieces exist once.
"""

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dyrate_ref")


def modules() -> dict[str, str]:
    """dotted module name -> path, for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


MODULES = modules()


def package_imports(name: str) -> set[str]:
    """The package modules `name` imports, anywhere in the file (inside functions too)."""
    path = MODULES[name]
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found - {"dyrate_ref"} if name != "dyrate_ref" else found


GRAPH = {m: package_imports(m) for m in MODULES}
CORE = {m for m, p in MODULES.items() if os.path.dirname(p) == ROOT}
COMMANDS = {m for m, p in MODULES.items() if re.search(r"^def main\(", open(p).read(), re.M)}


def test_the_layout_is_what_the_docs_say():
    assert {"dyrate_ref.model", "dyrate_ref.loading", "dyrate_ref.processing", "dyrate_ref.pruning",
            "dyrate_ref.predictor", "dyrate_ref.generation", "dyrate_ref.trace", "dyrate_ref.cli"} <= CORE
    assert {"dyrate_ref.demo.scenes", "dyrate_ref.demo.train", "dyrate_ref.demo.recipes", "dyrate_ref.demo.batches",
            "dyrate_ref.demo.tower", "dyrate_ref.tools.evaluate",
            "dyrate_ref.tools.bench", "dyrate_ref.tools.calibrate_vtw", "dyrate_ref.tools.train_predictor"} <= set(MODULES)


def test_model_imports_nothing_of_the_package():
    assert GRAPH["dyrate_ref.model"] == set()


@pytest.mark.parametrize("name", ["dyrate_ref.pruning", "dyrate_ref.predictor"])
def test_pruning_never_needs_the_model(name):
    reach = reachable(name)
    assert not reach & {"dyrate_ref.model", "dyrate_ref.loading", "dyrate_ref.generation", "dyrate_ref.cli"}, reach


def test_only_the_entry_point_imports_the_cli():
    users = {m for m, deps in GRAPH.items() if "dyrate_ref.cli" in deps}
    assert users <= {"dyrate_ref.__main__"}, users


def test_the_tools_reach_the_demo_world_through_one_door():
    """Of the tools, only tools/data.py imports dyrate_ref.demo: every other tool knows the scene world
    through it, so that a tool runs on a user's data without knowing scenes exist."""
    users = {m for m in MODULES if m.startswith("dyrate_ref.tools")
             and any(d.startswith("dyrate_ref.demo") for d in GRAPH[m])}
    assert users == {"dyrate_ref.tools.data"}, users
    # ... and that module through one function, called in one place
    tree = ast.parse(open(MODULES["dyrate_ref.tools.data"]).read())
    names = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and "demo" in (n.module or "")
             for a in n.names}
    assert names == {("demo.world", "scene_world")}, names
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "scene_world"]
    assert len(calls) == 1, len(calls)
    # the scene world's insides (a scene's shapes, its drawing) stay behind the door
    for m, path in MODULES.items():
        if m.startswith("dyrate_ref.tools"):
            assert not re.search(r"\.shapes\b|\.draw\(\)", open(path).read()), m


# pruning.py is the file a reader opens to learn the methods: their rules, nothing else. Making a method
# from flags (parsers, defaults read from files, origins) is settings.py; naming it in a table, the tools'.
NOT_RULES = {"parse_int", "parse_fraction", "parse_schedule", "parse_score", "PARSE", "Context", "Origin",
             "given_label", "parse_settings", "make_method", "describe", "metadata", "check_layer", "layer_in_range",
             "vtw_calibrated_layer", "VTW_CALIBRATION", "label", "family", "defaults"}


def defined_names(path: str) -> set[str]:
    """Top-level functions, classes and assignments of a file, and the methods of its classes."""
    tree = ast.parse(open(path).read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return names | {n.name for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body
                    if isinstance(n, ast.FunctionDef)}


def imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    return ({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            | {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)})


def test_pruning_holds_the_rules_only():
    assert not defined_names(MODULES["dyrate_ref.pruning"]) & NOT_RULES
    # no files read, no settings machinery: what a rule needs is torch and the predictor it calls
    assert imported_modules(MODULES["dyrate_ref.pruning"]) <= {"__future__", "math", "dataclasses", "typing", "torch",
                                                              ".predictor"}


def test_no_two_modules_define_the_same_public_name():
    """One word, one thing: a public function or class is defined in one module of the package (each
    command's own `main`, `run` and `build_parser` aside)."""
    homes: dict[str, list[str]] = {}
    for m, path in MODULES.items():
        for n in ast.parse(open(path).read()).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_"):
                homes.setdefault(n.name, []).append(m)
    twice = {name: ms for name, ms in homes.items() if len(ms) > 1 and name not in ("main", "run", "build_parser")}
    assert not twice, twice


def test_the_core_imports_neither_demo_nor_tools():
    for m in CORE:
        bad = {d for d in GRAPH[m] if d.startswith(("dyrate_ref.demo", "dyrate_ref.tools"))}
        assert not bad, (m, bad)


def test_no_command_of_demo_or_tools_imports_another():
    tools = {m for m in COMMANDS if m.startswith(("dyrate_ref.demo", "dyrate_ref.tools"))}
    assert len(tools) >= 5
    for m in tools | CORE:
        assert not GRAPH[m] & (tools - {m}), (m, GRAPH[m] & tools)


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in GRAPH[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_import_circle():
    for m in MODULES:
        assert m not in reachable(m), f"{m} imports itself through a circle"


def test_every_command_exits_through_the_one_wrapper():
    """commands.exits(), directly (generate.py, cli.main) or through commands.command_main (each tool)."""
    for m in COMMANDS:
        src = open(MODULES[m]).read()
        assert "command_main(" in src or "with exits():" in src, f"{m}.main does not use commands.exits"
        assert "sys.exit(" not in src and "except UserError" not in src, m
    script = open(os.path.join(os.path.dirname(ROOT), "generate.py")).read()
    assert "with exits():" in script and "sys.exit(" not in script


# ----------------------------------------------------------------------------------------------------
# A method is a value (pruning.py): rules read from the source of any package root, so that each can be
# shown to fail on a copy with a planted violation.

from dyrate_ref.pruning import METHODS  # noqa: E402
from dyrate_ref.tools.baselines import BASELINES  # noqa: E402

METHOD_NAMES = set(METHODS) | set(BASELINES)  # from the registry: a new method's name is covered at once
REGISTRY_FILES = {"pruning.py", os.path.join("tools", "baselines.py")}


def _sources(root: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[os.path.relpath(path, root)] = open(path).read()
    return out


def name_dispatch(root: str) -> list[str]:
    """Places outside the registry that compare something with a method's name ("fastv", ...)."""
    bad = []
    for rel, src in _sources(root).items():
        if rel in REGISTRY_FILES:
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Compare):
                consts = [n for n in [node.left, *node.comparators] for n in ast.walk(n)
                          if isinstance(n, ast.Constant) and n.value in METHOD_NAMES]
                if consts:
                    bad.append(f"{rel}:{node.lineno}")
    return bad


def loader_knows_methods(root: str) -> list[str]:
    """The loader reads files (a checkpoint, a predictor's file): it knows no method, so it imports nothing
    of pruning."""
    return [m for m in imported_modules(os.path.join(root, "loading.py")) if m == ".pruning"]


# Calls and constants that have one home: (what, its home file). Found with ast, so a comment or a
# docstring that mentions them is no second copy.
HOMES = [
    ("os.access", "files.py"),  # the output-path checks
    ("tempfile.mkstemp", "files.py"),  # atomic writes
    ("os.replace", "files.py"),
    ("torch.cuda.is_available", "loading.py"),  # the --device rule (resolve_device)
    (0.48145466, "processing.py"),  # CLIP's normalisation constants
]


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else ""


def misplaced(root: str) -> list[str]:
    """A shared call or constant found outside its home, or a public name defined in two files."""
    bad, defined = [], {}
    for rel, src in _sources(root).items():
        tree = ast.parse(src)
        for node in ast.walk(tree):
            what = (_dotted(node.func) if isinstance(node, ast.Call) else
                    node.value if isinstance(node, ast.Constant) and isinstance(node.value, float) else None)
            for thing, home in HOMES:
                if what == thing and rel != home:
                    bad.append(f"{thing} in {rel}")
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_") and n.name not in ("main", "run", "build_parser"):
                if n.name in defined:
                    bad.append(f"{n.name} defined in {defined[n.name]} and {rel}")
                defined[n.name] = rel
    return bad


RULES = {"name dispatch": name_dispatch, "loader knows methods": loader_knows_methods, "shared pieces": misplaced}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_method_rules_hold(rule):
    assert RULES[rule](ROOT) == []


PLANTED = {  # (file, text appended) -> the rule it must break
    "name dispatch": ("generation.py", "\n\ndef planted(method):\n    return method.name == 'fastv'\n"),
    "loader knows methods": ("loading.py", "\n\nfrom .pruning import VTW  # planted\n"),
    "shared pieces": ("cli.py", "\n\ndef planted(path):\n    return os.access(path, os.W_OK)\n"),
    "shared pieces, a second definition": ("generation.py", "\n\ndef kept_count(n, rate):\n    return n\n"),
    "shared pieces, a constant": ("plots.py", "\n\nMEAN = (0.48145466, 0.4578275, 0.40821073)\n"),
}


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_method_rules_fail_on_a_planted_violation(rule, tmp_path):
    import shutil
    copy = tmp_path / "dyrate_ref"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    rel, text = PLANTED[rule]
    with open(copy / rel, "a") as f:
        f.write(text)
    assert RULES[rule.split(",")[0]](str(copy)) != []


def test_every_mutant_still_applies(tmp_path):
    """Every mutant names the function it edits, and its edits match there exactly once: a refactor that
    moves the function moves none of them, and one that rewrites it is told which mutants to re-derive."""
    import shutil

    import mutants
    shutil.copytree(ROOT, tmp_path / "dyrate_ref", ignore=shutil.ignore_patterns("__pycache__"))
    for m in mutants.MUTANTS:
        assert m.where, m.name
        path, _, _ = mutants.locate(m, str(tmp_path))
        original = open(path).read()
        mutants.apply(m, str(tmp_path))  # SystemExit names the mutant when an edit does not match once
        assert open(path).read() != original, m.name
        open(path, "w").write(original)


def test_the_suite_runs_one_thread_per_process_subprocesses_included():
    """conftest.py sets one thread for the test process and, through the environment, for every
    subprocess a test starts (generate.py, the tools): torch's default fought itself on 2 busy cores."""
    import subprocess
    import sys

    import torch
    assert torch.get_num_threads() == 1
    r = subprocess.run([sys.executable, "-c", "import os, torch; print(os.environ['OMP_NUM_THREADS'], "
                        "torch.get_num_threads())"], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "1"], r.stdout + r.stderr
