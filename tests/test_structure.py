"""The house rules of DESIGN.md, checked on the source so no change quietly undoes them:
arrows point down (front -> pipelines -> core), no pipeline imports another, only telemetry and
runtime among the core import Ray, no function is longer than a screen and a half, and
ARCHITECTURE.md names every module on its floor."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raythyroid"
FRONT = {"cli", "demo", "jobspec"}
PIPELINES = {"preprocess", "train", "cv", "infer", "distill"}
# cv runs train's folds; distill trains its student with train's loop
ALLOWED_BETWEEN_PIPELINES = {("cv", "train"), ("distill", "train")}
CORE_WITH_RAY = {"telemetry", "runtime"}
MAX_FUNCTION_LINES = 80
DECLARATIVE = {("cli", "build_parser")}  # one argument after another: long, not complex


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def package_imports(tree: ast.Module) -> set[str]:
    """Names of raythyroid modules a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "raythyroid":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
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
        for target in package_imports(tree):
            if target not in trees:
                continue
            if name in PIPELINES and target in PIPELINES and target != name and \
                    (name, target) not in ALLOWED_BETWEEN_PIPELINES:
                broken.append(f"pipeline {name} imports pipeline {target}")
            if name in PIPELINES and target in FRONT:
                broken.append(f"pipeline {name} imports the front's {target}")
            if name not in PIPELINES | FRONT and target in PIPELINES | FRONT:
                broken.append(f"core {name} imports {target}")
        if name not in PIPELINES | FRONT | CORE_WITH_RAY and imports_ray(tree):
            broken.append(f"core {name} imports ray")
    assert broken == []


def test_no_function_longer_than_the_rule():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (name, node.name) not in DECLARATIVE:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_rules_catch_what_they_forbid():
    """The checks themselves: a pipeline importing another, and a core module importing Ray,
    are found."""
    pipeline = ast.parse("from . import train\nfrom .storage import join\n")
    assert package_imports(pipeline) == {"train", "storage"}
    assert imports_ray(ast.parse("def f():\n    import ray.data\n"))
    assert not imports_ray(ast.parse("from . import runtime\n"))


def floors_in_architecture_page() -> dict[str, set[str]]:
    """The modules ARCHITECTURE.md names on each floor: single words in backticks that open a
    bullet or a list item, not the names a sentence mentions in passing."""
    import re

    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    parts = re.split(r"\*\*(Front|Pipelines|Core)\*\*|What flows between rooms", text)
    # re.split keeps each captured floor name before its section; the last section ends the page
    sections = dict(zip(parts[1::2], parts[2::2]))
    return {floor: set(re.findall(r"(?:^\s*|- |, |: |\()`([a-z_]+)`", section, re.M))
            for floor, section in sections.items() if floor}


def test_the_architecture_page_names_every_module_on_its_floor():
    floors = floors_in_architecture_page()
    modules_here = set(modules())
    assert floors["Front"] == FRONT
    assert floors["Pipelines"] == PIPELINES
    assert floors["Core"] == modules_here - FRONT - PIPELINES
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    named_exceptions = {tuple(pair.split(" -> ")) for pair in
                        __import__("re").findall(r"`([a-z_]+ -> [a-z_]+)`", text)}
    assert named_exceptions == ALLOWED_BETWEEN_PIPELINES
