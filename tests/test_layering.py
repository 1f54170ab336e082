"""Packages layer one way: kernels < models / losses / flow / data < engine < eval < stages < cli. No module imports
(at module level or inside a function) from a package that stands above its own. Top-level modules (config,
weights, io, registry, ...) are shared ground; ``pae_fast.kernels`` is the kernels package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pae_fast"
RANK = {"kernels": 0, "models": 1, "losses": 1, "flow": 1, "data": 1, "engine": 2, "eval": 3, "stages": 4, "cli": 5}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pae_fast" and parts[1] in RANK else None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "pae_fast"]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_no_module_imports_from_a_package_above_it():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        own = _package(".".join(rel.parts))
        if own is None:
            continue
        for line, module in _imports(path):
            other = _package(module)
            if other is not None and RANK[other] > RANK[own]:
                bad.append(f"{rel}.py:{line} ({own}) imports {module} ({other})")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule above is not vacuous: a losses module importing eval is reported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pae_fast.eval.recon import psnr\n")
    assert [m for _, m in _imports(f)] == ["pae_fast.eval.recon"]
    assert RANK[_package("pae_fast.eval.recon")] > RANK[_package("pae_fast.losses.recon")]
