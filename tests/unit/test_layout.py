"""The house rules that a reader relies on, checked on the source itself: the subpackages are layers and a module
imports only its own layer or lower ones; no private name crosses a module boundary; no source file over 600 lines;
and every ``ktransfer.…`` dotted name that README.md, bench/README.md and docs/ mention exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "src" / "ktransfer"

# Lowest first. A module may import from its own layer or any lower one; the root package (``ktransfer``: the public
# API and ``__version__``) is importable from anywhere and itself imports only the losses.
LAYERS = {
    "losses": 0, "data": 0, "runtime": 0,
    "models": 1,
    "evaluation": 2,
    "training": 3,
    "experiments": 4, "integrations": 4,
    "cli": 5,
}
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _dotted(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(dotted: str) -> int | None:
    parts = dotted.split(".")
    if dotted == "ktransfer.__main__":  # ``python -m ktransfer``: the CLI's entry point
        return LAYERS["cli"]
    if len(parts) < 2:
        return None  # the root package
    return LAYERS.get(parts[1])


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported ktransfer module, names taken from it) for every import in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        ours = isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ktransfer"
        if ours:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "ktransfer"]
    return found


def test_every_module_sits_in_a_layer():
    loose = [_dotted(p) for p in _modules() if p.parent != SRC and _layer(_dotted(p)) is None]
    assert not loose, f"modules outside the layer table: {loose}"
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], f"top-level modules beside the subpackages: {top}"


def test_imports_go_down_the_layers():
    wrong = []
    for path in _modules():
        me = _dotted(path)
        mine = _layer(me)
        for line, module, names in _imports(path):
            targets = [module] if names == [] else [f"{module}.{n}" if module.count(".") == 0 else module
                                                     for n in names]
            for target in targets:
                theirs = _layer(target)
                if mine is None:  # the root package: the public API of the lowest layer only
                    ok = theirs == 0
                else:
                    ok = theirs is None or theirs <= mine
                if not ok:
                    wrong.append(f"{path.relative_to(REPO_ROOT)}:{line}: {me} (layer {mine}) imports {target} "
                                 f"(layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_modules():
    wrong = [f"{p.relative_to(REPO_ROOT)}:{line}: from {module} import {n}"
             for p in _modules() for line, module, names in _imports(p) for n in names
             if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "\n".join(wrong)


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(REPO_ROOT)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def _doc_files() -> list[Path]:
    return [REPO_ROOT / "README.md", REPO_ROOT / "bench" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _dotted_names(text: str) -> set[str]:
    return {m.rstrip(".") for m in re.findall(r"(?<![\w/.-])ktransfer(?:\.[A-Za-z_]\w*)+", text)}


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_dotted_names_in_docs_exist(doc):
    names = _dotted_names(doc.read_text(encoding="utf-8"))
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{doc.relative_to(REPO_ROOT)} names what does not exist: {missing}"


def test_the_name_check_can_fail():
    """The resolver itself: a real module, a real attribute, and two names that do not exist."""
    assert _resolves("ktransfer.losses.divergences.divergence") and _resolves("ktransfer.hf_loss")
    assert not _resolves("ktransfer.shift_causal") and not _resolves("ktransfer.losses.nothing_here")
    assert _dotted_names("see ``ktransfer.losses.native``: and ktransfer.train.") == {"ktransfer.losses.native",
                                                                                      "ktransfer.train"}
