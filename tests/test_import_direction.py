"""The arrows point one way (DESIGN.md §4): pipelines/ and serve/ -> fourdthinker/actors/ -> the library;
inside the library data -> model -> training math, with vllm_plugin/ beside them. Every import of
every module is read with `ast` (function-level imports too), so an upward one fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "fourdthinker"
# The training math and the data layer never depend on the inference engine's plugin.
MATH = ("fourdthinker.losses", "fourdthinker.grpo", "fourdthinker.rewards", "fourdthinker.model",
        "fourdthinker.mrope", "fourdthinker.tokens", "fourdthinker.generation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): _imports(p) for p in sorted(LIBRARY.rglob("*.py"))}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(source_ok, target_bad) -> list[str]:
    return sorted(f"{mod} imports {imp}" for mod, imps in MODULES.items() if source_ok(mod)
                  for imp in imps if target_bad(imp))


def test_the_walk_sees_every_module_and_its_imports():
    assert "fourdthinker.vllm_plugin.generate" in MODULES
    assert "fourdthinker.generation" in MODULES["fourdthinker.vllm_plugin.generate"]


@pytest.mark.parametrize("rule, source, target", [
    ("the library never imports its Ray actors",
     lambda m: not _within(m, "fourdthinker.actors"), lambda i: _within(i, "fourdthinker.actors")),
    ("the library never imports a pipeline or the Serve app",
     lambda m: True, lambda i: i.split(".")[0] in ("pipelines", "serve")),
    ("data/ never imports preprocess/",
     lambda m: _within(m, "fourdthinker.data"), lambda i: _within(i, "fourdthinker.preprocess")),
    ("the training math and the data layer never import the vLLM plugin",
     lambda m: m in MATH or _within(m, "fourdthinker.data"), lambda i: _within(i, "fourdthinker.vllm_plugin")),
])
def test_no_import_points_upward(rule, source, target):
    assert _violations(source, target) == [], rule
