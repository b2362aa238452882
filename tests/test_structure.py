"""The house rules of DESIGN.md, checked on the source so no change quietly undoes them:
arrows point down (front -> pipelines -> libraries -> core), no circle, no pipeline imports
another, only telemetry and runtime among the core import Ray, no function is longer than a
screen and a half, an actor's light module stays light, a job's driver reads its model without
torch, and ARCHITECTURE.md names every module on its floor."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raythyroid"
FRONT = {"cli", "demo", "jobspec", "weekly"}
PIPELINES = {"preprocess", "train", "cv", "infer", "distill", "compare"}
# what several pipelines share and that needs Ray (train, cv and distill all train with it)
LIBRARIES = {"training"}
# none: what two pipelines would share lives in a library or in the core
ALLOWED_BETWEEN_PIPELINES: set[tuple[str, str]] = set()
CORE_WITH_RAY = {"telemetry", "runtime"}
MAX_FUNCTION_LINES = 80
# a module whose class runs as an actor once per job: its new process imports it whole
LIGHT = {"review_bar"}
DECLARATIVE = {("cli", "build_parser")}  # one argument after another: long, not complex


def modules() -> dict[str, ast.Module]:
    """Every module by its dotted name below raythyroid: `imaging`, a subpackage `dicom` (its
    `__init__`) and its modules `dicom.read`, ...; a module's room is its first name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            found[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return found


def package_of(name: str) -> tuple[str, ...]:
    """Where a module's relative imports start: a subpackage's `__init__` is in its own."""
    parts = tuple(name.split("."))
    return parts if PACKAGE.joinpath(*parts).is_dir() else parts[:-1]


def package_imports(tree: ast.Module, package: tuple[str, ...] = ()) -> set[str]:
    """Rooms (first names) of the raythyroid modules a module imports, at its top or inside
    functions; `package` is where the module lies: () in raythyroid, ("dicom",) in dicom/."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = [*package[:len(package) + 1 - node.level], *(node.module or "").split(".")]
            elif node.module and node.module.split(".")[0] == "raythyroid":
                parts = node.module.split(".")[1:]
            else:
                continue
            parts = [part for part in parts if part]
            found.update([parts[0]] if parts else [a.name for a in node.names])
    return found


def imports_ray(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray"
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "ray":
            return True
    return False


def test_arrows_point_down_and_pipelines_stand_side_by_side():
    trees = modules()
    assert PIPELINES <= set(trees) and FRONT <= set(trees)
    broken = []
    for name, tree in trees.items():
        room = name.split(".")[0]
        for target in package_imports(tree, package_of(name)):
            if target not in trees:
                continue
            if room in PIPELINES and target in PIPELINES and target != room and \
                    (room, target) not in ALLOWED_BETWEEN_PIPELINES:
                broken.append(f"pipeline {name} imports pipeline {target}")
            if room in PIPELINES and target in FRONT:
                broken.append(f"pipeline {name} imports the front's {target}")
            if room in LIBRARIES and target in PIPELINES | FRONT:
                broken.append(f"library {name} imports {target}")
            if room not in PIPELINES | FRONT | LIBRARIES and \
                    target in PIPELINES | FRONT | LIBRARIES:
                broken.append(f"core {name} imports {target}")
        if room not in PIPELINES | FRONT | LIBRARIES | CORE_WITH_RAY and imports_ray(tree):
            broken.append(f"core {name} imports ray")
    assert broken == []


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every circle of rooms in an import graph, each as its sorted rooms."""
    found = set()

    def walk(path: list[str]) -> None:
        for target in graph.get(path[-1], ()):
            if target in path:
                found.add(tuple(sorted(path[path.index(target):])))
            else:
                walk(path + [target])

    for room in graph:
        walk([room])
    return found


def test_no_circle_among_the_rooms():
    """Within a floor too, arrows never lead back: no room imports, at its top or inside a
    function, a room that imports it, directly or round a circle."""
    trees = modules()
    rooms = {name.split(".")[0] for name in trees}
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        room = name.split(".")[0]
        graph.setdefault(room, set()).update(
            target for target in package_imports(tree, package_of(name))
            if target in rooms and target != room)
    assert circles(graph) == set()


def test_no_function_longer_than_the_rule():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (name, node.name) not in DECLARATIVE:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def third_party_imports(tree: ast.Module) -> set[str]:
    """Top names of what a module imports from outside the standard library and itself."""
    import sys

    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names}
    names |= {node.module for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    return {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"__future__"}


def test_light_modules_import_only_the_standard_library():
    trees = modules()
    heavy = {name: third_party_imports(trees[name]) | package_imports(trees[name])
             for name in LIGHT}
    assert heavy == {name: set() for name in LIGHT}


HEAVY = ("torch", "ray", "pydicom")  # what reading a model folder never needs


def test_a_job_driver_reads_its_model_without_torch():
    """infer's driver only reads which model runs (its Predictors load it): torch, a second and
    a half of imports, stays out of it, and out of the CLI's `models`; so does pydicom (a
    quarter second), which only reading a DICOM file needs."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from raythyroid import cli, infer, modelinfo\n"
             "import hashlib, os\n"
             "folder = modelinfo.resolve('ddti')\n"
             "info = modelinfo.read_info(folder, fast=True)\n"
             "shipped = open(os.path.join(folder, 'fast.pt'), 'rb').read()\n"
             "assert info.weights_sha256 == hashlib.sha256(shipped).hexdigest(), info\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]"]
    # and a whole command that reads model folders: Python lists every import it made
    listed = subprocess.run([sys.executable, "-X", "importtime", "-m", "raythyroid.cli",
                             "models"], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert listed.returncode == 0 and listed.stdout.startswith("ddti: "), listed.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in listed.stderr.splitlines()}
    assert "raythyroid.modelinfo" in imported and not set(HEAVY) & imported


def test_the_rules_catch_what_they_forbid():
    """The checks themselves: a pipeline importing another, and a core module importing Ray,
    are found."""
    pipeline = ast.parse("from . import train\nfrom .storage import join\n")
    assert package_imports(pipeline) == {"train", "storage"}
    inner = ast.parse("from . import codecs\nfrom ..pixels import x\nfrom ..train import y\n")
    assert package_imports(inner, ("dicom",)) == {"dicom", "pixels", "train"}
    assert imports_ray(ast.parse("def f():\n    import ray.data\n"))
    assert not imports_ray(ast.parse("from . import runtime\n"))
    assert third_party_imports(ast.parse("import os\nfrom pyarrow import Table\n")) == {"pyarrow"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


def floors_in_architecture_page() -> dict[str, set[str]]:
    """The modules ARCHITECTURE.md names on each floor: single (or dotted) words (digits after
    the first letter: `int8`) in backticks that open a bullet or a list item, not the names a
    sentence mentions in passing."""
    import re

    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    parts = re.split(r"\*\*(Front|Pipelines|Libraries|Core)\*\*|What flows between rooms", text)
    # re.split keeps each captured floor name before its section; the last section ends the page
    sections = dict(zip(parts[1::2], parts[2::2]))
    return {floor: set(re.findall(r"(?:^\s*|- |, |: |\()`([a-z][a-z0-9_.]*)`", section, re.M))
            for floor, section in sections.items() if floor}


def test_the_architecture_page_names_every_module_on_its_floor():
    floors = floors_in_architecture_page()
    modules_here = set(modules())
    assert floors["Front"] == FRONT
    assert floors["Pipelines"] == PIPELINES
    libraries = {name for name in modules_here if name.split(".")[0] in LIBRARIES}
    assert floors["Libraries"] == libraries
    assert floors["Core"] == modules_here - FRONT - PIPELINES - libraries
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    named_exceptions = {tuple(pair.split(" -> ")) for pair in
                        __import__("re").findall(r"`([a-z_]+ -> [a-z_]+)`", text)}
    assert named_exceptions == ALLOWED_BETWEEN_PIPELINES
