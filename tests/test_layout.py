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


# What pruning.py, the file a reader opens to learn the method, must not hold: the settings machinery
# (declaring, parsing, resolving, describing settings; the registry helpers) lives in settings.py.
SETTINGS_MACHINERY = ("setting", "parse_int", "parse_fraction", "parse_rates", "parse_score", "Context", "Origin",
                      "given_label", "checked", "resolve", "describe", "metadata", "parse_settings", "method_class",
                      "setting_fields", "input_file_settings", "setting_text", "check_layer", "check_layers",
                      "layer_in_range", "PER_ITEM", "build", "spec_layers")


def defined_names(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return names | {n.name for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Method"
                    for n in c.body if isinstance(n, ast.FunctionDef)}


def test_pruning_holds_the_methods_not_the_settings_machinery():
    assert not defined_names(MODULES["dyrate_ref.pruning"]) & set(SETTINGS_MACHINERY)
    assert set(SETTINGS_MACHINERY) <= defined_names(MODULES["dyrate_ref.settings"])
    # the reader meets DyRate's decision within the first 200 lines
    lines = open(MODULES["dyrate_ref.pruning"]).read().splitlines()
    in_dyrate = False
    for number, line in enumerate(lines, 1):
        in_dyrate = in_dyrate or line.startswith("class DyRate(")
        if in_dyrate and line.strip().startswith("def choose("):
            break
    assert in_dyrate and number <= 200, number


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
    for m in COMMANDS:
        src = open(MODULES[m]).read()
        assert "command_main(" in src, f"{m}.main does not use errors.command_main"
        assert "sys.exit(" not in src and "except UserError" not in src, m


@pytest.mark.parametrize("pattern, home, count", [
    (r"mkstemp|os\.replace\(", "files.py", 4),  # atomic writes (write_atomic, write_atomic_dir) and publish
    (r"class Progress\b", "progress.py", 1),
    (r"0\.48145466", "processing.py", 1),  # CLIP's normalisation constants
    (r"\"language_model\.\"", "loading.py", 2),  # the checkpoint key layout
    (r"\.exp\(\) \* \(lp - lq\)", "generation.py", 1),  # the KL between two next-token distributions
    (r"weights\", \"dyrate-shapes\"", "loading.py", 1),  # the default weights path
    (r"def visual_span|\.nonzero\(\)\[0\]\)", "pruning.py", 1),  # finding the image span
    (r"torch\.cuda\.is_available\(\)", "loading.py", 2),  # the --device rule (resolve_device)
    (r"add_argument\(\"--(?:weights|device|threads)\"", "flags.py", 3),  # the commands' shared flags
])
def test_shared_pieces_exist_once(pattern, home, count):
    """Each piece lives in one module, and there only as often as it is written once (a pattern found
    in its home twice where once is right means a second copy grew beside the first)."""
    found = {os.path.relpath(p, ROOT): len(re.findall(pattern, open(p).read())) for p in MODULES.values()}
    where = {rel: n for rel, n in found.items() if n}
    assert where == {home: count}, where


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
    """The loader loads weights: it imports nothing of pruning and says nothing of VTW or DyRate."""
    src = open(os.path.join(root, "loading.py")).read()
    bad = [f"imports {m}" for m in ("pruning", "predictor") if re.search(rf"from \.{m} import|import .*{m}", src)]
    return bad + [f"mentions {w}" for w in ("vtw", "VTW", "dyrate_predictor") if w in src]


HOMES = [  # (pattern, its one home, how often it is written there)
    (r"os\.access\(", "files.py", 2),  # the output-path checks (writable folders: a new file's, an existing one)
    (r"would overwrite", "files.py", 1),  # an output may not be one of the run's inputs
    (r"torch\.float16 if", "loading.py", 1),  # the dtype "auto" rule
    (r"\] = True", "pruning.py", 1),  # keep indices -> bool mask (keep_mask)
    (r"1 <= K <= num_layers - 1", "settings.py", 1),  # the range rule of a pruning layer (layer_in_range)
    (r"def kept_count", "pruning.py", 1),  # the one rounding rule of "how many to keep"
    (r"int\(round\(\(1 - \w+\) \* n\)\)|ceil\(round\(\(1 - |\* m \+ 0\.5", None, 0),  # ... and no other (the three old ones)
    (r"def top_k_sorted", "pruning.py", 1),
    (r"1 - [\w.]+\.numel\(\) / ", "generation.py", 1),  # the recorded rate, 1 - |keep| / N, computed once (step)
]


def misplaced(root: str) -> list[str]:
    bad = []
    sources = _sources(root)
    for pattern, home, count in HOMES:
        where = {rel: n for rel, src in sources.items() if (n := len(re.findall(pattern, src)))}
        if where != ({home: count} if home else {}):
            bad.append(f"{pattern}: {where}")
    return bad


RULES = {"name dispatch": name_dispatch, "loader knows methods": loader_knows_methods, "shared pieces": misplaced}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_method_rules_hold(rule):
    assert RULES[rule](ROOT) == []


PLANTED = {  # (file, text appended) -> the rule it must break
    "name dispatch": ("generation.py", "\n\ndef planted(method):\n    return method.name == 'fastv'\n"),
    "loader knows methods": ("loading.py", "\n\nfrom .pruning import VTW  # planted\n"),
    "shared pieces": ("cli.py", "\n\ndef planted(path):\n    return os.access(path, os.W_OK)\n"),
    "shared pieces, counted": ("pruning.py", "\n\ndef planted(keep, n):\n    return 1 - keep.numel() / n\n"),
    "shared pieces, twice at home": ("files.py", "\n\ndef planted(path):\n    return os.access(path, os.R_OK)\n"),
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


def test_every_mutant_still_applies():
    """The mutation check's edits must each match the source exactly once: a refactor that moves code
    (as the core redesign did) must move its mutants with it, or they would silently test nothing."""
    import mutants
    for m in mutants.MUTANTS:
        src = open(os.path.join(os.path.dirname(ROOT), m.path)).read()
        for old, _ in m.edits:
            assert src.count(old) == 1, (m.name, old)


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
